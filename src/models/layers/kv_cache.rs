//! The KV cache: per layer, the keys and values later tokens attend to.
//!
//! The sliding-window rule lives here once. transformers counts a window of `w` keys with the
//! query itself, so a query at position `p` sees keys `p - w + 1 ..= p` (candle's own masks
//! let it see `w + 1` and never mask cached keys). The next query, at the earliest the one
//! after the last cached token, can therefore see at most the last `w - 1` cached keys, and a
//! sliding layer keeps exactly those: memory stays bounded however long the sequence grows,
//! and the mask of a chunk starts at [`first_cached_key`] instead of position 0.

use crate::error::Result;
use candle_core::Tensor;

/// The absolute position of the oldest key a layer with `window` still holds once `position`
/// tokens went through it: where the keys of a chunk starting at `position` begin, cached
/// ones first.
pub fn first_cached_key(window: Option<usize>, position: usize) -> usize {
    match window {
        Some(w) => position - position.min(w.saturating_sub(1)),
        None => 0,
    }
}

/// The cache of one layer: keys and values `(batch, kv_heads, positions, head_dim)`.
#[derive(Debug, Clone)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
    window: Option<usize>,
}

impl LayerCache {
    /// An empty cache for a layer with this sliding window (`None`: full attention).
    pub fn new(window: Option<usize>) -> Self {
        LayerCache { kv: None, window }
    }

    /// Appends a chunk's keys and values and returns every key and value its queries may
    /// attend to (the cached ones first); then keeps only what a later query can still see.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        let len = k.dim(2)?;
        let keep = match self.window {
            Some(w) => len.min(w.saturating_sub(1)),
            None => len,
        };
        self.kv = match keep {
            0 => None,
            n if n == len => Some((k.clone(), v.clone())),
            n => Some((k.narrow(2, len - n, n)?, v.narrow(2, len - n, n)?)),
        };
        Ok((k, v))
    }

    /// The positions this layer holds.
    pub fn len(&self) -> Result<usize> {
        Ok(match &self.kv {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        })
    }

    /// Whether the layer holds nothing.
    pub fn is_empty(&self) -> bool {
        self.kv.is_none()
    }
}

/// One [`LayerCache`] per layer: everything a sequence changes in a network.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache, one layer per window (`None`: a full-attention layer).
    pub fn new(windows: impl IntoIterator<Item = Option<usize>>) -> Self {
        KvCache {
            layers: windows.into_iter().map(LayerCache::new).collect(),
        }
    }

    /// Empties every layer: the freshly loaded state.
    pub fn reset(&mut self) {
        for layer in &mut self.layers {
            layer.kv = None;
        }
    }

    /// Cuts the cache of a sequence of `cached` tokens back to its first `keep` tokens, as
    /// if only those had been run, and returns true; or returns false and changes nothing
    /// when a sliding layer no longer holds the keys the shorter sequence would (it dropped
    /// them as the sequence grew). Prefix reuse calls this; on false it starts over.
    pub fn truncate(&mut self, cached: usize, keep: usize) -> Result<bool> {
        if keep > cached {
            return Ok(false);
        }
        let mut cuts = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let held = layer.len()?;
            // The layer holds keys `cached - held .. cached`; the shorter sequence needs
            // `first_cached_key(window, keep) .. keep`, kept by the same rule.
            let from = first_cached_key(layer.window, keep);
            if held > cached || cached - held > from {
                return Ok(false);
            }
            cuts.push((from - (cached - held), keep - from));
        }
        for (layer, (offset, len)) in self.layers.iter_mut().zip(cuts) {
            layer.kv = match (layer.kv.take(), len) {
                (_, 0) | (None, _) => None,
                (Some((k, v)), len) => Some((k.narrow(2, offset, len)?, v.narrow(2, offset, len)?)),
            };
        }
        Ok(true)
    }

    /// The layers, in order.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = &mut LayerCache> {
        self.layers.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn chunk(n: usize) -> Tensor {
        Tensor::zeros((1, 1, n, 2), DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_sliding_layer_keeps_what_the_next_query_can_see() {
        let mut layer = LayerCache::new(Some(4));
        let (k, _) = layer.append(chunk(5), chunk(5)).unwrap();
        assert_eq!(k.dim(2).unwrap(), 5);
        assert_eq!(layer.len().unwrap(), 3);
        // The next chunk's keys start at the first cached one.
        assert_eq!(first_cached_key(Some(4), 5), 2);
        let (k, _) = layer.append(chunk(1), chunk(1)).unwrap();
        assert_eq!(k.dim(2).unwrap(), 4);
        assert_eq!(layer.len().unwrap(), 3);
        // A window of one key keeps nothing.
        let mut layer = LayerCache::new(Some(1));
        layer.append(chunk(2), chunk(2)).unwrap();
        assert!(layer.is_empty());
    }

    #[test]
    fn a_full_layer_keeps_everything_until_reset() {
        let mut cache = KvCache::new([None, Some(2)]);
        for layer in cache.layers_mut() {
            layer.append(chunk(3), chunk(3)).unwrap();
        }
        let lens: Vec<usize> = cache.layers_mut().map(|l| l.len().unwrap()).collect();
        assert_eq!(lens, [3, 1]);
        assert_eq!(first_cached_key(None, 3), 0);
        cache.reset();
        assert!(cache.layers_mut().all(|l| l.is_empty()));
    }

    #[test]
    fn truncation_keeps_a_prefix_where_every_layer_still_holds_it() {
        // Positions as values, so the kept keys can be read back.
        let seq = |from: usize, n: usize| {
            let v: Vec<f32> = (from..from + n).map(|p| p as f32).collect();
            Tensor::from_vec(v, (1, 1, n, 1), &Device::Cpu).unwrap()
        };
        let held = |cache: &mut KvCache| -> Vec<Vec<f32>> {
            cache
                .layers_mut()
                .map(|l| match &l.kv {
                    Some((k, _)) => k.flatten_all().unwrap().to_vec1().unwrap(),
                    None => vec![],
                })
                .collect()
        };
        let mut cache = KvCache::new([None, Some(4)]);
        for layer in cache.layers_mut() {
            layer.append(seq(0, 5), seq(0, 5)).unwrap();
        }
        // The sliding layer holds positions 2, 3, 4; a prefix of 4 tokens needs 1, 2, 3.
        assert!(!cache.truncate(5, 4).unwrap());
        assert_eq!(
            held(&mut cache),
            [vec![0., 1., 2., 3., 4.], vec![2., 3., 4.]]
        );
        // A prefix of 5 (all of it) is kept as is; more than there is cannot be.
        assert!(cache.truncate(5, 5).unwrap());
        assert!(!cache.truncate(5, 6).unwrap());
        let mut full = KvCache::new([None, None]);
        for layer in full.layers_mut() {
            layer.append(seq(0, 5), seq(0, 5)).unwrap();
        }
        assert!(full.truncate(5, 2).unwrap());
        assert_eq!(held(&mut full), [vec![0., 1.], vec![0., 1.]]);
        // A sliding layer that has not dropped anything yet can be cut too.
        let mut young = KvCache::new([Some(8)]);
        young
            .layers_mut()
            .next()
            .unwrap()
            .append(seq(0, 5), seq(0, 5))
            .unwrap();
        assert!(young.truncate(5, 3).unwrap());
        assert_eq!(held(&mut young), [vec![0., 1., 2.]]);
    }
}
