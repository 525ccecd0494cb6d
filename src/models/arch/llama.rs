//! Llama (and Llama 3 with `rope_scaling`, tied embeddings) from a Hugging Face directory.
//!
//! candle's llama takes an external `Cache` and builds its RoPE tables inside it, so the
//! reset swaps in a clone of the cache made at load time: empty KV, same tables.

use crate::error::Result;
use crate::models::adapter::Loaded;
use crate::models::hf::{HfConfig, RopeScaling};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::llama as candle_llama;

/// Llama, as registered.
pub struct Llama;

/// candle's Llama, with the cache it was loaded with, to reset to.
pub struct Network {
    model: candle_llama::Llama,
    pristine_cache: candle_llama::Cache,
}

impl Architecture for Llama {
    const NAMES: Names = Names::hf("llama", &["llama"], &["LlamaForCausalLM"]);
    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let config = |c: &HfConfig| config_from_hf(c, Self::NAME);
        Adapter::load_hf(source, options, config, Network::load)
    }
}

impl Network {
    /// candle's Llama, and the cache (with its RoPE tables) it starts from.
    pub(crate) fn load(config: &candle_llama::Config, vb: VarBuilder) -> Result<Loaded<Self>> {
        let vb_dtype = vb.dtype();
        let cache = candle_llama::Cache::new(true, vb_dtype, config, vb.device())?;
        let network = Network {
            model: candle_llama::Llama::load(vb, config)?,
            pristine_cache: cache.clone(),
        };
        let (vocab_size, max_context) = (config.vocab_size, config.max_position_embeddings);
        let head_dim = config.hidden_size / config.num_attention_heads;
        Ok(
            Loaded::new(network, cache, vocab_size, max_context).with_kv_cache(
                config.num_hidden_layers,
                config.num_key_value_heads,
                head_dim,
                vb_dtype,
            ),
        )
    }
}

impl crate::models::Network for Network {
    // candle's llama takes an external cache that also holds its RoPE tables.
    type Cache = candle_llama::Cache;

    fn forward(&self, ids: &Tensor, position: usize, cache: &mut Self::Cache) -> Result<Tensor> {
        Ok(self.model.forward(ids, position, cache)?)
    }

    fn reset(&self, cache: &mut Self::Cache) -> Result<()> {
        *cache = self.pristine_cache.clone();
        Ok(())
    }

    fn new_cache(&self) -> Result<Self::Cache> {
        Ok(self.pristine_cache.clone())
    }
}

/// candle's llama config from config.json, refusing what candle's llama cannot compute.
pub(crate) fn config_from_hf(c: &HfConfig, architecture: &str) -> Result<candle_llama::Config> {
    c.require_derived_head_dim()?;
    c.require_bool("attention_bias", false, architecture)?;
    c.require_bool("mlp_bias", false, architecture)?;
    c.activation(&["silu"], "silu")?;
    let rope = c.rope(None, 10_000.0)?;
    if rope.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err(c.unsupported_rope(&rope, architecture, &["default", "llama3"]));
    }
    let rope_scaling = match &rope.scaling {
        RopeScaling::None => None,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => Some(candle_llama::Llama3RopeConfig {
            factor: *factor as f32,
            low_freq_factor: *low_freq_factor as f32,
            high_freq_factor: *high_freq_factor as f32,
            original_max_position_embeddings: *original_max_position_embeddings,
            rope_type: candle_llama::Llama3RopeType::Llama3,
        }),
        _ => return Err(c.unsupported_rope(&rope, architecture, &["default", "llama3"])),
    };
    let num_attention_heads = c.usize("num_attention_heads")?;
    let max_position_embeddings = c.usize_or("max_position_embeddings", 4096)?;
    let vocab_size = c.usize("vocab_size")?;
    Ok(candle_llama::Config {
        hidden_size: c.usize("hidden_size")?,
        intermediate_size: c.usize("intermediate_size")?,
        vocab_size,
        num_hidden_layers: c.usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads: c.usize_or("num_key_value_heads", num_attention_heads)?,
        use_flash_attn: false,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: rope.theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::hf::real_config;

    #[test]
    fn llama_3_1_with_rope_scaling_maps() {
        let c = config_from_hf(&real_config("llama-Llama-3.1-8B.json"), "llama").unwrap();
        assert_eq!(
            (c.hidden_size, c.num_attention_heads, c.num_key_value_heads),
            (4096, 32, 8)
        );
        assert_eq!(c.max_position_embeddings, 131_072);
        assert_eq!(c.rope_theta, 500_000.0);
        let scaling = c.rope_scaling.expect("llama3 rope scaling");
        assert_eq!(
            (scaling.factor, scaling.original_max_position_embeddings),
            (8.0, 8192)
        );
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn llama_3_2_tied_and_smollm2_map() {
        let c = config_from_hf(&real_config("llama-Llama-3.2-1B.json"), "llama").unwrap();
        assert!(c.tie_word_embeddings);
        assert_eq!((c.hidden_size, c.num_hidden_layers), (2048, 16));
        let c = config_from_hf(&real_config("llama-SmolLM2-135M-Instruct.json"), "llama").unwrap();
        assert_eq!(
            (c.hidden_size, c.num_attention_heads, c.num_key_value_heads),
            (576, 9, 3)
        );
        assert_eq!(c.rope_theta, 100_000.0);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn yi_maps() {
        let c = config_from_hf(&real_config("yi-Yi-6B.json"), "yi").unwrap();
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.vocab_size),
            (32, 4, 64000)
        );
        assert_eq!(c.rope_theta, 5_000_000.0);
    }
}
