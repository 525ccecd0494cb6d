//! Llama-family GGUF files (`general.architecture = llama`), including the Mistral files that
//! llama.cpp writes under `llama`.
//!
//! candle's quantized llama builds its RoPE table for a fixed 4096 positions, so the context
//! reported here is the file's `llama.context_length` capped at that. Its mask cache grows with
//! every new prompt length, so the reset swaps in a pristine clone, which also drops the masks.

use super::common::{last_position_f32, token_set, Pristine};
use super::{Architecture, LanguageModel, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use crate::error::Result;
use candle_core::{DType, Tensor};
use candle_transformers::models::quantized_llama as candle_qllama;

/// A quantized Llama model with its KV cache.
pub struct QuantizedLlama {
    model: Pristine<candle_qllama::ModelWeights>,
    info: ModelInfo,
}

impl Architecture for QuantizedLlama {
    const NAME: &'static str = "quantized_llama";
    const FORMAT: WeightFormat = WeightFormat::Gguf;
    const MODEL_TYPES: &'static [&'static str] = &["llama"];

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Self> {
        let mut file = source.into_gguf(Self::NAME)?;
        let info = ModelInfo {
            architecture: Self::NAME,
            vocab_size: file.vocab_size("llama")?,
            max_context: file.context_length("llama", candle_qllama::MAX_SEQ_LEN)?,
            eos_token_ids: token_set(file.eos_token_ids()?),
            bos_token_id: file.bos_token_id()?,
            dtype: DType::F32,
        };
        let model =
            candle_qllama::ModelWeights::from_gguf(file.content, &mut file.reader, &options.device)?;
        Ok(QuantizedLlama {
            model: Pristine::new(model),
            info,
        })
    }
}

impl LanguageModel for QuantizedLlama {
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
        last_position_f32(self.model.live().forward(input_ids, position)?)
    }

    fn reset_cache(&mut self) -> Result<()> {
        self.model.reset();
        Ok(())
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}
