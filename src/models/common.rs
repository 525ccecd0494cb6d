//! Helpers shared by the architecture adapters: normalising candle's many output shapes to
//! last-position F32 logits, and resetting a model by swapping in a pristine clone.

use crate::error::{Error, Result};
use candle_core::{DType, IndexOp, Tensor};

/// Normalises a candle model's output to `(batch, vocab)` F32 logits of the last position.
///
/// candle's models return `(b, vocab)`, `(b, 1, vocab)` or `(b, seq, vocab)`, in F32 or in the
/// model's own dtype; the adapters hide that here.
pub fn last_position_f32(logits: Tensor) -> Result<Tensor> {
    let logits = match logits.rank() {
        2 => logits,
        3 => {
            let seq = logits.dim(1)?;
            logits.i((.., seq - 1, ..))?
        }
        r => {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "unexpected logits rank {r} (shape {:?})",
                logits.shape()
            ))))
        }
    };
    let logits = if logits.dtype() == DType::F32 {
        logits
    } else {
        logits.to_dtype(DType::F32)?
    };
    Ok(logits.contiguous()?)
}

/// A model plus a pristine copy taken right after loading.
///
/// candle's model structs hold their weights as reference-counted tensors, so `clone()` shares
/// the weights and copies only the (empty) cache state. Resetting swaps in a fresh clone of the
/// pristine copy: exactly the freshly loaded state, for models whose own `clear_kv_cache` is
/// missing or incomplete. KV caches that preallocate and write in place allocate lazily on the
/// first append, so the pristine copy never shares a written buffer with the live one.
pub struct Pristine<M: Clone> {
    live: M,
    pristine: M,
}

impl<M: Clone> Pristine<M> {
    /// Keeps a pristine copy of a freshly loaded model.
    pub fn new(model: M) -> Self {
        Pristine {
            live: model.clone(),
            pristine: model,
        }
    }

    /// The model to run.
    pub fn live(&mut self) -> &mut M {
        &mut self.live
    }

    /// Restores the freshly loaded state.
    pub fn reset(&mut self) {
        self.live = self.pristine.clone();
    }
}

/// Sorted, deduplicated token ids.
pub fn token_set(ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = ids.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v
}
