//! Gemma 2 from a Hugging Face directory, and the Gemma network Gemma 3 shares.
//!
//! Gemma 2 and Gemma 3 (text) are one network whose differences are settings: Gemma 3 adds
//! q/k norms, a RoPE per layer kind (local for sliding layers, global with optional linear
//! scaling for the others) and another sliding pattern. [`config_from_hf_with`] maps what both
//! configs share, [`network`] builds the [`Decoder`] for either; `gemma3.rs` holds only what
//! Gemma 3's config says differently.
//!
//! The network is not candle-transformers' `gemma2.rs` because candle's model computes
//! something else than the checkpoints were trained with:
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
//! output head.

use crate::error::{Error, Result};
use crate::models::adapter::Loaded;
use crate::models::hf::HfConfig;
use crate::models::layers::attention::{Attention, Heads};
use crate::models::layers::decoder::{Block, Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::mlp::Mlp;
use crate::models::layers::norm::Norm;
use crate::models::layers::rotary::{inv_freq_linear, Rotary};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_nn::{Activation, VarBuilder};

/// Gemma 2, as registered.
pub struct Gemma2;

/// The Gemma 2 / Gemma 3 settings llm-pool reads from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary, widths, layers and heads.
    pub(super) dims: Dims,
    pub(super) activation: Activation,
    pub(super) rms_norm_eps: f64,
    /// RoPE of the full-attention layers: base frequency and linear scaling factor.
    pub(super) rope_global: (f64, f64),
    /// RoPE of the sliding-window layers (Gemma 2: the same as the global one).
    pub(super) rope_local: (f64, f64),
    /// Whether each query and key head is RMS-normalised before RoPE (Gemma 3).
    pub(super) qk_norm: bool,
    pub(super) attention_bias: bool,
    pub(super) query_pre_attn_scalar: f64,
    pub(super) attn_logit_softcapping: Option<f64>,
    pub(super) final_logit_softcapping: Option<f64>,
    pub(super) sliding_window: Option<usize>,
    /// Per layer: whether it is a sliding-window layer.
    pub(super) sliding_layers: Vec<bool>,
    pub(super) max_position_embeddings: usize,
}

/// What differs between the Gemma 2 and Gemma 3 mappings.
pub(super) struct Family {
    /// The family name errors give.
    pub name: &'static str,
    /// Global and local RoPE.
    pub rope: ((f64, f64), (f64, f64)),
    /// Without `layer_types`, every `pattern`-th layer is a full one, the others slide.
    pub pattern: usize,
    /// transformers' default context.
    pub max_position_embeddings: usize,
    /// q/k norms.
    pub qk_norm: bool,
}

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Config> {
    let theta = c.plain_rope(Some("full_attention"), 10_000.0, "gemma2")?;
    config_from_hf_with(
        c,
        Family {
            name: "gemma2",
            rope: ((theta, 1.0), (theta, 1.0)),
            // Gemma 2 alternates sliding and full layers, starting with a sliding one.
            pattern: 2,
            max_position_embeddings: 8192,
            qk_norm: false,
        },
    )
}

/// The mapping Gemma 2 and Gemma 3 share.
pub(super) fn config_from_hf_with(c: &HfConfig, family: Family) -> Result<Config> {
    let activation = c.activation_fn(
        &["gelu_pytorch_tanh", "gelu_new", "gelu"],
        "gelu_pytorch_tanh",
    )?;
    c.require_bool("tie_word_embeddings", true, family.name)?;
    c.require_bool("use_bidirectional_attention", false, family.name)?;
    let dims = Dims::from_hf(c, |_| {
        let (heads, kv_heads) = c.heads(None, None)?;
        Ok(Heads::new(heads, kv_heads, c.stated_head_dim()?))
    })?;
    let num_hidden_layers = dims.num_hidden_layers;
    let sliding_layers = match c.layer_types(num_hidden_layers)? {
        Some(types) => types,
        None => (0..num_hidden_layers)
            .map(|i| (i + 1) % family.pattern != 0)
            .collect(),
    };
    // transformers' default when the key is absent; an explicit null means no window.
    let sliding_window = c.sliding_window(Some(4096))?;
    if sliding_layers.iter().any(|&s| s) && sliding_window.is_none() {
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
        dims,
        activation,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope_global: family.rope.0,
        rope_local: family.rope.1,
        qk_norm: family.qk_norm,
        attention_bias: c.bool_or("attention_bias", false)?,
        query_pre_attn_scalar,
        attn_logit_softcapping: softcap("attn_logit_softcapping")?,
        final_logit_softcapping: softcap("final_logit_softcapping")?,
        sliding_window,
        sliding_layers,
        max_position_embeddings: c
            .usize_or("max_position_embeddings", family.max_position_embeddings)?,
    })
}

impl Architecture for Gemma2 {
    const NAMES: Names = Names::hf("gemma2", &["gemma2"], &["Gemma2ForCausalLM"]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, network)
    }
}

/// The Gemma decoder: sandwich norms, `1 + weight` RMSNorms, scaled embeddings, soft-caps.
pub(super) fn network(cfg: &Config, vb: VarBuilder) -> Result<Loaded<Decoder>> {
    let (h, heads, eps) = (cfg.dims.hidden_size, cfg.dims.heads, cfg.rms_norm_eps);
    let hd = heads.head_dim;
    let rotary = |(theta, factor)| Rotary::new(inv_freq_linear(hd, theta, factor), vb.device());
    let mut rotaries = vec![rotary(cfg.rope_global)?];
    // Gemma 3's sliding layers have a RoPE of their own; Gemma 2's use the one.
    let local = match cfg.rope_local == cfg.rope_global {
        true => 0,
        false => {
            rotaries.push(rotary(cfg.rope_local)?);
            1
        }
    };
    let bias = cfg.attention_bias;
    let layer = |i: usize, vb: VarBuilder| -> Result<DecoderLayer> {
        let norm = |name: &str, size: usize| Norm::gemma_rms(size, eps, vb.pp(name));
        let vb_attn = vb.pp("self_attn");
        let mut attention = Attention::load(&vb_attn, h, heads, (bias, bias), "o_proj")?
            .with_scale(1.0 / cfg.query_pre_attn_scalar.sqrt())
            .with_softcap(cfg.attn_logit_softcapping);
        if cfg.qk_norm {
            let q_norm = Norm::gemma_rms(hd, eps, vb_attn.pp("q_norm"))?;
            attention =
                attention.with_qk_norms(q_norm, Norm::gemma_rms(hd, eps, vb_attn.pp("k_norm"))?);
        }
        let mlp = Mlp::load_gated(&vb.pp("mlp"), h, cfg.dims.intermediate_size, cfg.activation)?;
        let sliding = cfg.sliding_layers[i];
        Ok(DecoderLayer {
            attention,
            ffn: FeedForward::Mlp(mlp),
            block: Block::Sequential {
                attn_norm: norm("input_layernorm", h)?,
                post_attn_norm: Some(norm("post_attention_layernorm", h)?),
                ffn_norm: norm("pre_feedforward_layernorm", h)?,
                post_ffn_norm: Some(norm("post_feedforward_layernorm", h)?),
            },
            window: if sliding { cfg.sliding_window } else { None },
            rotary: if sliding { local } else { 0 },
        })
    };
    let norm = |vb: VarBuilder| Norm::gemma_rms(h, eps, vb);
    Ok(
        Decoder::load_hf(&vb, (&cfg.dims, true), layer, norm, rotaries)?
            .with_embed_scale((h as f64).sqrt())
            .with_final_softcap(cfg.final_logit_softcapping)
            .loaded(cfg.dims.vocab_size, cfg.max_position_embeddings),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::common::chunked_prefill_diff;
    use crate::models::hf::real_config;

    #[test]
    fn gemma_2_2b_maps() {
        let c = config_from_hf(&real_config("gemma2-gemma-2-2b.json")).unwrap();
        assert_eq!(c.dims.heads, Heads::new(8, 4, 256));
        assert_eq!((c.dims.hidden_size, c.dims.num_hidden_layers), (2304, 26));
        assert_eq!(c.activation, Activation::GeluPytorchTanh);
        assert_eq!(c.query_pre_attn_scalar, 256.0);
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(
            (c.rope_global, c.rope_local),
            ((10000.0, 1.0), (10000.0, 1.0))
        );
        assert_eq!(c.max_position_embeddings, 8192);
        // Sliding first, then alternating.
        assert_eq!(&c.sliding_layers[..4], &[true, false, true, false]);
    }

    #[test]
    fn gemma_2_27b_query_scale_differs_from_head_dim() {
        let c = config_from_hf(&real_config("gemma2-gemma-2-27b.json")).unwrap();
        assert_eq!(
            (c.dims.heads.head_dim, c.query_pre_attn_scalar),
            (128, 144.0)
        );
        assert_eq!(c.sliding_layers.len(), 46);
    }

    #[test]
    fn a_chunk_after_a_non_empty_cache_equals_one_prefill() {
        // 12 tokens: past the fixture"s window of 6, so the cached part is masked too.
        let ids = [1, 5, 9, 23, 42, 7, 100, 3, 77, 12, 8, 64];
        let diff = chunked_prefill_diff("gemma2", &ids, &[4, 5]);
        assert!(diff <= 1e-5, "chunked prefill differs by {diff}");
    }
}
