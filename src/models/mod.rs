//! The model layer: every architecture behind one trait.
//!
//! Every loaded model implements [`LanguageModel`] (the runtime face: one `forward` signature
//! for all, a `reset_cache` that really resets, and a [`ModelInfo`]) through one generic
//! [`Adapter`]. What differs per architecture is its [`Architecture`] (how it is detected and
//! loaded: config mapping, weights) and its [`Network`] (the forward over a cache), in one
//! module of `arch/`, composed from the shared blocks of [`layers`]. The
//! [`register_architectures!`] list at the bottom of this file (the macro is in `registry.rs`)
//! generates the [`AnyArchitecture`] enum, its dispatch, and the [`ARCHITECTURES`] table that
//! detection walks. [`Model`] (in `runtime.rs`) is what callers hold: the enum, with positions,
//! context, vocabulary and panics checked once for every architecture.
//!
//! # Adding an architecture
//!
//! 1. Write one module, say `src/models/arch/falcon.rs`, with a unit struct `Falcon` that
//!    implements [`Architecture`]: its name, format and detection names, its network type, and
//!    `load` (map config.json with [`hf::HfConfig`], build the network from [`layers`], return
//!    an [`Adapter`]). A GGUF architecture implements [`GgufArchitecture`] instead (its names,
//!    the mapping of the [`gguf::GgufFile`] metadata, and the shared decoder read from its
//!    tensors), which gives it its [`Architecture`].
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
mod registry;
mod runtime;

pub use adapter::{Adapter, BatchItem, GgufArchitecture, Network, SequenceInput};
pub use registry::{architecture, ArchitectureEntry};
pub use runtime::{Model, SequenceChunk};

use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use registry::register_architectures;
use std::path::Path;

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
