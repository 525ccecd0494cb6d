//! The model layer: every architecture behind one trait.
//!
//! Every loaded model implements [`LanguageModel`] (the runtime face: one `forward` signature
//! for all, a `reset_cache` that really resets, and a [`ModelInfo`]) through one generic
//! [`Adapter`]. What differs per architecture is its [`Architecture`] (how it is detected and
//! loaded: config mapping, weights) and its [`Network`] (the forward over a cache), in one
//! module of `arch/`, composed from the shared blocks of [`layers`]. The
//! [`register_architectures!`] list at the bottom of this file generates the
//! [`AnyArchitecture`] enum, its dispatch, and the [`ARCHITECTURES`] table that detection walks.
//!
//! # Adding an architecture
//!
//! 1. Write one module, say `src/models/arch/falcon.rs`, with a unit struct `Falcon` that
//!    implements [`Architecture`]: its name, format and detection names, its network type, and
//!    `load` (map config.json with [`hf::HfConfig`] or GGUF metadata with [`gguf::GgufFile`],
//!    build the network from [`layers`], return an [`Adapter`]).
//! 2. Declare it in `arch/mod.rs` (`pub mod falcon;`) and register it with one line
//!    `Falcon => falcon::Falcon,` in the `register_architectures!` list below.
//!
//! No other file changes. A registered line without its module does not compile; a declared
//! module that is not registered is dead code, which clippy's `-D warnings` rejects. The
//! generic tests in `tests/model_conformance.rs` walk [`ARCHITECTURES`], so the new line is
//! covered by the cache conformance test at once (and fails until its fixture exists).
//!
//! # The contract every model keeps
//!
//! - `forward(input_ids, position)`: `input_ids` is a `(batch, seq)` u32 tensor, `position` the
//!   number of tokens already in the KV cache (0 starts a new sequence). The result is
//!   `(batch, vocab)` F32 logits of the last position. The [`Adapter`] checks that `position`
//!   follows the cache, so networks may rely on it.
//! - `reset_cache()`: afterwards the model computes exactly what a freshly loaded one would.
//!   Networks reset with the mechanism that really works for them (an emptied cache, or a
//!   pristine clone of a candle model sharing the weights) and return an error if it cannot be
//!   done.

pub mod adapter;
mod arch;
pub mod common;
pub mod detect;
pub mod gguf;
pub mod hf;
pub mod layers;

pub use adapter::{Adapter, BatchItem, Network, SequenceInput};

use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// What the rest of llm-pool knows about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The registered architecture name (for example `llama` or `quantized_gemma3`).
    pub architecture: &'static str,
    /// Number of rows in the logits.
    pub vocab_size: usize,
    /// The longest sequence (prompt plus generated tokens) the model accepts.
    pub max_context: usize,
    /// End-of-sequence token ids declared by the model files (sorted, deduplicated).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id, when the model declares one.
    pub bos_token_id: Option<u32>,
    /// The dtype the weights are computed in.
    pub dtype: DType,
    /// Bytes of KV cache one token takes over all layers (keys and values, in the cache's
    /// dtype), for the KV budget.
    pub kv_bytes_per_token: usize,
}

impl ModelInfo {
    /// The info of a model loaded from a Hugging Face directory: end-of-sequence ids from
    /// config.json and generation_config.json, the beginning-of-sequence id from config.json.
    pub fn from_hf(
        architecture: &'static str,
        dir: &hf::HfModelDir,
        (vocab_size, max_context): (usize, usize),
        dtype: DType,
        kv_bytes_per_token: usize,
    ) -> Self {
        ModelInfo {
            architecture,
            vocab_size,
            max_context,
            eos_token_ids: common::token_set(dir.eos_token_ids()),
            bos_token_id: dir.bos_token_id(),
            dtype,
            kv_bytes_per_token,
        }
    }
}

/// The weight format an architecture loads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A Hugging Face directory: config.json plus `*.safetensors` (sharded or not).
    Safetensors,
    /// A GGUF file as llama.cpp writes it.
    Gguf,
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::Safetensors => "safetensors",
            WeightFormat::Gguf => "gguf",
        })
    }
}

/// The runtime face of a model: the one interface the engine and the pool use.
pub trait LanguageModel: Send {
    /// Runs `input_ids` (`(batch, seq)`, u32) starting at `position` and returns `(batch, vocab)`
    /// F32 logits for the last position of each sequence.
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor>;

    /// Restores the state of a freshly loaded model, or returns an error. Never a silent no-op.
    fn reset_cache(&mut self) -> Result<()>;

    /// Architecture name, vocabulary size, context length and end-of-sequence ids.
    fn info(&self) -> &ModelInfo;

    /// One step over several sequences, each in its own slot (its own KV cache) at its own
    /// position: `(n, vocab)` F32 logits, row `i` for the last token of `batch[i]`. Each row
    /// is what that sequence's [`LanguageModel::forward`] alone computes, within float
    /// rounding. A slot may appear once per batch; position 0 starts the slot over.
    fn forward_batch(&mut self, batch: &[BatchItem]) -> Result<Tensor>;

    /// The number of sequence slots; [`LanguageModel::forward`] runs on slot 0.
    fn slots(&self) -> usize;

    /// Sets the number of slots: new ones start empty, and slots past `n` are dropped.
    fn set_slots(&mut self, n: usize) -> Result<()>;

    /// Restores one slot to the freshly loaded state, or returns an error.
    fn reset_slot(&mut self, slot: usize) -> Result<()>;

    /// Cuts a slot's cache back to its first `keep` tokens (for reusing a shared prefix) and
    /// returns true, or returns false without changing it when the cache cannot be cut there.
    fn truncate_slot(&mut self, slot: usize, keep: usize) -> Result<bool>;
}

/// How an architecture is detected and loaded. Implemented once per module in `arch/`, on a
/// unit struct naming the architecture; the loaded model is an [`Adapter`] of it.
pub trait Architecture: Sized + 'static {
    /// Its registered name, format and the names files declare it by.
    const NAMES: Names;
    /// The registered name, unique across the list.
    const NAME: &'static str = Self::NAMES.name;

    /// The network it runs: weights, one forward over a cache, and the reset of that cache.
    type Network: Network;

    /// Reads the config and the weights from the detected source: the network, its empty
    /// cache and its [`ModelInfo`], in an [`Adapter`].
    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>>;
}

/// An architecture's names: the registered one, its format, and the names its files declare
/// it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names {
    /// The registered name, unique across the list.
    pub name: &'static str,
    /// Which files it loads from.
    pub format: WeightFormat,
    /// Names it is detected by: config.json `model_type` values for safetensors, or GGUF
    /// `general.architecture` values.
    pub model_types: &'static [&'static str],
    /// config.json `architectures[0]` class names, the fallback when `model_type` is absent.
    pub hf_classes: &'static [&'static str],
}

impl Names {
    /// An architecture of Hugging Face directories, detected by config.json `model_type`, else
    /// by the `architectures[0]` class.
    pub const fn hf(
        name: &'static str,
        model_types: &'static [&'static str],
        hf_classes: &'static [&'static str],
    ) -> Self {
        Names {
            name,
            format: WeightFormat::Safetensors,
            model_types,
            hf_classes,
        }
    }

    /// An architecture of GGUF files, detected by `general.architecture`.
    pub const fn gguf(name: &'static str, architectures: &'static [&'static str]) -> Self {
        Names {
            name,
            format: WeightFormat::Gguf,
            model_types: architectures,
            hf_classes: &[],
        }
    }
}

/// The files an architecture loads from, already opened and validated by detection.
pub enum ModelSource {
    /// A Hugging Face model directory.
    Hf(hf::HfModelDir),
    /// A GGUF file.
    Gguf(gguf::GgufFile),
}

impl ModelSource {
    /// The path the model was loaded from.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Hf(d) => &d.dir,
            ModelSource::Gguf(g) => &g.path,
        }
    }

    /// The Hugging Face directory, or an error naming the architecture that needs one.
    pub fn into_hf(self, architecture: &str) -> Result<hf::HfModelDir> {
        match self {
            ModelSource::Hf(d) => Ok(d),
            ModelSource::Gguf(g) => Err(Error::model_file(
                g.path,
                format!("architecture {architecture} loads from a safetensors directory, not a GGUF file"),
            )),
        }
    }

    /// The GGUF file, or an error naming the architecture that needs one.
    pub fn into_gguf(self, architecture: &str) -> Result<gguf::GgufFile> {
        match self {
            ModelSource::Gguf(g) => Ok(g),
            ModelSource::Hf(d) => Err(Error::model_file(
                d.dir,
                format!("architecture {architecture} loads from a GGUF file, not a directory"),
            )),
        }
    }
}

/// Where and how to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The device, as configured.
    pub device_spec: DeviceSpec,
    /// The opened candle device.
    pub device: Device,
    /// The compute dtype for safetensors weights. `None` picks F32 on CPU (BF16 matmul is about
    /// 18x slower there) and the checkpoint's own dtype on GPUs. GGUF weights keep their
    /// quantization whatever this says.
    pub dtype: Option<DType>,
}

impl LoadOptions {
    /// Options for the host CPU with the default dtype.
    pub fn cpu() -> Self {
        LoadOptions {
            device_spec: DeviceSpec::Cpu,
            device: Device::Cpu,
            dtype: None,
        }
    }

    /// Options for a device string such as `cpu` or `cuda:0`.
    pub fn for_device(spec: DeviceSpec) -> Result<Self> {
        Ok(LoadOptions {
            device: spec.open()?,
            device_spec: spec,
            dtype: None,
        })
    }
}

/// One row of the registration table: what detection needs to know about an architecture.
pub struct ArchitectureEntry {
    /// The registered name.
    pub name: &'static str,
    /// Which files it loads from.
    pub format: WeightFormat,
    /// `model_type` / `general.architecture` names it is detected by.
    pub model_types: &'static [&'static str],
    /// config.json `architectures[0]` fallbacks.
    pub hf_classes: &'static [&'static str],
    /// Loads it into the enum.
    pub load: fn(ModelSource, &LoadOptions) -> Result<AnyArchitecture>,
}

impl std::fmt::Debug for ArchitectureEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchitectureEntry")
            .field("name", &self.name)
            .field("format", &self.format)
            .finish()
    }
}

/// Generates the enum over all architectures, its [`LanguageModel`] dispatch, and the
/// [`ARCHITECTURES`] table, from one list of `Variant => module::Type` lines, and re-exports
/// each module of `arch/` as `models::module`.
///
/// The modules themselves are declared in `arch/mod.rs`, which is private: a module that is
/// declared there but not listed here is never used, which clippy's `-D warnings` rejects;
/// a line listed here without its module does not compile.
macro_rules! register_architectures {
    ($($variant:ident => $module:ident :: $ty:ident),+ $(,)?) => {
        $(pub use arch::$module;)+

        /// One loaded model of any registered architecture.
        pub enum AnyArchitecture {
            $(
                #[allow(missing_docs)]
                $variant(Adapter<$module::$ty>),
            )+
        }

        impl LanguageModel for AnyArchitecture {
            fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::forward(m, input_ids, position),)+
                }
            }

            fn reset_cache(&mut self) -> Result<()> {
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::reset_cache(m),)+
                }
            }

            fn info(&self) -> &ModelInfo {
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::info(m),)+
                }
            }

            fn forward_batch(&mut self, batch: &[BatchItem]) -> Result<Tensor> {
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::forward_batch(m, batch),)+
                }
            }

            fn slots(&self) -> usize {
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::slots(m),)+
                }
            }

            fn set_slots(&mut self, n: usize) -> Result<()> {
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::set_slots(m, n),)+
                }
            }

            fn reset_slot(&mut self, slot: usize) -> Result<()> {
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::reset_slot(m, slot),)+
                }
            }

            fn truncate_slot(&mut self, slot: usize, keep: usize) -> Result<bool> {
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::truncate_slot(m, slot, keep),)+
                }
            }
        }

        /// Every registered architecture, in registration order.
        pub static ARCHITECTURES: &[ArchitectureEntry] = &[
            $(ArchitectureEntry {
                name: <$module::$ty as Architecture>::NAMES.name,
                format: <$module::$ty as Architecture>::NAMES.format,
                model_types: <$module::$ty as Architecture>::NAMES.model_types,
                hf_classes: <$module::$ty as Architecture>::NAMES.hf_classes,
                load: |source, options| {
                    <$module::$ty as Architecture>::load(source, options).map(AnyArchitecture::$variant)
                },
            },)+
        ];
    };
}

// The registration list. One line per architecture; see the module docs.
register_architectures! {
    // Hugging Face safetensors directories.
    Llama => llama::Llama,
    Yi => yi::Yi,
    Mistral => mistral::Mistral,
    Mixtral => mixtral::Mixtral,
    Qwen2 => qwen2::Qwen2,
    Qwen3 => qwen3::Qwen3,
    Starcoder2 => starcoder2::Starcoder2,

    // Hugging Face safetensors directories: the Phi, Gemma and DeepSeek families.
    Phi => phi::Phi,
    Phi3 => phi3::Phi3,
    Gemma => gemma::Gemma,
    Gemma2 => gemma2::Gemma2,
    Gemma3 => gemma3::Gemma3,
    DeepSeek2 => deepseek2::DeepSeek2,

    // GGUF files.
    QuantizedLlama => quantized_llama::QuantizedLlama,
    QuantizedPhi2 => quantized_phi2::QuantizedPhi2,
    QuantizedPhi3 => quantized_phi3::QuantizedPhi3,
    QuantizedQwen2 => quantized_qwen2::QuantizedQwen2,
    QuantizedQwen3 => quantized_qwen3::QuantizedQwen3,
    QuantizedGemma3 => quantized_gemma3::QuantizedGemma3,
}

/// Looks an architecture up by its registered name.
pub fn architecture(name: &str) -> Option<&'static ArchitectureEntry> {
    ARCHITECTURES.iter().find(|a| a.name == name)
}

/// A loaded model: any architecture, plus the bookkeeping that keeps every caller honest
/// about positions, per sequence slot. This is what the engine and the workers hold.
pub struct Model {
    inner: AnyArchitecture,
    path: PathBuf,
    device: Device,
    /// Per slot: the tokens in its KV cache, and whether a failed forward may have left
    /// partial state in it (until a reset).
    slots: Vec<SlotState>,
    /// On CPU, the rayon pool this model's forwards run in (see [`Model::forward_ids_into`]).
    cpu_pool: Option<rayon::ThreadPool>,
}

#[derive(Debug, Clone, Copy, Default)]
struct SlotState {
    cached: usize,
    needs_reset: bool,
}

/// One sequence of a batched step: its slot, its new tokens, and where they start.
#[derive(Debug, Clone, Copy)]
pub struct SequenceChunk<'a> {
    /// The slot (KV cache) it runs in.
    pub slot: usize,
    /// Its new tokens (at least one).
    pub tokens: &'a [u32],
    /// The tokens already in the slot's cache: the chunk continues the slot's sequence
    /// (reset or cut the slot to start another).
    pub position: usize,
}

impl Model {
    /// Detects the architecture of `path` (a model directory or a `.gguf` file) and loads it.
    ///
    /// ```no_run
    /// use llm_pool::models::{LoadOptions, Model};
    /// let mut model = Model::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &LoadOptions::cpu())?;
    /// let logits = model.forward_ids(&[1, 4093, 198], 0)?;
    /// assert_eq!(logits.len(), model.info().vocab_size);
    /// # Ok::<(), llm_pool::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let (source, entry) = detect::detect(path)?;
        Self::load_detected(source, entry, options)
    }

    /// Loads an already detected source with the given architecture.
    pub fn load_detected(
        source: ModelSource,
        entry: &'static ArchitectureEntry,
        options: &LoadOptions,
    ) -> Result<Self> {
        let path = source.path().to_path_buf();
        let started = std::time::Instant::now();
        // candle's loaders can panic on malformed weights (some call `unwrap`); a model file
        // must never take the process down, so the panic becomes an error naming the file.
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (entry.load)(source, options)
        }))
        .map_err(|p| {
            Error::from_panic(format!("loading {} from {}", entry.name, path.display()), p)
        })?;
        let inner = loaded.map_err(|e| match e {
            Error::Candle(c) => Error::model_file(&path, format!("loading {}: {c}", entry.name)),
            other => other,
        })?;
        tracing::info!(
            architecture = entry.name,
            path = %path.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        let cpu_pool = options
            .device
            .is_cpu()
            .then(|| cpu_pool(entry.name))
            .flatten();
        Ok(Model {
            inner,
            path,
            device: options.device.clone(),
            slots: vec![SlotState::default()],
            cpu_pool,
        })
    }

    /// The path the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Architecture name, vocabulary size, context length and end-of-sequence ids.
    pub fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    /// Number of tokens in slot 0's KV cache (the one [`Model::forward_ids`] uses).
    pub fn cached_tokens(&self) -> usize {
        self.slots[0].cached
    }

    /// Number of tokens in a slot's KV cache (0 for a slot that does not exist).
    pub fn slot_tokens(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, |s| s.cached)
    }

    /// The number of sequence slots, each with its own KV cache.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Sets the number of sequence slots (at least one). New slots start empty; slots past
    /// `n` are dropped with their caches.
    pub fn set_slots(&mut self, n: usize) -> Result<()> {
        self.inner.set_slots(n)?;
        self.slots.resize(n, SlotState::default());
        Ok(())
    }

    /// Restores one slot to the freshly loaded state.
    pub fn reset_slot(&mut self, slot: usize) -> Result<()> {
        self.inner.reset_slot(slot)?;
        self.slots[slot] = SlotState::default();
        Ok(())
    }

    /// Cuts a slot's cache back to its first `keep` tokens, so that a new sequence sharing
    /// them continues from there; false (nothing changed) when this model's cache of that
    /// slot cannot be cut there.
    pub fn truncate_slot(&mut self, slot: usize, keep: usize) -> Result<bool> {
        let state = self.slot_state(slot)?;
        if state.needs_reset || keep > state.cached {
            return Ok(false);
        }
        let cut = self.inner.truncate_slot(slot, keep)?;
        if cut {
            self.slots[slot].cached = keep;
        }
        Ok(cut)
    }

    fn slot_state(&self, slot: usize) -> Result<SlotState> {
        self.slots
            .get(slot)
            .copied()
            .ok_or_else(|| Error::InvalidParameter {
                param: "slot".into(),
                message: format!(
                    "slot {slot} does not exist; this model has {} slots",
                    self.slots.len()
                ),
            })
    }

    /// Runs a single sequence of token ids at `position` and returns its last-position logits.
    pub fn forward_ids(&mut self, ids: &[u32], position: usize) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_ids_into(ids, position, &mut logits)?;
        Ok(logits)
    }

    /// Like [`Model::forward_ids`], but writes the logits into `out`, reusing its allocation:
    /// the decode loop calls this once per token, and a fresh vocabulary-sized `Vec` each time
    /// costs a page-faulting allocation (192 KiB for SmolLM2, 1 MiB for Gemma 3).
    pub fn forward_ids_into(
        &mut self,
        ids: &[u32],
        position: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let chunk = SequenceChunk {
            slot: 0,
            tokens: ids,
            position,
        };
        self.forward_batch_into(&[chunk], out)
    }

    /// One step over several sequences, each in its own slot: `out` receives `n × vocab`
    /// logits, row `i` for the last token of `batch[i]`. Every linear layer of the shared
    /// decoder runs once over all the step's tokens, so decoding `n` sequences together reads
    /// each weight once instead of `n` times.
    ///
    /// ```no_run
    /// use llm_pool::models::{LoadOptions, Model, SequenceChunk};
    /// let mut model = Model::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &LoadOptions::cpu())?;
    /// model.set_slots(2)?;
    /// let mut logits = Vec::new();
    /// model.forward_batch_into(
    ///     &[
    ///         SequenceChunk { slot: 0, tokens: &[1, 4093, 198], position: 0 },
    ///         SequenceChunk { slot: 1, tokens: &[1, 22], position: 0 },
    ///     ],
    ///     &mut logits,
    /// )?;
    /// assert_eq!(logits.len(), 2 * model.info().vocab_size);
    /// # Ok::<(), llm_pool::Error>(())
    /// ```
    pub fn forward_batch_into(
        &mut self,
        batch: &[SequenceChunk<'_>],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::InvalidParameter {
                param: "batch".into(),
                message: "at least one sequence is needed".into(),
            });
        }
        let vocab = self.info().vocab_size;
        let device = self.device.clone();
        let mut items = Vec::with_capacity(batch.len());
        for chunk in batch {
            let ids = chunk.tokens;
            if ids.is_empty() {
                return Err(Error::InvalidParameter {
                    param: "input_ids".into(),
                    message: "at least one token is needed".into(),
                });
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::InvalidParameter {
                    param: "input_ids".into(),
                    message: format!("token id {bad} is outside the vocabulary (size {vocab})"),
                });
            }
            items.push(BatchItem {
                slot: chunk.slot,
                input_ids: Tensor::from_slice(ids, (1, ids.len()), &device)?,
                position: chunk.position,
            });
        }
        // On CPU the forward runs inside this model's rayon pool: candle's norms, RoPE, softmax
        // and f32 matmuls each fan out over rayon, and called from outside a pool every one of
        // them wakes a pool thread and sleeps until it is done (two context switches an op,
        // about 15% of a SmolLM2 decode step in `perf`). Inside, they start on the current
        // thread. The pool is the model's own, not candle's shared one: a pool thread waiting
        // in a join runs whatever job is queued, so two models installing into one pool would
        // each wait on the other's whole forward.
        let logits = match self.cpu_pool.take() {
            Some(pool) => {
                let result = pool.install(|| self.run_checked(&items, |m| m.forward_batch(&items)));
                self.cpu_pool = Some(pool);
                result?
            }
            None => self.run_checked(&items, |m| m.forward_batch(&items))?,
        };
        out.clear();
        let (storage, layout) = logits.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
                out.extend_from_slice(&cpu.as_slice::<f32>()?[start..end]);
            }
            // GPU logits (or a strided view) come back through candle's own copy.
            _ => {
                drop(storage);
                out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// Checks every item against its slot (position, context, partial state), runs the batch
    /// with panics caught, and keeps each slot's count: on failure every slot of the batch is
    /// marked for reset.
    fn run_checked(
        &mut self,
        items: &[BatchItem],
        run: impl FnOnce(&mut AnyArchitecture) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let info = self.inner.info();
        for item in items {
            let state = self.slot_state(item.slot)?;
            if state.needs_reset {
                return Err(Error::InvalidParameter {
                    param: "position".into(),
                    message: "an earlier forward failed part way and the KV cache may hold partial state; reset the cache first".into(),
                });
            }
            if item.position != state.cached {
                return Err(Error::Position {
                    got: item.position,
                    cached: state.cached,
                });
            }
            let seq_len = item.input_ids.dim(1)?;
            if item.position + seq_len > info.max_context {
                return Err(Error::InvalidParameter {
                    param: "input_ids".into(),
                    message: format!(
                        "positions {}..{} go past the context of {} tokens of this {} model",
                        item.position,
                        item.position + seq_len,
                        info.max_context,
                        info.architecture
                    ),
                });
            }
        }
        // A panic inside candle (a shape bug, an out-of-range index) must not unwind through
        // the caller's thread: it becomes an error and the slots are marked for reset.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut self.inner)))
                .unwrap_or_else(|p| Err(Error::from_panic("model forward", p)));
        for item in items {
            let slot = &mut self.slots[item.slot];
            match &result {
                Ok(_) => {
                    slot.cached = item.position + item.input_ids.dim(1)?;
                    slot.needs_reset = false;
                }
                Err(_) => slot.needs_reset = true,
            }
        }
        result
    }
}

/// A rayon pool for one model's CPU forwards, as many threads as candle uses (`RAYON_NUM_THREADS`
/// or the cores). `None`, with a warning, when the threads cannot be started: the forwards then
/// run on the caller's thread as before.
fn cpu_pool(architecture: &str) -> Option<rayon::ThreadPool> {
    let name = architecture.to_string();
    match rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .thread_name(move |i| format!("{name}-cpu-{i}"))
        .start_handler(|_| crate::resources::lower_compute_thread_priority())
        .build()
    {
        Ok(pool) => Some(pool),
        Err(e) => {
            tracing::warn!(architecture, error = %e, "no rayon pool for the model's forwards");
            None
        }
    }
}

impl LanguageModel for Model {
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
        let item = BatchItem {
            slot: 0,
            input_ids: input_ids.clone(),
            position,
        };
        self.run_checked(std::slice::from_ref(&item), |m| {
            m.forward(input_ids, position)
        })
    }

    fn reset_cache(&mut self) -> Result<()> {
        self.inner.reset_cache()?;
        self.slots.fill(SlotState::default());
        Ok(())
    }

    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn forward_batch(&mut self, batch: &[BatchItem]) -> Result<Tensor> {
        self.run_checked(batch, |m| m.forward_batch(batch))
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn set_slots(&mut self, n: usize) -> Result<()> {
        Model::set_slots(self, n)
    }

    fn reset_slot(&mut self, slot: usize) -> Result<()> {
        Model::reset_slot(self, slot)
    }

    fn truncate_slot(&mut self, slot: usize, keep: usize) -> Result<bool> {
        Model::truncate_slot(self, slot, keep)
    }
}
