//! Qwen3 GGUF files (`general.architecture = qwen3`), run by candle's `quantized_qwen3`.
//!
//! What this adapter hides about candle's model:
//!
//! - Its caches never restart by themselves: a prefill at position 0 appends to whatever the
//!   previous request left and silently returns wrong logits. The adapter clears the cache
//!   before every forward at position 0 (for every architecture), and so does the reset.
//! - The reset is candle's `clear_kv_cache`, checked complete: the only mutable state is the
//!   three per-layer caches it empties (the concatenating GPU cache, and the CPU path's
//!   interleaved and raw caches); the RoPE tables sit behind an `Arc` and are never written,
//!   and there is no mask cache (masks are built per forward). A pristine clone would work
//!   too but costs more: the raw cache is a plain `Vec` preallocated for 4096 positions per
//!   layer, so every clone would copy (and make resident) hundreds of MiB of zeros.
//! - On CPU its decode step (one token) writes only the raw cache, while a multi-token forward
//!   attends over the interleaved cache, which then lacks the decoded tokens: a prompt chunk
//!   after a decode step would silently ignore them. Such chunks are fed one token at a time,
//!   which only uses the raw cache that has every token.
//! - On CPU it supports only batch 1 (it unwraps a cache it only builds for GPUs): a larger
//!   batch is refused with an error instead of a caught panic.
//! - It builds its RoPE tables in F16 unless the (non-standard, never written by llama.cpp)
//!   `general.dtype` key says F32. F16 cannot hold the angles: positions above 2048 are not
//!   even representable exactly, and at position 1000 the angle is off by up to a quarter
//!   radian. The key is set to F32 in the metadata handed to candle, which only uses it for
//!   the RoPE tables and the GPU mask.
//! - The RoPE table has `qwen3.context_length` rows (kept four times: tensors and flat
//!   copies), so the context is capped at [`MAX_CONTEXT`] and written back before loading.

use crate::error::{Error, Result};
use crate::models::adapter::Loaded;
use crate::models::gguf::GgufFile;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_core::quantized::gguf_file::Value;
use candle_core::Tensor;
use candle_transformers::models::quantized_qwen3::ModelWeights as Weights;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "qwen3";
/// The longest context run here (Qwen3 files declare 32k or 40k; 128k needs YaRN, refused).
pub const MAX_CONTEXT: usize = 131_072;

/// Quantized Qwen3, as registered.
pub struct QuantizedQwen3;

/// How candle's model is driven on this device.
pub struct Network {
    on_cpu: bool,
}

/// candle's model, whose weights and caches are one struct, and what its CPU path needs.
pub struct State {
    model: Weights,
    /// Whether a single-token step ran since the last clear (CPU path): the interleaved cache
    /// then lacks tokens, so multi-token chunks must go one token at a time.
    decoded: bool,
}

/// The vocabulary size and the context, after checking everything candle's loader reads (and
/// what it silently ignores); the capped context and F32 RoPE tables are written back for
/// candle to read.
fn config_from_gguf(file: &mut GgufFile) -> Result<(usize, usize)> {
    file.heads(ARCH)?;
    file.key_length(ARCH)?;
    file.count("qwen3.block_count")?;
    file.count("qwen3.embedding_length")?;
    file.count("qwen3.context_length")?;
    file.positive("qwen3.attention.layer_norm_rms_epsilon", None)?;
    file.positive("qwen3.rope.freq_base", None)?;
    file.rope_scaling(ARCH, &["none"])?;
    let context = file.context_length(ARCH, MAX_CONTEXT)?;
    let metadata = &mut file.content.metadata;
    // candle sizes its RoPE table from this key.
    metadata.insert("qwen3.context_length".into(), Value::U32(context as u32));
    // 0 is candle's code for F32 RoPE tables (see the module docs).
    metadata.insert("general.dtype".into(), Value::U32(0));
    // The output projection may be tied to the embeddings.
    Ok((file.checked_vocab_size(ARCH, true)?, context))
}

impl Architecture for QuantizedQwen3 {
    const NAMES: Names = Names::gguf("quantized_qwen3", &[ARCH]);
    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_gguf(
            source,
            options,
            config_from_gguf,
            |mut file, &(vocab, context), device| {
                let model = Weights::from_gguf(file.content, &mut file.reader, device)?;
                let state = State {
                    model,
                    decoded: false,
                };
                let network = Network {
                    on_cpu: device.is_cpu(),
                };
                Ok(Loaded::new(network, state, vocab, context))
            },
        )
    }
}

impl crate::models::Network for Network {
    type Cache = State;

    fn forward(&self, input_ids: &Tensor, position: usize, state: &mut State) -> Result<Tensor> {
        let (batch, seq_len) = input_ids.dims2()?;
        if self.on_cpu && batch != 1 {
            return Err(Error::InvalidParameter {
                param: "input_ids".into(),
                message: format!(
                    "candle's quantized qwen3 runs batch 1 on CPU, got a batch of {batch}"
                ),
            });
        }
        // (The adapter resets the caches before a forward at position 0.)
        if self.on_cpu && seq_len > 1 && state.decoded {
            let mut logits = None;
            for i in 0..seq_len {
                let token = input_ids.narrow(1, i, 1)?;
                logits = Some(state.model.forward(&token, position + i)?);
            }
            return logits.ok_or_else(|| Error::InvalidParameter {
                param: "input_ids".into(),
                message: "at least one token is needed".into(),
            });
        }
        let logits = state.model.forward(input_ids, position)?;
        if self.on_cpu && seq_len == 1 {
            state.decoded = true;
        }
        Ok(logits)
    }

    fn reset(&self, state: &mut State) -> Result<()> {
        state.model.clear_kv_cache();
        state.decoded = false;
        Ok(())
    }
}
