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
use super::{Architecture, LanguageModel, LoadOptions, ModelInfo, ModelSource};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
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
}

/// A loaded model of architecture `A`: its network, the cache of the one sequence it runs, and
/// what the rest of llm-pool knows about it. This is what the registration list stores.
pub struct Adapter<A: Architecture> {
    network: A::Network,
    cache: <A::Network as Network>::Cache,
    /// Tokens in the cache; `None` after a failed forward, which may have left part of a chunk
    /// behind, until a forward at position 0 or a reset starts over.
    cached: Option<usize>,
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
            cache,
            cached: Some(0),
            info,
        }
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
        let info = ModelInfo::from_hf(A::NAME, &dir, loaded.vocab_size, loaded.max_context, dtype);
        Ok(Adapter::new(loaded.network, loaded.cache, info))
    }

    /// Loads a GGUF file: `config` checks and maps the metadata, `build` reads the tensors onto
    /// the device (it gets the file itself). GGUF models compute in F32 whatever their
    /// quantization.
    pub fn load_gguf<C>(
        source: ModelSource,
        options: &LoadOptions,
        config: impl FnOnce(&mut GgufFile) -> Result<C>,
        build: impl FnOnce(GgufFile, &C, &Device) -> Result<Loaded<A::Network>>,
    ) -> Result<Self> {
        let mut file = source.into_gguf(A::NAME)?;
        let cfg = config(&mut file)?;
        // The special ids first: the builder consumes the file.
        let eos_token_ids = common::token_set(file.eos_token_ids()?);
        let bos_token_id = file.bos_token_id()?;
        let loaded = build(file, &cfg, &options.device)?;
        let info = ModelInfo {
            architecture: A::NAME,
            vocab_size: loaded.vocab_size,
            max_context: loaded.max_context,
            eos_token_ids,
            bos_token_id,
            dtype: DType::F32,
        };
        Ok(Adapter::new(loaded.network, loaded.cache, info))
    }

    /// The network, for tests that inspect what was loaded.
    pub fn network(&self) -> &A::Network {
        &self.network
    }
}

impl<A: Architecture> LanguageModel for Adapter<A> {
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
        // A new sequence at position 0 starts from the loaded state, whatever ran before
        // (candle's stock models would append to the old cache); any other position must
        // continue the cached sequence exactly.
        if position == 0 && self.cached != Some(0) {
            self.reset_cache()?;
        }
        match self.cached {
            Some(cached) if cached == position => {}
            Some(cached) => {
                return Err(Error::Position {
                    got: position,
                    cached,
                })
            }
            None => {
                return Err(Error::InvalidParameter {
                    param: "position".into(),
                    message: "an earlier forward failed part way; start over at position 0 or reset the cache".into(),
                })
            }
        }
        let (_batch, seq_len) = input_ids.dims2()?;
        self.cached = None;
        let logits = self.network.forward(input_ids, position, &mut self.cache)?;
        self.cached = Some(position + seq_len);
        last_position_f32(logits)
    }

    fn reset_cache(&mut self) -> Result<()> {
        self.cached = None;
        self.network.reset(&mut self.cache)?;
        self.cached = Some(0);
        Ok(())
    }

    fn info(&self) -> &ModelInfo {
        &self.info
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
}

impl<N: Network> Loaded<N> {
    /// A network, its empty cache and the sizes its [`ModelInfo`] reports.
    pub fn new(network: N, cache: N::Cache, vocab_size: usize, max_context: usize) -> Self {
        Loaded {
            network,
            cache,
            vocab_size,
            max_context,
        }
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
}
