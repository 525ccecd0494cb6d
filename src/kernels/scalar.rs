//! Portable kernels: the reference every SIMD level must agree with, and the only code on
//! architectures other than x86_64. Same structure as the SIMD drivers: one weight row at a
//! time, up to four activation rows per pass over it.

use super::blocks::{BlockQ8, WeightBlock};
use std::ops::Range;

/// `Σ w·a` of weight row `w` with `R` activation rows.
fn dot_rows<B: WeightBlock, const R: usize>(w: &[B], a: [&[BlockQ8]; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for (bi, wb) in w.iter().enumerate() {
        let codes = wb.codes();
        let d = wb.scale();
        for (o, rows) in out.iter_mut().zip(a) {
            let ab = &rows[bi];
            let sum: i32 = codes.iter().zip(&ab.qs).map(|(&c, &q)| c * q as i32).sum();
            *o += d * ab.d * sum as f32 + wb.correction(ab);
        }
    }
    out
}

/// Output columns `cols` for all `m` activation rows into `out` (`m × cols.len()`, row-major).
pub(super) fn tile<B: WeightBlock>(
    w: &[B],
    nb: usize,
    acts: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    let width = cols.len();
    for (c, j) in cols.enumerate() {
        let wr = &w[j * nb..(j + 1) * nb];
        let row = |r: usize| &acts[r * nb..(r + 1) * nb];
        let mut r = 0;
        while r + 4 <= m {
            let y = dot_rows(wr, [row(r), row(r + 1), row(r + 2), row(r + 3)]);
            for (i, v) in y.into_iter().enumerate() {
                out[(r + i) * width + c] = v;
            }
            r += 4;
        }
        for rr in r..m {
            out[rr * width + c] = dot_rows(wr, [row(rr)])[0];
        }
    }
}
