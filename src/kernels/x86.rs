//! x86_64 SIMD kernels: AVX2, AVX-VNNI and AVX-512 VNNI, one generic body instantiated per
//! level through `#[target_feature]` entry points.
//!
//! Row by row (AVX2 and AVX-VNNI, and row-major weights at any level): per 32-value block the
//! weight codes are unpacked once into 32 unsigned bytes in a ymm register (Q4_1: nibbles
//! 0..=15; Q5_0: nibble | fifth bit, 0..=31; Q8_0: `|w|`, with the activation's sign flipped
//! by `w`, as `maddubs`/`dpbusd` need an unsigned operand), then multiplied with up to eight
//! activation rows; each row's 8 lane sums are scaled by `d_w·d_a` into an f32 accumulator
//! (no horizontal sum per block), and the per-block correction (`m·s` for Q4_1, `−16·d·s` for
//! Q5_0) is a scalar FMA.
//!
//! Groups (AVX-512 VNNI, 1 to 16 activation rows: a decode step, alone or batched): the
//! weights were interleaved eight rows to a group at load ([`super::blocks::interleave`]), so
//! one 512-bit `vpdpbusd` multiplies a step of eight codes of all eight weight rows with the
//! activation's step broadcast ([`dot_group`]); several rows share one unpacking of each
//! group block, four rows per pass ([`dot_group_rows`]).
//!
//! Panels (AVX-512 VNNI, more rows: a prompt): the rows are first packed eight to a
//! panel ([`PanelBlock`]) so that one 512-bit `vpdpbusd` multiplies a step of eight codes of a
//! weight block with all eight rows at once. Measured with `bench kernels` on the demo models'
//! shapes, 1.8-2.6x the 256-bit kernel.
//!
//! Either way the float work after the byte products (conversion, `d_w·d_a`, accumulation) is
//! one instruction per block for eight rows instead of one per row.
//!
//! `maddubs` is safe from i16 saturation here: codes ≤ 31 (or `|w|` ≤ 128 against `|a|` ≤ 127,
//! pairs ≤ 32512). The levels differ in the byte product: AVX2 `maddubs`+`madd`, AVX-VNNI the
//! VEX `vpdpbusd`, AVX-512 VNNI the EVEX one (ymm with VL row by row, zmm for groups and
//! panels).

use super::blocks::{
    halves, BlockQ4_1, BlockQ5_0, BlockQ8, BlockQ8_0, GroupQ4_1, GroupQ5_0, GroupQ8_0, WeightBlock,
    GROUP, QK,
};
use std::arch::x86_64::*;
use std::array::from_fn;
use std::ops::Range;

/// The byte product of one level: `Σ_4 u8·i8` per 32-bit lane.
trait Dot {
    /// # Safety
    /// The CPU must have the level's features (the caller is a `#[target_feature]` function).
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i;
}

struct Avx2;
struct AvxVnni;
struct Avx512Vnni;

impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX2 is guaranteed by the caller.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }
}

impl Dot for AvxVnni {
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI is guaranteed by the caller.
        unsafe { _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s) }
    }
}

impl Dot for Avx512Vnni {
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX-512 VNNI and VL are guaranteed by the caller.
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s) }
    }
}

/// f16 bits to f32 with F16C.
///
/// # Safety
/// The CPU must have F16C.
#[inline(always)]
unsafe fn f16_to_f32(h: half::f16) -> f32 {
    // SAFETY: F16C is guaranteed by the caller.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32))) }
}

/// A weight block unpacked for the byte product.
pub(super) trait Unpack: WeightBlock {
    /// Whether the unpacked bytes are `|w|` and the activations take `w`'s sign (Q8_0).
    const SIGNED: bool;
    /// `(unsigned bytes, sign source)`; the sign source is only used when `SIGNED`.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    unsafe fn unpack(&self) -> (__m256i, __m256i);
    /// `(d, correction coefficient)`: the correction is `coefficient · s_a`.
    ///
    /// # Safety
    /// The CPU must have F16C.
    unsafe fn scales(&self) -> (f32, f32);
    /// The codes as the four steps of the AVX-512 prefill kernel: step `t` holds codes
    /// `8t..8t + 8` as unsigned bytes, repeated in all eight 64-bit lanes (one per activation
    /// row). That kernel computes every type in the offset form, `codes · a` plus a
    /// correction `coefficient · s_a`; Q8_0 there takes `w + 128` (`w ^ 0x80`) with
    /// coefficient `−128·d` instead of the sign trick (512-bit AVX-512 has no `sign_epi8`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    unsafe fn steps(&self) -> [__m512i; QK / 8];
    /// `(d, correction coefficient)` of the offset form (see [`Unpack::steps`]).
    ///
    /// # Safety
    /// The CPU must have F16C.
    #[inline(always)]
    unsafe fn offset_scales(&self) -> (f32, f32) {
        // SAFETY: F16C by the caller.
        unsafe { self.scales() }
    }
}

/// The 16 bytes of nibbles as 32 bytes: low nibbles (elements 0..16), then high (16..32).
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY: AVX2 by the caller; the load reads exactly the 16 bytes of `qs`.
    unsafe {
        let v = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        _mm256_set_m128i(hi, lo)
    }
}

/// The four steps of codes in nibble bytes: `lo` holds (per 64-bit lane) bytes 0..8 of the
/// nibbles, `hi` bytes 8..16; codes 0..8 are `lo`'s low nibbles, 8..16 `hi`'s, 16..24 `lo`'s
/// high nibbles, 24..32 `hi`'s.
#[inline(always)]
unsafe fn split_nibbles(lo: __m512i, hi: __m512i) -> [__m512i; QK / 8] {
    // SAFETY: AVX-512 F and BW by the caller.
    unsafe {
        let mask = _mm512_set1_epi8(0x0f);
        [
            _mm512_and_si512(lo, mask),
            _mm512_and_si512(hi, mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(lo), mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(hi), mask),
        ]
    }
}

/// The 16 bytes of nibbles (`lo` bytes 0..8, `hi` bytes 8..16) as the four steps of the
/// AVX-512 prefill kernel: codes 0..8 are the low nibbles of `lo`, 8..16 of `hi`, 16..24 the
/// high nibbles of `lo`, 24..32 of `hi`; each step's 8 bytes broadcast to all 64-bit lanes.
#[inline(always)]
unsafe fn nibble_steps(lo: &[u8; 8], hi: &[u8; 8]) -> [__m512i; QK / 8] {
    // SAFETY: AVX-512 F and BW by the caller; the reads are the two 8-byte arrays.
    unsafe {
        split_nibbles(
            _mm512_set1_epi64(i64::from_le_bytes(*lo)),
            _mm512_set1_epi64(i64::from_le_bytes(*hi)),
        )
    }
}

/// Q5_0's fifth bits added to the four steps of one row: bit `k` of `qh`'s byte `t` is code
/// `8t + k`'s, so that byte repeated in every lane is the mask of the bytes that take 16.
#[inline(always)]
unsafe fn fifth_bits(mut steps: [__m512i; QK / 8], qh: [u8; 4]) -> [__m512i; QK / 8] {
    // SAFETY: AVX-512 F and BW by the caller.
    unsafe {
        for (step, byte) in steps.iter_mut().zip(qh) {
            let mask = (byte as u64).wrapping_mul(0x0101_0101_0101_0101);
            *step = _mm512_mask_add_epi8(*step, mask, *step, _mm512_set1_epi8(16));
        }
        steps
    }
}

impl Unpack for BlockQ4_1 {
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn unpack(&self) -> (__m256i, __m256i) {
        // SAFETY: AVX2 by the caller.
        unsafe {
            let u = nibbles(&self.qs);
            (u, u)
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (f32, f32) {
        // SAFETY: F16C by the caller.
        unsafe { (f16_to_f32(self.d), f16_to_f32(self.m)) }
    }
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        // SAFETY: AVX-512 F and BW by the caller; the reads are inside `qs`.
        let (lo, hi) = halves(&self.qs);
        unsafe { nibble_steps(&lo, &hi) }
    }
}

impl Unpack for BlockQ5_0 {
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn unpack(&self) -> (__m256i, __m256i) {
        // SAFETY: AVX2 by the caller.
        unsafe {
            let lo4 = nibbles(&self.qs);
            // Byte j takes bit j of qh: broadcast qh, give byte j qh's byte j/8, keep bit j%8.
            let qh = _mm256_set1_epi32(i32::from_le_bytes(self.qh));
            let spread = _mm256_shuffle_epi8(
                qh,
                _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                ),
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
            let u = _mm256_or_si256(lo4, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
            (u, u)
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (f32, f32) {
        // SAFETY: F16C by the caller.
        let d = unsafe { f16_to_f32(self.d) };
        (d, -16.0 * d)
    }
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        // SAFETY: AVX-512 F and BW by the caller.
        unsafe {
            let (lo, hi) = halves(&self.qs);
            fifth_bits(nibble_steps(&lo, &hi), self.qh)
        }
    }
}

impl Unpack for BlockQ8_0 {
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn unpack(&self) -> (__m256i, __m256i) {
        // SAFETY: AVX2 by the caller; the load reads exactly the 32 bytes of `qs`.
        unsafe {
            let w = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
            (_mm256_abs_epi8(w), w)
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (f32, f32) {
        // SAFETY: F16C by the caller.
        (unsafe { f16_to_f32(self.d) }, 0.0)
    }
    #[inline(always)]
    unsafe fn offset_scales(&self) -> (f32, f32) {
        // SAFETY: F16C by the caller.
        let d = unsafe { f16_to_f32(self.d) };
        (d, -128.0 * d)
    }
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        // SAFETY: AVX-512 F by the caller; each read is 8 bytes inside `qs`.
        unsafe {
            std::array::from_fn(|t| {
                let q = (self.qs.as_ptr().add(8 * t) as *const u64).read_unaligned();
                _mm512_set1_epi64(offset_codes(q))
            })
        }
    }
}

/// Eight signed Q8_0 codes (one per byte) as their unsigned offset form `w + 128`
/// (`w ^ 0x80`), as one 64-bit lane. Done on the scalar before the broadcast: rustc 1.95's
/// LLVM looped without end in x86 instruction selection (eating all memory) on the same xor
/// written on the broadcast vector, in some builds of this crate.
#[inline(always)]
fn offset_codes(q: u64) -> i64 {
    (q ^ 0x8080_8080_8080_8080) as i64
}

/// Horizontal sum of 8 floats.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX by the caller.
    unsafe {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
        _mm_cvtss_f32(s1)
    }
}

/// `Σ w·a` of weight row `w` with `R` activation rows (each at least `w.len()` blocks).
#[inline(always)]
unsafe fn dot_rows<B: Unpack, D: Dot, const R: usize>(w: &[B], a: [&[BlockQ8]; R]) -> [f32; R] {
    let nb = w.len();
    let a = a.map(|r| &r[..nb]);
    // SAFETY: the level's features are guaranteed by the `#[target_feature]` caller; every
    // load is through a reference to a whole block.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut corr = [0f32; R];
        for bi in 0..nb {
            let wb = &w[bi];
            let (u, sw) = wb.unpack();
            let (d, coef) = wb.scales();
            for r in 0..R {
                let ab = &a[r][bi];
                let mut av = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                if B::SIGNED {
                    av = _mm256_sign_epi8(av, sw);
                }
                let p = _mm256_cvtepi32_ps(D::dot(u, av));
                acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * ab.d), acc[r]);
                if !B::SIGNED {
                    corr[r] += coef * ab.s;
                }
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) + corr[r];
        }
        out
    }
}

/// `Σ w·a` of weight row `w` with one activation row (a decode step): as [`dot_rows`] with one
/// row, but with four accumulators for the products and four for the corrections (blocks
/// `b mod 4`), so consecutive blocks do not wait on each other's FMA latency. Measured with
/// one accumulator, a decode-sized Q5_0 weight in cache streamed at 9 GB/s; with four, 16.
#[inline(always)]
unsafe fn dot_row<B: Unpack, D: Dot>(w: &[B], a: &[BlockQ8]) -> f32 {
    let a = &a[..w.len()];
    // SAFETY: the level's features are guaranteed by the `#[target_feature]` caller; every
    // load is through a reference to a whole block.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut corr = [_mm_setzero_ps(); 4];
        let block = |wb: &B, ab: &BlockQ8, acc: &mut __m256, corr: &mut __m128| {
            let (u, sw) = wb.unpack();
            let (d, coef) = wb.scales();
            let mut av = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            if B::SIGNED {
                av = _mm256_sign_epi8(av, sw);
            }
            let p = _mm256_cvtepi32_ps(D::dot(u, av));
            *acc = _mm256_fmadd_ps(p, _mm256_set1_ps(d * ab.d), *acc);
            if !B::SIGNED {
                *corr = _mm_fmadd_ss(_mm_set_ss(coef), _mm_set_ss(ab.s), *corr);
            }
        };
        let (w4, a4) = (w.chunks_exact(4), a.chunks_exact(4));
        let (wr, ar) = (w4.remainder(), a4.remainder());
        for (wb, ab) in w4.zip(a4) {
            block(&wb[0], &ab[0], &mut acc[0], &mut corr[0]);
            block(&wb[1], &ab[1], &mut acc[1], &mut corr[1]);
            block(&wb[2], &ab[2], &mut acc[2], &mut corr[2]);
            block(&wb[3], &ab[3], &mut acc[3], &mut corr[3]);
        }
        for (wb, ab) in wr.iter().zip(ar) {
            block(wb, ab, &mut acc[0], &mut corr[0]);
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let corr = _mm_add_ss(_mm_add_ss(corr[0], corr[1]), _mm_add_ss(corr[2], corr[3]));
        hsum(sum) + _mm_cvtss_f32(corr)
    }
}

/// Output columns `cols` for all `m` activation rows into `out` (`m × cols.len()`): weight
/// rows outside, activation rows inside in eights (then fours, then the rest), so each unpacked
/// block serves eight rows: measured against fours, prompts of 64 and 512 tokens ran 6-8% faster
/// on both demo models (the block's unpacking and scales are spread over more products).
#[inline(always)]
unsafe fn tile<B: Unpack, D: Dot>(
    w: &[B],
    nb: usize,
    acts: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    let width = cols.len();
    let row = |r: usize| &acts[r * nb..(r + 1) * nb];
    for (c, j) in cols.enumerate() {
        let wr = &w[j * nb..(j + 1) * nb];
        // The products of activation rows `r..r + R` with this weight row, into column `c`.
        let mut rows = |r: usize, y: &[f32]| {
            for (i, &v) in y.iter().enumerate() {
                out[(r + i) * width + c] = v;
            }
        };
        let mut r = 0;
        // SAFETY (all calls below): the level's features are guaranteed by the caller.
        while r + 8 <= m {
            rows(r, &unsafe {
                dot_rows::<B, D, 8>(wr, from_fn(|i| row(r + i)))
            });
            r += 8;
        }
        if r + 4 <= m {
            rows(r, &unsafe {
                dot_rows::<B, D, 4>(wr, from_fn(|i| row(r + i)))
            });
            r += 4;
        }
        match m - r {
            3 => rows(r, &unsafe {
                dot_rows::<B, D, 3>(wr, from_fn(|i| row(r + i)))
            }),
            2 => rows(r, &unsafe {
                dot_rows::<B, D, 2>(wr, from_fn(|i| row(r + i)))
            }),
            1 => rows(r, &[unsafe { dot_row::<B, D>(wr, row(r)) }]),
            _ => {}
        }
    }
}

/// [`tile`] at the AVX2 level.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2<B: Unpack>(
    w: &[B],
    nb: usize,
    acts: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: features checked by the caller, as this function's contract says.
    unsafe { tile::<B, Avx2>(w, nb, acts, m, cols, out) }
}

/// [`tile`] at the AVX-VNNI level.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C and AVX-VNNI.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(super) unsafe fn tile_avx_vnni<B: Unpack>(
    w: &[B],
    nb: usize,
    acts: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: features checked by the caller, as this function's contract says.
    unsafe { tile::<B, AvxVnni>(w, nb, acts, m, cols, out) }
}

/// [`tile`] at the AVX-512 VNNI level.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C, AVX-512 F, BW, VL and VNNI.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn tile_avx512_vnni<B: Unpack>(
    w: &[B],
    nb: usize,
    acts: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: features checked by the caller, as this function's contract says.
    unsafe { tile::<B, Avx512Vnni>(w, nb, acts, m, cols, out) }
}

// ---- AVX-512 prefill: activation panels ------------------------------------------------------

/// Activation rows per panel of the AVX-512 prefill kernel.
pub(super) const PANEL_ROWS: usize = 8;

/// Panels per cache chunk: a chunk's activations (64 rows × k) stay in L2 while every weight
/// row of a column range passes over them, instead of streaming all `m` rows per weight row.
const PANEL_CHUNK: usize = 8;

/// One block position of [`PANEL_ROWS`] activation rows, laid out for 512-bit registers so
/// that one `vpdpbusd` covers all eight rows: step `t` (of four) holds each row's codes
/// `8t..8t + 8` back to back (row `r` in 32-bit lanes `2r` and `2r + 1`), and four steps
/// accumulated in one register leave each row's block sum in its two lanes. `d` holds each
/// row's scale twice, matching those lanes; `s` the eight rows' sum terms for the correction.
///
/// Why this shape and not a pair of rows per register (each row's 32 codes in 8 lanes): the
/// float work after the byte products (conversion, `d_w·d_a`, accumulation) is per register,
/// and here one register serves eight rows instead of two. Measured on Gemma 3's Q5_0 shapes
/// (`bench kernels`), the pairs layout reached 1.1-1.4x the 256-bit kernel, this one more.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct PanelBlock {
    qs: [[[i8; 8]; PANEL_ROWS]; QK / 8],
    d: [f32; 2 * PANEL_ROWS],
    s: [f32; PANEL_ROWS],
}

impl PanelBlock {
    const ZERO: PanelBlock = PanelBlock {
        qs: [[[0; 8]; PANEL_ROWS]; QK / 8],
        d: [0.0; 2 * PANEL_ROWS],
        s: [0.0; PANEL_ROWS],
    };
}

/// Packs `m` rows of `nb` activation blocks into panels of [`PANEL_ROWS`] rows (panel-major,
/// then block): panel `p`, block `b` is at `p·nb + b`. Rows past `m` in the last panel are
/// zero (scale 0), so they contribute nothing and their outputs are dropped.
pub(super) fn pack_panels(acts: &[BlockQ8], m: usize, nb: usize) -> Vec<PanelBlock> {
    let panels = m.div_ceil(PANEL_ROWS);
    let mut out = vec![PanelBlock::ZERO; panels * nb];
    for r in 0..m {
        let (p, i) = (r / PANEL_ROWS, r % PANEL_ROWS);
        for (b, a) in acts[r * nb..(r + 1) * nb].iter().enumerate() {
            let dst = &mut out[p * nb + b];
            for (t, step) in dst.qs.iter_mut().enumerate() {
                step[i].copy_from_slice(&a.qs[8 * t..8 * t + 8]);
            }
            dst.d[2 * i] = a.d;
            dst.d[2 * i + 1] = a.d;
            dst.s[i] = a.s;
        }
    }
    out
}

/// The 64 bytes of one panel step.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline(always)]
unsafe fn load512(step: &[[i8; 8]; PANEL_ROWS]) -> __m512i {
    // SAFETY: AVX-512 F by the caller; the step is 64 bytes, 64-byte aligned in `PanelBlock`.
    unsafe { _mm512_load_si512(step.as_ptr() as *const _) }
}

impl PanelWeight for GroupRow<'_, GroupQ8_0> {
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        let (g, r) = (self.group, self.row);
        // SAFETY: AVX-512 F by the caller.
        unsafe {
            std::array::from_fn(|t| {
                let q = u64::from_le_bytes(g.qs[t][r].map(|b| b as u8));
                _mm512_set1_epi64(offset_codes(q))
            })
        }
    }
    #[inline(always)]
    unsafe fn offset_scales(&self) -> (f32, f32) {
        // SAFETY: F16C by the caller.
        let d = unsafe { f16_to_f32(self.group.d[self.row]) };
        (d, -128.0 * d)
    }
}

/// A weight block as the AVX-512 panel kernel reads it: a row-major GGUF block, or one row of
/// an interleaved group ([`GroupRow`]).
pub(super) trait PanelWeight {
    /// See [`Unpack::steps`].
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    unsafe fn steps(&self) -> [__m512i; QK / 8];
    /// See [`Unpack::offset_scales`].
    ///
    /// # Safety
    /// The CPU must have F16C.
    unsafe fn offset_scales(&self) -> (f32, f32);
}

impl<B: Unpack> PanelWeight for &B {
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        // SAFETY: as this method's contract.
        unsafe { Unpack::steps(*self) }
    }
    #[inline(always)]
    unsafe fn offset_scales(&self) -> (f32, f32) {
        // SAFETY: as this method's contract.
        unsafe { Unpack::offset_scales(*self) }
    }
}

/// Row `row` of an interleaved group of eight rows' blocks.
pub(super) struct GroupRow<'a, G> {
    pub group: &'a G,
    pub row: usize,
}

impl PanelWeight for GroupRow<'_, GroupQ4_1> {
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        // SAFETY: AVX-512 F and BW by the caller.
        unsafe { nibble_steps(&self.group.lo[self.row], &self.group.hi[self.row]) }
    }
    #[inline(always)]
    unsafe fn offset_scales(&self) -> (f32, f32) {
        // SAFETY: F16C by the caller.
        unsafe {
            (
                f16_to_f32(self.group.d[self.row]),
                f16_to_f32(self.group.m[self.row]),
            )
        }
    }
}

impl PanelWeight for GroupRow<'_, GroupQ5_0> {
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        let (g, r) = (self.group, self.row);
        // SAFETY: AVX-512 F and BW by the caller.
        unsafe { fifth_bits(nibble_steps(&g.lo[r], &g.hi[r]), g.qh.map(|q| q[r])) }
    }
    #[inline(always)]
    unsafe fn offset_scales(&self) -> (f32, f32) {
        // SAFETY: F16C by the caller.
        let d = unsafe { f16_to_f32(self.group.d[self.row]) };
        (d, -16.0 * d)
    }
}

/// One weight block, as its four broadcast steps and scales, against the eight rows of one
/// panel block, accumulated into `acc` (row `r` in lanes `2r`, `2r + 1`) and the corrections
/// into `corr`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL, VNNI, AVX2 and FMA.
#[inline(always)]
unsafe fn panel_block(
    steps: &[__m512i; QK / 8],
    (d, coef): (f32, f32),
    ab: &PanelBlock,
    acc: &mut __m512,
    corr: &mut __m256,
) {
    // SAFETY: the features are guaranteed by the caller; every load is through a reference
    // to a whole field of a 64-byte aligned `PanelBlock`.
    unsafe {
        let [a0, a1, a2, a3] = &ab.qs;
        // Two chains of two, so the four products are not one chain of dependent latencies.
        let dot01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), steps[0], load512(a0));
        let dot23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), steps[2], load512(a2));
        let dot01 = _mm512_dpbusd_epi32(dot01, steps[1], load512(a1));
        let dot23 = _mm512_dpbusd_epi32(dot23, steps[3], load512(a3));
        let dot = _mm512_add_epi32(dot01, dot23);
        let scale = _mm512_mul_ps(_mm512_set1_ps(d), _mm512_load_ps(ab.d.as_ptr()));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
        *corr = _mm256_fmadd_ps(_mm256_set1_ps(coef), _mm256_load_ps(ab.s.as_ptr()), *corr);
    }
}

/// The eight rows of one panel against one weight row (`w(b)` its block at position `b`, for
/// every position of `a`): per block, the weight codes are
/// unpacked once into four broadcast steps, then four `vpdpbusd`, one conversion, one
/// `d_w·d_a` product and one FMA serve all eight rows, and one ymm FMA their corrections.
/// Two accumulators (even and odd blocks) keep the FMA latency off the critical path.
/// (Two panels per pass, sharing the unpacking, measured no faster.)
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL, VNNI, AVX2, FMA and F16C.
#[inline(always)]
unsafe fn dot_panel<W: PanelWeight>(w: impl Fn(usize) -> W, a: &[PanelBlock]) -> [f32; PANEL_ROWS] {
    // SAFETY: the features are guaranteed by the caller.
    unsafe {
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (mut corr0, mut corr1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (i, ab) in a.chunks_exact(2).enumerate() {
            let (w0, w1) = (w(2 * i), w(2 * i + 1));
            panel_block(
                &w0.steps(),
                w0.offset_scales(),
                &ab[0],
                &mut acc0,
                &mut corr0,
            );
            panel_block(
                &w1.steps(),
                w1.offset_scales(),
                &ab[1],
                &mut acc1,
                &mut corr1,
            );
        }
        if a.len() % 2 == 1 {
            let last = a.len() - 1;
            let wl = w(last);
            panel_block(
                &wl.steps(),
                wl.offset_scales(),
                &a[last],
                &mut acc0,
                &mut corr0,
            );
        }
        // Row r is in lanes 2r and 2r + 1.
        row_sums(_mm512_add_ps(acc0, acc1), _mm256_add_ps(corr0, corr1))
    }
}

/// Output columns `cols` for the `m` activation rows in `panels` into `out`
/// (`m × cols.len()`), at the AVX-512 VNNI level (`w(j, b)` is weight row `j`'s block at
/// position `b`): chunks of panels outside, so a chunk stays in
/// cache, then weight rows, then the chunk's panels.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C, AVX-512 F, BW, VL and VNNI.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn tile_panels_avx512_vnni<W: PanelWeight>(
    w: impl Fn(usize, usize) -> W,
    nb: usize,
    panels: &[PanelBlock],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    let width = cols.len();
    let count = panels.len() / nb;
    for first in (0..count).step_by(PANEL_CHUNK) {
        let chunk = first..(first + PANEL_CHUNK).min(count);
        for (c, j) in cols.clone().enumerate() {
            for p in chunk.clone() {
                // SAFETY: the features are guaranteed by this function's contract.
                let y = unsafe { dot_panel(|b| w(j, b), &panels[p * nb..(p + 1) * nb]) };
                for (i, &v) in y.iter().enumerate() {
                    let r = p * PANEL_ROWS + i;
                    if r < m {
                        out[r * width + c] = v;
                    }
                }
            }
        }
    }
}

// ---- AVX-512 decode: interleaved weight groups ----------------------------------------------

/// An interleaved group of eight weight rows as the AVX-512 decode kernel reads it.
pub(super) trait GroupUnpack: Copy {
    /// The four steps of codes, unsigned: step `t`'s 64-bit lane `r` holds row `r`'s codes
    /// `8t..8t + 8`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    unsafe fn steps(&self) -> [__m512i; QK / 8];
    /// The eight rows' `d`.
    ///
    /// # Safety
    /// The CPU must have F16C and AVX.
    unsafe fn scales(&self) -> __m256;
    /// The eight rows' `d`, each twice: row `r`'s in lanes `2r` and `2r + 1`, matching the
    /// two lane sums `vpdpbusd` leaves per row.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, AVX2 and F16C.
    unsafe fn scale_pairs(&self) -> __m512;
    /// The eight rows' correction coefficients, given their `d`: Q4_1 `m`, Q5_0 `−16·d`,
    /// Q8_0 `−128·d`.
    ///
    /// # Safety
    /// The CPU must have F16C and AVX.
    unsafe fn coefficients(&self, d: __m256) -> __m256;
}

/// The two 64-byte halves of a group's nibbles as four steps.
#[inline(always)]
unsafe fn group_nibbles(lo: &[[u8; 8]; GROUP], hi: &[[u8; 8]; GROUP]) -> [__m512i; QK / 8] {
    // SAFETY: AVX-512 F and BW by the caller; each load is one 64-byte array.
    unsafe {
        split_nibbles(
            _mm512_loadu_si512(lo.as_ptr() as *const _),
            _mm512_loadu_si512(hi.as_ptr() as *const _),
        )
    }
}

/// Eight f16 values as f32.
#[inline(always)]
unsafe fn f16x8(v: &[half::f16; GROUP]) -> __m256 {
    // SAFETY: F16C by the caller; the load is the 16 bytes of `v`.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr() as *const __m128i)) }
}

/// Eight f16 values as sixteen f32, each twice (value `r` in lanes `2r` and `2r + 1`).
/// Each f16 is widened into a 32-bit lane and copied into its upper half, so one conversion
/// gives the pairs.
#[inline(always)]
unsafe fn f16_pairs(v: &[half::f16; GROUP]) -> __m512 {
    // SAFETY: AVX-512 F, AVX2 and F16C by the caller; the load is the 16 bytes of `v`.
    unsafe {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(v.as_ptr() as *const __m128i));
        _mm512_cvtph_ps(_mm256_or_si256(wide, _mm256_slli_epi32::<16>(wide)))
    }
}

/// The eight row sums of `acc` (row `r` in lanes `2r`, `2r + 1`) plus `corr`: the end of
/// every AVX-512 kernel that computes eight rows per product.
#[inline(always)]
unsafe fn row_sums(acc: __m512, corr: __m256) -> [f32; GROUP] {
    // SAFETY: AVX-512 F and AVX by the caller; the stores fill two local arrays exactly.
    unsafe {
        let mut lanes = [0f32; 2 * GROUP];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut corr_lanes = [0f32; GROUP];
        _mm256_storeu_ps(corr_lanes.as_mut_ptr(), corr);
        std::array::from_fn(|r| lanes[2 * r] + lanes[2 * r + 1] + corr_lanes[r])
    }
}

impl GroupUnpack for GroupQ4_1 {
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        // SAFETY: as this method's contract.
        unsafe { group_nibbles(&self.lo, &self.hi) }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> __m256 {
        // SAFETY: as this method's contract.
        unsafe { f16x8(&self.d) }
    }
    #[inline(always)]
    unsafe fn scale_pairs(&self) -> __m512 {
        // SAFETY: as this method's contract.
        unsafe { f16_pairs(&self.d) }
    }
    #[inline(always)]
    unsafe fn coefficients(&self, _d: __m256) -> __m256 {
        // SAFETY: as this method's contract.
        unsafe { f16x8(&self.m) }
    }
}

impl GroupUnpack for GroupQ5_0 {
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        // SAFETY: AVX-512 F and BW by the caller.
        unsafe {
            let mut steps = group_nibbles(&self.lo, &self.hi);
            for (step, qh) in steps.iter_mut().zip(&self.qh) {
                // Byte r of `qh` is row r's fifth bits of this step's codes: as a 64-bit mask,
                // exactly the bytes that take 16.
                let mask = u64::from_le_bytes(*qh);
                *step = _mm512_mask_add_epi8(*step, mask, *step, _mm512_set1_epi8(16));
            }
            steps
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> __m256 {
        // SAFETY: as this method's contract.
        unsafe { f16x8(&self.d) }
    }
    #[inline(always)]
    unsafe fn scale_pairs(&self) -> __m512 {
        // SAFETY: as this method's contract.
        unsafe { f16_pairs(&self.d) }
    }
    #[inline(always)]
    unsafe fn coefficients(&self, d: __m256) -> __m256 {
        // SAFETY: AVX by the caller.
        unsafe { _mm256_mul_ps(d, _mm256_set1_ps(-16.0)) }
    }
}

impl GroupUnpack for GroupQ8_0 {
    #[inline(always)]
    unsafe fn steps(&self) -> [__m512i; QK / 8] {
        // SAFETY: AVX-512 F by the caller; each load is one 64-byte step; `^ 0x80` gives the
        // offset form's unsigned codes `w + 128`.
        unsafe {
            std::array::from_fn(|t| {
                let w = _mm512_loadu_si512(self.qs[t].as_ptr() as *const _);
                _mm512_xor_si512(w, _mm512_set1_epi8(i8::MIN))
            })
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> __m256 {
        // SAFETY: as this method's contract.
        unsafe { f16x8(&self.d) }
    }
    #[inline(always)]
    unsafe fn scale_pairs(&self) -> __m512 {
        // SAFETY: as this method's contract.
        unsafe { f16_pairs(&self.d) }
    }
    #[inline(always)]
    unsafe fn coefficients(&self, d: __m256) -> __m256 {
        // SAFETY: AVX by the caller.
        unsafe { _mm256_mul_ps(d, _mm256_set1_ps(-128.0)) }
    }
}

/// One activation row against the eight weight rows of group row `g` (`g[b]` its blocks):
/// per block, four 512-bit `vpdpbusd` (weight codes of all eight rows against the activation's
/// step broadcast), one conversion, one scale product and one FMA serve all eight rows, where
/// the row-by-row kernel spends about that per row. Two accumulators for even and odd blocks.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL, VNNI, AVX2, FMA and F16C.
#[inline(always)]
unsafe fn dot_group<G: GroupUnpack>(g: &[G], a: &[BlockQ8]) -> [f32; GROUP] {
    // SAFETY: the features are guaranteed by the caller; loads are through references to whole
    // fields, and each activation step read is 8 bytes inside the block's 32.
    unsafe {
        let block = |gb: &G, ab: &BlockQ8, acc: &mut __m512, corr: &mut __m256| {
            let steps = gb.steps();
            // Step t of the activation: its bytes 8t..8t + 8 in every lane.
            let av = |t: usize| {
                _mm512_set1_epi64((ab.qs.as_ptr().add(8 * t) as *const i64).read_unaligned())
            };
            // One chain of four: written as two chains and a sum, rustc 1.95's LLVM exhausted
            // the build machine's memory compiling this crate.
            let mut dot = _mm512_setzero_si512();
            for (t, step) in steps.iter().enumerate() {
                dot = _mm512_dpbusd_epi32(dot, *step, av(t));
            }
            let scale = _mm512_mul_ps(gb.scale_pairs(), _mm512_set1_ps(ab.d));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
            *corr = _mm256_fmadd_ps(gb.coefficients(gb.scales()), _mm256_set1_ps(ab.s), *corr);
        };
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (mut corr0, mut corr1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (gb, ab) in g.chunks_exact(2).zip(a.chunks_exact(2)) {
            block(&gb[0], &ab[0], &mut acc0, &mut corr0);
            block(&gb[1], &ab[1], &mut acc1, &mut corr1);
        }
        if g.len() % 2 == 1 {
            let last = g.len() - 1;
            block(&g[last], &a[last], &mut acc0, &mut corr0);
        }
        row_sums(_mm512_add_ps(acc0, acc1), _mm256_add_ps(corr0, corr1))
    }
}

/// `R` activation rows against the eight weight rows of group row `g`: per block, the weight
/// codes are unpacked once into four steps and their scales converted once, then each row
/// adds four `vpdpbusd`, one conversion, one scale product and one FMA. A few decode rows
/// (a small batch) thus share one pass over the weights and one unpacking, where the panel
/// kernel would pad them to eight rows and the one-row kernel would unpack once per row.
/// One accumulator per row: the rows are the independent chains.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL, VNNI, AVX2, FMA and F16C; every row of `a` must hold
/// `g.len()` blocks.
#[inline(always)]
unsafe fn dot_group_rows<G: GroupUnpack, const R: usize>(
    g: &[G],
    a: [&[BlockQ8]; R],
) -> [[f32; GROUP]; R] {
    // SAFETY: as `dot_group`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let mut corr = [_mm256_setzero_ps(); R];
        for (b, gb) in g.iter().enumerate() {
            let steps = gb.steps();
            let d16 = gb.scale_pairs();
            let coef = gb.coefficients(gb.scales());
            for r in 0..R {
                let ab = a[r].get_unchecked(b);
                let av = |t: usize| {
                    _mm512_set1_epi64((ab.qs.as_ptr().add(8 * t) as *const i64).read_unaligned())
                };
                let mut dot = _mm512_setzero_si512();
                for (t, step) in steps.iter().enumerate() {
                    dot = _mm512_dpbusd_epi32(dot, *step, av(t));
                }
                let scale = _mm512_mul_ps(d16, _mm512_set1_ps(ab.d));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
                corr[r] = _mm256_fmadd_ps(coef, _mm256_set1_ps(ab.s), corr[r]);
            }
        }
        std::array::from_fn(|r| row_sums(acc[r], corr[r]))
    }
}

/// Output columns `cols` (a multiple of [`GROUP`] from a group boundary, or the matrix's end)
/// of `m` activation rows (`nb` blocks each, one after another in `a`) into `out`
/// (`m × cols.len()`, row-major), from interleaved groups (`nb` positions per group) at the
/// AVX-512 VNNI level: each group is read once per four rows ([`dot_group_rows`]) and stays
/// in cache between them; a lone row (a decode step alone) takes [`dot_group`].
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C, AVX-512 F, BW, VL and VNNI; `a` must hold `m · nb`
/// blocks.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn tile_groups_avx512_vnni<G: GroupUnpack>(
    groups: &[G],
    nb: usize,
    a: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    let width = cols.len();
    let first = cols.start / GROUP;
    let row = |r: usize| &a[r * nb..(r + 1) * nb];
    for (i, g) in (first..cols.end.div_ceil(GROUP)).enumerate() {
        let g = &groups[g * nb..(g + 1) * nb];
        let mut put = |r: usize, y: [f32; GROUP]| {
            for (c, &v) in y.iter().enumerate() {
                let col = i * GROUP + c;
                if col < width {
                    out[r * width + col] = v;
                }
            }
        };
        let mut r = 0;
        // SAFETY (each call): the features are this function's contract; each row slice
        // holds `nb` blocks, as many as the group row.
        while r + 4 <= m {
            let ys = unsafe { dot_group_rows(g, [row(r), row(r + 1), row(r + 2), row(r + 3)]) };
            for (k, y) in ys.into_iter().enumerate() {
                put(r + k, y);
            }
            r += 4;
        }
        if r + 2 <= m {
            let ys = unsafe { dot_group_rows(g, [row(r), row(r + 1)]) };
            for (k, y) in ys.into_iter().enumerate() {
                put(r + k, y);
            }
            r += 2;
        }
        if r < m {
            put(r, unsafe { dot_group(g, row(r)) });
        }
    }
}
