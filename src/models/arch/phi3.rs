//! Phi-3 (Phi-3, Phi-3.5 and Phi-4-mini text models, `model_type: phi3`) from a Hugging Face
//! directory.
//!
//! The network is the shared pre-norm [`Decoder`] (fused `qkv_proj` and `gate_up_proj`,
//! RMSNorm, partial rotary embeddings, optional tied head), not candle-transformers' `phi3.rs`,
//! because candle's model computes something else than transformers for real checkpoints:
//!
//! - it ignores `sliding_window` (Phi-3-mini-4k: 2047 of 4096 positions), which transformers
//!   applies to every layer;
//! - its LongRoPE multiplies the inverse frequencies by the scaling factors where
//!   transformers divides by them, and it leaves out the attention factor
//!   `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))` applied to cos and sin;
//! - its config deserializer rejects transformers >= 5 configs (`rope_parameters`).
//!
//! LongRoPE limit: transformers switches from the short to the long factors, for all positions
//! of a forward, once that forward reaches past `original_max_position_embeddings`, while the
//! keys already cached keep their short-factor rotation, so what it computes past that point
//! depends on how the sequence was chunked. Up to `original_max_position_embeddings` it
//! consistently uses the short factors, which this module reproduces exactly; a LongRoPE
//! model therefore reports `max_context = original_max_position_embeddings` (4096 for the
//! 128k models) so the engine refuses longer sequences instead of computing something
//! unverified.

use crate::error::{Error, Result};
use crate::models::adapter::Loaded;
use crate::models::hf::{HfConfig, RopeScaling};
use crate::models::layers::attention::{Attention, Heads};
use crate::models::layers::decoder::{Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::linear::Linear;
use crate::models::layers::mlp::Mlp;
use crate::models::layers::norm::Norm;
use crate::models::layers::rotary::Rotary;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_nn::{Activation, VarBuilder};
use serde_json::Value;

/// Phi-3, as registered.
pub struct Phi3;

/// The Phi-3 settings llm-pool reads from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary, widths, layers and heads.
    dims: Dims,
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
pub fn config_from_hf(c: &HfConfig) -> Result<Config> {
    const FAMILY: &str = "phi3";
    let activation = c.activation_fn(&["silu", "gelu_pytorch_tanh", "gelu_new", "gelu"], "silu")?;
    c.require_bool("attention_bias", false, FAMILY)?;
    let dims = Dims::from_hf(c, |_| {
        let (heads, kv_heads) = c.heads(None, None)?;
        Ok(Heads::new(heads, kv_heads, c.stated_head_dim()?))
    })?;
    let head_dim = dims.heads.head_dim;
    let max_position_embeddings = c.usize_or("max_position_embeddings", 4096)?;
    let rope = c.rope(None, 10_000.0)?;
    let rotary_dim = c.rotary_dim(&rope, 1.0, head_dim)?;
    let (factors, attention_factor, max_context) = match &rope.scaling {
        RopeScaling::None => (None, 1.0, max_position_embeddings),
        RopeScaling::Other { rope_type, params }
            if rope_type == "longrope" || rope_type == "su" =>
        {
            let number = |key: &str| rope.scaling.param(key);
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
    Ok(Config {
        dims,
        activation,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-5)?,
        rope: RopeConfig {
            theta: rope.theta,
            rotary_dim,
            factors,
            attention_factor,
        },
        sliding_window: c.sliding_window(None)?,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
        max_context,
    })
}

impl Architecture for Phi3 {
    const NAMES: Names = Names::hf("phi3", &["phi3"], &["Phi3ForCausalLM"]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, network)
    }
}

/// The inverse frequencies, divided by LongRoPE's short factors when there are any.
fn rotary(cfg: &RopeConfig, vb: &VarBuilder) -> Result<Rotary> {
    let dim = cfg.rotary_dim;
    let inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .enumerate()
        .map(|(k, i)| {
            // config_from_hf checked there is one factor per rotated pair.
            let ext = cfg.factors.as_ref().and_then(|f| f.get(k)).copied();
            let ext = ext.unwrap_or(1.0);
            (1.0 / (ext * cfg.theta.powf(i as f64 / dim as f64))) as f32
        })
        .collect();
    Ok(Rotary::new(inv_freq, vb.device())?.with_attention_factor(cfg.attention_factor))
}

/// The pre-norm decoder with Phi-3's fused projections.
fn network(cfg: &Config, vb: VarBuilder) -> Result<Loaded<Decoder>> {
    let dims = cfg.dims;
    let (h, i, heads) = (dims.hidden_size, dims.intermediate_size, dims.heads);
    let norm = |vb: VarBuilder| Norm::rms(h, cfg.rms_norm_eps, vb);
    let q_dim = heads.num_heads * heads.head_dim;
    let qkv_dim = q_dim + 2 * heads.num_kv_heads * heads.head_dim;
    let layer = |_: usize, vb: VarBuilder| {
        let qkv_proj = Linear::load(vb.pp("self_attn.qkv_proj"), h, qkv_dim, false)?;
        let o_proj = Linear::load(vb.pp("self_attn.o_proj"), q_dim, h, false)?;
        let mlp = FeedForward::Mlp(Mlp::FusedGated {
            gate_up: Linear::load(vb.pp("mlp.gate_up_proj"), h, 2 * i, false)?,
            down: Linear::load(vb.pp("mlp.down_proj"), i, h, false)?,
            act: cfg.activation,
            intermediate: i,
        });
        let attention = Attention::fused(qkv_proj, o_proj, heads);
        let layer = DecoderLayer::load_pre_norm(&vb, attention, mlp, norm)?;
        Ok(layer.with_window(cfg.sliding_window))
    };
    let rotaries = vec![rotary(&cfg.rope, &vb)?];
    let tied = cfg.tie_word_embeddings;
    let decoder = Decoder::load_hf(&vb, (&dims, tied), layer, norm, rotaries)?;
    // A LongRoPE model reports only the context computed exactly (see the module docs).
    Ok(decoder.loaded(dims.vocab_size, cfg.max_context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::common::chunked_prefill_diff;
    use crate::models::hf::real_config;
    use std::path::Path;

    #[test]
    fn phi_3_mini_4k_maps() {
        let c = config_from_hf(&real_config("phi3-Phi-3-mini-4k-instruct.json")).unwrap();
        assert_eq!(c.dims.heads, Heads::new(32, 32, 96));
        assert_eq!((c.dims.hidden_size, c.dims.num_hidden_layers), (3072, 32));
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
        let c = config_from_hf(&real_config("phi3-Phi-3-mini-128k-instruct.json")).unwrap();
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
        let c = config_from_hf(&HfConfig::from_value(Path::new("config.json"), v)).unwrap();
        assert_eq!(c.rope.factors.unwrap().len(), 48);
        assert_eq!(c.max_context, 4096);
    }

    #[test]
    fn a_chunk_after_a_non_empty_cache_equals_one_prefill() {
        // 12 tokens: past the fixture"s window of 6, so the cached part is masked too.
        let ids = [1, 5, 9, 23, 42, 7, 100, 3, 77, 12, 8, 64];
        let diff = chunked_prefill_diff("phi3", &ids, &[4, 5]);
        assert!(diff <= 1e-5, "chunked prefill differs by {diff}");
    }
}
