//! Activation quantization: each f32 row to 8-bit blocks ([`BlockQ8`]) once per matmul, with
//! the per-block sum term the weight type's correction needs.
//!
//! Rounding is to nearest, ties to even, at every level (the scalar code uses
//! `round_ties_even`, the SIMD code `cvtps2dq` under the default rounding mode), so every level
//! sees the same activation codes. candle rounds ties away from zero; an exact tie is rare
//! enough that results still agree with candle's to far better than 1e-4.

use super::blocks::{BlockQ8, QK};
use super::dispatch::Level;
use half::f16;

/// How the block sum `s = d·Σq` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SumForm {
    /// Rounded through f16, as ggml's Q8_1 stores it (`f16(Σq)·f16(d)`): Q4_1's dot type.
    F16,
    /// Exact in f32 (`d·Σq`): what the Q5_0 correction uses.
    F32,
}

/// Scale of a block whose largest magnitude is `amax`: returns `(d, 1/d)` with `d` rounded
/// through f16 as ggml stores it, and `1/d` taken before the rounding, as ggml does.
#[inline(always)]
fn scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (f16::from_f32(d).to_f32(), id)
}

#[inline(always)]
fn sum_term(form: SumForm, d: f32, sum: i32) -> f32 {
    match form {
        SumForm::F16 => (f16::from_f32(sum as f32) * f16::from_f32(d)).to_f32(),
        SumForm::F32 => d * sum as f32,
    }
}

/// Quantizes one block with portable code.
fn quantize_block_scalar(x: &[f32], form: SumForm) -> BlockQ8 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (d, id) = scales(amax);
    let mut b = BlockQ8 {
        d,
        ..BlockQ8::default()
    };
    let mut sum = 0i32;
    for (q, &v) in b.qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    b.s = sum_term(form, d, sum);
    b
}

/// Blocks per work item when a prompt's activations are quantized in parallel; below two
/// items (every decode step) one thread does it, as waking the pool would cost more.
const PARALLEL_BLOCKS: usize = 1024;

/// Quantizes `x` (a whole number of rows of `k` values, `k` a multiple of 32) into `out`,
/// one block per 32 values, at `level` (lowered to what the CPU has). A prompt's worth of
/// activations is split into contiguous ranges over candle's barrier pool, the pool the
/// matmul itself runs on.
pub fn quantize_into(level: Level, x: &[f32], form: SumForm, out: &mut Vec<BlockQ8>) {
    let blocks = x.len() / QK;
    if blocks < 2 * PARALLEL_BLOCKS {
        quantize_serial(level, x, form, out);
        return;
    }
    out.clear();
    out.resize(blocks, BlockQ8::default());
    let parts: Vec<std::sync::Mutex<(&[f32], &mut [BlockQ8])>> = x
        .chunks(PARALLEL_BLOCKS * QK)
        .zip(out.chunks_mut(PARALLEL_BLOCKS))
        .map(std::sync::Mutex::new)
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(parts.len(), |range| {
        let mut scratch = Vec::with_capacity(PARALLEL_BLOCKS);
        for part in &parts[range] {
            // Each part is locked by the one item that owns it; a poisoned lock only means a
            // panic elsewhere, which the pool re-raises.
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            let (src, dst) = &mut *part;
            quantize_serial(level, src, form, &mut scratch);
            dst.copy_from_slice(&scratch);
        }
    });
}

/// [`quantize_into`] on the calling thread.
fn quantize_serial(level: Level, x: &[f32], form: SumForm, out: &mut Vec<BlockQ8>) {
    out.clear();
    out.reserve(x.len() / QK);
    #[cfg(target_arch = "x86_64")]
    if level.min(Level::detect()) >= Level::Avx2 {
        for chunk in x.chunks_exact(QK) {
            // SAFETY: the level is capped by `Level::detect()`, which only returns Avx2 or
            // above when `Level::supported` saw AVX2, FMA and F16C; `chunk` has 32 values.
            out.push(unsafe { x86::quantize_block_avx2(chunk, form) });
        }
        return;
    }
    let _ = level;
    out.extend(x.chunks_exact(QK).map(|c| quantize_block_scalar(c, form)));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// One block with AVX2: abs-max, scale, convert (ties to even), pack to bytes, sum.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `x` must hold at least 32 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block_avx2(x: &[f32], form: SumForm) -> BlockQ8 {
        debug_assert!(x.len() >= QK);
        let p = x.as_ptr();
        // SAFETY: 4 × 8 floats inside `x` (checked length above by the caller's contract).
        let (v0, v1, v2, v3) = unsafe {
            (
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            )
        };
        let sign = _mm256_set1_ps(-0.0);
        let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
        let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3));
        let m = _mm256_max_ps(m01, m23);
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
        let (d, id) = scales(_mm_cvtss_f32(m1));
        let vid = _mm256_set1_ps(id);
        // cvtps2dq rounds to nearest even under the default MXCSR, like `round_ties_even`.
        let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));
        let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
        let i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
        let i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        let s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1));
        let sum = _mm_cvtsi128_si32(s1);
        // The packs interleave 128-bit lanes; the permute puts the 32 bytes back in order.
        let p01 = _mm256_packs_epi32(i0, i1);
        let p23 = _mm256_packs_epi32(i2, i3);
        let bytes = _mm256_packs_epi16(p01, p23);
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut b = BlockQ8 {
            d,
            s: sum_term(form, d, sum),
            ..BlockQ8::default()
        };
        // SAFETY: `b.qs` is 32 bytes; the store is unaligned.
        unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, bytes) };
        b
    }
}
