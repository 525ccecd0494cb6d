//! Qwen2 and Qwen2.5 GGUF files (`general.architecture = qwen2`).
//!
//! This is our own implementation, adapted from candle's `quantized_qwen2` (same tensors, same
//! arithmetic; a unit test below checks equal logits), because candle's model cannot be reset
//! to its freshly loaded state: its `ModelWeights` is not `Clone`, so there is no pristine copy
//! to swap in, and its `clear_kv_cache` drops the KV cache but not the causal-mask cache, which
//! keeps one mask per `(prompt length, cache length)` pair for the life of the model (a single
//! 8k-token prompt leaves 64 MiB behind). Reloading the file on every reset would be the only
//! other complete reset.
//!
//! Here the only mutable state is the per-layer KV cache, held apart from the weights, so the
//! reset empties it and nothing else can linger; masks are built per forward and dropped.
//! Two more differences from candle, neither changing the arithmetic: the token embeddings stay
//! quantized (rows are dequantized on lookup, as llama.cpp does) instead of a dequantized F32
//! copy of the whole table (519 MiB for Qwen2-0.5B's 151936 x 896), and a tied output
//! projection shares that one quantized tensor.

use crate::error::Result;
use crate::models::gguf::GgufFile;
use crate::models::{Adapter, Architecture, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::{build_additive_causal_mask, repeat_kv};
use std::sync::Arc;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "qwen2";
/// The longest context run here: the RoPE table has this many rows at most. Qwen2 and
/// Qwen2.5 declare 32k (131k only with YaRN scaling, which is refused).
pub const MAX_CONTEXT: usize = 131_072;

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
struct Config {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    ffn: usize,
    layers: usize,
    eps: f64,
    rope_base: f64,
    max_context: usize,
    vocab: usize,
}

impl Config {
    fn read(file: &GgufFile) -> Result<Self> {
        let heads = file.count("qwen2.attention.head_count")?;
        let kv_heads = file.count("qwen2.attention.head_count_kv")?;
        let hidden = file.count("qwen2.embedding_length")?;
        let ffn = file.count("qwen2.feed_forward_length")?;
        let layers = file.count("qwen2.block_count")?;
        file.count("qwen2.context_length")?;
        let eps = file
            .opt_f64("qwen2.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| {
                file.config_error("qwen2.attention.layer_norm_rms_epsilon", "is missing")
            })?;
        // llama.cpp's default too when the key is absent.
        let rope_base = file.opt_f64("qwen2.rope.freq_base")?.unwrap_or(10_000.0);
        if rope_base.is_nan() || rope_base <= 0.0 || rope_base.is_infinite() {
            return Err(file.config_error(
                "qwen2.rope.freq_base",
                format!("must be positive, found {rope_base}"),
            ));
        }
        if let Some(kind) = file.get("qwen2.rope.scaling.type") {
            if !matches!(kind.to_string().map(String::as_str), Ok("none")) {
                return Err(file.config_error(
                    "qwen2.rope.scaling.type",
                    format!("{kind:?} is not supported (allowed: none)"),
                ));
            }
        }
        if hidden % heads != 0 {
            return Err(file.config_error(
                "qwen2.embedding_length",
                format!("{hidden} is not a multiple of head_count {heads}"),
            ));
        }
        if heads % kv_heads != 0 {
            return Err(file.config_error(
                "qwen2.attention.head_count_kv",
                format!("{kv_heads} does not divide head_count {heads}"),
            ));
        }
        let head_dim = hidden / heads;
        if head_dim % 2 != 0 {
            return Err(file.config_error(
                "qwen2.embedding_length",
                format!("the head size {head_dim} must be even for RoPE"),
            ));
        }
        Ok(Config {
            heads,
            kv_heads,
            head_dim,
            hidden,
            ffn,
            layers,
            eps,
            rope_base,
            max_context: file.context_length(ARCH, MAX_CONTEXT)?,
            vocab: file.vocab_size(ARCH)?,
        })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    bq: Tensor,
    bk: Tensor,
    bv: Tensor,
    wo: QMatMul,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// Everything read-only: weights and RoPE tables.
#[derive(Debug, Clone)]
pub struct Network {
    embed: QMatMul,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    /// `(max_context, head_dim / 2)`, shared by all layers.
    cos: Tensor,
    sin: Tensor,
    cfg: Config,
}

/// The RoPE tables exactly as candle's `quantized_qwen2` computes them (F32 throughout).
fn rope_tables(cfg: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let base = cfg.rope_base as f32;
    let inv_freq: Vec<f32> = (0..cfg.head_dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / cfg.head_dim as f32))
        .collect();
    let n = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
    let positions = Tensor::arange(0, cfg.max_context as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.max_context, 1))?;
    let angles = positions.matmul(&inv_freq)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl Network {
    fn load(file: &mut GgufFile, cfg: Config, device: &Device) -> Result<Self> {
        let (h, hd, ff) = (cfg.hidden, cfg.head_dim, cfg.ffn);
        let (q_dim, kv_dim) = (cfg.heads * hd, cfg.kv_heads * hd);
        let embed = Arc::new(file.read_tensor("token_embd.weight", &[cfg.vocab, h], device)?);
        let output = if file.content.tensor_infos.contains_key("output.weight") {
            QMatMul::from_qtensor(file.read_tensor("output.weight", &[cfg.vocab, h], device)?)?
        } else {
            // Tied embeddings: the same quantized tensor serves the lookup and the projection.
            QMatMul::from_arc(embed.clone())?
        };
        let norm = RmsNorm::from_qtensor(
            file.read_tensor("output_norm.weight", &[h], device)?,
            cfg.eps,
        )?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut qm = |name: &str, shape: &[usize]| -> Result<QMatMul> {
                Ok(QMatMul::from_qtensor(file.read_tensor(
                    &format!("blk.{i}.{name}"),
                    shape,
                    device,
                )?)?)
            };
            let wq = qm("attn_q.weight", &[q_dim, h])?;
            let wk = qm("attn_k.weight", &[kv_dim, h])?;
            let wv = qm("attn_v.weight", &[kv_dim, h])?;
            let wo = qm("attn_output.weight", &[h, q_dim])?;
            let gate = qm("ffn_gate.weight", &[ff, h])?;
            let up = qm("ffn_up.weight", &[ff, h])?;
            let down = qm("ffn_down.weight", &[h, ff])?;
            let mut dense = |name: &str, shape: &[usize]| -> Result<Tensor> {
                Ok(file
                    .read_tensor(&format!("blk.{i}.{name}"), shape, device)?
                    .dequantize(device)?)
            };
            let bq = dense("attn_q.bias", &[q_dim])?;
            let bk = dense("attn_k.bias", &[kv_dim])?;
            let bv = dense("attn_v.bias", &[kv_dim])?;
            let attn_norm = RmsNorm::from_qtensor(
                file.read_tensor(&format!("blk.{i}.attn_norm.weight"), &[h], device)?,
                cfg.eps,
            )?;
            let ffn_norm = RmsNorm::from_qtensor(
                file.read_tensor(&format!("blk.{i}.ffn_norm.weight"), &[h], device)?,
                cfg.eps,
            )?;
            layers.push(Layer {
                wq,
                wk,
                wv,
                bq,
                bk,
                bv,
                wo,
                attn_norm,
                ffn_norm,
                gate,
                up,
                down,
            });
        }
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Network {
            embed: QMatMul::from_arc(embed)?,
            layers,
            norm,
            output,
            cos,
            sin,
            cfg,
        })
    }
}

/// One layer's cached keys and values, `(batch, kv_heads, positions, head_dim)`.
pub type KvCache = Option<(Tensor, Tensor)>;

impl Layer {
    fn attention(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        rope: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        cfg: &Config,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (hd, heads, kv_heads) = (cfg.head_dim, cfg.heads, cfg.kv_heads);
        let q = self.wq.forward(x)?.broadcast_add(&self.bq)?;
        let k = self.wk.forward(x)?.broadcast_add(&self.bk)?;
        let v = self.wv.forward(x)?.broadcast_add(&self.bv)?;
        let q = q
            .reshape((b, l, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k
            .reshape((b, l, kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((b, l, kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (cos, sin) = rope;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match cache.take() {
            None => (k, v),
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
        };
        *cache = Some((k.clone(), v.clone()));
        let k = repeat_kv(k, heads / kv_heads)?;
        let v = repeat_kv(v, heads / kv_heads)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = match mask {
            Some(mask) => att.broadcast_add(mask)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, heads * hd))?;
        Ok(self.wo.forward(&y)?)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        let up = self.up.forward(x)?;
        Ok(self.down.forward(&(gate * up)?)?)
    }
}

/// Quantized Qwen2, as registered.
pub struct QuantizedQwen2;

impl crate::models::Network for Network {
    /// One entry per layer: all the mutable state there is.
    type Cache = Vec<KvCache>;

    fn forward(
        &self,
        input_ids: &Tensor,
        position: usize,
        cache: &mut Vec<KvCache>,
    ) -> Result<Tensor> {
        let w = self;
        let (_b, l) = input_ids.dims2()?;
        let mut x = w.embed.embedding(input_ids)?;
        let mask = if l > 1 {
            Some(build_additive_causal_mask(
                l,
                position,
                None,
                x.device(),
                DType::F32,
            )?)
        } else {
            None
        };
        let cos = w.cos.narrow(0, position, l)?;
        let sin = w.sin.narrow(0, position, l)?;
        for (layer, cache) in w.layers.iter().zip(cache.iter_mut()) {
            let h = layer.attn_norm.forward(&x)?;
            let h = layer.attention(&h, cache, (&cos, &sin), mask.as_ref(), &w.cfg)?;
            x = (x + h)?;
            let h = layer.mlp(&layer.ffn_norm.forward(&x)?)?;
            x = (x + h)?;
        }
        // Only the last position's logits are returned, so only it is projected.
        let x = w.norm.forward(&x.i((.., l - 1, ..))?.contiguous()?)?;
        Ok(w.output.forward(&x)?)
    }

    fn reset(&self, cache: &mut Vec<KvCache>) -> Result<()> {
        cache.iter_mut().for_each(|c| *c = None);
        Ok(())
    }
}

impl Architecture for QuantizedQwen2 {
    const NAME: &'static str = "quantized_qwen2";
    const FORMAT: WeightFormat = WeightFormat::Gguf;
    const MODEL_TYPES: &'static [&'static str] = &[ARCH];
    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let mut file = source.into_gguf(Self::NAME)?;
        let cfg = Config::read(&file)?;
        let info = ModelInfo::from_gguf(Self::NAME, &file, cfg.vocab, cfg.max_context)?;
        let layers = cfg.layers;
        let network = Network::load(&mut file, cfg, &options.device)?;
        Ok(Adapter::new(network, vec![None; layers], info))
    }
}
