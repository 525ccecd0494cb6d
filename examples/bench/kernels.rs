//! `kernels`: our quantized matmul kernels against candle's `QMatMul` on the same random
//! weights, per type (Q4_1, Q5_0, Q8_0) and dispatch level: GB/s of weights at m = 1 (a decode
//! step), GOP/s at m = 64 and 512 (prefill), and the ratio to candle.

use crate::harness::{time_runs, Bench, Stats};
use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use serde_json::json;

/// `kernels`: per type, a decode-sized weight (m = 1, bytes streamed from memory) and a
/// layer-sized one (m = 64, 512), each multiplied by candle's `QMatMul` and by our kernels at
/// every level this CPU has. Both sides include activation quantization and the output.
pub(crate) fn run(b: &Bench) -> Result<()> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    use llm_pool::kernels::{Level, QuantizedWeight};

    let types = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0];
    // (n, k, rows): 65536 x 1024 is 42-71 MB of blocks, beyond the caches, like a decode step's
    // weights (candle repacks Q8_0 when k % 256 == 0 and n % 16 == 0, as here); 65536 x 640 is
    // a quarter of Gemma 3's Q8_0 head (k = 640: no repack); 1536 x 576 is SmolLM2's MLP gate.
    let shapes: [(usize, usize, &[usize]); 3] = if b.o.smoke {
        // The same paths (a repacked and a plain decode weight, a prefill) at a 32nd of the
        // size: the smoke run proves they run, not how fast.
        [(2048, 1024, &[1]), (2048, 640, &[1]), (1536, 576, &[64])]
    } else {
        [
            (65536, 1024, &[1]),
            (65536, 640, &[1]),
            (1536, 576, &[64, 512]),
        ]
    };
    let levels = Level::available();
    eprintln!(
        "kernels: levels {:?}, dispatched {:?}",
        levels,
        llm_pool::kernels::level()
    );
    for dtype in types {
        for &(n, k, rows) in &shapes {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let q = QTensor::quantize(&w, dtype)?;
            drop(w);
            let bytes = q.storage_size_in_bytes() as f64;
            // One weight per level, laid out as that level computes it (Q4_1/Q5_0 are
            // interleaved for AVX-512 VNNI), so no level pays for another's layout.
            let ours = levels
                .iter()
                .map(|&level| {
                    QuantizedWeight::from_qtensor_at(level, &q)?
                        .ok_or_else(|| anyhow!("no kernel for {dtype:?}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let theirs = QMatMul::from_qtensor(q)?;
            for &m in rows {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
                let xv = x.flatten_all()?.to_vec1::<f32>()?;
                let (unit, per_sec) = if m == 1 {
                    ("GB/s", bytes / 1e9)
                } else {
                    ("GOP/s", 2.0 * (m * n * k) as f64 / 1e9)
                };
                let model = format!("{dtype:?} {n}x{k}");
                let test = format!("m{m}");
                let candle = time_runs(b, || {
                    theirs.forward(&x)?;
                    Ok(())
                })?;
                let rate = |t: &[f64]| t.iter().map(|s| per_sec / s).collect::<Vec<_>>();
                b.emit(
                    "candle",
                    "kernels",
                    &model,
                    &test,
                    unit,
                    &rate(&candle),
                    json!({}),
                );
                let candle_median = Stats::of(&candle).median;
                for (&level, ours) in levels.iter().zip(&ours) {
                    let t = time_runs(b, || {
                        ours.matmul_at(level, &xv)?;
                        Ok(())
                    })?;
                    let ratio = candle_median / Stats::of(&t).median;
                    b.emit(
                        "llm-pool",
                        "kernels",
                        &model,
                        &format!("{test}_{}", level.name()),
                        unit,
                        &rate(&t),
                        json!({"level": level.name(), "vs_candle": ratio}),
                    );
                    eprintln!("{:>58} {ratio:.2}x candle", "");
                }
            }
        }
    }
    Ok(())
}
