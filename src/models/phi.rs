//! Phi (phi-1, phi-1.5, phi-2) from a Hugging Face directory.
//!
//! candle's `phi` model computes the network as transformers does (parallel attention and MLP
//! blocks, LayerNorm, biases, partial rotary embeddings). The adapter hides:
//!
//! - its `Config`, whose fields are private: the mapping below builds a normalised JSON object
//!   from [`HfConfig`] getters and deserializes that, so real configs (with `rope_parameters`,
//!   `num_key_value_heads: null`, no `partial_rotary_factor`) all load;
//! - its `forward`, which takes no position (it uses its cache length) and fails on a
//!   multi-token input once the cache holds tokens (its causal mask only covers the new
//!   tokens). A multi-token chunk that follows a non-empty cache is fed token by token, which
//!   computes exactly the same logits;
//! - features it cannot compute: `qk_layernorm` (candle applies a head-sized LayerNorm before
//!   splitting the heads, a shape error), tied embeddings (it always loads `lm_head`), RoPE
//!   scaling. Those are errors here.
//!
//! Reset: [`Pristine`]. candle's `Model` is `Clone` and its only state is the per-layer KV
//! cache, an `Option<(Tensor, Tensor)>` replaced by `Tensor::cat`, never written in place, so a
//! clone taken at load time shares the weights and stays the freshly loaded model.

use super::common::{last_position_f32, token_set, Pristine};
use super::hf::{HfConfig, RopeScaling};
use super::{Architecture, LanguageModel, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use crate::error::{Error, Result};
use candle_core::{IndexOp, Tensor};
use candle_transformers::models::phi as candle_phi;
use serde_json::{json, Value};

/// A Phi model with its KV cache.
pub struct Phi {
    model: Pristine<candle_phi::Model>,
    info: ModelInfo,
}

/// Maps config.json to the JSON object candle's (private-field) Phi config deserializes from,
/// refusing what candle cannot compute.
fn phi_config(c: &HfConfig) -> Result<Value> {
    const FAMILY: &str = "phi";
    let hidden_act = c.activation(&["gelu_new", "gelu", "gelu_pytorch_tanh"], "gelu_new")?;
    c.require_bool("qk_layernorm", false, FAMILY)?;
    c.require_bool("tie_word_embeddings", false, FAMILY)?;
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
    Ok(json!({
        "vocab_size": c.usize("vocab_size")?,
        "hidden_size": c.usize("hidden_size")?,
        "intermediate_size": c.usize("intermediate_size")?,
        "num_hidden_layers": c.usize("num_hidden_layers")?,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": hidden_act,
        "max_position_embeddings": c.usize_or("max_position_embeddings", 2048)?,
        "layer_norm_eps": c.f64_or("layer_norm_eps", 1e-5)?,
        "tie_word_embeddings": false,
        "rope_theta": rope.theta,
        "partial_rotary_factor": partial,
        "qk_layernorm": false,
    }))
}

fn candle_config(v: Value) -> Result<candle_phi::Config> {
    serde_json::from_value(v)
        .map_err(|e| Error::config("config.json", format!("building candle's phi config: {e}")))
}

impl Architecture for Phi {
    const NAME: &'static str = "phi";
    const FORMAT: WeightFormat = WeightFormat::Safetensors;
    const MODEL_TYPES: &'static [&'static str] = &["phi"];
    const HF_CLASSES: &'static [&'static str] = &["PhiForCausalLM"];

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Self> {
        let dir = source.into_hf(Self::NAME)?;
        let normalised = phi_config(&dir.config)?;
        let vocab_size = dir.config.usize("vocab_size")?;
        let max_context = dir.config.usize_or("max_position_embeddings", 2048)?;
        let config = candle_config(normalised)?;
        let dtype = dir.dtype(options)?;
        let vb = dir.var_builder(dtype, &options.device)?;
        let model = candle_phi::Model::new(&config, vb)?;
        Ok(Phi {
            model: Pristine::new(model),
            info: ModelInfo {
                architecture: Self::NAME,
                vocab_size,
                max_context,
                eos_token_ids: token_set(dir.eos_token_ids()),
                bos_token_id: dir.bos_token_id(),
                dtype,
            },
        })
    }
}

impl LanguageModel for Phi {
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
        let (_batch, seq_len) = input_ids.dims2()?;
        let model = self.model.live();
        if position == 0 || seq_len == 1 {
            return last_position_f32(model.forward(input_ids)?);
        }
        // candle's causal mask covers only the new tokens, so a chunk after a non-empty cache
        // goes in one token at a time: the same computation, each token seeing the cache.
        let mut logits = None;
        for i in 0..seq_len {
            logits = Some(model.forward(&input_ids.i((.., i..i + 1))?)?);
        }
        match logits {
            Some(l) => last_position_f32(l),
            None => Err(Error::InvalidParameter {
                param: "input_ids".into(),
                message: "at least one token is needed".into(),
            }),
        }
    }

    fn reset_cache(&mut self) -> Result<()> {
        self.model.reset();
        Ok(())
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn real(name: &str) -> HfConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/real_configs")
            .join(name);
        HfConfig::from_file(&path).unwrap()
    }

    #[test]
    fn phi_2_maps() {
        let v = phi_config(&real("phi-phi-2.json")).unwrap();
        assert_eq!(v["hidden_size"], 2560);
        assert_eq!(v["num_hidden_layers"], 32);
        assert_eq!(v["num_key_value_heads"], 32);
        assert_eq!(v["hidden_act"], "gelu_new");
        assert_eq!(v["partial_rotary_factor"], 0.4);
        assert_eq!(v["rope_theta"], 10000.0);
        assert_eq!(v["max_position_embeddings"], 2048);
        candle_config(v).unwrap();
    }

    #[test]
    fn phi_1_5_with_null_kv_heads_maps() {
        let v = phi_config(&real("phi-phi-1_5.json")).unwrap();
        assert_eq!(v["num_key_value_heads"], 32);
        assert_eq!(v["partial_rotary_factor"], 0.5);
        candle_config(v).unwrap();
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
    fn qk_layernorm_is_refused() {
        let mut v = real("phi-phi-2.json").value().clone();
        v["qk_layernorm"] = json!(true);
        let err = phi_config(&HfConfig::from_value(Path::new("config.json"), v))
            .unwrap_err()
            .to_string();
        assert!(err.contains("qk_layernorm"), "{err}");
    }
}
