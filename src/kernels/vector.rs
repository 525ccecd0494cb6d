//! f32 vector loops of the attention core on CPU: a query's dot products with a run of key
//! rows, and a weighted sum of value rows. A batched decode step attends each sequence's
//! query straight from its KV cache with these (see `models::layers::attention`), so they
//! run once per head, key and layer of every sequence in the batch.
//!
//! Why by hand: written as plain loops over lane arrays, LLVM vectorised them two lanes wide
//! inside the attention (and a formulation it compiled well in isolation sent rustc past the
//! build machine's memory in the crate). At the AVX2 level and above they run on 256-bit
//! registers; below, as plain loops.

use super::dispatch::{self, Level};

/// Where a run of rows lies in a buffer: row `j` starts at `first + j · stride`.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// The buffer holding every row.
    pub data: &'a [f32],
    /// The first row's offset in `data`.
    pub first: usize,
    /// The distance between consecutive rows.
    pub stride: usize,
}

impl Rows<'_> {
    /// Whether `count` rows of `width` values all lie inside the buffer.
    fn hold(&self, count: usize, width: usize) -> bool {
        count == 0
            || (count - 1)
                .checked_mul(self.stride)
                .and_then(|o| o.checked_add(self.first))
                .and_then(|o| o.checked_add(width))
                .is_some_and(|end| end <= self.data.len())
    }

    fn row(&self, j: usize, width: usize) -> &[f32] {
        &self.data[self.first + j * self.stride..][..width]
    }
}

/// `out[j] = q · row j` for every `j < out.len()`. Each product sums in vector lanes, so it
/// rounds differently from a single chain (by a few ulps).
///
/// # Panics
/// When the rows do not lie inside their buffer (a caller's layout bug, not input).
pub fn dots(q: &[f32], keys: Rows<'_>, out: &mut [f32]) {
    assert!(
        keys.hold(out.len(), q.len()),
        "key rows outside their buffer"
    );
    #[cfg(target_arch = "x86_64")]
    if dispatch::level() >= Level::Avx2 {
        // SAFETY: the AVX2 level is only dispatched when the CPU has AVX2 and FMA; every row
        // lies inside the buffer (checked above).
        unsafe { x86::dots(q, keys, out) };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = q
            .iter()
            .zip(keys.row(j, q.len()))
            .fold(0.0, |acc, (&a, &b)| a.mul_add(b, acc));
    }
}

/// `out = Σ_j p[j] · row j` over `j < p.len()`, rows of `out.len()` values, in row order.
///
/// # Panics
/// When the rows do not lie inside their buffer (a caller's layout bug, not input).
pub fn weighted_sum(p: &[f32], values: Rows<'_>, out: &mut [f32]) {
    assert!(
        values.hold(p.len(), out.len()),
        "value rows outside their buffer"
    );
    #[cfg(target_arch = "x86_64")]
    if dispatch::level() >= Level::Avx2 {
        // SAFETY: as in `dots`.
        unsafe { x86::weighted_sum(p, values, out) };
        return;
    }
    let width = out.len();
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(values.row(j, width)) {
            *o = pj.mul_add(v, *o);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Rows;
    use std::arch::x86_64::*;

    /// The eight lanes of `v` summed.
    #[inline(always)]
    unsafe fn sum8(v: __m256) -> f32 {
        // SAFETY: AVX by the caller.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// See [`super::dots`]: two 8-lane accumulators per product (independent FMA chains).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every row must lie inside the buffer.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(q: &[f32], keys: Rows<'_>, out: &mut [f32]) {
        let d = q.len();
        let whole = d & !15;
        let qp = q.as_ptr();
        for (j, o) in out.iter_mut().enumerate() {
            let k = keys.row(j, d);
            let kp = k.as_ptr();
            // SAFETY: offsets below `whole` ≤ d are inside both `q` and `k`.
            let sum = unsafe {
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut i = 0;
                while i < whole {
                    a0 =
                        _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(kp.add(i)), a0);
                    a1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qp.add(i + 8)),
                        _mm256_loadu_ps(kp.add(i + 8)),
                        a1,
                    );
                    i += 16;
                }
                sum8(_mm256_add_ps(a0, a1))
            };
            let tail: f32 = q[whole..].iter().zip(&k[whole..]).map(|(a, b)| a * b).sum();
            *o = sum + tail;
        }
    }

    /// See [`super::weighted_sum`]: the output in blocks of 64 values held in eight registers
    /// while every row passes (eight independent FMA chains, enough to keep both FMA units
    /// busy, and no store per row), then blocks of 8, then the last values one by one.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every row must lie inside the buffer.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(p: &[f32], values: Rows<'_>, out: &mut [f32]) {
        let width = out.len();
        let base = values.data.as_ptr();
        let row = |j: usize| values.first + j * values.stride;
        let mut start = 0;
        // SAFETY (all blocks): a row's offsets `row(j) + start + i` for `start + i < width`
        // are inside the buffer (checked by the caller), and the stores inside `out`.
        while start + 64 <= width {
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (j, &pj) in p.iter().enumerate() {
                    let pv = _mm256_set1_ps(pj);
                    let at = base.add(row(j) + start);
                    for (b, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(at.add(8 * b)), *a);
                    }
                }
                for (b, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add(start + 8 * b), *a);
                }
            }
            start += 64;
        }
        while start + 8 <= width {
            unsafe {
                let mut acc = _mm256_setzero_ps();
                for (j, &pj) in p.iter().enumerate() {
                    let at = base.add(row(j) + start);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(pj), _mm256_loadu_ps(at), acc);
                }
                _mm256_storeu_ps(out.as_mut_ptr().add(start), acc);
            }
            start += 8;
        }
        for (i, o) in out.iter_mut().enumerate().skip(start) {
            *o = p.iter().enumerate().fold(0.0, |acc, (j, &pj)| {
                pj.mul_add(values.data[row(j) + i], acc)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0
                    - 0.5
            })
            .collect()
    }

    /// Every width (the vector blocks and the scalar tail), rows strided inside a larger
    /// buffer, against the plain definition in f64.
    #[test]
    fn dots_and_weighted_sums_match_their_definition() {
        for d in [1, 7, 8, 15, 16, 33, 64, 80, 256] {
            let (count, stride, first) = (13, d + 5, 3);
            let data = values(first + count * stride, d as u32);
            let rows = Rows {
                data: &data,
                first,
                stride,
            };
            let q = values(d, 7);
            let mut got = vec![0f32; count];
            dots(&q, rows, &mut got);
            for (j, &g) in got.iter().enumerate() {
                let want: f64 = (0..d)
                    .map(|i| q[i] as f64 * data[first + j * stride + i] as f64)
                    .sum();
                assert!(
                    (g as f64 - want).abs() < 1e-5,
                    "d {d}, row {j}: {g} vs {want}"
                );
            }
            let p = values(count, 11);
            let mut sum = vec![0f32; d];
            weighted_sum(&p, rows, &mut sum);
            for (i, &s) in sum.iter().enumerate() {
                let want: f64 = (0..count)
                    .map(|j| p[j] as f64 * data[first + j * stride + i] as f64)
                    .sum();
                assert!(
                    (s as f64 - want).abs() < 1e-5,
                    "d {d}, value {i}: {s} vs {want}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "outside their buffer")]
    fn rows_outside_the_buffer_are_refused() {
        let data = vec![0f32; 10];
        let rows = Rows {
            data: &data,
            first: 2,
            stride: 4,
        };
        dots(&[1.0; 4], rows, &mut [0.0; 3]);
    }
}
