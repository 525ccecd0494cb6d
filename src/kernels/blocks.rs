//! Block layouts: the GGUF weight blocks we compute on, and our own activation block.
//!
//! The weight blocks are byte-for-byte the GGUF (ggml) layouts, parsed once at load from the
//! tensor's raw bytes, so no `unsafe` cast of a byte buffer is needed and the memory a decode
//! step streams is exactly the file's. Every type computes in one form: unsigned weight codes
//! times signed 8-bit activations, plus a per-block correction (see [`crate::kernels`]).

use half::f16;

/// Values per block, for every type this module handles.
pub const QK: usize = 32;

/// The weight types we have kernels for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    /// `w = d·q + m`, `q` in 0..=15 (4-bit), activations as Q8_1 (with their sums).
    Q4_1,
    /// `w = d·(q − 16)`, `q` in 0..=31 (4 low bits plus one high bit), activations as Q8_0.
    Q5_0,
    /// `w = d·q`, `q` a signed byte, activations as Q8_0.
    Q8_0,
}

impl WeightType {
    /// Bytes of one GGUF block of this type.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightType::Q4_1 => 20,
            WeightType::Q5_0 => 22,
            WeightType::Q8_0 => 34,
        }
    }

    /// The type for a candle GGML dtype, when we have a kernel for it.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4_1 => Some(WeightType::Q4_1),
            GgmlDType::Q5_0 => Some(WeightType::Q5_0),
            GgmlDType::Q8_0 => Some(WeightType::Q8_0),
            _ => None,
        }
    }
}

/// A GGUF Q4_1 block: scale, minimum, 32 nibbles (element `i` low, element `i + 16` high).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// A GGUF Q5_0 block: scale, the 32 fifth bits (bit `i` for element `i`), 32 nibbles.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// A GGUF Q8_0 block: scale and 32 signed bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// One quantized activation block, ours: 32 signed bytes, the scale as f32 (already rounded
/// through f16, as ggml stores it, so results match candle's), and the per-block sum term.
///
/// `s` is `d · Σqs`; for Q4_1 weights it is rounded through f16 exactly as ggml's Q8_1 stores
/// it (candle: `f16(Σqs) * f16(d)`), for the others it is exact in f32. 40 bytes; the
/// kernels load `qs` unaligned.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
}

impl Default for BlockQ8 {
    fn default() -> Self {
        BlockQ8 {
            qs: [0; QK],
            d: 0.0,
            s: 0.0,
        }
    }
}

/// The weight blocks of one matrix, row-major: row `j` is blocks `j·nb .. (j+1)·nb`.
#[derive(Debug, Clone, PartialEq)]
pub enum Blocks {
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q8_0(Vec<BlockQ8_0>),
}

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

impl Blocks {
    /// Parses raw GGUF block bytes; `bytes.len()` must be a whole number of blocks (checked by
    /// the caller, which knows the tensor's shape).
    pub fn parse(ty: WeightType, bytes: &[u8]) -> Self {
        fn rows<B: WeightBlock>(bytes: &[u8]) -> Vec<B> {
            bytes
                .chunks_exact(B::TYPE.block_bytes())
                .map(B::from_bytes)
                .collect()
        }
        match ty {
            WeightType::Q4_1 => Blocks::Q4_1(rows(bytes)),
            WeightType::Q5_0 => Blocks::Q5_0(rows(bytes)),
            WeightType::Q8_0 => Blocks::Q8_0(rows(bytes)),
        }
    }

    /// The weight type.
    pub fn weight_type(&self) -> WeightType {
        match self {
            Blocks::Q4_1(_) => WeightType::Q4_1,
            Blocks::Q5_0(_) => WeightType::Q5_0,
            Blocks::Q8_0(_) => WeightType::Q8_0,
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Blocks::Q4_1(b) => b.len(),
            Blocks::Q5_0(b) => b.len(),
            Blocks::Q8_0(b) => b.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the kernels need of a weight block, in the one form every type computes in:
/// `Σ w·a = d_w·d_a·Σ code·q_a + correction`.
pub trait WeightBlock: Copy + Send + Sync + 'static {
    /// The type.
    const TYPE: WeightType;
    /// One block from its GGUF bytes (at least [`WeightType::block_bytes`] of them).
    fn from_bytes(b: &[u8]) -> Self;
    /// The block's 32 unsigned codes (0..=15 or 0..=31), or for Q8_0 the signed bytes.
    fn codes(&self) -> [i32; QK];
    /// The scale `d`.
    fn scale(&self) -> f32;
    /// The block's correction for one activation block: Q4_1 `m·s`, Q5_0 `−16·d·s`; Q8_0 0.
    fn correction(&self, a: &BlockQ8) -> f32;
    /// The 32 weights as f32, computed as ggml (and candle) dequantize them.
    fn dequantize(&self) -> [f32; QK];
}

impl WeightBlock for BlockQ4_1 {
    const TYPE: WeightType = WeightType::Q4_1;
    fn from_bytes(b: &[u8]) -> Self {
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[4..20]);
        BlockQ4_1 {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qs,
        }
    }
    fn codes(&self) -> [i32; QK] {
        let mut c = [0; QK];
        for i in 0..QK / 2 {
            c[i] = (self.qs[i] & 0x0f) as i32;
            c[i + QK / 2] = (self.qs[i] >> 4) as i32;
        }
        c
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn correction(&self, a: &BlockQ8) -> f32 {
        self.m.to_f32() * a.s
    }
    fn dequantize(&self) -> [f32; QK] {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        self.codes().map(|c| c as f32 * d + m)
    }
}

impl WeightBlock for BlockQ5_0 {
    const TYPE: WeightType = WeightType::Q5_0;
    fn from_bytes(b: &[u8]) -> Self {
        let mut qh = [0u8; 4];
        qh.copy_from_slice(&b[2..6]);
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[6..22]);
        BlockQ5_0 {
            d: f16_at(b, 0),
            qh,
            qs,
        }
    }
    fn codes(&self) -> [i32; QK] {
        let qh = u32::from_le_bytes(self.qh);
        let mut c = [0; QK];
        for i in 0..QK / 2 {
            let hi0 = ((qh >> i) & 1) << 4;
            let hi1 = ((qh >> (i + 16)) & 1) << 4;
            c[i] = ((self.qs[i] & 0x0f) as u32 | hi0) as i32;
            c[i + QK / 2] = ((self.qs[i] >> 4) as u32 | hi1) as i32;
        }
        c
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn correction(&self, a: &BlockQ8) -> f32 {
        -16.0 * self.d.to_f32() * a.s
    }
    fn dequantize(&self) -> [f32; QK] {
        let d = self.d.to_f32();
        self.codes().map(|c| (c - 16) as f32 * d)
    }
}

impl WeightBlock for BlockQ8_0 {
    const TYPE: WeightType = WeightType::Q8_0;
    fn from_bytes(b: &[u8]) -> Self {
        BlockQ8_0 {
            d: f16_at(b, 0),
            qs: std::array::from_fn(|i| b[2 + i] as i8),
        }
    }
    fn codes(&self) -> [i32; QK] {
        self.qs.map(|q| q as i32)
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn correction(&self, _a: &BlockQ8) -> f32 {
        0.0
    }
    fn dequantize(&self) -> [f32; QK] {
        let d = self.d.to_f32();
        self.codes().map(|c| c as f32 * d)
    }
}

/// Weight rows per interleaved group (see [`interleave`]).
pub const GROUP: usize = 8;

/// Eight Q4_1 rows' blocks at one block position, interleaved (ggml's repacking idea, our
/// layout): `lo[r]` and `hi[r]` are row `r`'s nibble bytes 0..8 and 8..16, so a 64-byte load
/// holds one step of eight codes for all eight rows. 160 bytes, as the eight blocks were.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct GroupQ4_1 {
    pub lo: [[u8; 8]; GROUP],
    pub hi: [[u8; 8]; GROUP],
    pub d: [f16; GROUP],
    pub m: [f16; GROUP],
}

/// Eight Q5_0 rows' blocks at one block position, interleaved: nibbles as in [`GroupQ4_1`],
/// and `qh[t][r]` is byte `t` of row `r`'s fifth bits, so one 64-bit load is the byte mask of
/// step `t` for all eight rows. 176 bytes, as the eight blocks were.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct GroupQ5_0 {
    pub lo: [[u8; 8]; GROUP],
    pub hi: [[u8; 8]; GROUP],
    pub qh: [[u8; 8]; 4],
    pub d: [f16; GROUP],
}

/// Eight Q8_0 rows' blocks at one block position, interleaved: `qs[t][r]` is row `r`'s bytes
/// `8t..8t + 8`, so a 64-byte load holds one step of eight codes for all eight rows. 272
/// bytes, as the eight blocks were.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct GroupQ8_0 {
    pub qs: [[[i8; 8]; GROUP]; QK / 8],
    pub d: [f16; GROUP],
}

const _: () = assert!(std::mem::size_of::<GroupQ4_1>() == 8 * 20);
const _: () = assert!(std::mem::size_of::<GroupQ8_0>() == 8 * 34);
const _: () = assert!(std::mem::size_of::<GroupQ5_0>() == 8 * 22);

/// A weight block type that can be interleaved eight rows to a group.
pub trait Interleave: WeightBlock {
    /// The group of eight rows' blocks at one position.
    type Group: Copy + Send + Sync + 'static;
    /// The all-zero block (scale 0), padding a last group.
    const ZERO: Self;
    /// The eight blocks as a group.
    fn interleave(rows: [&Self; GROUP]) -> Self::Group;
    /// Row `r`'s block back out of a group.
    fn row(group: &Self::Group, r: usize) -> Self;
}

/// A block's 16 nibble bytes as its two 8-byte halves.
pub(super) fn halves(qs: &[u8; 16]) -> ([u8; 8], [u8; 8]) {
    let mut lo = [0; 8];
    let mut hi = [0; 8];
    lo.copy_from_slice(&qs[..8]);
    hi.copy_from_slice(&qs[8..]);
    (lo, hi)
}

fn joined(lo: &[u8; 8], hi: &[u8; 8]) -> [u8; 16] {
    let mut qs = [0; 16];
    qs[..8].copy_from_slice(lo);
    qs[8..].copy_from_slice(hi);
    qs
}

impl Interleave for BlockQ4_1 {
    type Group = GroupQ4_1;
    const ZERO: Self = BlockQ4_1 {
        d: f16::ZERO,
        m: f16::ZERO,
        qs: [0; QK / 2],
    };
    fn interleave(rows: [&Self; GROUP]) -> GroupQ4_1 {
        GroupQ4_1 {
            lo: rows.map(|b| halves(&b.qs).0),
            hi: rows.map(|b| halves(&b.qs).1),
            d: rows.map(|b| b.d),
            m: rows.map(|b| b.m),
        }
    }
    fn row(g: &GroupQ4_1, r: usize) -> Self {
        BlockQ4_1 {
            d: g.d[r],
            m: g.m[r],
            qs: joined(&g.lo[r], &g.hi[r]),
        }
    }
}

impl Interleave for BlockQ5_0 {
    type Group = GroupQ5_0;
    const ZERO: Self = BlockQ5_0 {
        d: f16::ZERO,
        qh: [0; 4],
        qs: [0; QK / 2],
    };
    fn interleave(rows: [&Self; GROUP]) -> GroupQ5_0 {
        GroupQ5_0 {
            lo: rows.map(|b| halves(&b.qs).0),
            hi: rows.map(|b| halves(&b.qs).1),
            qh: std::array::from_fn(|t| rows.map(|b| b.qh[t])),
            d: rows.map(|b| b.d),
        }
    }
    fn row(g: &GroupQ5_0, r: usize) -> Self {
        BlockQ5_0 {
            d: g.d[r],
            qh: std::array::from_fn(|t| g.qh[t][r]),
            qs: joined(&g.lo[r], &g.hi[r]),
        }
    }
}

impl Interleave for BlockQ8_0 {
    type Group = GroupQ8_0;
    const ZERO: Self = BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; QK],
    };
    fn interleave(rows: [&Self; GROUP]) -> GroupQ8_0 {
        GroupQ8_0 {
            qs: std::array::from_fn(|t| rows.map(|b| std::array::from_fn(|i| b.qs[8 * t + i]))),
            d: rows.map(|b| b.d),
        }
    }
    fn row(g: &GroupQ8_0, r: usize) -> Self {
        BlockQ8_0 {
            d: g.d[r],
            qs: std::array::from_fn(|i| g.qs[i / 8][r][i % 8]),
        }
    }
}

/// Interleaves the GGUF bytes of `n` rows of `nb` blocks into groups of eight rows
/// (group-major, then block position: group `g`, position `b` is at `g·nb + b`), parsing each
/// block straight from the file's bytes (no row-major copy in between, which for a model's
/// output head would be one more copy of its largest tensor at load). A last group of fewer
/// rows is padded with all-zero blocks (scale 0, so they compute 0 and their outputs are
/// dropped). `bytes` must hold `n·nb` blocks (checked by the caller).
pub fn interleave<B: Interleave>(bytes: &[u8], n: usize, nb: usize) -> Vec<B::Group> {
    let size = B::TYPE.block_bytes();
    let block = |j: usize, b: usize| {
        if j < n {
            B::from_bytes(&bytes[(j * nb + b) * size..])
        } else {
            B::ZERO
        }
    };
    let mut out = Vec::with_capacity(n.div_ceil(GROUP) * nb);
    for g in 0..n.div_ceil(GROUP) {
        for b in 0..nb {
            let rows: [B; GROUP] = std::array::from_fn(|r| block(g * GROUP + r, b));
            out.push(B::interleave(std::array::from_fn(|r| &rows[r])));
        }
    }
    out
}

/// The rows back out of groups: `n` rows of `nb` blocks, row-major.
pub fn deinterleave<B: Interleave>(groups: &[B::Group], n: usize, nb: usize) -> Vec<B> {
    let mut out = Vec::with_capacity(n * nb);
    for j in 0..n {
        for b in 0..nb {
            out.push(B::row(&groups[(j / GROUP) * nb + b], j % GROUP));
        }
    }
    out
}
