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
}
