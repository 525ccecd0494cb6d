//! Qwen2 (and Qwen2.5) from a Hugging Face directory.
//!
//! This module runs its own forward pass, adapted from candle-transformers' `qwen2.rs`, because
//! candle's model computes something other than transformers in ways an adapter cannot reach:
//!
//! - its sliding-window mask ignores `use_sliding_window` and `max_window_layers` (it applies
//!   `sliding_window` to every layer, and real configs set `sliding_window` with
//!   `use_sliding_window: false`), lets a query see `sliding_window + 1` keys instead of
//!   `sliding_window`, and never masks cached keys (a single-token decode gets no mask at all);
//!   the mask is private, so it cannot be corrected from outside;
//! - it builds the RoPE tables in the model dtype, so under BF16 the positions themselves are
//!   rounded (every position above 256 is off); here they are computed in F32 as transformers
//!   does and only the cos/sin tables are cast;
//! - it ignores `head_dim` and `tie_word_embeddings` (it ties when `lm_head.weight` is
//!   missing), and its `Config` rejects real configs (`sliding_window: null`, transformers >= 5's
//!   `rope_parameters`). Here the config is read through [`HfConfig`] into [`Qwen2Config`].
//!
//! Per layer, the window comes from `layer_types` when config.json lists them (transformers >= 5
//! writes them), else as transformers derives them: layers from `max_window_layers` on slide
//! when `use_sliding_window` is set. The KV cache keeps every position; the mask, not the cache,
//! enforces the window.
//!
//! Reset: a fresh, empty `KvCache`. The weights sit in an immutable network (`forward` takes
//! `&self`) and the cache is a separate value holding all the state there is, so replacing it
//! restores exactly the freshly loaded model.

use crate::error::{Error, Result};
use crate::models::common::attention_mask;
use crate::models::hf::{HfConfig, RopeScaling};
use crate::models::{Adapter, Architecture, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use serde_json::Value;

/// The settings of a Qwen2 checkpoint, read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// RoPE table length and the longest sequence.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// One entry per layer: its sliding window, or `None` for full attention.
    pub layer_windows: Vec<Option<usize>>,
}

/// Maps config.json to [`Qwen2Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Qwen2Config> {
    const FAMILY: &str = "qwen2";
    let hidden_size = c.usize("hidden_size")?;
    let num_hidden_layers = c.usize("num_hidden_layers")?;
    let num_attention_heads = c.usize("num_attention_heads")?;
    let num_key_value_heads = c.usize_or("num_key_value_heads", num_attention_heads)?;
    if num_attention_heads == 0
        || num_key_value_heads == 0
        || !num_attention_heads.is_multiple_of(num_key_value_heads)
    {
        return Err(Error::config(
            "num_key_value_heads",
            format!(
                "{num_key_value_heads} must be positive and divide num_attention_heads {num_attention_heads}"
            ),
        ));
    }
    // transformers: an explicit head_dim wins, else hidden_size / num_attention_heads.
    let head_dim = match c.opt_usize("head_dim")? {
        Some(hd) if hd > 0 => hd,
        _ => {
            if !hidden_size.is_multiple_of(num_attention_heads) {
                return Err(Error::config(
                    "num_attention_heads",
                    format!("{num_attention_heads} must divide hidden_size {hidden_size}"),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if !head_dim.is_multiple_of(2) {
        return Err(Error::config(
            "head_dim",
            format!("{head_dim} is not supported; RoPE needs an even head_dim"),
        ));
    }
    c.activation(&["silu"], "silu")?;
    let rope = c.rope(None, 10_000.0)?;
    if rope.scaling != RopeScaling::None || rope.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err(c.unsupported_rope(&rope, FAMILY, &["default"]));
    }
    Ok(Qwen2Config {
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: c.usize_or("max_position_embeddings", 32768)?,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: rope.theta,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
        layer_windows: layer_windows(c, num_hidden_layers)?,
    })
}

/// Each layer's window, as transformers' Qwen2Config decides it.
fn layer_windows(c: &HfConfig, num_layers: usize) -> Result<Vec<Option<usize>>> {
    // transformers: `sliding_window if use_sliding_window else None`, where an absent
    // sliding_window means its default 4096 and an explicit null means none.
    let window = if !c.bool_or("use_sliding_window", false)? {
        None
    } else {
        match c.value().get("sliding_window") {
            None => Some(4096),
            Some(Value::Null) => None,
            Some(_) => c.opt_usize("sliding_window")?,
        }
    };
    if window == Some(0) {
        return Err(Error::config(
            "sliding_window",
            "0 is not a valid window; use null or use_sliding_window: false for full attention",
        ));
    }
    let Some(types) = c.get("layer_types") else {
        let max_window_layers = c.usize_or("max_window_layers", 28)?;
        return Ok((0..num_layers)
            .map(|i| window.filter(|_| i >= max_window_layers))
            .collect());
    };
    let types = types.as_array().ok_or_else(|| {
        Error::config(
            "layer_types",
            format!("must be a list of layer type names, found {types}"),
        )
    })?;
    if types.len() != num_layers {
        return Err(Error::config(
            "layer_types",
            format!(
                "lists {} layers but num_hidden_layers is {num_layers}",
                types.len()
            ),
        ));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            Some("full_attention") => Ok(None),
            Some("sliding_attention") => window.map(Some).ok_or_else(|| {
                Error::config(
                    "layer_types",
                    format!(
                        "entry {i} is sliding_attention but there is no window \
                         (use_sliding_window is false or sliding_window is null)"
                    ),
                )
            }),
            _ => Err(Error::config(
                "layer_types",
                format!("entry {i} is {t}; allowed: \"full_attention\", \"sliding_attention\""),
            )),
        })
        .collect()
}

#[derive(Debug, Clone)]
struct RotaryEmbedding {
    sin: Tensor,
    cos: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &Qwen2Config, dtype: DType, dev: &Device) -> Result<Self> {
        let dim = cfg.head_dim;
        let max_len = cfg.max_position_embeddings;
        // In F32 as transformers computes them: positions in BF16 would be rounded.
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / cfg.rope_theta.powf(i as f64 / dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, dim / 2), dev)?;
        let t = Tensor::arange(0u32, max_len as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self {
            sin: freqs.sin()?.to_dtype(dtype)?,
            cos: freqs.cos()?.to_dtype(dtype)?,
        })
    }

    fn apply(&self, q: &Tensor, k: &Tensor, position: usize) -> Result<(Tensor, Tensor)> {
        let seq_len = q.dim(2)?;
        let cos = self.cos.narrow(0, position, seq_len)?;
        let sin = self.sin.narrow(0, position, seq_len)?;
        Ok((
            candle_nn::rotary_emb::rope(&q.contiguous()?, &cos, &sin)?,
            candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?,
        ))
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Qwen2Config, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: candle_nn::linear_no_bias(h, i, vb.pp("gate_proj"))?,
            up_proj: candle_nn::linear_no_bias(h, i, vb.pp("up_proj"))?,
            down_proj: candle_nn::linear_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = xs.apply(&self.gate_proj)?.silu()?;
        Ok((gate * xs.apply(&self.up_proj)?)?.apply(&self.down_proj)?)
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
    window: Option<usize>,
}

impl Attention {
    fn new(cfg: &Qwen2Config, window: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        // Qwen2 has biases on q, k and v, none on o.
        Ok(Self {
            q_proj: candle_nn::linear(h, nh * d, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, nkv * d, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, nkv * d, vb.pp("v_proj"))?,
            o_proj: candle_nn::linear_no_bias(nh * d, h, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            window,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        position: usize,
        mask: Option<&Tensor>,
        rotary: &RotaryEmbedding,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, seq_len, _) = xs.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, seq_len, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(xs.apply(&self.q_proj)?, self.num_heads)?;
        let k = heads(xs.apply(&self.k_proj)?, self.num_kv_heads)?;
        let v = heads(xs.apply(&self.v_proj)?, self.num_kv_heads)?;
        let (q, k) = rotary.apply(&q, &k, position)?;
        let (k, v) = match cache.as_ref() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        };
        *cache = Some((k.clone(), v.clone()));
        let groups = self.num_heads / self.num_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Scores and softmax in F32, as transformers' eager attention does.
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        Ok(probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, seq_len, self.num_heads * self.head_dim))?
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
    fn new(cfg: &Qwen2Config, window: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::new(cfg, window, vb.pp("self_attn"))?,
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

/// The KV cache: one `(k, v)` pair per layer, `(batch, kv_heads, positions, head_dim)`.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }
}

/// The weights; immutable once loaded.
pub struct Network {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
}

impl Network {
    fn new(cfg: &Qwen2Config, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = cfg
            .layer_windows
            .iter()
            .enumerate()
            .map(|(i, &w)| DecoderLayer::new(cfg, w, vb_m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let rotary = RotaryEmbedding::new(cfg, vb.dtype(), vb.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
        })
    }

    fn run(&self, input_ids: &Tensor, position: usize, cache: &mut KvCache) -> Result<Tensor> {
        let (_b, seq_len) = input_ids.dims2()?;
        let device = input_ids.device();
        // At most two masks: full attention and the one window this model uses.
        let full_mask = attention_mask(seq_len, position, 0, None, device)?;
        let window = self.layers.iter().find_map(|l| l.self_attn.window);
        let window_mask = match window {
            Some(w) => attention_mask(seq_len, position, 0, Some(w), device)?,
            None => None,
        };
        let mut xs = self.embed_tokens.forward(input_ids)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let mask = match layer.self_attn.window {
                Some(_) => window_mask.as_ref(),
                None => full_mask.as_ref(),
            };
            let residual = &xs;
            let h = xs.apply(&layer.input_layernorm)?;
            let h = layer
                .self_attn
                .forward(&h, position, mask, &self.rotary, kv)?;
            let xs_attn = (h + residual)?;
            let h = layer
                .mlp
                .forward(&xs_attn.apply(&layer.post_attention_layernorm)?)?;
            xs = (h + xs_attn)?;
        }
        Ok(xs
            .narrow(1, seq_len - 1, 1)?
            .apply(&self.norm)?
            .apply(&self.lm_head)?)
    }
}

/// Qwen2, as registered.
pub struct Qwen2;

impl Architecture for Qwen2 {
    const NAME: &'static str = "qwen2";
    const FORMAT: WeightFormat = WeightFormat::Safetensors;
    const MODEL_TYPES: &'static [&'static str] = &["qwen2"];
    const HF_CLASSES: &'static [&'static str] = &["Qwen2ForCausalLM"];

    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let dir = source.into_hf(Self::NAME)?;
        let cfg = config_from_hf(&dir.config)?;
        let dtype = dir.dtype(options)?;
        let vb = dir.var_builder(dtype, &options.device)?;
        let network = Network::new(&cfg, vb)?;
        // The RoPE table has exactly this many rows.
        let info = ModelInfo::from_hf(
            Self::NAME,
            &dir,
            cfg.vocab_size,
            cfg.max_position_embeddings,
            dtype,
        );
        let cache = KvCache::new(network.layers.len());
        Ok(Adapter::new(network, cache, info))
    }
}

impl crate::models::Network for Network {
    type Cache = KvCache;

    fn forward(&self, input_ids: &Tensor, position: usize, cache: &mut KvCache) -> Result<Tensor> {
        self.run(input_ids, position, cache)
    }

    fn reset(&self, cache: &mut KvCache) -> Result<()> {
        *cache = KvCache::new(self.layers.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn hf(file: &str) -> HfConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(file);
        HfConfig::from_file(&path).unwrap()
    }

    #[test]
    fn real_configs_map() {
        let cfg = config_from_hf(&hf("real_configs/qwen2-Qwen2.5-0.5B.json")).unwrap();
        assert_eq!(cfg.hidden_size, 896);
        assert_eq!(cfg.num_attention_heads, 14);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.rope_theta, 1_000_000.0);
        assert!(cfg.tie_word_embeddings);
        // sliding_window is set but use_sliding_window is false: every layer is full.
        assert_eq!(cfg.layer_windows, vec![None; 24]);

        let cfg = config_from_hf(&hf("real_configs/qwen2-Qwen2.5-7B-Instruct.json")).unwrap();
        assert_eq!(cfg.hidden_size, 3584);
        assert_eq!(cfg.num_attention_heads, 28);
        assert_eq!(cfg.num_key_value_heads, 4);
        assert_eq!(cfg.head_dim, 128);
        assert!(!cfg.tie_word_embeddings);
        assert_eq!(cfg.layer_windows, vec![None; 28]);
    }

    #[test]
    fn both_fixture_layouts_map_alike() {
        let new = config_from_hf(&hf("hf/qwen2/config.json")).unwrap();
        assert_eq!(
            new,
            config_from_hf(&hf("hf/qwen2/config.legacy.json")).unwrap()
        );
        assert_eq!(new.layer_windows, vec![None, Some(6)]);
    }

    #[test]
    fn windows_are_derived_like_transformers_without_layer_types() {
        let mut value = hf("hf/qwen2/config.json").value().clone();
        value.as_object_mut().unwrap().remove("layer_types");
        let c = HfConfig::from_value(Path::new("config.json"), value.clone());
        assert_eq!(
            config_from_hf(&c).unwrap().layer_windows,
            vec![None, Some(6)]
        );
        value["sliding_window"] = Value::Null;
        let c = HfConfig::from_value(Path::new("config.json"), value);
        assert_eq!(config_from_hf(&c).unwrap().layer_windows, vec![None, None]);
    }
}
