//! `raw`: candle-transformers' own quantized model for the file (`ModelWeights::from_gguf`,
//! `forward`, argmax), called directly: tg (single-token forwards from a 1-token prompt) and pp
//! (one prompt) tok/s, prefill time, peak RSS. The baseline the other layers are measured
//! against; `overhead` and `compare` reuse its [`RawModel`].

use crate::harness::{ms, prompt_ids, secs, Bench};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor, D};
use candle_transformers::models::quantized_gemma3 as qgemma3;
use candle_transformers::models::quantized_llama as qllama;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// A candle-transformers quantized model, called directly.
#[derive(Clone)]
pub(crate) enum RawModel {
    Llama(qllama::ModelWeights),
    Gemma3(qgemma3::ModelWeights),
}

impl RawModel {
    pub(crate) fn load(path: &Path) -> Result<RawModel> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(path))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        Ok(match arch.as_str() {
            "llama" => RawModel::Llama(qllama::ModelWeights::from_gguf(
                content,
                &mut file,
                &Device::Cpu,
            )?),
            "gemma3" => RawModel::Gemma3(qgemma3::ModelWeights::from_gguf(
                content,
                &mut file,
                &Device::Cpu,
            )?),
            other => bail!("raw candle baseline: unsupported GGUF architecture {other:?}"),
        })
    }

    /// One forward over `ids` at `pos`, then greedy argmax of the last position.
    pub(crate) fn step(&mut self, ids: &[u32], pos: usize) -> Result<u32> {
        let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let logits = match self {
            RawModel::Llama(m) => m.forward(&input, pos)?,
            RawModel::Gemma3(m) => m.forward(&input, pos)?,
        };
        Ok(logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?)
    }
}

pub(crate) fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let pristine = match RawModel::load(&b.o.model) {
        Ok(m) => m,
        Err(e) => return b.skip("candle", "raw", name, &format!("{e:#}")),
    };
    let ids = prompt_ids(b.pp.iter().copied().max().unwrap_or(1).max(1));
    let one = b.tg_prompt()?;
    // tg: b.tg single-token forwards from a 1-token prompt (a fresh KV cache each run).
    let mut tps = Vec::new();
    for run in 0..b.runs() {
        let mut m = pristine.clone();
        let t = Instant::now();
        let mut tok = m.step(&one, 0)?;
        for pos in 1..b.tg {
            tok = m.step(&[tok], pos)?;
        }
        let dt = t.elapsed();
        if run >= b.warmup {
            tps.push(b.tg as f64 / secs(dt));
        }
    }
    b.emit(
        "candle",
        "raw",
        name,
        &format!("tg{}", b.tg),
        "tok/s",
        &tps,
        json!({}),
    );
    for &n in &b.pp {
        let mut tps = Vec::new();
        let mut ttft = Vec::new();
        for run in 0..b.runs() {
            // A fresh KV cache each run already; a fresh prompt too, so that these are the
            // prompts the pool and llama-server get in the same order.
            let prompt = b.fresh_prompt(&ids[..n])?;
            let mut m = pristine.clone();
            let t = Instant::now();
            m.step(&prompt, 0)?;
            let dt = t.elapsed();
            if run >= b.warmup {
                tps.push(n as f64 / secs(dt));
                ttft.push(ms(dt));
            }
        }
        b.emit(
            "candle",
            "raw",
            name,
            &format!("pp{n}"),
            "tok/s",
            &tps,
            json!({}),
        );
        b.emit(
            "candle",
            "raw",
            name,
            &format!("ttft_pp{n}"),
            "ms",
            &ttft,
            json!({}),
        );
    }
    b.emit_rss("candle", "raw", name, llm_pool::resources::peak_rss_bytes());
    Ok(())
}
