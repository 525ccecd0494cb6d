//! Yi from a Hugging Face directory.
//!
//! Yi checkpoints are Llama-shaped (GQA, RMSNorm, SwiGLU, untied head); the original ones name
//! themselves `model_type: "Yi"`. candle's own `yi` model cannot be configured from a
//! config.json (its config fields are private, with only two hard-coded presets), so this
//! adapter runs the Llama implementation, which computes the same network.

use super::llama::Llama;
use super::{Architecture, LanguageModel, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use crate::error::Result;
use candle_core::Tensor;

/// A Yi model with its KV cache.
pub struct Yi(Llama);

impl Architecture for Yi {
    const NAME: &'static str = "yi";
    const FORMAT: WeightFormat = WeightFormat::Safetensors;
    const MODEL_TYPES: &'static [&'static str] = &["Yi", "yi"];
    const HF_CLASSES: &'static [&'static str] = &["YiForCausalLM"];

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Self> {
        Llama::load_as(Self::NAME, source, options).map(Yi)
    }
}

impl LanguageModel for Yi {
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
        self.0.forward(input_ids, position)
    }

    fn reset_cache(&mut self) -> Result<()> {
        self.0.reset_cache()
    }

    fn info(&self) -> &ModelInfo {
        self.0.info()
    }
}
