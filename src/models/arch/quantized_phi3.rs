//! Phi-3 GGUF files (`general.architecture = phi3`: Phi-3, Phi-3.5-mini, Phi-4-mini).
//!
//! This is our own implementation on the shared pre-norm [`Decoder`], adapted from candle's
//! `quantized_phi3` (same tensors, same arithmetic; a test checks equal logits against it, in
//! F32 and Q8_0), so that every projection goes through the linear-layer seam and so through
//! our own quantized kernels (`crate::kernels`). llama.cpp writes Phi-3's projections already
//! fused: `attn_qkv` is `[q | k | v]` ([`Attention::fused`]) and `ffn_up` is `[gate | up]`
//! ([`Mlp::FusedGated`], SwiGLU), each one matrix for the kernels as it is in the file; files
//! with separate `attn_q`/`attn_k`/`attn_v`, which llama.cpp also reads, are fused at load
//! where the kernels handle their type. RoPE rotates halves (llama.cpp's NEOX ordering) of the
//! first `phi3.rope.dimension_count` dimensions of each head. What candle's model got wrong
//! or could not do, and this does:
//!
//! - RoPE. candle hard-coded the base to 10000 and rotated the whole head, so files with
//!   another `phi3.rope.freq_base` or a partial rotation (Phi-4-mini rotates 3/4 of each
//!   head) were refused; here both are read, as is linear scaling (`rope.scaling.factor`).
//!   The angles are computed per forward for the positions at hand, with the frequencies
//!   rounded as candle and llama.cpp round them (f32), instead of a table of
//!   `context_length` rows.
//! - LongRoPE. The 128k Phi-3/3.5/4-mini files carry `rope_factors_short.weight` and
//!   `rope_factors_long.weight` (one divisor per rotated pair) and `rope.scaling.attn_factor`.
//!   llama.cpp divides the frequencies by the short factors when its context is at most
//!   `phi3.rope.scaling.original_context_length` (4096) and by the long ones otherwise, for
//!   every position, and multiplies cos and sin by the attention factor either way. Here the
//!   short factors and the attention factor are applied and the context is limited to the
//!   original length: exactly what llama.cpp computes there. The long-factor regime is not
//!   offered (its logits depend on the context llama.cpp was started with, not on the
//!   sequence), as the Hugging Face Phi-3 module limits its LongRoPE context the same way.
//! - State and memory. candle's model kept a causal mask per prompt length and preallocated a
//!   `context_length` KV buffer per layer on its first forward, and had to be reset by
//!   swapping in a pristine clone. Here the cache is the only mutable state and grows with the
//!   sequence, so a reset empties it; the token embeddings stay quantized (rows dequantized on
//!   lookup), and a file without `output.weight` ties the head to them, as llama.cpp does.
//!
//! llama.cpp disables Phi-3's sliding window (`phi3.attention.sliding_window`, 2047 in
//! Phi-3-mini-4k), and so does this: results match llama.cpp's, not a windowed reference,
//! past the window.

use crate::error::Result;
use crate::models::adapter::Loaded;
use crate::models::gguf::{GgufFile, RopeSettings};
use crate::models::layers::attention::Attention;
use crate::models::layers::decoder::{Decoder, DecoderLayer, FeedForward, GgufDecoderConfig};
use crate::models::layers::gguf_weights::{GgufWeights, NormKind};
use crate::models::layers::mlp::Mlp;
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{GgufArchitecture, Names};
use candle_nn::Activation;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "phi3";
/// LongRoPE's per-pair divisors for contexts up to the original length.
const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";
/// LongRoPE's per-pair divisors for longer contexts (not used; see the module docs).
const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sizes, norms and context (with LongRoPE, at most the original context).
    decoder: GgufDecoderConfig,
    /// Dimensions of each head that RoPE rotates.
    rope_dim: usize,
    rope: RopeSettings,
    /// Whether the frequencies are divided by LongRoPE's short factors.
    short_factors: bool,
}

/// Quantized Phi-3, as registered.
pub struct QuantizedPhi3;

impl GgufArchitecture for QuantizedPhi3 {
    const NAMES: Names = Names::gguf("quantized_phi3", &[ARCH]);
    type Config = Config;

    fn config(file: &GgufFile) -> Result<Config> {
        let head_dim = |heads| file.derived_head_dim(ARCH, heads);
        let mut decoder = GgufDecoderConfig::from_gguf(file, ARCH, head_dim, NormKind::Rms)?;
        // The output projection may be tied to the embeddings.
        file.check_vocab(decoder.dims.vocab_size, true)?;
        let tensors = &file.content.tensor_infos;
        let longrope =
            tensors.contains_key(ROPE_FACTORS_SHORT) || tensors.contains_key(ROPE_FACTORS_LONG);
        if longrope {
            // llama.cpp's default for the original length is the trained context.
            let key = "phi3.rope.scaling.original_context_length";
            if file.get(key).is_some() {
                decoder.max_context = decoder.max_context.min(file.count(key)?);
            }
        }
        Ok(Config {
            rope_dim: file.rope_dimension_count(ARCH, decoder.dims.heads.head_dim)?,
            rope: file.rope_settings(ARCH, 10_000.0)?,
            short_factors: tensors.contains_key(ROPE_FACTORS_SHORT),
            decoder,
        })
    }

    /// The pre-norm decoder with llama.cpp's Phi-3 tensors: fused q/k/v, fused gate/up (SwiGLU),
    /// partial NEOX RoPE.
    fn network(cfg: &Config, w: &mut GgufWeights) -> Result<Loaded<Decoder>> {
        let dims = cfg.decoder.dims;
        let (h, ff) = (dims.hidden_size, dims.intermediate_size);
        let rotary = rotary(w, cfg)?;
        let decoder = Decoder::from_gguf(w, &cfg.decoder, vec![rotary], |w, _, blk| {
            let attention = Attention::from_gguf_any_layout(w, blk, h, dims.heads, (false, false))?;
            let mut linear = |name: &str, shape| w.linear(&format!("{blk}.{name}.weight"), shape);
            let mlp = Mlp::FusedGated {
                gate_up: linear("ffn_up", [2 * ff, h])?,
                down: linear("ffn_down", [h, ff])?,
                act: Activation::Silu,
                intermediate: ff,
            };
            let parts = (attention, FeedForward::Mlp(mlp));
            DecoderLayer::pre_norm_from_gguf(w, blk, parts, &cfg.decoder)
        })?;
        Ok(decoder.loaded(dims.vocab_size, cfg.decoder.max_context))
    }
}

/// NEOX RoPE over the first `rope_dim` dimensions, with the file's base, linear scaling and
/// attention factor, the frequencies divided by LongRoPE's short factors when there are any.
fn rotary(w: &mut GgufWeights, cfg: &Config) -> Result<Rotary> {
    let mut freqs = inv_freq(cfg.rope_dim, cfg.rope.base, Rounding::F32);
    if cfg.short_factors {
        w.divide_frequencies(&mut freqs, ROPE_FACTORS_SHORT)?;
    }
    Ok(Rotary::new(freqs, w.device())?.with_settings(&cfg.rope))
}
