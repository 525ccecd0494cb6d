//! Qwen3 GGUF files (`general.architecture = qwen3`).
//!
//! This is our own implementation on the shared pre-norm [`Decoder`], adapted from candle's
//! `quantized_qwen3` (same tensors, same arithmetic; a test checks equal logits against it,
//! in F32 and Q8_0), so that every projection goes through the linear-layer seam and so through
//! our own quantized kernels (`crate::kernels`), with q/k/v and gate/up each read as one fused
//! matrix where the kernels handle their type ([`GgufWeights::fused_linear`]). Qwen3 is
//! llama.cpp's Qwen2 block without the q/k/v biases and with a per-head RMSNorm on queries
//! and keys (`attn_q_norm`, `attn_k_norm`) before RoPE, which rotates the halves of each head
//! (llama.cpp's NEOX ordering). It also drops what candle's model carries and should not:
//!
//! - State. candle's model keeps three caches per layer (a concatenating one for GPUs, an
//!   interleaved one and a raw one preallocated for 4096 positions for its CPU path), and its
//!   CPU decode step writes only the raw one, so a prompt chunk after a decode step attended
//!   without the decoded tokens unless it was fed one token at a time; it ran batch 1 only on
//!   CPU. Here the cache is one [`KvCache`](crate::models::layers::kv_cache::KvCache), the only
//!   mutable state, so any chunk follows any other and a reset empties it.
//! - RoPE. candle tabulates cos and sin in F16 unless the non-standard `general.dtype` key says
//!   F32 (F16 cannot even hold the positions above 2048 exactly), with `context_length` rows
//!   kept four times over. Here the angles are computed in F32 for the positions of each
//!   forward, with the inverse frequencies rounded as candle's file rounds them. The base is
//!   the file's `qwen3.rope.freq_base` (llama.cpp's default 10000 when absent), and linear
//!   scaling (`rope.scaling.factor`) and `rope.scaling.attn_factor` are applied as llama.cpp
//!   applies them.
//! - Memory. The token embeddings stay quantized (rows dequantized on lookup) instead of a
//!   dequantized F32 copy of the table; a tied head shares that one tensor.
//!
//! Still refused, with the reason: YaRN scaling (`qwen3.rope.scaling.type = yarn`, the
//! 128k-context configuration), which this implementation does not compute. llama.cpp's
//! Qwen3 has no sliding-window attention, and neither has this (a `sliding_window` key is
//! ignored, as llama.cpp ignores it).

use crate::error::Result;
use crate::models::adapter::Loaded;
use crate::models::gguf::{GgufFile, RopeSettings};
use crate::models::layers::attention::Attention;
use crate::models::layers::decoder::{Decoder, DecoderLayer, GgufDecoderConfig};
use crate::models::layers::gguf_weights::{GgufWeights, NormKind};
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{GgufArchitecture, Names};

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "qwen3";

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sizes, norms and context.
    decoder: GgufDecoderConfig,
    rope: RopeSettings,
}

/// Quantized Qwen3, as registered.
pub struct QuantizedQwen3;

impl GgufArchitecture for QuantizedQwen3 {
    const NAMES: Names = Names::gguf("quantized_qwen3", &[ARCH]);
    type Config = Config;

    fn config(file: &GgufFile) -> Result<Config> {
        // Qwen3's head size is its own setting (128 in every released size), not hidden / heads,
        // so `key_length` is required: llama.cpp's converter always writes it for Qwen3, and
        // deriving it from a file that lost it would only fail later, at a tensor's shape.
        let head_dim = |_| file.key_length(ARCH);
        let decoder = GgufDecoderConfig::from_gguf(file, ARCH, head_dim, NormKind::Rms)?;
        // llama.cpp asserts this architecture's rotation covers the whole head.
        file.rope_whole_head(ARCH, decoder.dims.heads.head_dim)?;
        // The output projection may be tied to the embeddings.
        file.check_vocab(decoder.dims.vocab_size, true)?;
        Ok(Config {
            decoder,
            rope: file.rope_settings(ARCH, 10_000.0)?,
        })
    }

    /// The Llama block with llama.cpp's Qwen3 tensors: per-head q/k RMSNorms, no q/k/v biases.
    fn network(cfg: &Config, w: &mut GgufWeights) -> Result<Loaded<Decoder>> {
        let GgufDecoderConfig { dims, norm, .. } = cfg.decoder;
        let head_dim = dims.heads.head_dim;
        // candle's quantized_qwen3 rounds the frequencies this way; llama.cpp's f32 computation
        // differs from it by an ulp at most.
        let freqs = inv_freq(head_dim, cfg.rope.base, Rounding::F32Inverse);
        let rotary = Rotary::new(freqs, w.device())?.with_settings(&cfg.rope);
        let decoder = Decoder::from_gguf(w, &cfg.decoder, vec![rotary], |w, _, blk| {
            let (q_norm, k_norm) = w.qk_norms(blk, head_dim, norm)?;
            let attention = Attention::from_gguf(w, blk, dims.hidden_size, dims.heads, false)?
                .with_qk_norms(q_norm, k_norm);
            DecoderLayer::swiglu_from_gguf(w, blk, attention, &cfg.decoder)
        })?;
        Ok(decoder.loaded(dims.vocab_size, cfg.decoder.max_context))
    }
}
