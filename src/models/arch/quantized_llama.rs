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

/// The vocabulary size, and the file's context capped at candle's RoPE table. candle sizes
/// its RoPE table by `rope.dimension_count` without checking it, so a corrupt value would be an
/// allocation of that size: it must be the head size, as llama.cpp requires for llama.
fn config_from_gguf(file: &mut GgufFile) -> Result<(usize, usize)> {
    let (heads, _) = file.heads("llama")?;
    let head_dim = file.derived_head_dim("llama", heads)?;
    let key = "llama.rope.dimension_count";
    let rope_dim = file.count(key)?;
    if rope_dim != head_dim {
        return Err(file.config_error(
            key,
            format!(
                "is {rope_dim}, but the head size (embedding_length / head_count) is {head_dim}"
            ),
        ));
    }
    // candle reserves one layer per `block_count` before it reads any: the last one must exist.
    let key = "llama.block_count";
    let blocks = file.count(key)?;
    let last = format!("blk.{}.attn_q.weight", blocks - 1);
    if !file.content.tensor_infos.contains_key(&last) {
        return Err(file.config_error(key, format!("is {blocks}, but tensor {last} is missing")));
    }
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
