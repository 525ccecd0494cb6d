//! Gemma (the first generation: gemma-2b, gemma-7b, CodeGemma) from a Hugging Face directory.
//!
//! candle's `gemma` model computes this family exactly as transformers does; the adapter hides:
//!
//! - its `Config` deserializer, which fails on the real configs that set both `hidden_act` and
//!   `hidden_activation` (gemma-2b does). The config is built here from [`HfConfig`] getters, and
//!   the legacy `hidden_act: "gelu"` is read as the tanh approximation, as transformers does for
//!   Gemma (that is what the checkpoints were trained with);
//! - features it silently ignores: RoPE scaling, an untied output head, bidirectional attention.
//!   Those are errors here;
//! - its output, `(b, 1, vocab)` in the model dtype, normalised to F32 `(b, vocab)`.
//!
//! Reset: a pristine clone. candle's `Model` is `Clone`; its only state is the per-layer KV cache,
//! an `Option<(Tensor, Tensor)>` that is replaced (by `Tensor::cat`), never written in place, so
//! a clone taken at load time shares the weights and stays the freshly loaded model.

use crate::error::Result;
use crate::models::adapter::{Loaded, Pristine};
use crate::models::hf::HfConfig;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_nn::Activation;
use candle_transformers::models::gemma as candle_gemma;

/// Gemma, as registered: candle's model, reset to a pristine clone.
pub struct Gemma;

/// Maps config.json to candle's Gemma config, refusing what candle cannot compute.
fn gemma_config(c: &HfConfig) -> Result<candle_gemma::Config> {
    const FAMILY: &str = "gemma";
    // The original Gemma configs say "gelu" but mean the tanh approximation (what the
    // checkpoints were trained with); transformers rewrites it the same way.
    c.activation(&["gelu", "gelu_pytorch_tanh"], "gelu_pytorch_tanh")?;
    let act = Activation::GeluPytorchTanh;
    let rope_theta = c.plain_rope(None, 10_000.0, FAMILY)?;
    // candle's Gemma always ties the output head to the embeddings.
    c.require_bool("tie_word_embeddings", true, FAMILY)?;
    c.require_bool("use_bidirectional_attention", false, FAMILY)?;
    // Grouped-query attention needs whole groups; candle would divide and silently truncate.
    let (num_attention_heads, num_key_value_heads) = c.heads(None, None)?;
    let hidden_size = c.usize("hidden_size")?;
    let head_dim = match c.opt_usize("head_dim")? {
        Some(hd) => hd,
        None => c.require_derived_head_dim()?,
    };
    Ok(candle_gemma::Config {
        attention_bias: c.bool_or("attention_bias", false)?,
        head_dim,
        hidden_act: Some(act),
        hidden_activation: None,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_attention_heads,
        num_hidden_layers: c.usize("num_hidden_layers")?,
        num_key_value_heads,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta,
        vocab_size: c.usize("vocab_size")?,
        max_position_embeddings: c.usize_or("max_position_embeddings", 8192)?,
    })
}

impl Architecture for Gemma {
    const NAMES: Names = Names::hf("gemma", &["gemma"], &["GemmaForCausalLM"]);
    type Network = Pristine<candle_gemma::Model>;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, gemma_config, |cfg, vb| {
            let dtype = vb.dtype();
            let model = candle_gemma::Model::new(false, cfg, vb)?;
            Ok(Loaded::pristine(
                model,
                candle_gemma::Model::forward,
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
    use crate::models::hf::mapping_error;
    use crate::models::hf::real_config;

    #[test]
    fn gemma_2b_with_both_activation_keys_maps() {
        let c = gemma_config(&real_config("gemma-gemma-2b.json")).unwrap();
        assert_eq!(c.hidden_act, Some(Activation::GeluPytorchTanh));
        assert_eq!(c.hidden_activation, None);
        assert_eq!((c.hidden_size, c.head_dim), (2048, 256));
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (8, 1));
        assert_eq!(c.num_hidden_layers, 18);
        assert_eq!(c.vocab_size, 256000);
        assert_eq!(c.max_position_embeddings, 8192);
        assert_eq!(c.rope_theta, 10000.0);
    }

    #[test]
    fn gemma_7b_legacy_gelu_is_the_tanh_approximation() {
        let c = gemma_config(&real_config("gemma-gemma-7b.json")).unwrap();
        assert_eq!(c.hidden_act, Some(Activation::GeluPytorchTanh));
        // head_dim 256 is not hidden_size / heads (192): it must come from the config.
        assert_eq!(
            (c.hidden_size, c.num_attention_heads, c.head_dim),
            (3072, 16, 256)
        );
    }

    #[test]
    fn rope_scaling_is_refused() {
        let mut v = real_config("gemma-gemma-2b.json").value().clone();
        v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let err = mapping_error(gemma_config, v);
        assert!(
            err.contains("linear") && err.contains("allowed: default"),
            "{err}"
        );
    }
}
