//! Llama-family GGUF files (`general.architecture = llama`), including the Mistral files that
//! llama.cpp writes under `llama`.
//!
//! candle's quantized llama builds its RoPE table for a fixed 4096 positions, so the context
//! reported here is the file's `llama.context_length` capped at that. Its mask cache grows with
//! every new prompt length, so the reset swaps in a pristine clone, which also drops the masks.

use crate::error::Result;
use crate::models::adapter::{Pristine, StockGguf};
use crate::models::gguf::GgufFile;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_transformers::models::quantized_llama::{ModelWeights as Weights, MAX_SEQ_LEN};

/// Quantized Llama, as registered: candle's model, reset to a pristine clone.
pub struct QuantizedLlama;

impl Architecture for QuantizedLlama {
    const NAMES: Names = Names::gguf("quantized_llama", &["llama"]);
    type Network = Pristine<Weights>;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_stock_gguf(source, options, STOCK)
    }
}

/// The vocabulary size, and the file's context capped at candle's RoPE table.
fn config_from_gguf(file: &mut GgufFile) -> Result<(usize, usize)> {
    Ok((
        file.vocab_size("llama")?,
        file.context_length("llama", MAX_SEQ_LEN)?,
    ))
}

/// candle's model, after our checks of the metadata.
const STOCK: StockGguf<Weights> = StockGguf {
    config: config_from_gguf,
    from_gguf: Weights::from_gguf,
    forward: Weights::forward,
};
