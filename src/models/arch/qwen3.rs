//! Qwen3 from a Hugging Face directory, on candle's `qwen3` model.
//!
//! What this adapter hides:
//!
//! - candle's Qwen3 appends to its KV cache whatever position it is given, so a second prefill
//!   at position 0 without a clear silently attends to the previous sequence; the reset below
//!   makes that impossible.
//! - candle's `Config` derives `Deserialize` but needs fields real configs leave out or moved
//!   (`rope_theta` lives in `rope_parameters` since transformers 5; `head_dim`,
//!   `max_window_layers`, `attention_bias` may be absent and then take transformers'
//!   defaults); it is filled from [`HfConfig`] getters.
//! - candle has no sliding-window attention for Qwen3 (it bails on `use_sliding_window`); a
//!   config with any sliding layer is refused here with an error naming the key, instead of
//!   being computed as full attention.
//!
//! Reset: a pristine clone taken at load time. candle's model is `Clone`; its weights and
//! RoPE tables are reference-counted tensors that nothing writes in place, and its only state,
//! each layer's `ConcatKvCache`, is empty (`None`) in the pristine copy and grows by
//! concatenation into new tensors, so a clone of the pristine copy is exactly the freshly
//! loaded model.

use crate::error::{Error, Result};
use crate::models::adapter::{Loaded, Pristine};
use crate::models::hf::HfConfig;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_nn::Activation;
use candle_transformers::models::qwen3 as candle_qwen3;
use serde_json::Value;

/// Qwen3, as registered: candle's model, reset to a pristine clone.
pub struct Qwen3;

/// Maps config.json to candle's Qwen3 config, refusing what candle cannot compute.
pub(crate) fn config_from_hf(c: &HfConfig) -> Result<candle_qwen3::Config> {
    const FAMILY: &str = "qwen3";
    let num_hidden_layers = c.usize("num_hidden_layers")?;
    let (num_attention_heads, num_key_value_heads) = c.heads(None, None)?;
    // Qwen3's head_dim is its own setting (128 in every released size), not derived from
    // hidden_size; transformers' default is 128 too.
    let head_dim = c.usize_or("head_dim", 128)?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::config(
            "head_dim",
            format!("{head_dim} is not supported; RoPE needs a positive even head_dim"),
        ));
    }
    c.activation(&["silu"], "silu")?;
    let rope_theta = c.plain_rope(None, 10_000.0, FAMILY)?;
    let max_window_layers = c.usize_or("max_window_layers", 28)?;
    if let Some(layer) = first_sliding_layer(c, num_hidden_layers, max_window_layers)? {
        return Err(Error::config(
            "use_sliding_window",
            format!(
                "layer {layer} uses sliding-window attention, which candle's qwen3 cannot compute; \
                 only full attention (use_sliding_window: false) is supported"
            ),
        ));
    }
    Ok(candle_qwen3::Config {
        vocab_size: c.usize("vocab_size")?,
        hidden_size: c.usize("hidden_size")?,
        intermediate_size: c.usize("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        head_dim,
        attention_bias: c.bool_or("attention_bias", false)?,
        num_key_value_heads,
        max_position_embeddings: c.usize_or("max_position_embeddings", 32768)?,
        sliding_window: None,
        max_window_layers,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
        rope_theta,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        use_sliding_window: false,
        hidden_act: Activation::Silu,
    })
}

/// The first layer transformers would run with a sliding window: from `layer_types` when the
/// config lists them (transformers >= 5 writes them), else as transformers derives them
/// (`use_sliding_window` with a non-null `sliding_window`, from layer `max_window_layers` on).
fn first_sliding_layer(
    c: &HfConfig,
    num_layers: usize,
    max_window_layers: usize,
) -> Result<Option<usize>> {
    if let Some(types) = c.get("layer_types") {
        let types = types.as_array().ok_or_else(|| {
            Error::config(
                "layer_types",
                format!("must be a list of layer type names, found {types}"),
            )
        })?;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                Some("full_attention") => {}
                Some("sliding_attention") => return Ok(Some(i)),
                _ => {
                    return Err(Error::config(
                        "layer_types",
                        format!(
                            "entry {i} is {t}; allowed: \"full_attention\", \"sliding_attention\""
                        ),
                    ))
                }
            }
        }
        return Ok(None);
    }
    let window_set = matches!(
        c.value().get("sliding_window"),
        None | Some(Value::Number(_))
    );
    if c.bool_or("use_sliding_window", false)? && window_set && max_window_layers < num_layers {
        return Ok(Some(max_window_layers));
    }
    Ok(None)
}

impl Architecture for Qwen3 {
    const NAMES: Names = Names::hf("qwen3", &["qwen3"], &["Qwen3ForCausalLM"]);
    type Network = Pristine<candle_qwen3::ModelForCausalLM>;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, |cfg, vb| {
            let dtype = vb.dtype();
            let model = candle_qwen3::ModelForCausalLM::new(cfg, vb)?;
            // candle's RoPE table has exactly this many rows.
            Ok(Loaded::pristine(
                model,
                candle_qwen3::ModelForCausalLM::forward,
                cfg.vocab_size,
                cfg.max_position_embeddings,
            )
            .with_kv_cache(
                cfg.num_hidden_layers,
                cfg.num_key_value_heads,
                cfg.head_dim,
                dtype,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::hf::both_layouts;
    use crate::models::hf::fixture_config as hf;
    use crate::models::hf::mapping_error;

    #[test]
    fn real_configs_map() {
        let cfg = config_from_hf(&hf("real_configs/qwen3-Qwen3-0.6B.json")).unwrap();
        assert_eq!(cfg.hidden_size, 1024);
        assert_eq!(cfg.num_attention_heads, 16);
        assert_eq!(cfg.num_key_value_heads, 8);
        assert_eq!(cfg.head_dim, 128);
        assert_eq!(cfg.rope_theta, 1_000_000.0);
        assert_eq!(cfg.max_position_embeddings, 40960);
        assert!(cfg.tie_word_embeddings);
        assert!(!cfg.use_sliding_window);

        let cfg = config_from_hf(&hf("real_configs/qwen3-Qwen3-8B.json")).unwrap();
        assert_eq!(cfg.hidden_size, 4096);
        assert_eq!(cfg.num_hidden_layers, 36);
        assert!(!cfg.tie_word_embeddings);
    }

    #[test]
    fn both_fixture_layouts_map_alike() {
        let new = both_layouts("qwen3", config_from_hf);
        assert_eq!(new.head_dim, 32);
    }

    #[test]
    fn a_sliding_window_is_refused() {
        let mut value = hf("real_configs/qwen3-Qwen3-0.6B.json").value().clone();
        value["use_sliding_window"] = serde_json::json!(true);
        value["sliding_window"] = serde_json::json!(4096);
        value["max_window_layers"] = serde_json::json!(20);
        let err = mapping_error(config_from_hf, value);
        assert!(err.contains("layer 20") && err.contains("sliding"), "{err}");
    }
}
