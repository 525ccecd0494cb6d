//! Qwen2 and Qwen2.5 GGUF files (`general.architecture = qwen2`).
//!
//! This is our own implementation, adapted from candle's `quantized_qwen2` (same tensors, same
//! arithmetic; `qwen2_matches_candle` in `tests/quantized_gguf.rs` checks equal logits),
//! because candle's model cannot be reset to its freshly loaded state: its `ModelWeights` is
//! not `Clone`, so there is no pristine copy to swap in, and its `clear_kv_cache` drops the KV
//! cache but not the causal-mask cache, which keeps one mask per `(prompt length, cache
//! length)` pair for the life of the model (a single 8k-token prompt leaves 64 MiB behind).
//! Reloading the file on every reset would be the only other complete reset.
//!
//! Here the network is the shared pre-norm [`Decoder`] read from the GGUF tensors: the only
//! mutable state is the per-layer KV cache, held apart from the weights, so the reset empties
//! it and nothing else can linger; masks are built per forward and dropped. The RoPE
//! frequencies are computed in f32 as candle's file does. Two more differences from candle,
//! neither changing the arithmetic: the token embeddings stay quantized (rows are dequantized
//! on lookup, as llama.cpp does) instead of a dequantized F32 copy of the whole table
//! (519 MiB for Qwen2-0.5B's 151936 x 896), and a tied output projection shares that one
//! quantized tensor.

use crate::error::Result;
use crate::models::adapter::Loaded;
use crate::models::gguf::GgufFile;
use crate::models::layers::attention::Attention;
use crate::models::layers::decoder::{Decoder, DecoderLayer, GgufDecoderConfig};
use crate::models::layers::gguf_weights::{GgufWeights, NormKind};
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{GgufArchitecture, Names};

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "qwen2";

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sizes, norms and context.
    decoder: GgufDecoderConfig,
    rope_base: f64,
}

/// Quantized Qwen2, as registered.
pub struct QuantizedQwen2;

impl GgufArchitecture for QuantizedQwen2 {
    const NAMES: Names = Names::gguf("quantized_qwen2", &[ARCH]);
    type Config = Config;

    fn config(file: &GgufFile) -> Result<Config> {
        let head_dim = |heads| file.rope_head_dim(ARCH, heads);
        let decoder = GgufDecoderConfig::from_gguf(file, ARCH, head_dim, NormKind::Rms)?;
        file.rope_scaling(ARCH, &["none"])?;
        Ok(Config {
            decoder,
            // llama.cpp's default too when the key is absent.
            rope_base: file.positive("qwen2.rope.freq_base", Some(10_000.0))?,
        })
    }

    /// The Llama block with llama.cpp's Qwen2 tensors: biases on q, k and v; unscaled RoPE over
    /// the halves of each head.
    fn network(cfg: &Config, w: &mut GgufWeights) -> Result<Loaded<Decoder>> {
        let dims = cfg.decoder.dims;
        let rotary = Rotary::new(
            inv_freq(dims.heads.head_dim, cfg.rope_base, Rounding::F32),
            w.device(),
        )?;
        let decoder = Decoder::from_gguf(w, &cfg.decoder, vec![rotary], |w, _, blk| {
            let attention = Attention::from_gguf(w, blk, dims.hidden_size, dims.heads, true)?;
            DecoderLayer::swiglu_from_gguf(w, blk, attention, &cfg.decoder)
        })?;
        Ok(decoder.loaded(dims.vocab_size, cfg.decoder.max_context))
    }
}
