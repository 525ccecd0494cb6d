//! Phi (phi-1, phi-1.5, phi-2) from a Hugging Face directory.
//!
//! This module runs its own forward pass, adapted from candle-transformers' `phi.rs` (parallel
//! attention and MLP blocks, LayerNorm, biases, partial rotary embeddings), because candle's
//! model cannot serve as it is:
//!
//! - its `forward` takes no position (it uses its cache length) and fails on a multi-token
//!   input once the cache holds tokens (its causal mask only covers the new tokens);
//! - its rotary tables are always F32, so it fails in BF16 and F16 (the dtype llm-pool picks
//!   on GPUs, from phi-2's `torch_dtype: float16`);
//! - with `qk_layernorm` it applies a head-sized LayerNorm before splitting the heads, a shape
//!   error; transformers normalises each head;
//! - it cannot tie the output head to the embeddings, and its `Config` has private fields.
//!
//! Here `forward(ids, position)` takes any chunk that follows the cache, in any dtype, with
//! `qk_layernorm` and tied embeddings computed as transformers does.
//!
//! Reset: a fresh [`Cache`] (one empty slot per layer). All state lives in that cache, which
//! is separate from the weights, so a new one is exactly the freshly loaded state.

use crate::error::{Error, Result};
use crate::models::hf::{HfConfig, RopeScaling};
use crate::models::{Adapter, Architecture, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{layer_norm, linear, Activation, Embedding, LayerNorm, Linear, VarBuilder};

/// The Phi settings llm-pool reads from config.json.
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
    layer_norm_eps: f64,
    rope_theta: f64,
    rotary_dim: usize,
    qk_layernorm: bool,
    tie_word_embeddings: bool,
    max_position_embeddings: usize,
}

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
fn phi_config(c: &HfConfig) -> Result<Config> {
    const FAMILY: &str = "phi";
    let activation = match c
        .activation(&["gelu_new", "gelu", "gelu_pytorch_tanh"], "gelu_new")?
        .as_str()
    {
        // transformers' "gelu" is the exact (erf) GELU, the others the tanh approximation.
        "gelu" => Activation::Gelu,
        _ => Activation::GeluPytorchTanh,
    };
    let head_dim = c.require_derived_head_dim()?;
    let num_attention_heads = c.usize("num_attention_heads")?;
    let num_key_value_heads = c.usize_or("num_key_value_heads", num_attention_heads)?;
    if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(Error::config(
            "num_key_value_heads",
            format!("{num_key_value_heads} must be positive and divide num_attention_heads {num_attention_heads}"),
        ));
    }
    let rope = c.rope(None, 10_000.0)?;
    if rope.scaling != RopeScaling::None {
        return Err(c.unsupported_rope(&rope, FAMILY, &["default"]));
    }
    // transformers' Phi rotates half of each head unless the config says otherwise.
    let partial = rope.partial_rotary_factor.unwrap_or(0.5);
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
    Ok(Config {
        vocab_size: c.usize("vocab_size")?,
        hidden_size: c.usize("hidden_size")?,
        intermediate_size: c.usize("intermediate_size")?,
        num_hidden_layers: c.usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        activation,
        layer_norm_eps: c.f64_or("layer_norm_eps", 1e-5)?,
        rope_theta: rope.theta,
        rotary_dim,
        qk_layernorm: c.bool_or("qk_layernorm", false)?,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
        max_position_embeddings: c.usize_or("max_position_embeddings", 2048)?,
    })
}

/// Rotary embeddings over the first `rotary_dim` dimensions of each head; cos/sin are
/// computed for the positions of each forward, in the activations' dtype.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Tensor,
    rotary_dim: usize,
}

impl Rotary {
    fn new(cfg: &Config, device: &Device) -> Result<Self> {
        let dim = cfg.rotary_dim;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| (1.0 / cfg.rope_theta.powf(i as f64 / dim as f64)) as f32)
            .collect();
        let n = inv_freq.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, n), device)?,
            rotary_dim: dim,
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
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
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
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            act: cfg.activation,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.apply(&self.fc1)?.apply(&self.act)?.apply(&self.fc2)
    }
}

/// The KV cache: per layer, the keys and values of the cached tokens.
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
    dense: Linear,
    /// Per-head LayerNorms of queries and keys (`qk_layernorm`).
    qk_layernorm: Option<(LayerNorm, LayerNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let qk_layernorm = if cfg.qk_layernorm {
            Some((
                layer_norm(hd, cfg.layer_norm_eps, vb.pp("q_layernorm"))?,
                layer_norm(hd, cfg.layer_norm_eps, vb.pp("k_layernorm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            q_proj: linear(h, nh * hd, vb.pp("q_proj"))?,
            k_proj: linear(h, nkv * hd, vb.pp("k_proj"))?,
            v_proj: linear(h, nkv * hd, vb.pp("v_proj"))?,
            dense: linear(nh * hd, h, vb.pp("dense"))?,
            qk_layernorm,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
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
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, seq_len, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(xs.apply(&self.q_proj)?, self.num_heads)?;
        let k = heads(xs.apply(&self.k_proj)?, self.num_kv_heads)?;
        let v = heads(xs.apply(&self.v_proj)?, self.num_kv_heads)?;
        let (q, k) = match &self.qk_layernorm {
            Some((qn, kn)) => (q.apply(qn)?, k.apply(kn)?),
            None => (q, k),
        };
        let q = rotary.apply(&q, cos_sin)?;
        let k = rotary.apply(&k, cos_sin)?;
        let (k, v) = match cache.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        *cache = Some((k.clone(), v.clone()));
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
            .apply(&self.dense)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: LayerNorm,
}

/// The causal mask for queries at `offset..offset + seq_len` over all cached and new keys;
/// `None` for a single token, which sees everything.
fn causal_mask(seq_len: usize, offset: usize, device: &Device) -> Result<Option<Tensor>> {
    if seq_len == 1 {
        return Ok(None);
    }
    let kv_len = offset + seq_len;
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq_len, kv_len), device)?))
}

/// The Phi network.
#[derive(Debug, Clone)]
pub struct Network {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    final_layernorm: LayerNorm,
    lm_head: Linear,
    rotary: Rotary,
}

impl Network {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb_l = vb_m.pp("layers").pp(i);
                Ok(DecoderLayer {
                    self_attn: Attention::new(cfg, vb_l.pp("self_attn"))?,
                    mlp: Mlp::new(cfg, vb_l.pp("mlp"))?,
                    input_layernorm: layer_norm(
                        cfg.hidden_size,
                        cfg.layer_norm_eps,
                        vb_l.pp("input_layernorm"),
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Phi's head has a bias even when its weight is tied to the embeddings.
        let lm_head = if cfg.tie_word_embeddings {
            let bias = vb.pp("lm_head").get(cfg.vocab_size, "bias")?;
            Linear::new(embed_tokens.embeddings().clone(), Some(bias))
        } else {
            linear(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens,
            layers,
            final_layernorm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb_m.pp("final_layernorm"),
            )?,
            lm_head,
            rotary: Rotary::new(cfg, vb.device())?,
        })
    }

    fn run(&self, input_ids: &Tensor, offset: usize, cache: &mut Cache) -> Result<Tensor> {
        let (_b, seq_len) = input_ids.dims2()?;
        let mut xs = self.embed_tokens.forward(input_ids)?;
        let cos_sin = self.rotary.cos_sin(offset, seq_len, xs.dtype())?;
        let mask = causal_mask(seq_len, offset, input_ids.device())?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            // Attention and MLP both read the same normalised input, in parallel.
            let normed = xs.apply(&layer.input_layernorm)?;
            let attn =
                layer
                    .self_attn
                    .forward(&normed, &self.rotary, &cos_sin, mask.as_ref(), slot)?;
            xs = ((attn + normed.apply(&layer.mlp)?)? + xs)?;
        }
        Ok(xs
            .narrow(1, seq_len - 1, 1)?
            .apply(&self.final_layernorm)?
            .apply(&self.lm_head)?)
    }
}

/// Phi, as registered.
pub struct Phi;

impl Architecture for Phi {
    const NAME: &'static str = "phi";
    const FORMAT: WeightFormat = WeightFormat::Safetensors;
    const MODEL_TYPES: &'static [&'static str] = &["phi"];
    const HF_CLASSES: &'static [&'static str] = &["PhiForCausalLM"];

    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let dir = source.into_hf(Self::NAME)?;
        let cfg = phi_config(&dir.config)?;
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
    fn phi_2_maps() {
        let c = phi_config(&real_config("phi-phi-2.json")).unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.head_dim),
            (2560, 32, 80)
        );
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (32, 32));
        assert_eq!(c.activation, Activation::GeluPytorchTanh);
        // partial_rotary_factor 0.4 of 80.
        assert_eq!(c.rotary_dim, 32);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.max_position_embeddings, 2048);
        assert!(!c.qk_layernorm && !c.tie_word_embeddings);
    }

    #[test]
    fn phi_1_5_with_null_kv_heads_maps() {
        let c = phi_config(&real_config("phi-phi-1_5.json")).unwrap();
        assert_eq!(c.num_key_value_heads, 32);
        assert_eq!(c.rotary_dim, 32);
    }

    #[test]
    fn a_chunk_after_a_non_empty_cache_equals_one_prefill() {
        use crate::models::{LoadOptions, Model};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/phi");
        let ids = [1, 5, 9, 23, 42, 7, 100, 3];
        let mut model = Model::load(&dir, &LoadOptions::cpu()).unwrap();
        model.forward_ids(&ids[..3], 0).unwrap();
        let chunked = model.forward_ids(&ids[3..], 3).unwrap();
        model.reset_cache().unwrap();
        let whole = model.forward_ids(&ids, 0).unwrap();
        let diff = chunked
            .iter()
            .zip(&whole)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 1e-5, "chunked prefill differs by {diff}");
    }

    #[test]
    fn half_precision_runs() {
        use crate::models::{LoadOptions, Model};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/phi");
        let mut options = LoadOptions::cpu();
        options.dtype = Some(DType::BF16);
        let mut model = Model::load(&dir, &options).unwrap();
        let logits = model.forward_ids(&[1, 5, 9], 0).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
        model.forward_ids(&[23], 3).unwrap();
    }
}
