//! Gemma 3 (text: `Gemma3ForCausalLM`, `model_type: gemma3_text`) from a Hugging Face
//! directory.
//!
//! Gemma 3 runs the Gemma network of `gemma2.rs` (not candle-transformers' `gemma3.rs`) with
//! its own settings; this module maps what its config says differently. candle's model
//! computes something else than the checkpoints were trained with:
//!
//! - it scales queries by `1/sqrt(head_dim)`; Gemma 3 uses `query_pre_attn_scalar^-1/2`;
//! - it ignores RoPE scaling (gemma-3-4b and larger use a linear factor 8 on the global
//!   layers) and reads only the legacy RoPE keys;
//! - its sliding window is one token too wide (`j + w < i` keeps `w + 1` tokens), is not
//!   applied in single-token decoding, and its rotating KV cache and prefill mask disagree in
//!   shape once a prefill outgrows the window;
//! - its layer pattern only comes from `sliding_window_pattern`, while newer configs state
//!   `layer_types`.
//!
//! What Gemma 3 adds to Gemma 2: q/k RMSNorms, and a RoPE per layer kind from either config
//! layout: transformers >= 5 nests `rope_parameters` per layer type (`full_attention`,
//! `sliding_attention`); legacy configs give `rope_theta` / `rope_scaling` for the global
//! layers and `rope_local_base_freq` for the sliding ones. Without `layer_types`, every
//! `sliding_window_pattern`-th layer (default 6) is a global one.

use super::gemma2::{config_from_hf_with, network, Config, Family};
use crate::error::{Error, Result};
use crate::models::hf::{HfConfig, Rope, RopeScaling};
use crate::models::layers::decoder::Decoder;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use serde_json::Value;

/// Gemma 3 (text), as registered.
pub struct Gemma3;

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Config> {
    let rope = match c.get("rope_parameters") {
        // transformers >= 5: one entry per layer type.
        Some(Value::Object(o)) if o.contains_key("full_attention") => (
            rope_setting(c, &c.rope(Some("full_attention"), 1_000_000.0)?)?,
            rope_setting(c, &c.rope(Some("sliding_attention"), 10_000.0)?)?,
        ),
        Some(_) => {
            return Err(Error::config(
                "rope_parameters",
                "Gemma 3 needs one entry per layer type (full_attention, sliding_attention)",
            ))
        }
        // Legacy: rope_theta / rope_scaling are the global layers'; the sliding layers have
        // their own base frequency and no scaling.
        None => (
            rope_setting(c, &c.rope(None, 1_000_000.0)?)?,
            (c.f64_or("rope_local_base_freq", 10_000.0)?, 1.0),
        ),
    };
    let pattern = match c.opt_usize("sliding_window_pattern")? {
        Some(p) => p,
        None => c.usize_or("_sliding_window_pattern", 6)?,
    };
    if pattern == 0 {
        return Err(Error::config(
            "sliding_window_pattern",
            "0 must be positive",
        ));
    }
    let family = Family {
        name: "gemma3",
        rope,
        pattern,
        max_position_embeddings: 131_072,
        qk_norm: true,
    };
    config_from_hf_with(c, family)
}

/// Base frequency and linear factor of a RoPE setting; Gemma 3 uses default and linear.
fn rope_setting(c: &HfConfig, rope: &Rope) -> Result<(f64, f64)> {
    if rope.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err(Error::config(
            "partial_rotary_factor",
            format!(
                "{:?} is not supported for gemma3; the whole head is rotated",
                rope.partial_rotary_factor
            ),
        ));
    }
    match rope.scaling {
        RopeScaling::None => Ok((rope.theta, 1.0)),
        RopeScaling::Linear { factor } if factor > 0.0 => Ok((rope.theta, factor)),
        _ => Err(c.unsupported_rope(rope, "gemma3", &["default", "linear"])),
    }
}

impl Architecture for Gemma3 {
    const NAMES: Names = Names::hf("gemma3", &["gemma3_text"], &["Gemma3ForCausalLM"]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, network)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::common::chunked_prefill_diff;
    use crate::models::hf::mapping_error;
    use crate::models::hf::real_config;
    use crate::models::layers::attention::Heads;
    use candle_nn::Activation;
    use std::path::Path;

    #[test]
    fn gemma_3_270m_with_layer_types_maps() {
        let c = config_from_hf(&real_config("gemma3-gemma-3-270m.json")).unwrap();
        assert_eq!(c.dims.heads, Heads::new(4, 1, 256));
        assert_eq!((c.dims.hidden_size, c.dims.num_hidden_layers), (640, 18));
        assert_eq!(c.activation, Activation::GeluPytorchTanh);
        assert_eq!(c.query_pre_attn_scalar, 256.0);
        assert_eq!(
            (c.attn_logit_softcapping, c.final_logit_softcapping),
            (None, None)
        );
        assert_eq!(c.sliding_window, Some(512));
        assert_eq!(c.rope_global, (1_000_000.0, 1.0));
        assert_eq!(c.rope_local, (10_000.0, 1.0));
        assert_eq!(c.max_position_embeddings, 32768);
        let full: Vec<usize> = (0..18).filter(|&i| !c.sliding_layers[i]).collect();
        assert_eq!(full, vec![5, 11, 17]);
    }

    #[test]
    fn gemma_3_1b_with_sliding_window_pattern_maps() {
        let c = config_from_hf(&real_config("gemma3-gemma-3-1b-it.json")).unwrap();
        assert_eq!((c.dims.hidden_size, c.dims.num_hidden_layers), (1152, 26));
        let full: Vec<usize> = (0..26).filter(|&i| !c.sliding_layers[i]).collect();
        assert_eq!(full, vec![5, 11, 17, 23]);
        assert_eq!(c.rope_local, (10_000.0, 1.0));
    }

    #[test]
    fn nested_rope_parameters_give_each_layer_type_its_own_rope() {
        let mut v = real_config("gemma3-gemma-3-270m.json").value().clone();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("rope_scaling");
        o.remove("rope_local_base_freq");
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
            }),
        );
        let c = config_from_hf(&HfConfig::from_value(Path::new("config.json"), v.clone())).unwrap();
        assert_eq!(c.rope_global, (1_000_000.0, 8.0));
        assert_eq!(c.rope_local, (10_000.0, 1.0));

        v["rope_parameters"]["full_attention"] =
            serde_json::json!({"rope_type": "yarn", "factor": 8.0, "rope_theta": 1000000.0});
        let err = mapping_error(config_from_hf, v);
        assert!(
            err.contains("yarn") && err.contains("allowed: default, linear"),
            "{err}"
        );
    }

    #[test]
    fn a_chunk_after_a_non_empty_cache_equals_one_prefill() {
        // 12 tokens: past the fixture"s window of 6, so the cached part is masked too.
        let ids = [1, 5, 9, 23, 42, 7, 100, 3, 77, 12, 8, 64];
        let diff = chunked_prefill_diff("gemma3", &ids, &[4, 5]);
        assert!(diff <= 1e-5, "chunked prefill differs by {diff}");
    }
}
