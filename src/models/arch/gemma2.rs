//! Gemma 2 from a Hugging Face directory.
//!
//! This module runs its own forward pass, adapted from candle-transformers' `gemma2.rs`,
//! because candle's model computes something else than the checkpoints were trained with:
//!
//! - it scales queries by `1/sqrt(head_dim)`; Gemma 2 uses `query_pre_attn_scalar^-1/2`
//!   (they differ for gemma-2-27b: 144 against head_dim 128);
//! - it applies the sliding window to every layer, only in multi-token prefills, with an
//!   off-by-one window (`j + w < i` keeps `w + 1` tokens) and not at all across the cached
//!   part; transformers applies it on the sliding layers only (`layer_types`, by default every
//!   other layer starting with the first), to every query, keeping exactly `sliding_window`
//!   tokens;
//! - its config deserializer rejects real configs (`hidden_act` next to `hidden_activation`,
//!   `layer_types`, `rope_parameters`).
//!
//! Everything else follows candle's file: RMSNorm with `1 + weight`, the embedding scaled by
//! `sqrt(hidden_size)`, the four norms per layer, attention and final logit soft-capping, tied
//! output head. Sliding layers keep only the last `sliding_window - 1` keys in their cache,
//! which is all a later query can see.
//!
//! Reset: a fresh [`Cache`] (one empty slot per layer). All state lives in that cache, which
//! is separate from the weights, so a new one is exactly the freshly loaded state.

use crate::error::{Error, Result};
use crate::models::common::attention_mask;
use crate::models::hf::{HfConfig, RopeScaling};
use crate::models::{Adapter, Architecture, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear_b, Activation, Embedding, Linear, VarBuilder};

/// The Gemma 2 settings llm-pool reads from config.json.
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
    rope_theta: f64,
    attention_bias: bool,
    query_pre_attn_scalar: f64,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    sliding_window: Option<usize>,
    /// Per layer: whether it is a sliding-window layer.
    sliding_layers: Vec<bool>,
    max_position_embeddings: usize,
}

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
fn gemma2_config(c: &HfConfig) -> Result<Config> {
    const FAMILY: &str = "gemma2";
    let activation = match c
        .activation(
            &["gelu_pytorch_tanh", "gelu_new", "gelu"],
            "gelu_pytorch_tanh",
        )?
        .as_str()
    {
        // transformers' "gelu" is the exact (erf) GELU, the others the tanh approximation.
        "gelu" => Activation::Gelu,
        _ => Activation::GeluPytorchTanh,
    };
    let rope = c.rope(Some("full_attention"), 10_000.0)?;
    if rope.scaling != RopeScaling::None || rope.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err(c.unsupported_rope(&rope, FAMILY, &["default"]));
    }
    c.require_bool("tie_word_embeddings", true, FAMILY)?;
    c.require_bool("use_bidirectional_attention", false, FAMILY)?;
    let num_hidden_layers = c.usize("num_hidden_layers")?;
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
    // Gemma 2 alternates sliding and full layers, starting with a sliding one.
    let sliding_layers = layer_types(c, num_hidden_layers, |i| (i + 1) % 2 != 0)?;
    // transformers' default when the key is absent; an explicit null means no window.
    let sliding_window = match c.value().get("sliding_window") {
        None => Some(4096),
        Some(_) => c.opt_usize("sliding_window")?,
    };
    if sliding_layers.iter().any(|&s| s) && sliding_window.is_none_or(|w| w == 0) {
        return Err(Error::config(
            "sliding_window",
            "a positive window is required when sliding_attention layers are present",
        ));
    }
    let softcap = |key: &str| -> Result<Option<f64>> {
        match c.opt_f64(key)? {
            Some(v) if v <= 0.0 => Err(Error::config(
                key,
                format!("{v} must be positive (or null to disable soft-capping)"),
            )),
            v => Ok(v),
        }
    };
    let query_pre_attn_scalar = c.f64_or("query_pre_attn_scalar", 256.0)?;
    if query_pre_attn_scalar <= 0.0 {
        return Err(Error::config(
            "query_pre_attn_scalar",
            format!("{query_pre_attn_scalar} must be positive"),
        ));
    }
    Ok(Config {
        vocab_size: c.usize("vocab_size")?,
        hidden_size: c.usize("hidden_size")?,
        intermediate_size: c.usize("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        activation,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: rope.theta,
        attention_bias: c.bool_or("attention_bias", false)?,
        query_pre_attn_scalar,
        attn_logit_softcapping: softcap("attn_logit_softcapping")?,
        final_logit_softcapping: softcap("final_logit_softcapping")?,
        sliding_window,
        sliding_layers,
        max_position_embeddings: c.usize_or("max_position_embeddings", 8192)?,
    })
}

/// `layer_types` (each `sliding_attention` or `full_attention`), or the family's default
/// pattern when the config predates that key.
fn layer_types(c: &HfConfig, layers: usize, default: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
    let Some(v) = c.get("layer_types") else {
        return Ok((0..layers).map(default).collect());
    };
    let items = v
        .as_array()
        .ok_or_else(|| Error::config("layer_types", format!("must be a list, found {v}")))?;
    if items.len() != layers {
        return Err(Error::config(
            "layer_types",
            format!(
                "has {} entries but num_hidden_layers is {layers}",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .map(|t| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(Error::config(
                "layer_types",
                format!("{t} is not supported; allowed: sliding_attention, full_attention"),
            )),
        })
        .collect()
}

/// Gemma's RMSNorm: computed in F32, scaled by `1 + weight`, as transformers does.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight_plus_one: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?.to_dtype(DType::F32)?;
        Ok(Self {
            weight_plus_one: (weight + 1.0)?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight_plus_one)?.to_dtype(dtype)
    }
}

/// RoPE frequencies; cos/sin are computed for the positions of each forward.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Tensor,
}

impl Rotary {
    fn new(head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| (1.0 / theta.powf(i as f64 / head_dim as f64)) as f32)
            .collect();
        let n = inv_freq.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, n), device)?,
        })
    }

    /// `(cos, sin)`, each `(seq_len, head_dim / 2)`, for positions `offset..offset + seq_len`.
    fn cos_sin(&self, offset: usize, seq_len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let t = Tensor::arange(
            offset as u32,
            (offset + seq_len) as u32,
            self.inv_freq.device(),
        )?
        .to_dtype(DType::F32)?
        .reshape((seq_len, 1))?;
        let freqs = t.matmul(&self.inv_freq)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear_b(h, i, false, vb.pp("gate_proj"))?,
            up_proj: linear_b(h, i, false, vb.pp("up_proj"))?,
            down_proj: linear_b(i, h, false, vb.pp("down_proj"))?,
            act: cfg.activation,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate = xs.apply(&self.gate_proj)?.apply(&self.act)?;
        (gate * xs.apply(&self.up_proj)?)?.apply(&self.down_proj)
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
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
    /// Keys kept in the cache after a forward: `sliding_window - 1` for sliding layers.
    keep: Option<usize>,
}

impl Attention {
    fn new(cfg: &Config, sliding: bool, vb: VarBuilder) -> Result<Self> {
        let (h, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: linear_b(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: linear_b(nh * hd, h, bias, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
            softcap: cfg.attn_logit_softcapping,
            keep: if sliding {
                cfg.sliding_window.map(|w| w.saturating_sub(1))
            } else {
                None
            },
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, seq_len, _) = xs.dims3()?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, seq_len, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(xs.apply(&self.q_proj)?, self.num_heads)?;
        let k = heads(xs.apply(&self.k_proj)?, self.num_kv_heads)?;
        let v = heads(xs.apply(&self.v_proj)?, self.num_kv_heads)?;
        let (cos, sin) = cos_sin;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
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
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let scores = match self.softcap {
            None => scores,
            Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        };
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match mask {
            None => scores,
            Some(m) => scores.broadcast_add(m)?,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?;
        Ok(out
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
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    sliding: bool,
}

impl DecoderLayer {
    fn new(cfg: &Config, sliding: bool, vb: VarBuilder) -> Result<Self> {
        let norm = |name: &str| RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            self_attn: Attention::new(cfg, sliding, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            sliding,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let residual = xs;
        let h = self
            .self_attn
            .forward(&xs.apply(&self.input_layernorm)?, cos_sin, mask, cache)?;
        let xs = (h.apply(&self.post_attention_layernorm)? + residual)?;
        let h = xs
            .apply(&self.pre_feedforward_layernorm)?
            .apply(&self.mlp)?
            .apply(&self.post_feedforward_layernorm)?;
        Ok((h + xs)?)
    }
}

/// The Gemma 2 network.
#[derive(Debug, Clone)]
pub struct Network {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    hidden_size: usize,
    sliding_window: Option<usize>,
    final_logit_softcapping: Option<f64>,
}

impl Network {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = cfg
            .sliding_layers
            .iter()
            .enumerate()
            .map(|(i, &sliding)| DecoderLayer::new(cfg, sliding, vb_m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            lm_head: Linear::new(embed_tokens.embeddings().clone(), None),
            embed_tokens,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?,
            rotary: Rotary::new(cfg.head_dim, cfg.rope_theta, vb.device())?,
            hidden_size: cfg.hidden_size,
            sliding_window: cfg.sliding_window,
            final_logit_softcapping: cfg.final_logit_softcapping,
        })
    }

    fn run(&self, input_ids: &Tensor, offset: usize, cache: &mut Cache) -> Result<Tensor> {
        let (_b, seq_len) = input_ids.dims2()?;
        let device = input_ids.device();
        let xs = self.embed_tokens.forward(input_ids)?;
        let mut xs = (xs * (self.hidden_size as f64).sqrt())?;
        let cos_sin = self.rotary.cos_sin(offset, seq_len, xs.dtype())?;
        let full_mask = attention_mask(seq_len, offset, 0, None, device)?;
        let sliding_mask = match self.sliding_window {
            Some(w) if self.layers.iter().any(|l| l.sliding) => {
                // Sliding layers hold at most `window - 1` cached keys.
                let start = offset - offset.min(w.saturating_sub(1));
                attention_mask(seq_len, offset, start, Some(w), device)?
            }
            _ => None,
        };
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let mask = if layer.sliding {
                sliding_mask.as_ref()
            } else {
                full_mask.as_ref()
            };
            xs = layer.forward(&xs, &cos_sin, mask, slot)?;
        }
        let logits = xs
            .narrow(1, seq_len - 1, 1)?
            .apply(&self.norm)?
            .apply(&self.lm_head)?;
        Ok(match self.final_logit_softcapping {
            None => logits,
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
        })
    }
}

/// Gemma2, as registered.
pub struct Gemma2;

impl Architecture for Gemma2 {
    const NAME: &'static str = "gemma2";
    const FORMAT: WeightFormat = WeightFormat::Safetensors;
    const MODEL_TYPES: &'static [&'static str] = &["gemma2"];
    const HF_CLASSES: &'static [&'static str] = &["Gemma2ForCausalLM"];

    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let dir = source.into_hf(Self::NAME)?;
        let cfg = gemma2_config(&dir.config)?;
        let dtype = dir.dtype(options)?;
        let vb = dir.var_builder(dtype, &options.device)?;
        let network = Network::new(&cfg, vb)?;
        let info = ModelInfo::from_hf(
            Self::NAME,
            &dir,
            cfg.vocab_size,
            cfg.max_position_embeddings,
            dtype,
        );
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
    fn gemma_2_2b_maps() {
        let c = gemma2_config(&real_config("gemma2-gemma-2-2b.json")).unwrap();
        assert_eq!(
            (c.hidden_size, c.head_dim, c.num_hidden_layers),
            (2304, 256, 26)
        );
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (8, 4));
        assert_eq!(c.activation, Activation::GeluPytorchTanh);
        assert_eq!(c.query_pre_attn_scalar, 256.0);
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.max_position_embeddings, 8192);
        // Sliding first, then alternating.
        assert_eq!(&c.sliding_layers[..4], &[true, false, true, false]);
    }

    #[test]
    fn gemma_2_27b_query_scale_differs_from_head_dim() {
        let c = gemma2_config(&real_config("gemma2-gemma-2-27b.json")).unwrap();
        assert_eq!((c.head_dim, c.query_pre_attn_scalar), (128, 144.0));
        assert_eq!(c.sliding_layers.len(), 46);
    }

    #[test]
    fn a_chunk_after_a_non_empty_cache_equals_one_prefill() {
        use crate::models::{LoadOptions, Model};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/gemma2");
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
