//! Phi-2 GGUF files (`general.architecture = phi2`).
//!
//! This is our own implementation on the shared [`Decoder`] with Phi's parallel block
//! (attention and MLP read the same LayerNorm output and are added to the residual together),
//! adapted from candle's `quantized_phi` (same tensors, same arithmetic; a test checks equal
//! logits against it, in F32 and Q8_0), so that every projection goes through the linear-layer
//! seam and so through our own quantized kernels (`crate::kernels`). Biases everywhere
//! (LayerNorms, q/k/v, output, MLP, head), GELU (tanh form, llama.cpp's `ggml_gelu`), and RoPE
//! over the halves (llama.cpp's NEOX ordering) of the first `phi2.rope.dimension_count`
//! dimensions of each head (partial rotary: 32 of Phi-2's 80). What candle's model could not
//! do, and this does:
//!
//! - Layouts. candle read only the fused `attn_qkv` projection and split it as
//!   `(3, heads, head_size)`, so it had no grouped-query attention and refused the separate
//!   `attn_q`/`attn_k`/`attn_v` tensors that newer llama.cpp conversions write. Both layouts
//!   run here, with any `head_count_kv` dividing `head_count`; separate q/k/v are fused at
//!   load where our kernels handle their type ([`GgufWeights::fused_linear`]).
//! - RoPE. candle tabulated cos and sin for 4096 positions with the base hard-coded to 10000;
//!   here the angles are computed per forward for the positions at hand (no cap but the
//!   declared context), from the file's `phi2.rope.freq_base` (llama.cpp's default 10000 when
//!   absent, as in every Phi-2 conversion) and its linear scaling, if any.
//! - State and memory. candle's model kept a causal mask per prompt length and had to be reset
//!   by swapping in a pristine clone; here the KV cache is the only mutable state, so a reset
//!   empties it. The token embeddings stay quantized (rows dequantized on lookup) instead of a
//!   dequantized F32 copy of the table.
//!
//! Still refused, with the reason: RoPE scaling other than linear (YaRN).

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
const ARCH: &str = "phi2";

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sizes, norms (LayerNorms) and context.
    decoder: GgufDecoderConfig,
    /// Dimensions of each head that RoPE rotates.
    rope_dim: usize,
    rope: RopeSettings,
}

/// Quantized Phi-2, as registered.
pub struct QuantizedPhi2;

impl GgufArchitecture for QuantizedPhi2 {
    const NAMES: Names = Names::gguf("quantized_phi2", &[ARCH]);
    type Config = Config;

    fn config(file: &GgufFile) -> Result<Config> {
        let head_dim = |heads| file.derived_head_dim(ARCH, heads);
        let decoder = GgufDecoderConfig::from_gguf(file, ARCH, head_dim, NormKind::Layer)?;
        // llama.cpp's Phi-2 always has its own output projection (with a bias).
        file.check_vocab(decoder.dims.vocab_size, false)?;
        Ok(Config {
            rope_dim: file.rope_dimension_count(ARCH, decoder.dims.heads.head_dim)?,
            rope: file.rope_settings(ARCH, 10_000.0)?,
            decoder,
        })
    }

    /// The decoder with llama.cpp's Phi-2 tensors: parallel blocks over one LayerNorm, biases
    /// everywhere, a GELU MLP, partial NEOX RoPE.
    fn network(cfg: &Config, w: &mut GgufWeights) -> Result<Loaded<Decoder>> {
        let GgufDecoderConfig { dims, norm, .. } = cfg.decoder;
        let (h, ff) = (dims.hidden_size, dims.intermediate_size);
        let freqs = inv_freq(cfg.rope_dim, cfg.rope.base, Rounding::F32);
        let rotary = Rotary::new(freqs, w.device())?.with_settings(&cfg.rope);
        let decoder = Decoder::from_gguf(w, &cfg.decoder, vec![rotary], |w, _, blk| {
            let attention = Attention::from_gguf_any_layout(w, blk, h, dims.heads, (true, true))?;
            let mut linear = |name: &str, (rows, cols): (usize, usize)| -> Result<_> {
                let weight = w.linear(&format!("{blk}.{name}.weight"), [rows, cols])?;
                Ok(weight.with_bias(w.vector(&format!("{blk}.{name}.bias"), rows)?))
            };
            let mlp = FeedForward::Mlp(Mlp::Plain {
                fc1: linear("ffn_up", (ff, h))?,
                fc2: linear("ffn_down", (h, ff))?,
                act: Activation::NewGelu,
            });
            let input_norm = w.norm(norm, &format!("{blk}.attn_norm"), h)?;
            Ok(DecoderLayer::parallel(attention, mlp, input_norm))
        })?;
        let head_bias = w.vector("output.bias", dims.vocab_size)?;
        Ok(decoder
            .with_head_bias(head_bias)
            .loaded(dims.vocab_size, cfg.decoder.max_context))
    }
}
