//! Mistral from a Hugging Face directory, on candle's `mistral` model.
//!
//! What this adapter hides:
//!
//! - candle's sliding-window mask is wrong in two ways: it lets a query see `sliding_window + 1`
//!   keys (transformers: `sliding_window`, the query included), and it does not mask cached keys
//!   at all: a single-token decode gets no mask and a prefill at a non-zero position sees the
//!   whole cache. This adapter never lets candle build the mask: it embeds the tokens itself and
//!   calls `forward_embeds` with the transformers mask, built here for every forward.
//! - candle always loads `lm_head.weight`; tied checkpoints (`tie_word_embeddings: true`) have
//!   none, so the var builder reads the embedding matrix under that name instead.
//! - candle's `Config` derives `Deserialize` but rejects real configs (it needs
//!   `max_position_embeddings`, `rope_theta` and `rms_norm_eps` at the top level, which
//!   transformers >= 5 moves into `rope_parameters`); it is filled from [`HfConfig`] getters.
//!
//! Reset: a pristine clone taken at load time. candle's model is `Clone`, its weights are
//! reference-counted tensors that nothing writes in place, and its only state, the per-layer
//! `Option<(k, v)>` cache, is `None` in the pristine copy and grows by concatenation (new
//! tensors), so a clone of the pristine copy is exactly the freshly loaded model.

use crate::error::{Error, Result};
use crate::models::adapter::Loaded;
use crate::models::common::attention_mask;
use crate::models::hf::HfConfig;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_core::{Module, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::mistral as candle_mistral;
use serde_json::Value;

/// Mistral, as registered.
pub struct Mistral;

/// candle's Mistral as loaded (the pristine copy resets clone from) and its window.
pub struct Network {
    pristine: candle_mistral::Model,
    sliding_window: Option<usize>,
}

/// What config.json says, mapped to candle's config.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MistralSettings {
    pub config: candle_mistral::Config,
    pub tie_word_embeddings: bool,
}

/// Maps config.json to candle's Mistral config, refusing what candle cannot compute.
pub(crate) fn settings_from_hf(c: &HfConfig) -> Result<MistralSettings> {
    const FAMILY: &str = "mistral";
    let hidden_size = c.usize("hidden_size")?;
    let (num_attention_heads, num_key_value_heads) = c.heads(Some(32), Some(8))?;
    // transformers: `head_dim or hidden_size // num_attention_heads`, checked here; candle
    // honours an explicit head_dim (Mistral NeMo's 128 with hidden_size 5120 and 32 heads)
    // and derives it otherwise.
    c.head_dim(hidden_size, num_attention_heads)?;
    let head_dim = c.opt_usize("head_dim")?.filter(|&hd| hd > 0);
    c.activation(&["silu"], "silu")?;
    let rope_theta = c.plain_rope(None, 10_000.0, FAMILY)?;
    // transformers' MistralConfig: an absent sliding_window means 4096, an explicit null none.
    let sliding_window = match c.value().get("sliding_window") {
        None => Some(4096),
        Some(Value::Null) => None,
        Some(_) => match c.opt_usize("sliding_window")? {
            Some(0) => {
                return Err(Error::config(
                    "sliding_window",
                    "0 is not a valid window; use null for full attention",
                ))
            }
            w => w,
        },
    };
    let config = candle_mistral::Config {
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_hidden_layers: c.usize("num_hidden_layers")?,
        num_attention_heads,
        head_dim,
        num_key_value_heads,
        hidden_act: Activation::Silu,
        // transformers' MistralConfig default.
        max_position_embeddings: c.usize_or("max_position_embeddings", 4096 * 32)?,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta,
        sliding_window,
        use_flash_attn: false,
    };
    Ok(MistralSettings {
        config,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
    })
}

impl Architecture for Mistral {
    const NAMES: Names = Names::hf("mistral", &["mistral"], &["MistralForCausalLM"]);
    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, settings_from_hf, Network::load)
    }
}

impl Network {
    /// candle's Mistral, as loaded.
    fn load(settings: &MistralSettings, vb: VarBuilder) -> Result<Loaded<Self>> {
        let vb = match settings.tie_word_embeddings {
            // Tied checkpoints store no lm_head; candle's Mistral always reads one.
            true => vb.rename_f(|name| match name {
                "lm_head.weight" => "model.embed_tokens.weight".to_string(),
                _ => name.to_string(),
            }),
            false => vb,
        };
        let config = &settings.config;
        let dtype = vb.dtype();
        let model = candle_mistral::Model::new(config, vb)?;
        let network = Network {
            pristine: model.clone(),
            sliding_window: config.sliding_window,
        };
        // candle's RoPE table has exactly max_position_embeddings rows.
        let (vocab, context) = (config.vocab_size, config.max_position_embeddings);
        let head_dim = config
            .head_dim
            .unwrap_or(config.hidden_size / config.num_attention_heads);
        Ok(Loaded::new(network, model, vocab, context).with_kv_cache(
            config.num_hidden_layers,
            config.num_key_value_heads,
            head_dim,
            dtype,
        ))
    }
}

impl crate::models::Network for Network {
    /// The live copy of candle's model, which holds its KV cache.
    type Cache = candle_mistral::Model;

    fn forward(&self, ids: &Tensor, position: usize, live: &mut Self::Cache) -> Result<Tensor> {
        let (_batch, seq_len) = ids.dims2()?;
        let embeds = live.embed_tokens().forward(ids)?;
        let mask = attention_mask(seq_len, position, 0, self.sliding_window, ids.device())?
            .map(|m| m.to_dtype(embeds.dtype()))
            .transpose()?;
        Ok(live.forward_embeds(&embeds, mask.as_ref(), position)?)
    }

    fn reset(&self, live: &mut Self::Cache) -> Result<()> {
        *live = self.pristine.clone();
        Ok(())
    }

    fn new_cache(&self) -> Result<Self::Cache> {
        Ok(self.pristine.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn settings(file: &str) -> MistralSettings {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(file);
        settings_from_hf(&HfConfig::from_file(&path).unwrap()).unwrap()
    }

    #[test]
    fn real_configs_map() {
        let s = settings("real_configs/mistral-Mistral-7B-v0.1.json");
        assert_eq!(s.config.hidden_size, 4096);
        assert_eq!(s.config.num_attention_heads, 32);
        assert_eq!(s.config.num_key_value_heads, 8);
        assert_eq!(s.config.head_dim, None);
        assert_eq!(s.config.rope_theta, 10_000.0);
        assert_eq!(s.config.sliding_window, Some(4096));
        assert_eq!(s.config.max_position_embeddings, 32768);
        assert!(!s.tie_word_embeddings);

        let s = settings("real_configs/mistral-Mistral-7B-Instruct-v0.3.json");
        assert_eq!(s.config.vocab_size, 32768);
        assert_eq!(s.config.rope_theta, 1_000_000.0);
        assert_eq!(s.config.sliding_window, None);
    }

    #[test]
    fn both_fixture_layouts_map_alike() {
        let new = settings("hf/mistral/config.json");
        assert_eq!(new, settings("hf/mistral/config.legacy.json"));
        assert_eq!(new.config.sliding_window, Some(6));
    }

    #[test]
    fn an_absent_window_is_transformers_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/real_configs/mistral-Mistral-7B-v0.1.json");
        let mut value = HfConfig::from_file(&path).unwrap().value().clone();
        value.as_object_mut().unwrap().remove("sliding_window");
        let c = HfConfig::from_value(&path, value);
        assert_eq!(
            settings_from_hf(&c).unwrap().config.sliding_window,
            Some(4096)
        );
    }

    /// The Llama fixture is a tied checkpoint (no `lm_head.weight`) of the same network as a
    /// Mistral without a window, so loading it as Mistral must reproduce its reference logits.
    #[test]
    fn tied_checkpoints_read_the_embeddings_as_lm_head() {
        use crate::models::{LoadOptions, Model};
        let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            llama.join("model.safetensors"),
            tmp.path().join("model.safetensors"),
        )
        .unwrap();
        let mut cfg = HfConfig::from_file(&llama.join("config.json"))
            .unwrap()
            .value()
            .clone();
        cfg["model_type"] = serde_json::json!("mistral");
        cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        cfg["sliding_window"] = Value::Null;
        assert_eq!(cfg["tie_word_embeddings"], serde_json::json!(true));
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(llama.join("reference.json")).unwrap())
                .unwrap();
        let prompt: Vec<u32> = serde_json::from_value(reference["prompt_ids"].clone()).unwrap();
        let expected: Vec<Vec<f32>> =
            serde_json::from_value(reference["step_logits"].clone()).unwrap();

        let mut model = Model::load(tmp.path(), &LoadOptions::cpu()).unwrap();
        assert_eq!(model.info().architecture, "mistral");
        let logits = model.forward_ids(&prompt, 0).unwrap();
        let diff = logits
            .iter()
            .zip(&expected[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-4,
            "tied Mistral differs from the reference by {diff}"
        );
    }
}
