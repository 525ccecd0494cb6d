//! Phi-3 GGUF files (`general.architecture = phi3`), run by candle's `quantized_phi3`.
//!
//! What this adapter hides about candle's model:
//!
//! - It has no `clear_kv_cache`, and its causal-mask cache grows with every new
//!   `(prompt length, cache length)` pair. The reset therefore swaps in a pristine clone taken
//!   at load time ([`Pristine`]). That is sound here: the clone shares the weights, RoPE tables
//!   and the `-inf` constant, which candle only reads; the per-layer `KvCache` writes in place
//!   (`slice_set`) but allocates its buffer on the first append, so the pristine copy, never
//!   run, holds no buffer for the live model to write into.
//! - That `KvCache` preallocates `phi3.context_length` positions per layer on its first append,
//!   and the RoPE table has exactly that many rows. The context is capped at
//!   [`MAX_CONTEXT`] and written back into the metadata before candle reads it, so a file
//!   declaring a huge context cannot make every first forward allocate gigabytes.
//! - Its RoPE base is hard-coded to 10000, it rotates the whole head (no partial rotary) and
//!   it knows nothing of the `longrope` factors of the 128k Phi-3/3.5/4-mini files. Such
//!   files are refused with the reason rather than run with silently wrong positions.
//! - llama.cpp currently ignores Phi-3's sliding window (`phi3.attention.sliding_window`), and
//!   so does candle; results match llama.cpp's, not a windowed reference, past the window.

use super::quantized_phi2::check_rope_base;
use crate::error::{Error, Result};
use crate::models::adapter::{Pristine, StockGguf};
use crate::models::gguf::GgufFile;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Device;
use candle_transformers::models::quantized_phi3::ModelWeights as Weights;
use std::fs::File;
use std::io::BufReader;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "phi3";
/// The longest context run here. Phi-3 files without `longrope` factors are trained at 4k
/// (medium at 4k too); the cap only bounds what a malformed file can make candle allocate.
pub const MAX_CONTEXT: usize = 32_768;

/// Quantized Phi-3, as registered: candle's model, reset to a pristine clone.
pub struct QuantizedPhi3;

/// The vocabulary size and the context, after checking everything candle's loader reads (and
/// what it silently ignores); the capped context is written back for candle to read.
fn config_from_gguf(file: &mut GgufFile) -> Result<(usize, usize)> {
    let (heads, _) = file.heads(ARCH)?;
    file.count("phi3.block_count")?;
    file.count("phi3.feed_forward_length")?;
    file.count("phi3.context_length")?;
    let rope_dim = file.count("phi3.rope.dimension_count")?;
    file.positive("phi3.attention.layer_norm_rms_epsilon", None)?;
    let head_dim = file.derived_head_dim(ARCH, heads)?;
    if rope_dim != head_dim {
        return Err(file.config_error("phi3.rope.dimension_count",
            format!("is {rope_dim}, but candle's quantized phi3 rotates the whole head ({head_dim}): partial rotary embeddings are not supported"),
        ));
    }
    check_rope_base(file, ARCH)?;
    file.rope_scaling(ARCH, &["none"])?;
    // The 128k Phi-3 files (and Phi-3.5/Phi-4-mini) scale RoPE with per-dimension `longrope`
    // factors, stored as these tensors; llama.cpp applies them at every length.
    for name in ["rope_factors_long.weight", "rope_factors_short.weight"] {
        if file.content.tensor_infos.contains_key(name) {
            return Err(Error::model_file(
                &file.path,
                format!("this phi3 file uses longrope RoPE scaling (tensor {name}), which candle's quantized phi3 does not implement"),
            ));
        }
    }
    let context = file.context_length(ARCH, MAX_CONTEXT)?;
    // candle sizes both the RoPE table and each layer's KV buffer from this key.
    let key = "phi3.context_length".to_string();
    file.content
        .metadata
        .insert(key, Value::U32(context as u32));
    Ok((file.checked_vocab_size(ARCH, false)?, context))
}

/// candle's model, after our checks of the metadata.
const STOCK: StockGguf<Weights> = StockGguf {
    config: config_from_gguf,
    from_gguf,
    forward: Weights::forward,
};

/// candle's loader, without flash attention (a CUDA kernel the default build does not have).
fn from_gguf(
    content: Content,
    reader: &mut BufReader<File>,
    device: &Device,
) -> candle_core::Result<Weights> {
    Weights::from_gguf(false, content, reader, device)
}

impl Architecture for QuantizedPhi3 {
    const NAMES: Names = Names::gguf("quantized_phi3", &[ARCH]);
    type Network = Pristine<Weights>;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_stock_gguf(source, options, STOCK)
    }
}
