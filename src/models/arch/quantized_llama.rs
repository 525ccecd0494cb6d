//! Llama-family GGUF files (`general.architecture = llama`), including the Mistral and
//! Mixtral files that llama.cpp writes under `llama`.
//!
//! This is our own implementation on the shared [`Decoder`], adapted from candle's
//! `quantized_llama` (same tensors, same arithmetic; a test checks equal logits against it),
//! so that every projection goes through the linear-layer seam and so through our own
//! quantized kernels (`crate::kernels`): SmolLM2's Q4_1 layers are the reason. It also drops
//! what candle's model carries and should not:
//!
//! - RoPE. candle tabulates cos and sin for 4096 positions at load, so a file that declares a
//!   longer context was capped at 4096; here the angles are computed per forward, for the
//!   declared context. llama.cpp writes these models' Q and K weights permuted for RoPE over
//!   interleaved pairs, so the pairs rotated are `(2i, 2i + 1)` (llama.cpp's `LLAMA_ROPE_TYPE_NORM`).
//!   Llama 3.1's scaling comes as the `rope_freqs.weight` tensor of per-pair divisors, which
//!   llama.cpp applies and candle ignored; so does linear scaling (`rope.scaling.type`).
//! - Memory. The token embeddings stay quantized (rows dequantized on lookup) instead of a
//!   dequantized F32 copy of the table; a tied head shares that one tensor.
//! - State. The cache is the only mutable state, so a reset empties it; candle's model kept a
//!   mask per prompt length and had to be swapped for a pristine clone.
//!
//! Mixtral files with one tensor per expert (`ffn_gate.{e}.weight`, as candle reads them) run
//! through the shared mixture of experts; files that stack the experts in one 3-D tensor
//! (`ffn_gate_exps.weight`) are refused at load with that reason.
//!
//! Q/K/V and gate/up are each read as one fused matrix when our kernels handle their type
//! ([`GgufWeights::fused_linear`]): one activation quantization and one parallel dispatch
//! instead of three or two, with the same products.

use crate::error::{Error, Result};
use crate::models::adapter::Loaded;
use crate::models::gguf::{GgufFile, RopeSettings};
use crate::models::layers::attention::{Attention, Heads};
use crate::models::layers::decoder::{Decoder, DecoderLayer, FeedForward, GgufDecoderConfig};
use crate::models::layers::gguf_weights::{GgufWeights, NormKind};
use crate::models::layers::mlp::Mlp;
use crate::models::layers::moe::{Router, Routing, SparseMoe};
use crate::models::layers::rotary::{inv_freq, Pairing, Rotary, Rounding};
use crate::models::{GgufArchitecture, Names};
use candle_nn::Activation;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "llama";
/// The per-pair RoPE divisors of Llama 3.1-style scaling, as llama.cpp's converter writes them.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The mixture of experts of a Mixtral file: how many experts, and how many each token uses.
#[derive(Debug, Clone, Copy)]
struct Experts {
    count: usize,
    used: usize,
}

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sizes, norms and context.
    decoder: GgufDecoderConfig,
    /// Base, linear scaling (ignored when the type says `none`, as llama.cpp does) and
    /// attention factor.
    rope: RopeSettings,
    experts: Option<Experts>,
}

/// Quantized Llama, as registered.
pub struct QuantizedLlama;

impl GgufArchitecture for QuantizedLlama {
    const NAMES: Names = Names::gguf("quantized_llama", &[ARCH]);
    type Config = Config;

    fn config(file: &GgufFile) -> Result<Config> {
        let head_dim = |heads| file.rope_head_dim(ARCH, heads);
        let decoder = GgufDecoderConfig::from_gguf(file, ARCH, head_dim, NormKind::Rms)?;
        // llama.cpp rotates whole heads for this architecture; a file that says otherwise is
        // corrupt (or a partial rotation nothing here implements).
        file.rope_whole_head(ARCH, decoder.dims.heads.head_dim)?;
        let experts = match file.opt_u64("llama.expert_count")? {
            None | Some(0) | Some(1) => None,
            Some(_) => {
                let count = file.count("llama.expert_count")?;
                let used = file.count("llama.expert_used_count")?;
                if used > count {
                    return Err(file.config_error(
                        "llama.expert_used_count",
                        format!("is {used}, more than llama.expert_count ({count})"),
                    ));
                }
                Some(Experts { count, used })
            }
        };
        Ok(Config {
            decoder,
            // llama.cpp's default base too when the key is absent.
            rope: file.rope_settings(ARCH, 10_000.0)?,
            experts,
        })
    }

    /// The pre-norm decoder with llama.cpp's Llama tensors: SwiGLU (or Mixtral's experts),
    /// interleaved RoPE.
    fn network(cfg: &Config, w: &mut GgufWeights) -> Result<Loaded<Decoder>> {
        let dims = cfg.decoder.dims;
        let rotary = rotary(w, cfg, dims.heads)?;
        let decoder = Decoder::from_gguf(w, &cfg.decoder, vec![rotary], |w, _, blk| {
            let attention = Attention::from_gguf(w, blk, dims.hidden_size, dims.heads, false)?;
            match cfg.experts {
                None => DecoderLayer::swiglu_from_gguf(w, blk, attention, &cfg.decoder),
                Some(experts) => {
                    let moe = FeedForward::Moe(Box::new(mixture(w, blk, cfg, experts)?));
                    DecoderLayer::pre_norm_from_gguf(w, blk, (attention, moe), &cfg.decoder)
                }
            }
        })?;
        Ok(decoder.loaded(dims.vocab_size, cfg.decoder.max_context))
    }
}

/// Interleaved RoPE with the file's base, its linear scaling and attention factor, and Llama
/// 3.1's per-pair divisors when the file has them.
fn rotary(w: &mut GgufWeights, cfg: &Config, heads: Heads) -> Result<Rotary> {
    let mut freqs = inv_freq(heads.head_dim, cfg.rope.base, Rounding::F32);
    if w.has(ROPE_FREQS) {
        w.divide_frequencies(&mut freqs, ROPE_FREQS)?;
    }
    Ok(Rotary::new(freqs, w.device())?
        .with_pairing(Pairing::Interleaved)
        .with_settings(&cfg.rope))
}

/// Mixtral's experts, one tensor each, routed as Mixtral routes: softmax, top-k, weights
/// renormalised over the chosen experts.
fn mixture(w: &mut GgufWeights, prefix: &str, cfg: &Config, experts: Experts) -> Result<SparseMoe> {
    let dims = cfg.decoder.dims;
    let (h, ff) = (dims.hidden_size, dims.intermediate_size);
    let stacked = format!("{prefix}.ffn_gate_exps.weight");
    if w.has(&stacked) {
        return Err(Error::model_file(
            &w.file().path,
            format!(
                "tensor {stacked} stacks the experts in one 3-D tensor, which is not supported \
                 (supported: one tensor per expert, {prefix}.ffn_gate.0.weight ...)"
            ),
        ));
    }
    let gate = w.linear(&format!("{prefix}.ffn_gate_inp.weight"), [experts.count, h])?;
    let experts_mlp = (0..experts.count)
        .map(|e| {
            let mut linear =
                |name: &str, shape| w.linear(&format!("{prefix}.{name}.{e}.weight"), shape);
            Ok(Mlp::Gated {
                gate: linear("ffn_gate", [ff, h])?,
                up: linear("ffn_up", [ff, h])?,
                down: linear("ffn_down", [h, ff])?,
                act: Activation::Silu,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SparseMoe {
        router: Router {
            gate,
            f32_input: false,
        },
        experts: experts_mlp,
        shared: None,
        routing: Routing {
            top_k: experts.used,
            groups: None,
            renormalize: true,
            scale: 1.0,
        },
        weight_dtype: None,
    })
}
