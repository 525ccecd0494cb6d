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
use crate::models::layers::decoder::{Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::gguf_weights::GgufWeights;
use crate::models::layers::mlp::Mlp;
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_core::Device;
use candle_nn::Activation;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "qwen2";
/// The longest context run here. Qwen2 and Qwen2.5 declare 32k (131k only with YaRN scaling,
/// which is refused).
pub const MAX_CONTEXT: usize = 131_072;

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Vocabulary, widths, layers and heads.
    dims: Dims,
    eps: f64,
    rope_base: f64,
    max_context: usize,
}

/// Maps the GGUF metadata to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_gguf(file: &GgufFile) -> Result<Config> {
    let dims = Dims::from_gguf(file, ARCH, |heads| file.rope_head_dim(ARCH, heads))?;
    file.count("qwen2.context_length")?;
    file.rope_scaling(ARCH, &["none"])?;
    Ok(Config {
        dims,
        eps: file.positive("qwen2.attention.layer_norm_rms_epsilon", None)?,
        // llama.cpp's default too when the key is absent.
        rope_base: file.positive("qwen2.rope.freq_base", Some(10_000.0))?,
        max_context: file.context_length(ARCH, MAX_CONTEXT)?,
    })
}

/// Quantized Qwen2, as registered.
pub struct QuantizedQwen2;

/// The pre-norm decoder with llama.cpp's Qwen2 tensors: biases on q, k and v, SwiGLU.
fn network(mut file: GgufFile, cfg: &Config, device: &Device) -> Result<Loaded<Decoder>> {
    let (dims, eps) = (cfg.dims, cfg.eps);
    let h = dims.hidden_size;
    let mut w = GgufWeights::new(&mut file, device);
    let (embed, output) = w.embeddings_and_head(dims.vocab_size, h)?;
    let norm = w.rms_norm("output_norm.weight", h, eps)?;
    let mut layers = Vec::with_capacity(dims.num_hidden_layers);
    for i in 0..dims.num_hidden_layers {
        let prefix = format!("blk.{i}");
        let attention = Attention::from_gguf(&mut w, &prefix, h, dims.heads, true)?;
        let mlp = Mlp::gated_from_gguf(
            &mut w,
            &prefix,
            (h, dims.intermediate_size),
            Activation::Silu,
        )?;
        layers.push(DecoderLayer::pre_norm_from_gguf(
            &mut w,
            &prefix,
            (attention, FeedForward::Mlp(mlp)),
            h,
            eps,
        )?);
    }
    let rotary = Rotary::new(
        inv_freq(dims.heads.head_dim, cfg.rope_base, Rounding::F32),
        device,
    )?;
    let decoder = Decoder::new(embed, layers, norm, output, vec![rotary]);
    Ok(decoder.loaded(dims.vocab_size, cfg.max_context))
}

impl Architecture for QuantizedQwen2 {
    const NAMES: Names = Names::gguf("quantized_qwen2", &[ARCH]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_gguf(source, options, |file| config_from_gguf(file), network)
    }
}
