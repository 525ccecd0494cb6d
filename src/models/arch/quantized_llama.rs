//! Llama-family GGUF files (`general.architecture = llama`), including the Mistral files that
//! llama.cpp writes under `llama`.
//!
//! candle's quantized llama builds its RoPE table for a fixed 4096 positions, so the context
//! reported here is the file's `llama.context_length` capped at that. Its mask cache grows with
//! every new prompt length, so the reset swaps in a pristine clone, which also drops the masks.

use crate::error::Result;
use crate::models::adapter::{Pristine, StockModel};
use crate::models::{Adapter, Architecture, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use candle_core::Tensor;
use candle_transformers::models::quantized_llama as candle_qllama;

/// Quantized Llama, as registered: candle's model, reset to a pristine clone.
pub struct QuantizedLlama;

impl Architecture for QuantizedLlama {
    const NAME: &'static str = "quantized_llama";
    const FORMAT: WeightFormat = WeightFormat::Gguf;
    const MODEL_TYPES: &'static [&'static str] = &["llama"];
    type Network = Pristine<candle_qllama::ModelWeights>;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let mut file = source.into_gguf(Self::NAME)?;
        let info = ModelInfo::from_gguf(
            Self::NAME,
            &file,
            file.vocab_size("llama")?,
            file.context_length("llama", candle_qllama::MAX_SEQ_LEN)?,
        )?;
        let model = candle_qllama::ModelWeights::from_gguf(
            file.content,
            &mut file.reader,
            &options.device,
        )?;
        let (network, live) = Pristine::new(model);
        Ok(Adapter::new(network, live, info))
    }
}

impl StockModel for candle_qllama::ModelWeights {
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
        Ok(candle_qllama::ModelWeights::forward(
            self, input_ids, position,
        )?)
    }
}
