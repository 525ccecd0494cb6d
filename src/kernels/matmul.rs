//! The quantized matrix: GGUF blocks held in memory, multiplied by f32 activations on CPU.
//!
//! One matmul: quantize the activations once (Q8_1-style sums for Q4_1, Q8_0 for the others),
//! then split the output columns into contiguous ranges over candle's barrier pool, each range
//! computing all activation rows (see the level's `tile`). The barrier pool is the one
//! candle's own quantized matmuls run on: the fallback types (Q4_K, Q6_K, …) in the same model
//! use it too, so one set of worker threads serves every quantized matmul instead of two pools
//! spinning against each other on the same cores (rayon is left to candle's f32 `gemm`).

use super::blocks::{
    deinterleave, interleave, BlockQ4_1, BlockQ5_0, BlockQ8, BlockQ8_0, Blocks, GroupQ4_1,
    GroupQ5_0, GroupQ8_0, Interleave, WeightBlock, WeightType, GROUP, QK,
};
use super::dispatch::{self, Level};
use super::quantize::{quantize_into, SumForm};
use super::scalar;
use crate::error::{Error, Result};
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Mutex;

/// Output columns per work item: small enough to balance two to a few dozen threads, large
/// enough that a column range amortises its item overhead.
const COLUMN_TILE: usize = 16;

/// Rows from which the AVX-512 level packs activation panels (eight rows per zmm pass, the
/// rest padded) for weights held as in the file: measured on a Q5_0 2048×640 weight, panels
/// beat the row-by-row kernel from two rows on (1.4x at two, 1.6x at three, 1.8x at four);
/// one row (a decode step) is faster row by row.
const PANEL_MIN_ROWS: usize = 2;

/// Rows up to which interleaved groups multiply the activations directly, four rows per pass
/// over each group (`x86::tile_groups_avx512_vnni`), instead of packing panels: a batched
/// decode step's few rows then read every weight once and unpack it once per four rows,
/// where panels pad them to eight and unpack once per weight row. Measured on SmolLM2's
/// batched decode step at one thread (the whole step, as `bench step` times it), groups were
/// faster at every batch size from 2 to 16: 1.85x at 2 rows, 1.7x at 4, 1.1-1.3x at 8-16.
const GROUP_ROWS_MAX: usize = 16;

/// Activation panels for the AVX-512 prefill kernel.
#[cfg(target_arch = "x86_64")]
type Panels = Vec<super::x86::PanelBlock>;
/// No panels off x86.
#[cfg(not(target_arch = "x86_64"))]
enum Panels {}

/// A quantized `(n, k)` weight (`n` outputs, `k` inputs) that our kernels multiply.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    storage: Storage,
    n: usize,
    k: usize,
}

/// How the blocks are held: as in the file, or (at the AVX-512 VNNI level)
/// interleaved eight rows to a group, so that a decode step's 512-bit products cover eight
/// weight rows at once instead of unpacking one block per row (see `x86::dot_group`). Same
/// bytes either way; the groups are the only copy.
#[derive(Debug, Clone)]
enum Storage {
    Rows(Blocks),
    Groups(Groups),
}

/// Interleaved weight groups, group-major (see [`interleave`]).
#[derive(Debug, Clone)]
enum Groups {
    Q4_1(Vec<GroupQ4_1>),
    Q5_0(Vec<GroupQ5_0>),
    Q8_0(Vec<GroupQ8_0>),
}

impl QuantizedWeight {
    /// Takes the GGUF blocks `bytes` of an `(n, k)` matrix of type `ty`, laid out for the
    /// dispatched level.
    pub fn from_bytes(ty: WeightType, bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        Self::from_bytes_at(dispatch::level(), ty, bytes, n, k)
    }

    /// [`Self::from_bytes`] laid out for `level` (a level the CPU lacks is lowered): every
    /// type is interleaved for AVX-512 VNNI. Any layout computes at every level; the
    /// other levels take the rows back out of groups per matmul, which only tests and
    /// benchmarks do.
    pub fn from_bytes_at(
        level: Level,
        ty: WeightType,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Self> {
        if k == 0 || !k.is_multiple_of(QK) {
            return Err(Error::Kernel(format!(
                "k = {k} is not a positive multiple of {QK}"
            )));
        }
        let expected = n * (k / QK) * ty.block_bytes();
        if bytes.len() != expected {
            return Err(Error::Kernel(format!(
                "{ty:?} ({n}, {k}): {} bytes, expected {expected}",
                bytes.len()
            )));
        }
        let nb = k / QK;
        let storage = match (level.min(Level::detect()), ty) {
            (Level::Avx512Vnni, WeightType::Q4_1) => {
                Storage::Groups(Groups::Q4_1(interleave::<BlockQ4_1>(bytes, n, nb)))
            }
            (Level::Avx512Vnni, WeightType::Q5_0) => {
                Storage::Groups(Groups::Q5_0(interleave::<BlockQ5_0>(bytes, n, nb)))
            }
            (Level::Avx512Vnni, WeightType::Q8_0) => {
                Storage::Groups(Groups::Q8_0(interleave::<BlockQ8_0>(bytes, n, nb)))
            }
            _ => Storage::Rows(Blocks::parse(ty, bytes)),
        };
        Ok(QuantizedWeight { storage, n, k })
    }

    /// Takes a CPU GGUF tensor `(n, k)` when we have a kernel for its type; `None` otherwise
    /// (other types, other devices, other ranks), for the caller to keep candle's `QMatMul`.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        Self::from_qtensor_at(dispatch::level(), t)
    }

    /// [`Self::from_qtensor`] laid out for `level` (see [`Self::from_bytes_at`]).
    pub fn from_qtensor_at(level: Level, t: &QTensor) -> Result<Option<Self>> {
        let Some(ty) = WeightType::from_ggml(t.dtype()) else {
            return Ok(None);
        };
        let (n, k) = match (t.device(), t.shape().dims()) {
            (Device::Cpu, &[n, k]) if k.is_multiple_of(QK) => (n, k),
            _ => return Ok(None),
        };
        Ok(Some(Self::from_bytes_at(level, ty, &t.data()?, n, k)?))
    }

    /// The weight type.
    pub fn weight_type(&self) -> WeightType {
        match &self.storage {
            Storage::Rows(b) => b.weight_type(),
            Storage::Groups(Groups::Q4_1(_)) => WeightType::Q4_1,
            Storage::Groups(Groups::Q5_0(_)) => WeightType::Q5_0,
            Storage::Groups(Groups::Q8_0(_)) => WeightType::Q8_0,
        }
    }

    /// Whether the blocks are held interleaved in groups of eight rows.
    pub fn interleaved(&self) -> bool {
        matches!(self.storage, Storage::Groups(_))
    }

    /// `(n, k)`: outputs, inputs.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The blocks, row-major (taken back out of groups when interleaved).
    pub fn blocks(&self) -> Cow<'_, Blocks> {
        let (n, nb) = (self.n, self.k / QK);
        match &self.storage {
            Storage::Rows(b) => Cow::Borrowed(b),
            Storage::Groups(Groups::Q4_1(g)) => Cow::Owned(Blocks::Q4_1(deinterleave(g, n, nb))),
            Storage::Groups(Groups::Q5_0(g)) => Cow::Owned(Blocks::Q5_0(deinterleave(g, n, nb))),
            Storage::Groups(Groups::Q8_0(g)) => Cow::Owned(Blocks::Q8_0(deinterleave(g, n, nb))),
        }
    }

    /// The activation form this weight type multiplies with.
    pub fn sum_form(&self) -> SumForm {
        match self.weight_type() {
            WeightType::Q4_1 => SumForm::F16,
            WeightType::Q5_0 | WeightType::Q8_0 => SumForm::F32,
        }
    }

    /// Quantizes `m` activation rows of `k` values at `level`, as a matmul does.
    pub fn quantize_activations(&self, level: Level, x: &[f32]) -> Vec<BlockQ8> {
        let mut acts = Vec::new();
        quantize_into(level, x, self.sum_form(), &mut acts);
        acts
    }

    /// `y = x Wᵀ` for `x` of `m × k` values, at the dispatched level; `m × n` values.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.matmul_at(dispatch::level(), x)
    }

    /// [`Self::matmul`] at a given level (tests and benchmarks run every level in one process).
    /// A level the CPU lacks is lowered to the best one it has.
    pub fn matmul_at(&self, level: Level, x: &[f32]) -> Result<Vec<f32>> {
        if !x.len().is_multiple_of(self.k) {
            return Err(Error::Kernel(format!(
                "{} activation values are not rows of k = {}",
                x.len(),
                self.k
            )));
        }
        let acts = self.quantize_activations(level, x);
        self.matmul_quantized(level, &acts, x.len() / self.k)
    }

    /// The matmul proper on already-quantized activations (`m` rows of `k / 32` blocks).
    /// A level the CPU lacks is lowered to the best one it has.
    pub fn matmul_quantized(&self, level: Level, acts: &[BlockQ8], m: usize) -> Result<Vec<f32>> {
        let (n, nb) = (self.n, self.k / QK);
        if acts.len() != m * nb {
            return Err(Error::Kernel(format!(
                "{} activation blocks are not {m} rows of {nb}",
                acts.len()
            )));
        }
        // The SIMD entry points are only sound at a level this CPU has.
        let level = level.min(Level::detect());
        // Groups compute at the level they were laid out for; any other level gets the rows.
        let rows = match (&self.storage, level) {
            (Storage::Groups(_), Level::Avx512Vnni) => None,
            _ => Some(self.blocks()),
        };
        let panels = self.panels(level, acts, m);
        let out = Mutex::new(vec![0f32; m * n]);
        let items = n.div_ceil(COLUMN_TILE);
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            let cols = range.start * COLUMN_TILE..(range.end * COLUMN_TILE).min(n);
            let mut local = vec![0f32; m * cols.len()];
            match (&panels, &rows) {
                (Some(panels), _) => self.tile_panels(panels, m, cols.clone(), &mut local),
                (None, Some(rows)) => tile(level, rows, nb, acts, m, cols.clone(), &mut local),
                (None, None) => self.tile_groups(acts, m, cols.clone(), &mut local),
            }
            // A poisoned lock only means another item panicked; the pool re-raises that panic.
            let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
            let width = cols.len();
            for (r, src) in local.chunks_exact(width).enumerate() {
                out[r * n + cols.start..r * n + cols.end].copy_from_slice(src);
            }
        });
        Ok(out.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// The activations packed for the AVX-512 prefill kernel, when it runs: at that level and
    /// for [`PANEL_MIN_ROWS`] rows or more (a decode step keeps the row-by-row kernel).
    fn panels(&self, level: Level, acts: &[BlockQ8], m: usize) -> Option<Panels> {
        #[cfg(target_arch = "x86_64")]
        let grouped_rows = matches!(self.storage, Storage::Groups(_)) && m <= GROUP_ROWS_MAX;
        if level == Level::Avx512Vnni && m >= PANEL_MIN_ROWS && !grouped_rows {
            return Some(super::x86::pack_panels(acts, m, self.k / QK));
        }
        let _ = (level, acts, m);
        None
    }

    #[cfg(target_arch = "x86_64")]
    fn tile_panels(&self, panels: &Panels, m: usize, cols: Range<usize>, out: &mut [f32]) {
        use super::x86::tile_panels_avx512_vnni as tile;
        let nb = self.k / QK;
        // SAFETY: panels are only packed at the AVX-512 VNNI level, after that level was
        // capped by `Level::detect()`, which only returns it when the CPU has its features.
        unsafe {
            match &self.storage {
                Storage::Rows(Blocks::Q4_1(w)) => tile(rows_of(w, nb), nb, panels, m, cols, out),
                Storage::Rows(Blocks::Q5_0(w)) => tile(rows_of(w, nb), nb, panels, m, cols, out),
                Storage::Rows(Blocks::Q8_0(w)) => tile(rows_of(w, nb), nb, panels, m, cols, out),
                Storage::Groups(Groups::Q4_1(g)) => {
                    tile(group_rows(g, nb), nb, panels, m, cols, out)
                }
                Storage::Groups(Groups::Q5_0(g)) => {
                    tile(group_rows(g, nb), nb, panels, m, cols, out)
                }
                Storage::Groups(Groups::Q8_0(g)) => {
                    tile(group_rows(g, nb), nb, panels, m, cols, out)
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn tile_panels(&self, panels: &Panels, _m: usize, _cols: Range<usize>, _out: &mut [f32]) {
        match *panels {}
    }

    /// A decode step (`m` activation rows, a few) on interleaved groups, at the AVX-512 VNNI
    /// level.
    #[cfg(target_arch = "x86_64")]
    fn tile_groups(&self, acts: &[BlockQ8], m: usize, cols: Range<usize>, out: &mut [f32]) {
        use super::x86::tile_groups_avx512_vnni as tile;
        let nb = self.k / QK;
        // SAFETY: groups run here only at the AVX-512 VNNI level (see `matmul_quantized`),
        // capped by `Level::detect()`, which only returns it when the CPU has its features.
        // Column ranges start at multiples of `COLUMN_TILE`, itself a multiple of `GROUP`.
        unsafe {
            match &self.storage {
                Storage::Groups(Groups::Q4_1(g)) => tile(g, nb, acts, m, cols, out),
                Storage::Groups(Groups::Q5_0(g)) => tile(g, nb, acts, m, cols, out),
                Storage::Groups(Groups::Q8_0(g)) => tile(g, nb, acts, m, cols, out),
                Storage::Rows(_) => {}
            }
        }
    }

    /// Off x86 no groups are built (they are laid out for AVX-512 only).
    #[cfg(not(target_arch = "x86_64"))]
    fn tile_groups(&self, acts: &[BlockQ8], m: usize, cols: Range<usize>, out: &mut [f32]) {
        tile(
            Level::Scalar,
            &self.blocks(),
            self.k / QK,
            acts,
            m,
            cols,
            out,
        )
    }

    /// Row `j` dequantized into `out` (`k` values).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        fn rows<B: WeightBlock>(w: &[B], j: usize, nb: usize, out: &mut [f32]) {
            for (b, o) in w[j * nb..(j + 1) * nb].iter().zip(out.chunks_exact_mut(QK)) {
                o.copy_from_slice(&b.dequantize());
            }
        }
        fn groups<B: Interleave>(g: &[B::Group], j: usize, nb: usize, out: &mut [f32]) {
            let first = (j / GROUP) * nb;
            for (gb, o) in g[first..first + nb].iter().zip(out.chunks_exact_mut(QK)) {
                o.copy_from_slice(&B::row(gb, j % GROUP).dequantize());
            }
        }
        let nb = self.k / QK;
        match &self.storage {
            Storage::Rows(Blocks::Q4_1(w)) => rows(w, j, nb, out),
            Storage::Rows(Blocks::Q5_0(w)) => rows(w, j, nb, out),
            Storage::Rows(Blocks::Q8_0(w)) => rows(w, j, nb, out),
            Storage::Groups(Groups::Q4_1(g)) => groups::<BlockQ4_1>(g, j, nb, out),
            Storage::Groups(Groups::Q5_0(g)) => groups::<BlockQ5_0>(g, j, nb, out),
            Storage::Groups(Groups::Q8_0(g)) => groups::<BlockQ8_0>(g, j, nb, out),
        }
    }

    /// An embedding lookup: the rows `ids` (any shape) dequantized, shape `ids.dims() + [k]`.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.k);
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        let mut out = vec![0f32; ids.len() * self.k];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.k)) {
            let j = id as usize;
            if j >= self.n {
                candle_core::bail!(
                    "embedding: token id {id} is outside the table of {}",
                    self.n
                )
            }
            self.dequantize_row(j, row);
        }
        Tensor::from_vec(out, shape, &Device::Cpu)
    }

    /// `x Wᵀ` over the last dimension of a CPU tensor; any leading dimensions are kept. Runs
    /// as a candle custom op ([`CustomOp1`]) on the tensor's storage.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(&k) = x.dims().last() else {
            candle_core::bail!("quantized matmul: a scalar has no last dimension")
        };
        if k != self.k {
            candle_core::bail!(
                "quantized matmul: input {:?} does not end in k = {}",
                x.shape(),
                self.k
            );
        }
        x.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(self)
    }
}

/// Weight row `j`'s block at position `b`, row-major.
/// The matmul as a candle op: CPU only (the weight is only built from CPU tensors, and other
/// devices keep candle's `QMatMul`), F32 activations contiguous in memory.
impl CustomOp1 for QuantizedWeight {
    fn name(&self) -> &'static str {
        "llm-pool-quantized-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("quantized matmul: activations must be F32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quantized matmul: activations must be contiguous")
        };
        let y = self
            .matmul(&values[start..end])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut dims = layout.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

#[cfg(target_arch = "x86_64")]
fn rows_of<'a, B>(w: &'a [B], nb: usize) -> impl Fn(usize, usize) -> &'a B + 'a {
    move |j, b| &w[j * nb + b]
}

/// Weight row `j`'s block at position `b`, out of interleaved groups.
#[cfg(target_arch = "x86_64")]
fn group_rows<'a, G>(
    g: &'a [G],
    nb: usize,
) -> impl Fn(usize, usize) -> super::x86::GroupRow<'a, G> + 'a {
    move |j, b| super::x86::GroupRow {
        group: &g[(j / GROUP) * nb + b],
        row: j % GROUP,
    }
}

/// Output columns `cols` of row-major blocks at `level`.
fn tile(
    level: Level,
    blocks: &Blocks,
    nb: usize,
    acts: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    match blocks {
        Blocks::Q4_1(w) => tile_at(level, w, nb, acts, m, cols, out),
        Blocks::Q5_0(w) => tile_at(level, w, nb, acts, m, cols, out),
        Blocks::Q8_0(w) => tile_at(level, w, nb, acts, m, cols, out),
    }
}

#[cfg(target_arch = "x86_64")]
fn tile_at<B: super::x86::Unpack>(
    level: Level,
    w: &[B],
    nb: usize,
    acts: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    use super::x86;
    // SAFETY: `level` was capped by `Level::detect()`, which only returns a level whose
    // features `is_x86_feature_detected!` reported on this CPU.
    match level {
        Level::Avx512Vnni => unsafe { x86::tile_avx512_vnni(w, nb, acts, m, cols, out) },
        Level::AvxVnni => unsafe { x86::tile_avx_vnni(w, nb, acts, m, cols, out) },
        Level::Avx2 => unsafe { x86::tile_avx2(w, nb, acts, m, cols, out) },
        Level::Scalar => scalar::tile(w, nb, acts, m, cols, out),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn tile_at<B: WeightBlock>(
    _level: Level,
    w: &[B],
    nb: usize,
    acts: &[BlockQ8],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
) {
    scalar::tile(w, nb, acts, m, cols, out)
}
