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

/// Rows a layer's buffer starts with; it doubles when full.
const MIN_CAPACITY: usize = 64;

/// The cache of one layer: keys `(batch, kv_heads, positions, head_dim)` and values (whose
/// last dimension may differ), in buffers that grow by doubling and are written in place.
///
/// Appending writes the chunk's rows after the held ones; a concatenation instead copied the
/// whole cache of every layer at every step (for eight sequences of a few hundred tokens, tens
/// of megabytes per decode step). A sliding layer drops its oldest rows by moving where its
/// rows start; a buffer that runs out of room is replaced by one twice the size needed, with
/// the held rows moved to its front. Cutting back to a prefix only moves the end.
#[derive(Debug)]
pub struct LayerCache {
    /// The buffers; the layer's positions are rows `start .. start + len` of dimension 2.
    buf: Option<(Tensor, Tensor)>,
    start: usize,
    len: usize,
    window: Option<usize>,
}

impl LayerCache {
    /// An empty cache for a layer with this sliding window (`None`: full attention).
    pub fn new(window: Option<usize>) -> Self {
        LayerCache {
            buf: None,
            start: 0,
            len: 0,
            window,
        }
    }

    /// Appends a chunk's keys and values and returns every key and value its queries may
    /// attend to (the cached ones first), as views of the buffers that are valid until the
    /// next append; then keeps only what a later query can still see.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let needed = self.len + n;
        let (bk, bv) = match self.buf.take() {
            Some((bk, bv)) if self.start + needed <= bk.dim(2)? => (bk, bv),
            old => {
                let capacity = (2 * needed).max(MIN_CAPACITY);
                let grown = |t: &Tensor| -> Result<Tensor> {
                    let mut shape = t.dims().to_vec();
                    shape[2] = capacity;
                    Ok(Tensor::zeros(shape, t.dtype(), t.device())?)
                };
                let (nk, nv) = (grown(&k)?, grown(&v)?);
                if let (Some((ok, ov)), true) = (old, self.len > 0) {
                    nk.slice_set(&ok.narrow(2, self.start, self.len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&ov.narrow(2, self.start, self.len)?.contiguous()?, 2, 0)?;
                }
                self.start = 0;
                (nk, nv)
            }
        };
        bk.slice_set(&k, 2, self.start + self.len)?;
        bv.slice_set(&v, 2, self.start + self.len)?;
        self.len = needed;
        let all = (
            bk.narrow(2, self.start, self.len)?,
            bv.narrow(2, self.start, self.len)?,
        );
        if let Some(w) = self.window {
            let keep = self.len.min(w.saturating_sub(1));
            self.start += self.len - keep;
            self.len = keep;
        }
        self.buf = Some((bk, bv));
        Ok(all)
    }

    /// The positions this layer holds.
    pub fn len(&self) -> Result<usize> {
        Ok(self.len)
    }

    /// Whether the layer holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The held keys, for tests.
    #[cfg(test)]
    fn keys(&self) -> Option<Tensor> {
        let (k, _) = self.buf.as_ref()?;
        (self.len > 0).then(|| k.narrow(2, self.start, self.len).unwrap())
    }
}

/// One [`LayerCache`] per layer: everything a sequence changes in a network.
#[derive(Debug)]
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
            *layer = LayerCache::new(layer.window);
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
            layer.start += offset;
            layer.len = len;
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
    fn buffers_grow_and_slide_without_losing_a_row() {
        let row =
            |p: usize| Tensor::from_vec(vec![p as f32; 2], (1, 1, 1, 2), &Device::Cpu).unwrap();
        let mut full = LayerCache::new(None);
        let mut sliding = LayerCache::new(Some(10));
        for p in 0..3 * MIN_CAPACITY {
            let (k, v) = full.append(row(p), row(p)).unwrap();
            let seen: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(seen.len(), 2 * (p + 1));
            assert_eq!((seen[0], seen[2 * p]), (0.0, p as f32));
            assert_eq!(v.dim(2).unwrap(), p + 1);
            let (k, _) = sliding.append(row(p), row(p)).unwrap();
            let seen: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
            let first = p.saturating_sub(9);
            assert_eq!(seen[0], first as f32, "at {p}");
            assert_eq!(seen.len(), 2 * (p + 1 - first));
        }
        assert_eq!(full.len().unwrap(), 3 * MIN_CAPACITY);
        assert_eq!(sliding.len().unwrap(), 9);
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
                .map(|l| match l.keys() {
                    Some(k) => k.flatten_all().unwrap().to_vec1().unwrap(),
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
