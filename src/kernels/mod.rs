//! Our own quantized matmul kernels for CPU: GGUF Q4_1, Q5_0 and Q8_0 weights times f32
//! activations, for the linear-layer seam ([`crate::models::layers::Linear`]).
//!
//! Why: candle 0.11's CPU path multiplies Q4_1 and Q5_0 with scalar code, quantizes the
//! activations serially, and unpacks every weight block again for each activation row. These
//! types carry most of the demo models' bytes (SmolLM2: Q4_1 layers; Gemma 3: Q5_0 layers and
//! a Q8_0 head), so they come first; every other type stays on candle's `QMatMul`.
//!
//! How one matmul runs ([`QuantizedWeight::matmul`], reached from a model through
//! [`QuantizedWeight::forward`], a candle custom op on the activations' storage):
//! 1. the activations are quantized once to 8-bit blocks ([`quantize`]), with the per-block
//!    sum term the weight type needs (Q8_1-style for Q4_1, Q8_0 for the others);
//! 2. the output columns are split into contiguous ranges over candle's barrier pool (the pool
//!    candle's own quantized matmuls use, so one set of threads serves both);
//! 3. each range walks its weight rows, unpacking each block once for up to eight activation
//!    rows (AVX2, AVX-VNNI, scalar).
//!
//! At the AVX-512 VNNI level (what llama.cpp's repacking does for its types, in our own
//! layout): the weights are interleaved eight rows to a group when they load
//! ([`blocks::interleave`]), so a decode step's 512-bit `vpdpbusd` covers eight output rows
//! against one activation step; a prompt's activations are packed eight rows to a panel per
//! matmul, so one product covers eight activation rows against one weight row. Either way the
//! float work after the byte products is per eight rows, not per row.
//!
//! Every type computes in one form: unsigned weight codes × signed activation bytes, then
//! `d_w·d_a` and a per-block correction (Q4_1 `m·s`, Q5_0 `−16·d·s`; Q8_0 row by row uses the
//! sign trick instead, and in 512-bit form the offset `w + 128` with `−128·d·s`).
//!
//! Dispatch ([`dispatch`]): AVX-512 VNNI → AVX-VNNI → AVX2 → scalar, detected once;
//! `LLM_POOL_KERNEL_LEVEL=scalar|avx2|avx-vnni|avx512-vnni` forces a lower level. Other
//! architectures run the scalar kernels.

pub mod blocks;
pub mod dispatch;
mod matmul;
pub mod quantize;
mod scalar;
pub mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use blocks::WeightType;
pub use dispatch::{level, Level, LEVEL_ENV};
pub use matmul::QuantizedWeight;

/// Runs `f` on the values of a contiguous F32 CPU tensor; `what` names the operation in the
/// error for any other tensor.
pub(crate) fn with_cpu_f32<T>(
    t: &candle_core::Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            f(&cpu.as_slice::<f32>()?[start..end])
        }
        _ => candle_core::bail!("{what}: expected a contiguous F32 CPU tensor"),
    }
}
