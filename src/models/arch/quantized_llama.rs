//! Llama-family GGUF files (`general.architecture = llama`), including the Mistral files that
//! llama.cpp writes under `llama`.
//!
//! candle's quantized llama builds its RoPE table for a fixed 4096 positions, so the context
//! reported here is the file's `llama.context_length` capped at that. Its mask cache grows with
//! every new prompt length, so the reset swaps in a pristine clone, which also drops the masks.

use crate::error::Result;
use crate::models::adapter::{Loaded, Pristine};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Registration};
use candle_transformers::models::quantized_llama as candle_qllama;

/// Quantized Llama, as registered: candle's model, reset to a pristine clone.
pub struct QuantizedLlama;

impl Architecture for QuantizedLlama {
    const REGISTRATION: Registration = Registration::gguf("quantized_llama", &["llama"]);
    type Network = Pristine<candle_qllama::ModelWeights>;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_gguf(source, options, |mut file, device| {
            let vocab_size = file.vocab_size("llama")?;
            let context = file.context_length("llama", candle_qllama::MAX_SEQ_LEN)?;
            let model =
                candle_qllama::ModelWeights::from_gguf(file.content, &mut file.reader, device)?;
            Ok(Loaded::pristine(
                model,
                candle_qllama::ModelWeights::forward,
                vocab_size,
                context,
            ))
        })
    }
}
