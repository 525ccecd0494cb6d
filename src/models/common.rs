//! Helpers shared by the architecture adapters: normalising candle's many output shapes to
//! last-position F32 logits, token-id sets, and transformers' attention mask.

use crate::error::{Error, Result};
use candle_core::{DType, Device, IndexOp, Tensor};

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

/// Sorted, deduplicated token ids.
pub fn token_set(ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = ids.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The additive attention mask transformers applies, `(1, 1, seq_len, kv_len)` F32: query at
/// absolute position `p` sees key `k` when `k <= p` and, with a window `w`, `p - k < w` (the
/// window counts the query itself; candle's own masks allow `w + 1` and never mask cached
/// keys). Keys start at absolute position `key_start` (caches that drop keys older than the
/// window hold only the recent ones). `None` when nothing would be masked, as for a
/// single-token step that sees every key.
pub fn attention_mask(
    seq_len: usize,
    position: usize,
    key_start: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let kv_len = position + seq_len - key_start;
    let mut any_masked = false;
    let mut mask = Vec::with_capacity(seq_len * kv_len);
    for q in position..position + seq_len {
        for k in key_start..position + seq_len {
            let visible = k <= q && window.is_none_or(|w| q - k < w);
            any_masked |= !visible;
            mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    if !any_masked {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(
        mask,
        (1, 1, seq_len, kv_len),
        device,
    )?))
}

/// Test support: loads the Hugging Face fixture `name`, runs `ids` in chunks that end at each
/// of `splits` and then at the end (a prefill, then decode steps or chunks on top of the
/// cache), and returns the max abs difference between the last logits and those of one
/// prefill of all of `ids` after a reset.
#[cfg(test)]
pub(crate) fn chunked_prefill_diff(name: &str, ids: &[u32], splits: &[usize]) -> f32 {
    use super::{LanguageModel, LoadOptions, Model};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name);
    let mut model = Model::load(&dir, &LoadOptions::cpu()).unwrap();
    let (mut start, mut chunked) = (0, Vec::new());
    for &end in splits.iter().chain([&ids.len()]) {
        chunked = model.forward_ids(&ids[start..end], start).unwrap();
        start = end;
    }
    model.reset_cache().unwrap();
    let whole = model.forward_ids(ids, 0).unwrap();
    chunked
        .iter()
        .zip(&whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(m: &Tensor) -> Vec<Vec<bool>> {
        m.squeeze(0)
            .and_then(|m| m.squeeze(0))
            .and_then(|m| m.to_vec2::<f32>())
            .unwrap()
            .iter()
            .map(|r| r.iter().map(|x| x.is_finite()).collect())
            .collect()
    }

    #[test]
    fn masks_follow_the_transformers_sliding_window_rule() {
        let m = attention_mask(3, 2, 0, Some(2), &Device::Cpu)
            .unwrap()
            .unwrap();
        // Query 2 sees keys 1, 2; query 3 sees 2, 3; query 4 sees 3, 4.
        assert_eq!(
            visible(&m),
            vec![
                vec![false, true, true, false, false],
                vec![false, false, true, true, false],
                vec![false, false, false, true, true],
            ]
        );
        // Causal only.
        let m = attention_mask(2, 1, 0, None, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            visible(&m),
            vec![vec![true, true, false], vec![true, true, true]]
        );
        // A cache holding keys from position 3 on: query 5 and 6 with window 3.
        let m = attention_mask(2, 5, 3, Some(3), &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            visible(&m),
            vec![vec![true, true, true, false], vec![false, true, true, true]]
        );
    }

    #[test]
    fn a_single_token_that_sees_every_key_needs_no_mask() {
        assert!(attention_mask(1, 5, 0, None, &Device::Cpu)
            .unwrap()
            .is_none());
        assert!(attention_mask(1, 9, 7, Some(3), &Device::Cpu)
            .unwrap()
            .is_none());
        // But the window hides keys once the sequence is longer than it.
        let m = attention_mask(1, 7, 0, Some(6), &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            visible(&m),
            vec![vec![false, false, true, true, true, true, true, true]]
        );
    }
}
