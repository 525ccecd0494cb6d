//! The one [`LanguageModel`] implementation: [`Adapter`], generic over the architecture.
//!
//! Each architecture in `arch/` provides a [`Network`]: its weights and how one forward runs
//! over a per-sequence cache. Everything else an adapter used to repeat lives here once: the
//! position bookkeeping (a forward at position 0 starts over, any other position must follow
//! the cache), the reset, the normalisation of candle's many output shapes to last-position F32
//! logits, and the [`ModelInfo`].
//!
//! The cache is where all the state of a sequence lives. For our own networks it is a
//! [`KvCache`](super::layers::kv_cache::KvCache); for candle's stock models, whose weights and
//! cache sit in one struct, it is the live copy of that struct, and [`Pristine`] resets it by
//! swapping in a clone of the copy taken at load time.

use super::common::{self, last_position_f32};
use super::gguf::GgufFile;
use super::hf::HfConfig;
use super::layers::decoder::Decoder;
use super::layers::gguf_weights::GgufWeights;
use super::{Architecture, LanguageModel, LoadOptions, ModelInfo, ModelSource, Names};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// An architecture's computation: read-only weights, run over a separate, mutable cache.
pub trait Network: Send + 'static {
    /// Everything one sequence changes.
    type Cache: Send;

    /// Runs `input_ids` (`(batch, seq)`, u32) at `position`, the number of tokens `cache`
    /// already holds, and returns logits of which the last position is used: `(b, vocab)`,
    /// `(b, 1, vocab)` or `(b, seq, vocab)`, in any dtype.
    fn forward(
        &self,
        input_ids: &Tensor,
        position: usize,
        cache: &mut Self::Cache,
    ) -> Result<Tensor>;

    /// Brings `cache` back to the freshly loaded state, or fails; never a silent no-op.
    fn reset(&self, cache: &mut Self::Cache) -> Result<()>;

    /// A new empty cache, for one more sequence slot: the state `reset` brings a cache to.
    fn new_cache(&self) -> Result<Self::Cache>;

    /// One step over several sequences, each with its own cache, position and new tokens:
    /// `(n, vocab)` logits, one row per sequence, of its last position, in any dtype.
    ///
    /// By default each sequence runs [`Network::forward`] alone. The shared [`Decoder`] runs
    /// them together, every linear layer one matmul over all their tokens.
    fn forward_batch(&self, batch: &mut [SequenceInput<'_, Self::Cache>]) -> Result<Tensor> {
        let rows = batch
            .iter_mut()
            .map(|s| last_position_f32(self.forward(&s.input_ids, s.position, s.cache)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Cuts `cache`, which holds `cached` tokens, back to its first `keep` tokens and returns
    /// true; or returns false, changing nothing, when this network's cache cannot be cut
    /// there (the caller then starts the sequence over). By default no cache can be cut.
    fn truncate(&self, cache: &mut Self::Cache, cached: usize, keep: usize) -> Result<bool> {
        let _ = (cache, cached, keep);
        Ok(false)
    }
}

/// One sequence of a batched step, as a [`Network`] runs it.
pub struct SequenceInput<'a, C> {
    /// Its new tokens, `(1, len)` u32.
    pub input_ids: Tensor,
    /// The tokens its cache already holds.
    pub position: usize,
    /// Its cache.
    pub cache: &'a mut C,
}

/// One sequence of a batched step, as [`LanguageModel::forward_batch`] takes it.
#[derive(Debug, Clone)]
pub struct BatchItem {
    /// The sequence slot whose cache it runs over.
    pub slot: usize,
    /// Its new tokens, `(1, len)` u32.
    pub input_ids: Tensor,
    /// The tokens that slot's cache holds (0 starts the slot over).
    pub position: usize,
}

/// A sequence slot: a cache, and how many tokens it holds (`None` after a failed forward,
/// which may have left part of a chunk behind, until a forward at position 0 or a reset).
struct Slot<C> {
    cache: C,
    cached: Option<usize>,
}

/// A loaded model of architecture `A`: its network, one cache per sequence slot (one slot
/// until [`LanguageModel::set_slots`] asks for more), and what the rest of llm-pool knows about
/// it. This is what the registration list stores.
pub struct Adapter<A: Architecture> {
    network: A::Network,
    slots: Vec<Slot<<A::Network as Network>::Cache>>,
    info: ModelInfo,
}

impl<A: Architecture> Adapter<A> {
    /// A freshly loaded model: `cache` must be the network's empty cache.
    pub fn new(
        network: A::Network,
        cache: <A::Network as Network>::Cache,
        info: ModelInfo,
    ) -> Self {
        Adapter {
            network,
            slots: vec![Slot {
                cache,
                cached: Some(0),
            }],
            info,
        }
    }

    fn slot_mut(&mut self, slot: usize) -> Result<&mut Slot<<A::Network as Network>::Cache>> {
        Ok(self.network_and_slot(slot)?.1)
    }

    /// The network and one slot, borrowed together; an error names the slots there are.
    #[allow(clippy::type_complexity)]
    fn network_and_slot(
        &mut self,
        slot: usize,
    ) -> Result<(&A::Network, &mut Slot<<A::Network as Network>::Cache>)> {
        let n = self.slots.len();
        let s = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| Error::InvalidParameter {
                param: "slot".into(),
                message: format!("slot {slot} does not exist; this model has {n} slots"),
            })?;
        Ok((&self.network, s))
    }

    /// Loads a Hugging Face directory: `config` maps config.json, `build` builds the network
    /// from the weights, read in the dtype and on the device the options ask for.
    pub fn load_hf<C>(
        source: ModelSource,
        options: &LoadOptions,
        config: impl FnOnce(&HfConfig) -> Result<C>,
        build: impl FnOnce(&C, VarBuilder) -> Result<Loaded<A::Network>>,
    ) -> Result<Self> {
        let dir = source.into_hf(A::NAME)?;
        let cfg = config(&dir.config)?;
        let dtype = dir.dtype(options)?;
        let loaded = build(&cfg, dir.var_builder(dtype, &options.device)?)?;
        let info = ModelInfo::from_hf(
            A::NAME,
            &dir,
            (loaded.vocab_size, loaded.max_context),
            dtype,
            loaded.kv_bytes_per_token,
        );
        Ok(Adapter::new(loaded.network, loaded.cache, info))
    }

    /// Loads a GGUF file: `config` checks and maps the metadata, `build` reads the tensors onto
    /// the device the options ask for. GGUF models compute in F32 whatever their quantization.
    pub fn load_gguf<C>(
        source: ModelSource,
        options: &LoadOptions,
        config: impl FnOnce(&GgufFile) -> Result<C>,
        build: impl FnOnce(&C, &mut GgufWeights) -> Result<Loaded<A::Network>>,
    ) -> Result<Self> {
        let mut file = source.into_gguf(A::NAME)?;
        let cfg = config(&file)?;
        let eos_token_ids = common::token_set(file.eos_token_ids()?);
        let bos_token_id = file.bos_token_id()?;
        let loaded = build(&cfg, &mut GgufWeights::new(&mut file, &options.device))?;
        let info = ModelInfo {
            architecture: A::NAME,
            vocab_size: loaded.vocab_size,
            max_context: loaded.max_context,
            eos_token_ids,
            bos_token_id,
            dtype: DType::F32,
            kv_bytes_per_token: loaded.kv_bytes_per_token,
        };
        Ok(Adapter::new(loaded.network, loaded.cache, info))
    }

    /// The network, for tests that inspect what was loaded.
    pub fn network(&self) -> &A::Network {
        &self.network
    }
}

/// A GGUF architecture: its names, the mapping of its metadata, and the network it reads from
/// the file's tensors, which is always the shared [`Decoder`]. Its [`Architecture`] follows
/// from these (every GGUF architecture loads through [`Adapter::load_gguf`] the same way).
pub trait GgufArchitecture: Sized + 'static {
    /// Its registered name and the `general.architecture` it answers to.
    const NAMES: Names;

    /// Its hyperparameters, all read and checked before any tensor is.
    type Config;

    /// Maps the GGUF metadata, refusing what the implementation cannot compute.
    fn config(file: &GgufFile) -> Result<Self::Config>;

    /// Reads the network from the file's tensors.
    fn network(cfg: &Self::Config, w: &mut GgufWeights) -> Result<Loaded<Decoder>>;
}

impl<A: GgufArchitecture> Architecture for A {
    const NAMES: Names = <A as GgufArchitecture>::NAMES;
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_gguf(source, options, A::config, A::network)
    }
}

impl<A: Architecture> LanguageModel for Adapter<A> {
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
        let item = BatchItem {
            slot: 0,
            input_ids: input_ids.clone(),
            position,
        };
        let (_batch, seq_len) = input_ids.dims2()?;
        self.prepare(0, position)?;
        let slot = &mut self.slots[0];
        slot.cached = None;
        let logits = self
            .network
            .forward(&item.input_ids, position, &mut slot.cache)?;
        slot.cached = Some(position + seq_len);
        last_position_f32(logits)
    }

    fn forward_batch(&mut self, batch: &[BatchItem]) -> Result<Tensor> {
        let mut seen = vec![false; self.slots.len()];
        for item in batch {
            match seen.get_mut(item.slot) {
                Some(true) => {
                    return Err(Error::InvalidParameter {
                        param: "batch".into(),
                        message: format!("slot {} appears twice in one batch", item.slot),
                    })
                }
                Some(s) => *s = true,
                None => {
                    self.slot_mut(item.slot)?;
                }
            }
            self.prepare(item.slot, item.position)?;
        }
        // Each item borrows its own slot's cache, in the batch's order.
        let mut caches: Vec<Option<&mut Slot<_>>> = self.slots.iter_mut().map(Some).collect();
        let mut inputs = Vec::with_capacity(batch.len());
        for item in batch {
            let slot = caches[item.slot].take().ok_or_else(|| {
                candle_core::Error::Msg(format!("slot {} taken twice", item.slot))
            })?;
            slot.cached = None;
            inputs.push(SequenceInput {
                input_ids: item.input_ids.clone(),
                position: item.position,
                cache: &mut slot.cache,
            });
        }
        let logits = self.network.forward_batch(&mut inputs)?;
        drop(inputs);
        for item in batch {
            self.slots[item.slot].cached = Some(item.position + item.input_ids.dim(1)?);
        }
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn reset_cache(&mut self) -> Result<()> {
        for slot in 0..self.slots.len() {
            self.reset_slot(slot)?;
        }
        Ok(())
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn set_slots(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::InvalidParameter {
                param: "slots".into(),
                message: "a model needs at least one sequence slot".into(),
            });
        }
        self.slots.truncate(n);
        while self.slots.len() < n {
            self.slots.push(Slot {
                cache: self.network.new_cache()?,
                cached: Some(0),
            });
        }
        Ok(())
    }

    fn reset_slot(&mut self, slot: usize) -> Result<()> {
        let (network, s) = self.network_and_slot(slot)?;
        s.cached = None;
        network.reset(&mut s.cache)?;
        s.cached = Some(0);
        Ok(())
    }

    fn truncate_slot(&mut self, slot: usize, keep: usize) -> Result<bool> {
        let (network, s) = self.network_and_slot(slot)?;
        match s.cached {
            Some(cached) if keep == cached => Ok(true),
            Some(cached) if keep < cached && network.truncate(&mut s.cache, cached, keep)? => {
                s.cached = Some(keep);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

impl<A: Architecture> Adapter<A> {
    /// Checks that a forward at `position` may run on `slot`: a new sequence at position 0
    /// starts from the loaded state, whatever ran before (candle's stock models would append
    /// to the old cache); any other position must continue the slot's sequence exactly.
    fn prepare(&mut self, slot: usize, position: usize) -> Result<()> {
        let cached = self.slot_mut(slot)?.cached;
        if position == 0 && cached != Some(0) {
            self.reset_slot(slot)?;
            return Ok(());
        }
        match cached {
            Some(cached) if cached == position => Ok(()),
            Some(cached) => Err(Error::Position {
                got: position,
                cached,
            }),
            None => Err(Error::InvalidParameter {
                param: "position".into(),
                message: "an earlier forward failed part way; start over at position 0 or reset the cache".into(),
            }),
        }
    }
}

/// A network as built from its weights: with its empty cache, and the vocabulary size and
/// context length its [`ModelInfo`] reports.
pub struct Loaded<N: Network> {
    /// The network.
    pub network: N,
    /// Its empty cache.
    pub cache: N::Cache,
    /// Rows of the logits.
    pub vocab_size: usize,
    /// The longest sequence it computes.
    pub max_context: usize,
    /// Bytes of KV cache per token, over all layers.
    pub kv_bytes_per_token: usize,
}

impl<N: Network> Loaded<N> {
    /// A network, its empty cache and the sizes its [`ModelInfo`] reports.
    pub fn new(network: N, cache: N::Cache, vocab_size: usize, max_context: usize) -> Self {
        Loaded {
            network,
            cache,
            vocab_size,
            max_context,
            kv_bytes_per_token: 0,
        }
    }

    /// The same, with the KV cache's bytes per token: `layers` layers of `kv_heads` key and
    /// value heads of `head_dim` in `dtype` (for a stock model, whose cache is opaque).
    pub fn with_kv_cache(
        mut self,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Self {
        self.kv_bytes_per_token = layers * 2 * kv_heads * head_dim * dtype.size_in_bytes();
        self
    }
}

impl<M: Clone + Send + 'static> Loaded<Pristine<M>> {
    /// A freshly loaded stock model run by its `forward`: its pristine copy is the network, the
    /// live one the cache.
    pub fn pristine(
        model: M,
        forward: StockForward<M>,
        vocab_size: usize,
        max_context: usize,
    ) -> Self {
        let network = Pristine {
            pristine: model.clone(),
            forward,
        };
        Loaded::new(network, model, vocab_size, max_context)
    }
}

/// candle's stock models keep their weights and their cache in one `Clone` struct whose
/// clone shares the weights (reference-counted tensors that candle never writes in place).
/// Such a model is run as a network whose cache is the live copy; resetting swaps in a fresh
/// clone of the copy taken right after loading, which is exactly the freshly loaded state even
/// when candle's own `clear_kv_cache` is missing or incomplete (mask caches, for example).
/// KV caches that preallocate and write in place allocate lazily on the first append, so the
/// pristine copy never shares a written buffer with the live one.
pub struct Pristine<M> {
    pristine: M,
    forward: StockForward<M>,
}

/// candle's forward of a stock model: the ids and their position, with the cache inside.
pub type StockForward<M> = fn(&mut M, &Tensor, usize) -> candle_core::Result<Tensor>;

impl<M: Clone + Send + 'static> Network for Pristine<M> {
    type Cache = M;

    fn forward(&self, input_ids: &Tensor, position: usize, live: &mut M) -> Result<Tensor> {
        Ok((self.forward)(live, input_ids, position)?)
    }

    fn reset(&self, live: &mut M) -> Result<()> {
        *live = self.pristine.clone();
        Ok(())
    }

    fn new_cache(&self) -> Result<M> {
        Ok(self.pristine.clone())
    }
}
