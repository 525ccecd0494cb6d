//! `memory`: the machine's memory bandwidth at this thread count (a read sum and a STREAM-like
//! copy over buffers beyond the caches) and the weight bytes one decode step of `--model`
//! reads, for the share of bandwidth a decode rate reaches.

use crate::harness::{time_runs, Bench};
use anyhow::Result;
use serde_json::json;

/// `memory`: read and copy bandwidth over buffers far beyond the caches, split into contiguous
/// ranges over this run's thread count (as our kernels split a matmul), and the weight bytes
/// per decode step of the model.
pub(crate) fn run(b: &Bench) -> Result<()> {
    // Smoke: 16 MiB, which the caches may hold; it proves the part runs, not the bandwidth.
    let bytes: usize = if b.o.smoke { 16 << 20 } else { 512 << 20 };
    let threads = b.threads.max(1);
    let src: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let mut dst = vec![0u64; bytes / 8];
    let chunk = src.len().div_ceil(threads);
    let read = time_runs(b, || {
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = src
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(total);
        Ok(())
    })?;
    let copy = time_runs(b, || {
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        std::hint::black_box(&dst);
        Ok(())
    })?;
    let gbs =
        |t: &[f64], bytes: usize| t.iter().map(|s| bytes as f64 / s / 1e9).collect::<Vec<_>>();
    b.emit(
        "machine",
        "memory",
        "-",
        "read",
        "GB/s",
        &gbs(&read, bytes),
        json!({}),
    );
    // STREAM counts a copy's bytes read and written.
    b.emit(
        "machine",
        "memory",
        "-",
        "copy",
        "GB/s",
        &gbs(&copy, 2 * bytes),
        json!({}),
    );
    if let Some(bytes) = decode_weight_bytes(&b.o.model)? {
        b.emit(
            "llm-pool",
            "memory",
            &b.model_name,
            "decode_weight_bytes",
            "MB",
            &[bytes as f64 / 1e6],
            json!({}),
        );
    }
    Ok(())
}

/// The bytes of weights one decode step reads from a GGUF file: every matrix, except that the
/// token embeddings are one looked-up row unless the output head is tied to them (then the
/// head reads the whole table). Norms and other vectors are counted too (they are small).
fn decode_weight_bytes(path: &std::path::Path) -> Result<Option<u64>> {
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Ok(None);
    }
    let file = llm_pool::models::gguf::GgufFile::open(path)?;
    let infos = &file.content.tensor_infos;
    let tied = !infos.contains_key("output.weight");
    let bytes = infos
        .iter()
        .filter(|(name, _)| tied || name.as_str() != "token_embd.weight")
        .map(|(_, info)| {
            let elems = info.shape.elem_count();
            (elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
        })
        .sum();
    Ok(Some(bytes))
}
