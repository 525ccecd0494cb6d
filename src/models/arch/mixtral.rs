//! Mixtral (sparse mixture of experts) from a Hugging Face directory.
//!
//! This module runs its own forward pass, adapted from candle-transformers' `mixtral.rs`,
//! because candle's model cannot be used as it is:
//!
//! - its `Config` has only `pub(crate)` fields and requires `sliding_window` as a number and
//!   `use_flash_attn`, so real configs (Mixtral-8x7B has `sliding_window: null`, none has
//!   `use_flash_attn`) do not load and cannot be built by hand;
//! - it has no way to clear its KV cache;
//! - its sliding-window mask lets a query see `sliding_window + 1` keys instead of
//!   `sliding_window`, and never masks cached keys (a single-token decode gets no mask), so it
//!   diverges from transformers once a sequence is longer than the window;
//! - it ignores `head_dim` and runs the router softmax in the model dtype (transformers runs it
//!   in F32).
//!
//! Here the config is read through [`HfConfig`] into [`MixtralConfig`], the mask is
//! transformers' (window counted with the query itself, cached keys included), and RoPE tables
//! and router probabilities are computed in F32. The KV cache keeps every position; the mask,
//! not the cache, enforces the window.
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

/// The settings of a Mixtral checkpoint, read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct MixtralConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Inner size of each expert.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
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
    /// The attention window of every layer, or `None` for full attention.
    pub sliding_window: Option<usize>,
    /// Experts per layer.
    pub num_local_experts: usize,
    /// Experts each token is routed to.
    pub num_experts_per_tok: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// Maps config.json to [`MixtralConfig`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<MixtralConfig> {
    const FAMILY: &str = "mixtral";
    let hidden_size = c.usize("hidden_size")?;
    let num_attention_heads = c.usize_or("num_attention_heads", 32)?;
    let num_key_value_heads = c.usize_or("num_key_value_heads", 8)?;
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
    c.activation(&["silu"], "silu")?;
    let rope = c.rope(None, 1_000_000.0)?;
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
    let num_local_experts = c.usize_or("num_local_experts", 8)?;
    let num_experts_per_tok = c.usize_or("num_experts_per_tok", 2)?;
    if num_experts_per_tok == 0 || num_experts_per_tok > num_local_experts {
        return Err(Error::config(
            "num_experts_per_tok",
            format!(
                "{num_experts_per_tok} must be between 1 and num_local_experts {num_local_experts}"
            ),
        ));
    }
    Ok(MixtralConfig {
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_hidden_layers: c.usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        // transformers' MixtralConfig default.
        max_position_embeddings: c.usize_or("max_position_embeddings", 4096 * 32)?,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-5)?,
        rope_theta: rope.theta,
        sliding_window,
        num_local_experts,
        num_experts_per_tok,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
    })
}

#[derive(Debug, Clone)]
struct RotaryEmbedding {
    sin: Tensor,
    cos: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &MixtralConfig, dtype: DType, dev: &Device) -> Result<Self> {
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
    fn new(cfg: &MixtralConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: candle_nn::linear_no_bias(h, nh * d, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear_no_bias(h, nkv * d, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear_no_bias(h, nkv * d, vb.pp("v_proj"))?,
            o_proj: candle_nn::linear_no_bias(nh * d, h, vb.pp("o_proj"))?,
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

/// One expert: a SwiGLU MLP (`w1` gate, `w3` up, `w2` down).
#[derive(Debug, Clone)]
struct Expert {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl Expert {
    fn new(cfg: &MixtralConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            w1: candle_nn::linear_no_bias(h, i, vb.pp("w1"))?,
            w2: candle_nn::linear_no_bias(i, h, vb.pp("w2"))?,
            w3: candle_nn::linear_no_bias(h, i, vb.pp("w3"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = xs.apply(&self.w1)?.silu()?;
        Ok((gate * xs.apply(&self.w3)?)?.apply(&self.w2)?)
    }
}

/// The routed MLP: each token goes through its top `k` experts, weighted by the router's
/// softmax probabilities renormalised over those `k`.
#[derive(Debug, Clone)]
struct SparseMoe {
    gate: Linear,
    experts: Vec<Expert>,
    top_k: usize,
}

impl SparseMoe {
    fn new(cfg: &MixtralConfig, vb: VarBuilder) -> Result<Self> {
        let gate =
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.num_local_experts, vb.pp("gate"))?;
        let experts = (0..cfg.num_local_experts)
            .map(|i| Expert::new(cfg, vb.pp("experts").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate,
            experts,
            top_k: cfg.num_experts_per_tok,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, seq_len, hidden) = xs.dims3()?;
        let xs = xs.reshape((b * seq_len, hidden))?;
        // Router in F32, as transformers computes it.
        let logits = xs.apply(&self.gate)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        // Rows each expert processes, and each row's weight for that expert.
        let mut rows = vec![Vec::<u32>::new(); self.experts.len()];
        let mut weights = vec![Vec::<f32>::new(); self.experts.len()];
        for (row, p) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
            let top = &order[..self.top_k];
            let sum: f32 = top.iter().map(|&e| p[e]).sum();
            for &e in top {
                rows[e].push(row as u32);
                weights[e].push(p[e] / sum);
            }
        }
        let mut ys = xs.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), xs.device())?;
            let w = Tensor::new(weights[e].as_slice(), xs.device())?
                .reshape(((), 1))?
                .to_dtype(xs.dtype())?;
            let out = expert.forward(&xs.index_select(&idx, 0)?)?;
            ys = ys.index_add(&idx, &out.broadcast_mul(&w)?, 0)?;
        }
        Ok(ys.reshape((b, seq_len, hidden))?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    block_sparse_moe: SparseMoe,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &MixtralConfig, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            block_sparse_moe: SparseMoe::new(cfg, vb.pp("block_sparse_moe"))?,
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
    sliding_window: Option<usize>,
}

impl Network {
    fn new(cfg: &MixtralConfig, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb_m.pp("layers").pp(i)))
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
                .block_sparse_moe
                .forward(&xs_attn.apply(&layer.post_attention_layernorm)?)?;
            xs = (h + xs_attn)?;
        }
        Ok(xs
            .narrow(1, seq_len - 1, 1)?
            .apply(&self.norm)?
            .apply(&self.lm_head)?)
    }
}

/// Mixtral, as registered.
pub struct Mixtral;

impl Architecture for Mixtral {
    const NAME: &'static str = "mixtral";
    const FORMAT: WeightFormat = WeightFormat::Safetensors;
    const MODEL_TYPES: &'static [&'static str] = &["mixtral"];
    const HF_CLASSES: &'static [&'static str] = &["MixtralForCausalLM"];

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
        let cfg = config_from_hf(&hf("real_configs/mixtral-Mixtral-8x7B-v0.1.json")).unwrap();
        assert_eq!(cfg.hidden_size, 4096);
        assert_eq!(cfg.num_attention_heads, 32);
        assert_eq!(cfg.num_key_value_heads, 8);
        assert_eq!(cfg.head_dim, 128);
        assert_eq!(cfg.rope_theta, 1_000_000.0);
        // `sliding_window: null`, which candle's own Config cannot even parse.
        assert_eq!(cfg.sliding_window, None);
        assert_eq!((cfg.num_local_experts, cfg.num_experts_per_tok), (8, 2));

        let cfg = config_from_hf(&hf("real_configs/mixtral-Mixtral-8x22B-v0.1.json")).unwrap();
        assert_eq!(cfg.hidden_size, 6144);
        assert_eq!(cfg.num_attention_heads, 48);
        assert_eq!(cfg.num_hidden_layers, 56);
        assert_eq!(cfg.max_position_embeddings, 65536);
        assert_eq!(cfg.rope_theta, 1_000_000.0);
    }

    #[test]
    fn both_fixture_layouts_map_alike() {
        let new = config_from_hf(&hf("hf/mixtral/config.json")).unwrap();
        assert_eq!(
            new,
            config_from_hf(&hf("hf/mixtral/config.legacy.json")).unwrap()
        );
        assert_eq!(new.sliding_window, Some(6));
        assert_eq!((new.num_local_experts, new.num_experts_per_tok), (4, 2));
    }

    #[test]
    fn too_many_experts_per_token_is_an_error() {
        let mut value = hf("real_configs/mixtral-Mixtral-8x7B-v0.1.json")
            .value()
            .clone();
        value["num_experts_per_tok"] = serde_json::json!(9);
        let err = config_from_hf(&HfConfig::from_value(Path::new("config.json"), value))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("num_experts_per_tok") && err.contains('9'),
            "{err}"
        );
    }
}
