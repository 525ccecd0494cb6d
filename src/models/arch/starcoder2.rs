//! StarCoder2 from a Hugging Face directory.
//!
//! This module runs its own forward pass, adapted from candle-transformers' `starcoder2.rs`,
//! because candle's model cannot be used as it is:
//!
//! - its `Config` has only private fields and needs `rope_theta` at the top level, so a
//!   transformers >= 5 config (`rope_parameters`) does not load;
//! - every StarCoder2 checkpoint has a sliding window (4096) and candle's mask lets a query see
//!   `sliding_window + 1` keys instead of `sliding_window`, and never masks cached keys (a
//!   single-token decode gets no mask), so it diverges from transformers past the window;
//! - it builds the RoPE tables in the model dtype, so under BF16 the positions themselves are
//!   rounded (every position above 256 is off);
//! - it ignores `head_dim` and `tie_word_embeddings` (it always ties).
//!
//! Here the config is read through [`HfConfig`] into [`Starcoder2Config`], the mask is
//! transformers' (window counted with the query itself, cached keys included), and the RoPE
//! tables are computed in F32. The KV cache keeps every position; the mask, not the cache,
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
use candle_nn::{Activation, Embedding, LayerNorm, Linear, VarBuilder};

/// The settings of a StarCoder2 checkpoint, read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Starcoder2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// The MLP activation.
    pub hidden_act: Activation,
    /// RoPE table length and the longest sequence.
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    pub norm_epsilon: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Whether every linear layer has a bias.
    pub use_bias: bool,
    /// The attention window of every layer, or `None` for full attention.
    pub sliding_window: Option<usize>,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// Maps config.json to [`Starcoder2Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Starcoder2Config> {
    const FAMILY: &str = "starcoder2";
    let hidden_size = c.usize("hidden_size")?;
    let num_attention_heads = c.usize("num_attention_heads")?;
    let num_key_value_heads = c.usize_or("num_key_value_heads", 2)?;
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
    // transformers: `head_dim or hidden_size // num_attention_heads`.
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
    // transformers' names: `gelu` is the exact (erf) GELU, the other two the tanh one.
    let hidden_act = match c
        .activation(
            &["gelu_pytorch_tanh", "gelu_new", "gelu"],
            "gelu_pytorch_tanh",
        )?
        .as_str()
    {
        "gelu" => Activation::Gelu,
        "gelu_new" => Activation::NewGelu,
        _ => Activation::GeluPytorchTanh,
    };
    let rope = c.rope(None, 10_000.0)?;
    if rope.scaling != RopeScaling::None || rope.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err(c.unsupported_rope(&rope, FAMILY, &["default"]));
    }
    let sliding_window = match c.opt_usize("sliding_window")? {
        Some(0) => {
            return Err(Error::config(
                "sliding_window",
                "0 is not a valid window; use null for full attention",
            ))
        }
        w => w,
    };
    Ok(Starcoder2Config {
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_hidden_layers: c.usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        hidden_act,
        max_position_embeddings: c.usize_or("max_position_embeddings", 4096)?,
        norm_epsilon: c.f64_or("norm_epsilon", 1e-5)?,
        rope_theta: rope.theta,
        use_bias: c.bool_or("use_bias", true)?,
        sliding_window,
        // transformers' Starcoder2Config default: tied.
        tie_word_embeddings: c.bool_or("tie_word_embeddings", true)?,
    })
}

#[derive(Debug, Clone)]
struct RotaryEmbedding {
    sin: Tensor,
    cos: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &Starcoder2Config, dtype: DType, dev: &Device) -> Result<Self> {
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
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &Starcoder2Config, vb: VarBuilder) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.use_bias);
        Ok(Self {
            c_fc: candle_nn::linear_b(h, i, b, vb.pp("c_fc"))?,
            c_proj: candle_nn::linear_b(i, h, b, vb.pp("c_proj"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs
            .apply(&self.c_fc)?
            .apply(&self.act)?
            .apply(&self.c_proj)?)
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
}

impl Attention {
    fn new(cfg: &Starcoder2Config, vb: VarBuilder) -> Result<Self> {
        let (h, d, b) = (cfg.hidden_size, cfg.head_dim, cfg.use_bias);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: candle_nn::linear_b(h, nh * d, b, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear_b(h, nkv * d, b, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear_b(h, nkv * d, b, vb.pp("v_proj"))?,
            o_proj: candle_nn::linear_b(nh * d, h, b, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
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
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
}

impl DecoderLayer {
    fn new(cfg: &Starcoder2Config, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.norm_epsilon);
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            // StarCoder2 uses LayerNorm with a bias (not RMSNorm), whatever `use_bias` says.
            input_layernorm: candle_nn::layer_norm(h, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: candle_nn::layer_norm(
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
    norm: LayerNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    sliding_window: Option<usize>,
}

impl Network {
    fn new(cfg: &Starcoder2Config, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb_m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = candle_nn::layer_norm(cfg.hidden_size, cfg.norm_epsilon, vb_m.pp("norm"))?;
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
            sliding_window: cfg.sliding_window,
        })
    }

    fn run(&self, input_ids: &Tensor, position: usize, cache: &mut KvCache) -> Result<Tensor> {
        let (_b, seq_len) = input_ids.dims2()?;
        let mask = attention_mask(
            seq_len,
            position,
            0,
            self.sliding_window,
            input_ids.device(),
        )?;
        let mut xs = self.embed_tokens.forward(input_ids)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let residual = &xs;
            let h = xs.apply(&layer.input_layernorm)?;
            let h = layer
                .self_attn
                .forward(&h, position, mask.as_ref(), &self.rotary, kv)?;
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

/// Starcoder2, as registered.
pub struct Starcoder2;

impl Architecture for Starcoder2 {
    const NAME: &'static str = "starcoder2";
    const FORMAT: WeightFormat = WeightFormat::Safetensors;
    const MODEL_TYPES: &'static [&'static str] = &["starcoder2"];
    const HF_CLASSES: &'static [&'static str] = &["Starcoder2ForCausalLM"];

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
        let cfg = config_from_hf(&hf("real_configs/starcoder2-starcoder2-3b.json")).unwrap();
        assert_eq!(cfg.hidden_size, 3072);
        assert_eq!(cfg.num_attention_heads, 24);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.head_dim, 128);
        // serde_json's default float parsing may be one ulp off the literal.
        assert!((cfg.rope_theta - 999_999.442_035_881_3).abs() < 1e-6);
        assert_eq!(cfg.sliding_window, Some(4096));
        assert_eq!(cfg.max_position_embeddings, 16384);
        assert_eq!(cfg.hidden_act, Activation::GeluPytorchTanh);
        assert!(cfg.use_bias);
        // No tie_word_embeddings key: transformers ties.
        assert!(cfg.tie_word_embeddings);

        let cfg = config_from_hf(&hf("real_configs/starcoder2-starcoder2-15b.json")).unwrap();
        assert_eq!(cfg.hidden_size, 6144);
        assert_eq!(cfg.num_attention_heads, 48);
        assert_eq!(cfg.num_key_value_heads, 4);
        assert_eq!(cfg.rope_theta, 100_000.0);
        assert_eq!(cfg.sliding_window, Some(4096));
    }

    #[test]
    fn both_fixture_layouts_map_alike() {
        let new = config_from_hf(&hf("hf/starcoder2/config.json")).unwrap();
        assert_eq!(
            new,
            config_from_hf(&hf("hf/starcoder2/config.legacy.json")).unwrap()
        );
        assert_eq!(new.sliding_window, Some(6));
    }
}
