//! Phi-3 (Phi-3, Phi-3.5 and Phi-4-mini text models, `model_type: phi3`) from a Hugging Face
//! directory.
//!
//! This module runs its own forward pass, adapted from candle-transformers' `phi3.rs`, because
//! candle's model computes something else than transformers for real checkpoints:
//!
//! - it ignores `sliding_window` (Phi-3-mini-4k: 2047 of 4096 positions), which transformers
//!   applies to every layer;
//! - its LongRoPE multiplies the inverse frequencies by the scaling factors where
//!   transformers divides by them, and it leaves out the attention factor
//!   `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))` applied to cos and sin;
//! - its config deserializer rejects transformers >= 5 configs (`rope_parameters`).
//!
//! Everything else follows candle's file: fused `qkv_proj` and `gate_up_proj`, RMSNorm,
//! partial rotary embeddings, optional tied head. Sliding-window caches keep only the last
//! `sliding_window - 1` keys, which is all a later query can see.
//!
//! LongRoPE limit: transformers switches from the short to the long factors, for all positions
//! of a forward, once that forward reaches past `original_max_position_embeddings`, while the
//! keys already cached keep their short-factor rotation, so what it computes past that point
//! depends on how the sequence was chunked. Up to `original_max_position_embeddings` it
//! consistently uses the short factors, which this module reproduces exactly; a LongRoPE
//! model therefore reports `max_context = original_max_position_embeddings` (4096 for the
//! 128k models) so the engine refuses longer sequences instead of computing something
//! unverified.
//!
//! Reset: a fresh [`Cache`] (one empty slot per layer). All state lives in that cache, which
//! is separate from the weights, so a new one is exactly the freshly loaded state.

use crate::error::{Error, Result};
use crate::models::common::attention_mask;
use crate::models::hf::{HfConfig, RopeScaling};
use crate::models::{Adapter, Architecture, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear_no_bias, Activation, Embedding, Linear, RmsNorm, VarBuilder};
use serde_json::Value;

/// The Phi-3 settings llm-pool reads from config.json.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    activation: Activation,
    rms_norm_eps: f64,
    rope: RopeConfig,
    sliding_window: Option<usize>,
    tie_word_embeddings: bool,
    /// The longest sequence this implementation computes as transformers does.
    max_context: usize,
}

/// RoPE over the first `rotary_dim` dimensions of each head.
#[derive(Debug, Clone, PartialEq)]
struct RopeConfig {
    theta: f64,
    rotary_dim: usize,
    /// LongRoPE's short factors (one per rotated pair), dividing the frequencies.
    factors: Option<Vec<f64>>,
    /// Multiplies cos and sin (LongRoPE's attention factor; 1 otherwise).
    attention_factor: f64,
}

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
fn phi3_config(c: &HfConfig) -> Result<Config> {
    const FAMILY: &str = "phi3";
    let activation = match c
        .activation(&["silu", "gelu_pytorch_tanh", "gelu_new", "gelu"], "silu")?
        .as_str()
    {
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluPytorchTanh,
        _ => Activation::Silu,
    };
    c.require_bool("attention_bias", false, FAMILY)?;
    let hidden_size = c.usize("hidden_size")?;
    let num_attention_heads = c.usize("num_attention_heads")?;
    let num_key_value_heads = c.usize_or("num_key_value_heads", num_attention_heads)?;
    if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(Error::config(
            "num_key_value_heads",
            format!("{num_key_value_heads} must be positive and divide num_attention_heads {num_attention_heads}"),
        ));
    }
    let head_dim = match c.opt_usize("head_dim")? {
        Some(hd) => hd,
        None => c.require_derived_head_dim()?,
    };
    let max_position_embeddings = c.usize_or("max_position_embeddings", 4096)?;
    let rope = c.rope(None, 10_000.0)?;
    let partial = rope.partial_rotary_factor.unwrap_or(1.0);
    let rotary_dim = (partial * head_dim as f64) as usize;
    if !(partial > 0.0 && partial <= 1.0) || rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        return Err(Error::config(
            "partial_rotary_factor",
            format!(
                "{partial} is not supported: it must be in (0, 1] and rotate an even, non-zero \
                 number of the {head_dim} head dimensions (found {rotary_dim})"
            ),
        ));
    }
    let (factors, attention_factor, max_context) = match &rope.scaling {
        RopeScaling::None => (None, 1.0, max_position_embeddings),
        RopeScaling::Other { rope_type, params }
            if rope_type == "longrope" || rope_type == "su" =>
        {
            let number = |key: &str| -> Result<Option<f64>> {
                match params.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                        Error::config(
                            format!("rope_scaling.{key}"),
                            format!("must be a number, found {v}"),
                        )
                    }),
                }
            };
            let original = match number("original_max_position_embeddings")? {
                Some(v) => v as usize,
                None => c.usize_or("original_max_position_embeddings", max_position_embeddings)?,
            };
            if original == 0 {
                return Err(Error::config(
                    "original_max_position_embeddings",
                    "0 must be positive",
                ));
            }
            let short: Vec<f64> = match params.get("short_factor").and_then(Value::as_array) {
                Some(list) => list.iter().filter_map(Value::as_f64).collect(),
                None => Vec::new(),
            };
            if short.len() != rotary_dim / 2
                || params
                    .get("short_factor")
                    .and_then(Value::as_array)
                    .is_some_and(|l| l.len() != short.len())
            {
                return Err(Error::config(
                    "rope_scaling.short_factor",
                    format!(
                        "must be a list of {} numbers (one per rotated pair)",
                        rotary_dim / 2
                    ),
                ));
            }
            // transformers: the attention factor as given, else derived from the context
            // extension factor (given, or max / original positions).
            let factor = match number("factor")? {
                Some(f) => f,
                None => max_position_embeddings as f64 / original as f64,
            };
            let attention_factor = match number("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            (
                Some(short),
                attention_factor,
                original.min(max_position_embeddings),
            )
        }
        _ => return Err(c.unsupported_rope(&rope, FAMILY, &["default", "longrope", "su"])),
    };
    let sliding_window = c.opt_usize("sliding_window")?;
    if sliding_window == Some(0) {
        return Err(Error::config(
            "sliding_window",
            "0 must be positive (or null)",
        ));
    }
    Ok(Config {
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_hidden_layers: c.usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        activation,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-5)?,
        rope: RopeConfig {
            theta: rope.theta,
            rotary_dim,
            factors,
            attention_factor,
        },
        sliding_window,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
        max_context,
    })
}

/// RoPE frequencies; cos/sin are computed for the positions of each forward.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Tensor,
    rotary_dim: usize,
    attention_factor: f64,
}

impl Rotary {
    fn new(cfg: &RopeConfig, device: &Device) -> Result<Self> {
        let dim = cfg.rotary_dim;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .enumerate()
            .map(|(k, i)| {
                // phi3_config checked there is one factor per rotated pair.
                let ext = cfg.factors.as_ref().and_then(|f| f.get(k)).copied();
                let ext = ext.unwrap_or(1.0);
                (1.0 / (ext * cfg.theta.powf(i as f64 / dim as f64))) as f32
            })
            .collect();
        let n = inv_freq.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, n), device)?,
            rotary_dim: dim,
            attention_factor: cfg.attention_factor,
        })
    }

    /// `(cos, sin)`, each `(seq_len, rotary_dim / 2)`, for positions `offset..offset + seq_len`.
    fn cos_sin(&self, offset: usize, seq_len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let t = Tensor::arange(
            offset as u32,
            (offset + seq_len) as u32,
            self.inv_freq.device(),
        )?
        .to_dtype(DType::F32)?
        .reshape((seq_len, 1))?;
        let freqs = t.matmul(&self.inv_freq)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let (cos, sin) = if self.attention_factor == 1.0 {
            (cos, sin)
        } else {
            (
                (cos * self.attention_factor)?,
                (sin * self.attention_factor)?,
            )
        };
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }

    /// Rotates the first `rotary_dim` dimensions of `xs` (`(b, heads, seq, head_dim)`).
    fn apply(&self, xs: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
        let head_dim = xs.dim(D::Minus1)?;
        if self.rotary_dim == head_dim {
            return Ok(candle_nn::rotary_emb::rope(&xs.contiguous()?, cos, sin)?);
        }
        let rot = xs.narrow(D::Minus1, 0, self.rotary_dim)?.contiguous()?;
        let pass = xs.narrow(D::Minus1, self.rotary_dim, head_dim - self.rotary_dim)?;
        let rot = candle_nn::rotary_emb::rope(&rot, cos, sin)?;
        Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?.contiguous()?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    act: Activation,
    intermediate_size: usize,
}

impl Mlp {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up_proj: linear_no_bias(h, 2 * i, vb.pp("gate_up_proj"))?,
            down_proj: linear_no_bias(i, h, vb.pp("down_proj"))?,
            act: cfg.activation,
            intermediate_size: i,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate_up = xs.apply(&self.gate_up_proj)?;
        let i = self.intermediate_size;
        let gate = gate_up.narrow(D::Minus1, 0, i)?.apply(&self.act)?;
        (gate_up.narrow(D::Minus1, i, i)? * gate)?.apply(&self.down_proj)
    }
}

/// The KV cache: per layer, the keys and values the next tokens attend to.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl Cache {
    fn new(layers: usize) -> Self {
        Cache {
            layers: vec![None; layers],
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Keys kept in the cache after a forward: `sliding_window - 1` with a window.
    keep: Option<usize>,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            qkv_proj: linear_no_bias(h, (nh + 2 * nkv) * hd, vb.pp("qkv_proj"))?,
            o_proj: linear_no_bias(nh * hd, h, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            keep: cfg.sliding_window.map(|w| w - 1),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        cos_sin: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, seq_len, _) = xs.dims3()?;
        let qkv = xs.apply(&self.qkv_proj)?;
        let (q_size, kv_size) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, seq_len, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(qkv.narrow(D::Minus1, 0, q_size)?, self.num_heads)?;
        let k = heads(qkv.narrow(D::Minus1, q_size, kv_size)?, self.num_kv_heads)?;
        let v = heads(
            qkv.narrow(D::Minus1, q_size + kv_size, kv_size)?,
            self.num_kv_heads,
        )?;
        let q = rotary.apply(&q, cos_sin)?;
        let k = rotary.apply(&k, cos_sin)?;
        let (k, v) = match cache.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        let len = k.dim(2)?;
        *cache = match self.keep {
            Some(0) => None,
            Some(keep) if len > keep => Some((
                k.narrow(2, len - keep, keep)?,
                v.narrow(2, len - keep, keep)?,
            )),
            _ => Some((k.clone(), v.clone())),
        };
        let groups = self.num_heads / self.num_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match mask {
            None => scores,
            Some(m) => scores.broadcast_add(m)?,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        Ok(probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, seq_len, ()))?
            .apply(&self.o_proj)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: candle_nn::rms_norm(h, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: candle_nn::rms_norm(
                h,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }
}

/// The Phi-3 network.
#[derive(Debug, Clone)]
pub struct Network {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    sliding_window: Option<usize>,
}

impl Network {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb_m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?,
            lm_head,
            rotary: Rotary::new(&cfg.rope, vb.device())?,
            sliding_window: cfg.sliding_window,
        })
    }

    fn run(&self, input_ids: &Tensor, offset: usize, cache: &mut Cache) -> Result<Tensor> {
        let (_b, seq_len) = input_ids.dims2()?;
        let mut xs = self.embed_tokens.forward(input_ids)?;
        let cos_sin = self.rotary.cos_sin(offset, seq_len, xs.dtype())?;
        // With a window, every layer holds at most `window - 1` cached keys.
        let kv_start = match self.sliding_window {
            Some(w) => offset - offset.min(w - 1),
            None => 0,
        };
        let mask = attention_mask(
            seq_len,
            offset,
            kv_start,
            self.sliding_window,
            input_ids.device(),
        )?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let residual = &xs;
            let h = layer.self_attn.forward(
                &xs.apply(&layer.input_layernorm)?,
                &self.rotary,
                &cos_sin,
                mask.as_ref(),
                slot,
            )?;
            let xs_attn = (h + residual)?;
            let h = xs_attn
                .apply(&layer.post_attention_layernorm)?
                .apply(&layer.mlp)?;
            xs = (h + xs_attn)?;
        }
        Ok(xs
            .narrow(1, seq_len - 1, 1)?
            .apply(&self.norm)?
            .apply(&self.lm_head)?)
    }
}

/// Phi3, as registered.
pub struct Phi3;

impl Architecture for Phi3 {
    const NAME: &'static str = "phi3";
    const FORMAT: WeightFormat = WeightFormat::Safetensors;
    const MODEL_TYPES: &'static [&'static str] = &["phi3"];
    const HF_CLASSES: &'static [&'static str] = &["Phi3ForCausalLM"];

    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let dir = source.into_hf(Self::NAME)?;
        let cfg = phi3_config(&dir.config)?;
        let dtype = dir.dtype(options)?;
        let vb = dir.var_builder(dtype, &options.device)?;
        let network = Network::new(&cfg, vb)?;
        let info = ModelInfo::from_hf(Self::NAME, &dir, cfg.vocab_size, cfg.max_context, dtype);
        let cache = Cache::new(network.layers.len());
        Ok(Adapter::new(network, cache, info))
    }
}

impl crate::models::Network for Network {
    type Cache = Cache;

    fn forward(&self, input_ids: &Tensor, position: usize, cache: &mut Cache) -> Result<Tensor> {
        self.run(input_ids, position, cache)
    }

    fn reset(&self, cache: &mut Cache) -> Result<()> {
        *cache = Cache::new(self.layers.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::hf::real_config;
    use crate::models::LanguageModel;
    use std::path::Path;

    #[test]
    fn phi_3_mini_4k_maps() {
        let c = phi3_config(&real_config("phi3-Phi-3-mini-4k-instruct.json")).unwrap();
        assert_eq!(
            (c.hidden_size, c.head_dim, c.num_hidden_layers),
            (3072, 96, 32)
        );
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (32, 32));
        assert_eq!(c.activation, Activation::Silu);
        assert_eq!(c.sliding_window, Some(2047));
        assert_eq!(c.rope.theta, 10000.0);
        assert_eq!(c.rope.rotary_dim, 96);
        assert_eq!(
            (c.rope.factors.clone(), c.rope.attention_factor),
            (None, 1.0)
        );
        assert_eq!(c.max_context, 4096);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn phi_3_mini_128k_longrope_maps_and_limits_the_context() {
        let c = phi3_config(&real_config("phi3-Phi-3-mini-128k-instruct.json")).unwrap();
        let short = c.rope.factors.clone().unwrap();
        assert_eq!(short.len(), 48);
        assert_eq!(short[0], 1.05);
        let expected = (1.0 + (131072.0f64 / 4096.0).ln() / 4096f64.ln()).sqrt();
        assert!((c.rope.attention_factor - expected).abs() < 1e-12);
        assert_eq!(c.max_context, 4096);
    }

    #[test]
    fn transformers_5_longrope_layout_maps() {
        let mut v = real_config("phi3-Phi-3-mini-128k-instruct.json")
            .value()
            .clone();
        let mut scaling = v["rope_scaling"].clone();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_scaling");
        o.remove("rope_theta");
        scaling["rope_type"] = "longrope".into();
        scaling["rope_theta"] = 10000.0.into();
        scaling["original_max_position_embeddings"] = 4096.into();
        o.insert("rope_parameters".into(), scaling);
        let c = phi3_config(&HfConfig::from_value(Path::new("config.json"), v)).unwrap();
        assert_eq!(c.rope.factors.unwrap().len(), 48);
        assert_eq!(c.max_context, 4096);
    }

    #[test]
    fn a_chunk_after_a_non_empty_cache_equals_one_prefill() {
        use crate::models::{LoadOptions, Model};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/phi3");
        // 12 tokens: past the fixture's window of 6, so the cached part is masked too.
        let ids = [1, 5, 9, 23, 42, 7, 100, 3, 77, 12, 8, 64];
        let mut model = Model::load(&dir, &LoadOptions::cpu()).unwrap();
        model.forward_ids(&ids[..4], 0).unwrap();
        model.forward_ids(&ids[4..5], 4).unwrap();
        let chunked = model.forward_ids(&ids[5..], 5).unwrap();
        model.reset_cache().unwrap();
        let whole = model.forward_ids(&ids, 0).unwrap();
        let diff = chunked
            .iter()
            .zip(&whole)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 1e-5, "chunked prefill differs by {diff}");
    }
}
