//! Grouped-query self-attention: projections, per-head norms, RoPE, the KV cache, and the
//! core every architecture shares ([`attend`]).
//!
//! The core computes as transformers' eager attention does: scores scaled (by `1/sqrt(d)`
//! unless the architecture says otherwise, as Gemma's `query_pre_attn_scalar`), optionally
//! soft-capped, then cast to F32 for the mask and the softmax, and back to the activations'
//! dtype for the product with the values. Masks come from [`common::attention_mask`], with
//! the window counted as transformers counts it and the keys of a sliding layer starting where
//! its cache does ([`first_cached_key`]).

use super::gguf_weights::GgufWeights;
use super::kv_cache::{first_cached_key, LayerCache};
use super::linear::Linear;
use super::norm::Norm;
use super::rotary::{CosSin, Rotary};
use crate::error::Result;
use crate::kernels::vector::{self, Rows};
use crate::models::common;
use candle_core::{DType, Device, Storage, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Mutex;

/// The head layout of an attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; each serves `num_heads / num_kv_heads` query heads.
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
}

impl Heads {
    /// `num_heads` query heads sharing `num_kv_heads` key/value heads of `head_dim`.
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Heads {
            num_heads,
            num_kv_heads,
            head_dim,
        }
    }
}

/// The query, key and value projections.
#[derive(Debug, Clone)]
enum Projections {
    /// Three matrices.
    Separate { q: Linear, k: Linear, v: Linear },
    /// One matrix whose output is `[q | k | v]` (Phi-3's `qkv_proj`).
    Fused(Linear),
}

/// Self-attention over a KV cache.
#[derive(Debug, Clone)]
pub struct Attention {
    projections: Projections,
    o_proj: Linear,
    /// Per-head norms of queries and keys, applied before RoPE (Gemma 3, Phi's qk_layernorm).
    qk_norms: Option<(Norm, Norm)>,
    heads: Heads,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    /// Attention with separate query, key and value projections.
    pub fn new(q: Linear, k: Linear, v: Linear, o_proj: Linear, heads: Heads) -> Self {
        Self::with_projections(Projections::Separate { q, k, v }, o_proj, heads)
    }

    /// Attention with one fused `[q | k | v]` projection.
    pub fn fused(qkv: Linear, o_proj: Linear, heads: Heads) -> Self {
        Self::with_projections(Projections::Fused(qkv), o_proj, heads)
    }

    fn with_projections(projections: Projections, o_proj: Linear, heads: Heads) -> Self {
        Attention {
            projections,
            o_proj,
            qk_norms: None,
            scale: 1.0 / (heads.head_dim as f64).sqrt(),
            softcap: None,
            heads,
        }
    }

    /// Loads the Hugging Face layout: `q_proj`, `k_proj`, `v_proj` (with biases when
    /// `qkv_bias`) and the output projection `o_name` (with a bias when `o_bias`).
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        heads: Heads,
        (qkv_bias, o_bias): (bool, bool),
        o_name: &str,
    ) -> Result<Self> {
        let (q_dim, kv_dim) = (
            heads.num_heads * heads.head_dim,
            heads.num_kv_heads * heads.head_dim,
        );
        Ok(Attention::new(
            Linear::load(vb.pp("q_proj"), hidden, q_dim, qkv_bias)?,
            Linear::load(vb.pp("k_proj"), hidden, kv_dim, qkv_bias)?,
            Linear::load(vb.pp("v_proj"), hidden, kv_dim, qkv_bias)?,
            Linear::load(vb.pp(o_name), q_dim, hidden, o_bias)?,
            heads,
        ))
    }

    /// Reads llama.cpp's layout: `{prefix}.attn_q`, `attn_k`, `attn_v` and `attn_output`
    /// (`.weight`, plus a dense `.bias` on q, k and v when `qkv_bias`). Q, K and V become one
    /// fused projection where our kernels compute all three ([`GgufWeights::fused_linear`]).
    pub fn from_gguf(
        w: &mut GgufWeights,
        prefix: &str,
        hidden: usize,
        heads: Heads,
        qkv_bias: bool,
    ) -> Result<Self> {
        let (q_dim, kv_dim) = (
            heads.num_heads * heads.head_dim,
            heads.num_kv_heads * heads.head_dim,
        );
        let names = ["attn_q", "attn_k", "attn_v"].map(|n| format!("{prefix}.{n}"));
        let dims = [q_dim, kv_dim, kv_dim];
        let weights = names.each_ref().map(|n| format!("{n}.weight"));
        let parts: Vec<(&str, usize)> = weights.iter().map(String::as_str).zip(dims).collect();
        if let Some(qkv) = w.fused_linear(&parts, hidden)? {
            let qkv = match qkv_bias {
                false => qkv,
                true => {
                    let biases = names
                        .iter()
                        .zip(dims)
                        .map(|(n, dim)| w.vector(&format!("{n}.bias"), dim))
                        .collect::<Result<Vec<_>>>()?;
                    qkv.with_bias(Tensor::cat(&biases, 0)?)
                }
            };
            let o_proj = w.linear(&format!("{prefix}.attn_output.weight"), [hidden, q_dim])?;
            return Ok(Attention::fused(qkv, o_proj, heads));
        }
        let mut projection = |name: &str, out_dim: usize| -> Result<Linear> {
            let linear = w.linear(&format!("{prefix}.{name}.weight"), [out_dim, hidden])?;
            Ok(match qkv_bias {
                true => linear.with_bias(w.vector(&format!("{prefix}.{name}.bias"), out_dim)?),
                false => linear,
            })
        };
        let (q, k, v) = (
            projection("attn_q", q_dim)?,
            projection("attn_k", kv_dim)?,
            projection("attn_v", kv_dim)?,
        );
        let o_proj = w.linear(&format!("{prefix}.attn_output.weight"), [hidden, q_dim])?;
        Ok(Attention::new(q, k, v, o_proj, heads))
    }

    /// Reads llama.cpp's attention in either of its layouts: one fused `{prefix}.attn_qkv`
    /// (Phi-2 and Phi-3 files) when the file has it, else separate `attn_q`, `attn_k` and
    /// `attn_v` ([`Attention::from_gguf`], fused at load where our kernels can). When
    /// `qkv_bias`, q, k and v have dense biases: `attn_qkv.bias`, or, on a fused weight
    /// without one, `attn_q.bias`, `attn_k.bias` and `attn_v.bias` concatenated (as llama.cpp
    /// reads older files). When `o_bias`, `attn_output` has one too.
    pub fn from_gguf_any_layout(
        w: &mut GgufWeights,
        prefix: &str,
        hidden: usize,
        heads: Heads,
        (qkv_bias, o_bias): (bool, bool),
    ) -> Result<Self> {
        let (q_dim, kv_dim) = (
            heads.num_heads * heads.head_dim,
            heads.num_kv_heads * heads.head_dim,
        );
        let fused = format!("{prefix}.attn_qkv.weight");
        let mut attention = if w.has(&fused) {
            let qkv_dim = q_dim + 2 * kv_dim;
            let mut qkv = w.linear(&fused, [qkv_dim, hidden])?;
            if qkv_bias {
                let fused_bias = format!("{prefix}.attn_qkv.bias");
                let q_bias = format!("{prefix}.attn_q.bias");
                let bias = if !w.has(&fused_bias) && w.has(&q_bias) {
                    let parts = [("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)];
                    let biases = parts
                        .iter()
                        .map(|(n, dim)| w.vector(&format!("{prefix}.{n}.bias"), *dim))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&biases, 0)?
                } else {
                    w.vector(&fused_bias, qkv_dim)?
                };
                qkv = qkv.with_bias(bias);
            }
            let o_proj = w.linear(&format!("{prefix}.attn_output.weight"), [hidden, q_dim])?;
            Attention::fused(qkv, o_proj, heads)
        } else {
            Self::from_gguf(w, prefix, hidden, heads, qkv_bias)?
        };
        if o_bias {
            let bias = w.vector(&format!("{prefix}.attn_output.bias"), hidden)?;
            attention.o_proj = attention.o_proj.with_bias(bias);
        }
        Ok(attention)
    }

    /// Scales the scores by `scale` instead of `1/sqrt(head_dim)`.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = scale;
        self
    }

    /// Soft-caps the scores: `cap * tanh(scores / cap)` (Gemma 2).
    pub fn with_softcap(mut self, softcap: Option<f64>) -> Self {
        self.softcap = softcap;
        self
    }

    /// Whether q, k and v are one fused projection (for tests and diagnostics).
    pub fn fused_projections(&self) -> bool {
        matches!(self.projections, Projections::Fused(_))
    }

    /// Normalises each query and key head before RoPE.
    pub fn with_qk_norms(mut self, q_norm: Norm, k_norm: Norm) -> Self {
        self.qk_norms = Some((q_norm, k_norm));
        self
    }
}

/// What a layer's attention needs to know about the positions of a chunk: its RoPE, the cos
/// and sin computed for those positions, and its mask (`None` when nothing is hidden).
#[derive(Debug, Clone, Copy)]
pub struct Positions<'a> {
    /// The layer's RoPE variant.
    pub rotary: &'a Rotary,
    /// cos and sin of the chunk's positions.
    pub cos_sin: &'a CosSin,
    /// The additive mask over cached and new keys.
    pub mask: Option<&'a Tensor>,
}

impl Positions<'_> {
    /// Rotates `x` `(batch, heads, seq_len, head_dim)` to the chunk's positions.
    pub fn rotate(&self, x: &Tensor) -> Result<Tensor> {
        self.rotary.apply(x, self.cos_sin)
    }
}

/// One sequence's part of a batched step, as one layer's attention sees it: its rows of the
/// step's activations, its positions, and its own KV cache.
#[derive(Debug)]
pub struct Span<'a> {
    /// The first of its rows in the step's `(batch, rows, hidden)` activations.
    pub start: usize,
    /// How many rows (tokens) it has.
    pub len: usize,
    /// Its positions: RoPE, cos and sin, mask.
    pub at: Positions<'a>,
    /// This layer's cache of its sequence.
    pub cache: &'a mut LayerCache,
}

/// An attention block a decoder layer can hold: this module's [`Attention`], or an
/// architecture's own (DeepSeek-V2's latent attention).
pub trait SelfAttention: Send + Sync + 'static {
    /// Attends `x` `(batch, seq_len, hidden)` at `at` to the cached keys and its own, and
    /// appends its keys and values to `cache`.
    fn forward(&self, x: &Tensor, at: &Positions, cache: &mut LayerCache) -> Result<Tensor>;

    /// The values one token adds to this layer's cache: its keys and its values.
    fn kv_values_per_token(&self) -> usize;

    /// Attends the rows of several sequences at once: `x` holds every span's rows one after
    /// the other, each span attends only to its own cache and rows, and the result has `x`'s
    /// rows in the same order. `rows` rotates every row of `x` to its own position (its
    /// sequence's); each span's `at` does the same for its rows alone, with its mask. By
    /// default each span runs [`SelfAttention::forward`] on its own rows; [`Attention`]
    /// projects, normalises and rotates all rows at once instead.
    fn forward_spans(
        &self,
        x: &Tensor,
        rows: &Positions,
        spans: &mut [Span<'_>],
    ) -> Result<Tensor> {
        let _ = rows;
        if let [span] = spans {
            if span.start == 0 && span.len == x.dim(1)? {
                return self.forward(x, &span.at, span.cache);
            }
        }
        let outs = spans
            .iter_mut()
            .map(|s| self.forward(&x.narrow(1, s.start, s.len)?, &s.at, s.cache))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs, 1)?)
    }
}

impl Attention {
    /// The query, key and value rows of `x` `(batch, rows, hidden)`, each `(batch, rows, width)`.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(match &self.projections {
            Projections::Separate { q, k, v } => (x.apply(q)?, x.apply(k)?, x.apply(v)?),
            Projections::Fused(qkv) => {
                let Heads {
                    num_heads,
                    num_kv_heads,
                    head_dim,
                } = self.heads;
                let qkv = x.apply(qkv)?;
                let (q_size, kv_size) = (num_heads * head_dim, num_kv_heads * head_dim);
                (
                    qkv.narrow(D::Minus1, 0, q_size)?,
                    qkv.narrow(D::Minus1, q_size, kv_size)?,
                    qkv.narrow(D::Minus1, q_size + kv_size, kv_size)?,
                )
            }
        })
    }

    /// Splits projected rows `(batch, rows, width)` into heads, `(batch, heads, rows, d)`,
    /// with the q/k norms applied and every row rotated by `at`.
    fn heads_of(
        &self,
        (q, k, v): (Tensor, Tensor, Tensor),
        at: &Positions,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, rows, _) = q.dims3()?;
        let Heads {
            num_heads,
            num_kv_heads,
            head_dim,
        } = self.heads;
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, rows, n, head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (
            split(q, num_heads)?,
            split(k, num_kv_heads)?,
            split(v, num_kv_heads)?,
        );
        let (q, k) = match &self.qk_norms {
            Some((qn, kn)) => (q.apply(qn)?, k.apply(kn)?),
            None => (q, k),
        };
        Ok((at.rotate(&q)?, at.rotate(&k)?, v))
    }

    /// One sequence's heads `(batch, heads, len, d)` appended to its cache and attended:
    /// `(batch, heads, len, d)`. A decode step's query on CPU attends straight from the
    /// cache ([`attend_one_cpu`]): no copy of the cache's keys and values (the general path
    /// makes the cache's strided views contiguous first) and no tensor ops. Measured alone
    /// (a paired run in one process), it decodes SmolLM2 3% faster after an 8-token prompt and
    /// 45% faster after 1500 tokens; in a batch it saves a dozen ops per sequence and layer.
    fn attend_heads(
        &self,
        (q, k, v): (Tensor, Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (k, v) = cache.append(k, v)?;
        if mask.is_none() {
            if let Some(out) = attend_one_cpu(&q, &k, &v, self.scale, self.softcap)? {
                return Ok(out);
            }
        }
        attend(&q, k, v, self.scale, self.softcap, mask)
    }

    /// Heads `(batch, heads, rows, d)` back to rows `(batch, rows, heads · d)` through the
    /// output projection.
    fn output(&self, attended: Tensor) -> Result<Tensor> {
        let (b, _, rows, _) = attended.dims4()?;
        Ok(attended
            .transpose(1, 2)?
            .reshape((b, rows, ()))?
            .apply(&self.o_proj)?)
    }
}

impl SelfAttention for Attention {
    fn kv_values_per_token(&self) -> usize {
        2 * self.heads.num_kv_heads * self.heads.head_dim
    }

    fn forward(&self, x: &Tensor, at: &Positions, cache: &mut LayerCache) -> Result<Tensor> {
        let heads = self.heads_of(self.project(x)?, at)?;
        self.output(self.attend_heads(heads, at.mask, cache)?)
    }

    /// Everything but the attention core runs once over every span's rows: the projections
    /// (one matmul reads each weight once for the whole batch), the head split, the q/k norms
    /// and RoPE (each row at its own sequence's position). Only appending to the cache and
    /// attending run per sequence.
    fn forward_spans(
        &self,
        x: &Tensor,
        rows: &Positions,
        spans: &mut [Span<'_>],
    ) -> Result<Tensor> {
        let (q, k, v) = self.heads_of(self.project(x)?, rows)?;
        let mut outs = Vec::with_capacity(spans.len());
        for s in spans.iter_mut() {
            let part = |t: &Tensor| t.narrow(2, s.start, s.len);
            let heads = (part(&q)?, part(&k)?, part(&v)?);
            outs.push(self.attend_heads(heads, s.at.mask, s.cache)?);
        }
        let attended = match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 2)?,
        };
        self.output(attended)
    }
}

/// Query rows per piece of a long chunk in [`attend`]: each piece attends only to the keys up
/// to its last row, so a causal prompt of `n` tokens computes about half of the `n × n`
/// scores instead of all of them (with pieces of 64, 56% at 512 tokens).
const QUERY_PIECE: usize = 64;

/// The attention core: `softmax(q k^T * scale [soft-capped] + mask) v`, with grouped-query
/// attention. `q` is `(batch, heads, seq_len, d)`, `k` and `v` `(batch, kv_heads, kv_len, d)`
/// with the chunk's own keys last; the result is `(batch, heads, seq_len, d_v)`. `mask`, when
/// given, is causal as [`mask`] builds it (it hides at least every key after each query's own
/// position), which lets a long chunk skip the keys none of a piece's queries can see.
pub fn attend(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    scale: f64,
    softcap: Option<f64>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (seq_len, kv_len) = (q.dim(2)?, k.dim(2)?);
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let Some(mask) = mask.filter(|_| seq_len > QUERY_PIECE) else {
        return attend_all(q, &k, &v, scale, softcap, mask);
    };
    let mut pieces = Vec::with_capacity(seq_len.div_ceil(QUERY_PIECE));
    for start in (0..seq_len).step_by(QUERY_PIECE) {
        let len = QUERY_PIECE.min(seq_len - start);
        // Keys after the piece's last query are in every one of its queries' future.
        let keys = kv_len - (seq_len - start - len);
        let (kp, vp) = (
            k.narrow(2, 0, keys)?.contiguous()?,
            v.narrow(2, 0, keys)?.contiguous()?,
        );
        let mp = mask.narrow(2, start, len)?.narrow(3, 0, keys)?;
        pieces.push(attend_all(
            &q.narrow(2, start, len)?,
            &kp,
            &vp,
            scale,
            softcap,
            Some(&mp),
        )?);
    }
    Ok(Tensor::cat(&pieces, 2)?)
}

/// [`attend`] for one query per head (a decode step) on CPU in F32, straight from the memory
/// of the keys and values, which may be strided views of a KV cache's buffers: no copy of the
/// cache, and a handful of loops ([`vector`]) instead of a dozen tensor ops; the heads run in
/// parallel. It rounds close to the general path (the dot products sum in vector lanes, the
/// softmax in candle's order), though not to the bit. `None` when the inputs are not of that
/// kind (the caller takes the general path).
fn attend_one_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    let (b, heads, seq_len, d) = q.dims4()?;
    let (kv_heads, kv_len, d_v) = (k.dim(1)?, k.dim(2)?, v.dim(3)?);
    let f32s = [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if b != 1 || seq_len != 1 || kv_len == 0 || !q.device().is_cpu() || !f32s {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        return Ok(None);
    };
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 {
        return Ok(None);
    }
    let qd = &qs.as_slice::<f32>()?[ql.start_offset()..];
    let (kd, vd) = (
        &ks.as_slice::<f32>()?[kl.start_offset()..],
        &vs.as_slice::<f32>()?[vl.start_offset()..],
    );
    let groups = heads / kv_heads;
    let (scale, cap) = (scale as f32, softcap.map(|c| c as f32));
    // One head's output into `o`, its scores in `scores`.
    let head = |h: usize, scores: &mut [f32], o: &mut [f32]| {
        let g = h / groups;
        let keys = Rows {
            data: kd,
            first: g * kst[1],
            stride: kst[2],
        };
        vector::dots(&qd[h * d..(h + 1) * d], keys, scores);
        for score in scores.iter_mut() {
            let s = *score * scale;
            *score = match cap {
                Some(c) => (s / c).tanh() * c,
                None => s,
            };
        }
        // Softmax as candle's: max, exp, the same summation order, divide.
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
        }
        let sum = candle_sum(scores);
        for s in scores.iter_mut() {
            *s /= sum;
        }
        // probabilities · V, keys in order.
        let values = Rows {
            data: vd,
            first: g * vst[1],
            stride: vst[2],
        };
        vector::weighted_sum(scores, values, o);
    };
    // The heads are independent: they split over candle's barrier pool (the threads our
    // matmuls use, idle between them), each range of heads into its own buffer.
    let out = Mutex::new(vec![0f32; heads * d_v]);
    candle_core::utils::barrier_pool().execute_chunked(heads, |range| {
        let mut scores = vec![0f32; kv_len];
        let mut local = vec![0f32; range.len() * d_v];
        for (h, o) in range.clone().zip(local.chunks_exact_mut(d_v)) {
            head(h, &mut scores, o);
        }
        // A poisoned lock only means another range panicked; the pool re-raises that panic.
        let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
        out[range.start * d_v..range.end * d_v].copy_from_slice(&local);
    });
    let out = out.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(Some(Tensor::from_vec(out, (1, heads, 1, d_v), q.device())?))
}

/// The sum of `x` in the order candle's CPU softmax adds (four 8-lane accumulators over
/// blocks of 32, reduced pairwise, then the tail in order), so that a softmax computed here
/// rounds as candle's does.
fn candle_sum(x: &[f32]) -> f32 {
    let whole = x.len() & !31;
    let mut acc = [[0f32; 8]; 4];
    for block in x[..whole].chunks_exact(32) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, a) in lanes.iter_mut().enumerate() {
                *a += block[j * 8 + l];
            }
        }
    }
    let [a0, a1, a2, a3] = acc;
    let pair = |x: [f32; 8], y: [f32; 8]| -> [f32; 8] { std::array::from_fn(|l| x[l] + y[l]) };
    let a = pair(pair(a0, a1), pair(a2, a3));
    let t0 = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let mut sum = (t0[0] + t0[1]) + (t0[2] + t0[3]);
    for &v in &x[whole..] {
        sum += v;
    }
    sum
}

/// [`attend`] over all keys at once.
///
/// The query heads that share a KV head are consecutive (head `i` reads KV head
/// `i / (heads / kv_heads)`, as transformers' `repeat_kv` lays them out), so they fold into
/// that KV head's rows of one matmul: `(batch, kv_heads, groups·seq_len, d)` against the keys
/// as they are. Repeating K and V per query head instead copied the whole cache `groups`
/// times in every layer at every step (Gemma 3 270M: 4 query heads per KV head).
fn attend_all(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, heads, seq_len, d) = q.dims4()?;
    let (kv_heads, kv_len, d_v) = (k.dim(1)?, k.dim(2)?, v.dim(3)?);
    let groups = heads / kv_heads;
    let q = q
        .contiguous()?
        .reshape((b, kv_heads, groups * seq_len, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?.reshape((b, heads, seq_len, kv_len))?;
    let scores = match softcap {
        None => scores,
        Some(cap) => ((scores / cap)?.tanh()? * cap)?,
    };
    // Mask and softmax in F32, as transformers' eager attention does.
    let scores = scores.to_dtype(DType::F32)?;
    let scores = match mask {
        None => scores,
        Some(m) => scores.broadcast_add(m)?,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?
        .to_dtype(v.dtype())?
        .reshape((b, kv_heads, groups * seq_len, kv_len))?;
    Ok(probs.matmul(v)?.reshape((b, heads, seq_len, d_v))?)
}

/// The additive mask of a chunk of `seq_len` queries at `position` for a layer with `window`
/// (`None`: causal only), over the keys its cache holds plus the chunk's own; `None` when
/// nothing is hidden.
pub fn mask(
    seq_len: usize,
    position: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    common::attention_mask(
        seq_len,
        position,
        first_cached_key(window, position),
        window,
        device,
    )
}

/// The masks of one sequence's chunk, built once per distinct window (a model has one or two).
#[derive(Debug, Default)]
pub struct Masks {
    built: Vec<(Option<usize>, Option<Tensor>)>,
}

impl Masks {
    /// The masks of a chunk of `seq_len` queries at `position`, for each of `windows`.
    pub fn new(
        seq_len: usize,
        position: usize,
        windows: impl IntoIterator<Item = Option<usize>>,
        device: &Device,
    ) -> Result<Self> {
        let mut masks = Masks::default();
        for window in windows {
            if !masks.built.iter().any(|(w, _)| *w == window) {
                let m = mask(seq_len, position, window, device)?;
                masks.built.push((window, m));
            }
        }
        Ok(masks)
    }

    /// The mask for layers with `window` (`None` when nothing is hidden, or when no mask was
    /// built for that window).
    pub fn get(&self, window: Option<usize>) -> Option<&Tensor> {
        self.built
            .iter()
            .find(|(w, _)| *w == window)
            .and_then(|(_, m)| m.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut s = seed | 1;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// A decode step's query attends straight from strided views of a cache's buffers, as
    /// the general path computes it: grouped-query heads, soft-cap or not.
    #[test]
    fn one_query_from_a_strided_cache_equals_the_general_path() {
        let q = random((1, 4, 1, 16), 4);
        // Keys and values as a cache holds them: rows 3..40 of buffers with room for 64.
        let kb = random((1, 2, 64, 16), 5);
        let vb = random((1, 2, 64, 12), 6);
        let (k, v) = (kb.narrow(2, 3, 37).unwrap(), vb.narrow(2, 3, 37).unwrap());
        for softcap in [None, Some(2.0)] {
            let fast = attend_one_cpu(&q, &k, &v, 0.25, softcap).unwrap().unwrap();
            let general = attend_all(
                &q,
                &k.contiguous().unwrap(),
                &v.contiguous().unwrap(),
                0.25,
                softcap,
                None,
            )
            .unwrap();
            assert_eq!(fast.dims(), general.dims());
            let diff = max_abs_diff(&fast, &general);
            assert!(diff < 1e-5, "{softcap:?}: max abs diff {diff}");
        }
    }

    /// A long chunk attends piece by piece, each piece to the keys up to its last query:
    /// the same result as all queries against all keys, with grouped-query heads, cached keys
    /// before the chunk, and with or without a sliding window.
    #[test]
    fn a_long_chunk_in_pieces_equals_all_at_once() {
        let (seq_len, cached) = (2 * QUERY_PIECE + 22, 20);
        let q = random((1, 4, seq_len, 8), 1);
        let k = random((1, 2, cached + seq_len, 8), 2);
        let v = random((1, 2, cached + seq_len, 8), 3);
        for window in [None, Some(50)] {
            let first = first_cached_key(window, cached);
            let (k, v) = (
                k.narrow(2, first, cached + seq_len - first).unwrap(),
                v.narrow(2, first, cached + seq_len - first).unwrap(),
            );
            let m = mask(seq_len, cached, window, &Device::Cpu).unwrap();
            let pieces = attend(&q, k.clone(), v.clone(), 0.3, Some(5.0), m.as_ref()).unwrap();
            let all = attend_all(&q, &k, &v, 0.3, Some(5.0), m.as_ref()).unwrap();
            assert_eq!(pieces.dims(), all.dims());
            let diff = max_abs_diff(&pieces, &all);
            assert!(diff < 1e-5, "{window:?}: max abs diff {diff}");
        }
    }
}
