//! Qwen2 (and Qwen2.5) from a Hugging Face directory.
//!
//! The network is the shared pre-norm [`Decoder`] (RMSNorm, biases on q, k and v, SwiGLU),
//! not candle-transformers' `qwen2.rs`, because candle's model computes something other than
//! transformers in ways an adapter cannot reach:
//!
//! - its sliding-window mask ignores `use_sliding_window` and `max_window_layers` (it applies
//!   `sliding_window` to every layer, and real configs set `sliding_window` with
//!   `use_sliding_window: false`), lets a query see `sliding_window + 1` keys instead of
//!   `sliding_window`, and never masks cached keys (a single-token decode gets no mask at all);
//!   the mask is private, so it cannot be corrected from outside;
//! - it builds the RoPE tables in the model dtype, so under BF16 the positions themselves are
//!   rounded (every position above 256 is off); here they are computed in F32 as transformers
//!   does and only cos and sin are cast;
//! - it ignores `head_dim` and `tie_word_embeddings` (it ties when `lm_head.weight` is
//!   missing), and its `Config` rejects real configs (`sliding_window: null`, transformers >= 5's
//!   `rope_parameters`). Here the config is read through [`HfConfig`] into [`Config`].
//!
//! Per layer, the window comes from `layer_types` when config.json lists them (transformers >= 5
//! writes them), else as transformers derives them: layers from `max_window_layers` on slide
//! when `use_sliding_window` is set.

use crate::error::{Error, Result};
use crate::models::adapter::Loaded;
use crate::models::hf::HfConfig;
use crate::models::layers::attention::Attention;
use crate::models::layers::decoder::{Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::mlp::Mlp;
use crate::models::layers::norm::Norm;
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_nn::{Activation, VarBuilder};

/// Qwen2, as registered.
pub struct Qwen2;

/// The settings of a Qwen2 checkpoint, read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary, widths, layers and heads.
    pub dims: Dims,
    /// The longest sequence.
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

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Config> {
    let dims = Dims::from_hf_derived(c, (None, None))?;
    c.activation(&["silu"], "silu")?;
    Ok(Config {
        dims,
        max_position_embeddings: c.usize_or("max_position_embeddings", 32768)?,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: c.plain_rope(None, 10_000.0, "qwen2")?,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
        layer_windows: layer_windows(c, dims.num_hidden_layers)?,
    })
}

/// Each layer's window, as transformers' Qwen2Config decides it.
fn layer_windows(c: &HfConfig, num_layers: usize) -> Result<Vec<Option<usize>>> {
    // transformers: `sliding_window if use_sliding_window else None`, where an absent
    // sliding_window means its default 4096 and an explicit null means none.
    let window = match c.bool_or("use_sliding_window", false)? {
        false => None,
        true => c.sliding_window(Some(4096))?,
    };
    let Some(sliding) = c.layer_types(num_layers)? else {
        let max_window_layers = c.usize_or("max_window_layers", 28)?;
        return Ok((0..num_layers)
            .map(|i| window.filter(|_| i >= max_window_layers))
            .collect());
    };
    sliding
        .iter()
        .enumerate()
        .map(|(i, &sliding)| match (sliding, window) {
            (false, _) => Ok(None),
            (true, Some(w)) => Ok(Some(w)),
            (true, None) => Err(Error::config(
                "layer_types",
                format!(
                    "entry {i} is sliding_attention but there is no window \
                     (use_sliding_window is false or sliding_window is null)"
                ),
            )),
        })
        .collect()
}

impl Architecture for Qwen2 {
    const NAMES: Names = Names::hf("qwen2", &["qwen2"], &["Qwen2ForCausalLM"]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, network)
    }
}

/// The pre-norm decoder with Qwen2's weights.
fn network(cfg: &Config, vb: VarBuilder) -> Result<Loaded<Decoder>> {
    let dims = cfg.dims;
    let h = dims.hidden_size;
    let norm = |vb: VarBuilder| Norm::rms(h, cfg.rms_norm_eps, vb);
    let layer = |i: usize, vb: VarBuilder| {
        // Qwen2 has biases on q, k and v, none on o.
        let attention =
            Attention::load(&vb.pp("self_attn"), h, dims.heads, (true, false), "o_proj")?;
        let mlp = Mlp::load_gated(&vb.pp("mlp"), h, dims.intermediate_size, Activation::Silu)?;
        let layer = DecoderLayer::load_pre_norm(&vb, attention, FeedForward::Mlp(mlp), norm)?;
        Ok(layer.with_window(cfg.layer_windows[i]))
    };
    let inv_freq = inv_freq(dims.heads.head_dim, cfg.rope_theta, Rounding::F32Inverse);
    let rotaries = vec![Rotary::new(inv_freq, vb.device())?];
    let decoder = Decoder::load_hf(&vb, (&dims, cfg.tie_word_embeddings), layer, norm, rotaries)?;
    Ok(decoder.loaded(dims.vocab_size, cfg.max_position_embeddings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::hf::both_layouts;
    use crate::models::hf::fixture_config as hf;
    use serde_json::Value;
    use std::path::Path;

    #[test]
    fn real_configs_map() {
        let cfg = config_from_hf(&hf("real_configs/qwen2-Qwen2.5-0.5B.json")).unwrap();
        assert_eq!(cfg.dims.hidden_size, 896);
        assert_eq!(cfg.dims.heads.num_heads, 14);
        assert_eq!(cfg.dims.heads.num_kv_heads, 2);
        assert_eq!(cfg.dims.heads.head_dim, 64);
        assert_eq!(cfg.rope_theta, 1_000_000.0);
        assert!(cfg.tie_word_embeddings);
        // sliding_window is set but use_sliding_window is false: every layer is full.
        assert_eq!(cfg.layer_windows, vec![None; 24]);

        let cfg = config_from_hf(&hf("real_configs/qwen2-Qwen2.5-7B-Instruct.json")).unwrap();
        assert_eq!(cfg.dims.hidden_size, 3584);
        assert_eq!(cfg.dims.heads.num_heads, 28);
        assert_eq!(cfg.dims.heads.num_kv_heads, 4);
        assert_eq!(cfg.dims.heads.head_dim, 128);
        assert!(!cfg.tie_word_embeddings);
        assert_eq!(cfg.layer_windows, vec![None; 28]);
    }

    #[test]
    fn both_fixture_layouts_map_alike() {
        let new = both_layouts("qwen2", config_from_hf);
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
