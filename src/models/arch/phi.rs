//! Phi (phi-1, phi-1.5, phi-2) from a Hugging Face directory.
//!
//! The network is the shared [`Decoder`] with Phi's parallel block (attention and MLP read the
//! same LayerNorm output), biases everywhere and partial rotary embeddings, not
//! candle-transformers' `phi.rs`, because candle's model cannot serve as it is:
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

use crate::error::Result;
use crate::models::adapter::Loaded;
use crate::models::hf::{HfConfig, RopeScaling};
use crate::models::layers::attention::{Attention, Heads};
use crate::models::layers::decoder::{Block, Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::linear::{Embedding, Linear};
use crate::models::layers::mlp::Mlp;
use crate::models::layers::norm::Norm;
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_nn::{Activation, VarBuilder};

/// Phi, as registered.
pub struct Phi;

/// The Phi settings llm-pool reads from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary, widths, layers and heads.
    dims: Dims,
    activation: Activation,
    layer_norm_eps: f64,
    rope_theta: f64,
    rotary_dim: usize,
    qk_layernorm: bool,
    tie_word_embeddings: bool,
    max_position_embeddings: usize,
}

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Config> {
    let activation = c.activation_fn(&["gelu_new", "gelu", "gelu_pytorch_tanh"], "gelu_new")?;
    let dims = Dims::from_hf(c, |_| {
        let head_dim = c.require_derived_head_dim()?;
        let (heads, kv_heads) = c.heads(None, None)?;
        Ok(Heads::new(heads, kv_heads, head_dim))
    })?;
    let rope = c.rope(None, 10_000.0)?;
    if rope.scaling != RopeScaling::None {
        return Err(c.unsupported_rope(&rope, "phi", &["default"]));
    }
    Ok(Config {
        dims,
        activation,
        layer_norm_eps: c.f64_or("layer_norm_eps", 1e-5)?,
        rope_theta: rope.theta,
        // transformers' Phi rotates half of each head unless the config says otherwise.
        rotary_dim: c.rotary_dim(&rope, 0.5, dims.heads.head_dim)?,
        qk_layernorm: c.bool_or("qk_layernorm", false)?,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
        max_position_embeddings: c.usize_or("max_position_embeddings", 2048)?,
    })
}

impl Architecture for Phi {
    const NAMES: Names = Names::hf("phi", &["phi"], &["PhiForCausalLM"]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, network)
    }
}

/// One Phi layer: parallel attention and MLP over one LayerNorm.
fn layer(cfg: &Config, vb: VarBuilder) -> Result<DecoderLayer> {
    let (dims, eps) = (cfg.dims, cfg.layer_norm_eps);
    let (h, i, heads) = (dims.hidden_size, dims.intermediate_size, dims.heads);
    let vb_attn = vb.pp("self_attn");
    let mut attention = Attention::load(&vb_attn, h, heads, (true, true), "dense")?;
    if cfg.qk_layernorm {
        // Per head, as transformers normalises them.
        attention = attention.with_qk_norms(
            Norm::layer(heads.head_dim, eps, vb_attn.pp("q_layernorm"))?,
            Norm::layer(heads.head_dim, eps, vb_attn.pp("k_layernorm"))?,
        );
    }
    let mlp = Mlp::Plain {
        fc1: Linear::load(vb.pp("mlp.fc1"), h, i, true)?,
        fc2: Linear::load(vb.pp("mlp.fc2"), i, h, true)?,
        act: cfg.activation,
    };
    Ok(DecoderLayer {
        attention,
        ffn: FeedForward::Mlp(mlp),
        block: Block::Parallel {
            norm: Norm::layer(h, eps, vb.pp("input_layernorm"))?,
        },
        window: None,
        rotary: 0,
    })
}

/// The decoder with Phi's weights.
fn network(cfg: &Config, vb: VarBuilder) -> Result<Loaded<Decoder>> {
    let (h, vocab) = (cfg.dims.hidden_size, cfg.dims.vocab_size);
    let embed = Embedding::load(vb.pp("model.embed_tokens"), vocab, h)?;
    // Phi's head has a bias even when its weight is tied to the embeddings.
    let lm_head = if cfg.tie_word_embeddings {
        embed.tied_head(Some(vb.pp("lm_head").get(vocab, "bias")?))?
    } else {
        Linear::load(vb.pp("lm_head"), h, vocab, true)?
    };
    let layers = (0..cfg.dims.num_hidden_layers)
        .map(|i| layer(cfg, vb.pp("model.layers").pp(i)))
        .collect::<Result<Vec<_>>>()?;
    let norm = Norm::layer(h, cfg.layer_norm_eps, vb.pp("model.final_layernorm"))?;
    let inv_freq = inv_freq(cfg.rotary_dim, cfg.rope_theta, Rounding::F64);
    let rotary = Rotary::new(inv_freq, vb.device())?;
    let decoder = Decoder::new(embed, layers, norm, lm_head, vec![rotary]);
    Ok(decoder.loaded(vocab, cfg.max_position_embeddings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::common::chunked_prefill_diff;
    use crate::models::hf::real_config;
    use candle_core::DType;
    use std::path::Path;

    #[test]
    fn phi_2_maps() {
        let c = config_from_hf(&real_config("phi-phi-2.json")).unwrap();
        assert_eq!(c.dims.heads, Heads::new(32, 32, 80));
        assert_eq!((c.dims.hidden_size, c.dims.num_hidden_layers), (2560, 32));
        assert_eq!(c.activation, Activation::GeluPytorchTanh);
        // partial_rotary_factor 0.4 of 80.
        assert_eq!(c.rotary_dim, 32);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.max_position_embeddings, 2048);
        assert!(!c.qk_layernorm && !c.tie_word_embeddings);
    }

    #[test]
    fn phi_1_5_with_null_kv_heads_maps() {
        let c = config_from_hf(&real_config("phi-phi-1_5.json")).unwrap();
        assert_eq!(c.dims.heads.num_kv_heads, 32);
        assert_eq!(c.rotary_dim, 32);
    }

    #[test]
    fn a_chunk_after_a_non_empty_cache_equals_one_prefill() {
        let ids = [1, 5, 9, 23, 42, 7, 100, 3];
        let diff = chunked_prefill_diff("phi", &ids, &[3]);
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
