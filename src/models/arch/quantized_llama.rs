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
use crate::models::layers::decoder::{Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::gguf_weights::GgufWeights;
use crate::models::layers::mlp::Mlp;
use crate::models::layers::moe::{Router, Routing, SparseMoe};
use crate::models::layers::rotary::{inv_freq, Pairing, Rotary, Rounding};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_core::Device;
use candle_nn::Activation;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "llama";
/// The longest context run here (Llama 3.1 declares 131072).
pub const MAX_CONTEXT: usize = 131_072;
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
    /// Vocabulary, widths, layers and heads.
    dims: Dims,
    eps: f64,
    /// Base, linear scaling (ignored when the type says `none`, as llama.cpp does) and
    /// attention factor.
    rope: RopeSettings,
    experts: Option<Experts>,
    max_context: usize,
}

/// Maps the GGUF metadata to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_gguf(file: &GgufFile) -> Result<Config> {
    let dims = Dims::from_gguf(file, ARCH, |heads| file.rope_head_dim(ARCH, heads))?;
    // llama.cpp rotates whole heads for this architecture; a file that says otherwise is
    // corrupt (or a partial rotation nothing here implements).
    let key = "llama.rope.dimension_count";
    if let Some(rope_dim) = file.opt_u64(key)? {
        let head_dim = dims.heads.head_dim;
        if rope_dim != head_dim as u64 {
            return Err(file.config_error(
                key,
                format!(
                    "is {rope_dim}, but the head size (embedding_length / head_count) is {head_dim}"
                ),
            ));
        }
    }
    file.count("llama.context_length")?;
    // llama.cpp's default base too when the key is absent.
    let rope = file.rope_settings(ARCH, 10_000.0)?;
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
        dims,
        eps: file.positive("llama.attention.layer_norm_rms_epsilon", None)?,
        rope,
        experts,
        max_context: file.context_length(ARCH, MAX_CONTEXT)?,
    })
}

/// Quantized Llama, as registered.
pub struct QuantizedLlama;

impl Architecture for QuantizedLlama {
    const NAMES: Names = Names::gguf("quantized_llama", &[ARCH]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_gguf(source, options, |file| config_from_gguf(file), network)
    }
}

/// The pre-norm decoder with llama.cpp's Llama tensors: SwiGLU (or Mixtral's experts),
/// interleaved RoPE.
fn network(mut file: GgufFile, cfg: &Config, device: &Device) -> Result<Loaded<Decoder>> {
    let (dims, eps) = (cfg.dims, cfg.eps);
    let (h, ff) = (dims.hidden_size, dims.intermediate_size);
    let mut w = GgufWeights::new(&mut file, device);
    let rotary = rotary(&mut w, cfg, dims.heads, device)?;
    let (embed, output) = w.embeddings_and_head(dims.vocab_size, h)?;
    let norm = w.rms_norm("output_norm.weight", h, eps)?;
    let mut layers = Vec::with_capacity(dims.num_hidden_layers);
    for i in 0..dims.num_hidden_layers {
        let prefix = format!("blk.{i}");
        let attention = Attention::from_gguf(&mut w, &prefix, h, dims.heads, false)?;
        let ffn = match cfg.experts {
            None => FeedForward::Mlp(Mlp::gated_from_gguf(
                &mut w,
                &prefix,
                (h, ff),
                Activation::Silu,
            )?),
            Some(experts) => FeedForward::Moe(Box::new(mixture(&mut w, &prefix, cfg, experts)?)),
        };
        layers.push(DecoderLayer::pre_norm_from_gguf(
            &mut w,
            &prefix,
            (attention, ffn),
            h,
            eps,
        )?);
    }
    let decoder = Decoder::new(embed, layers, norm, output, vec![rotary]);
    Ok(decoder.loaded(dims.vocab_size, cfg.max_context))
}

/// Interleaved RoPE with the file's base, its linear scaling and attention factor, and Llama
/// 3.1's per-pair divisors when the file has them.
fn rotary(w: &mut GgufWeights, cfg: &Config, heads: Heads, device: &Device) -> Result<Rotary> {
    let mut freqs = inv_freq(heads.head_dim, cfg.rope.base, Rounding::F32);
    if w.file().content.tensor_infos.contains_key(ROPE_FREQS) {
        let divisors = w.vector(ROPE_FREQS, freqs.len())?.to_vec1::<f32>()?;
        if let Some(bad) = divisors.iter().find(|d| !(d.is_finite() && **d > 0.0)) {
            return Err(Error::model_file(
                &w.file().path,
                format!("{ROPE_FREQS} holds {bad}; RoPE divisors must be positive"),
            ));
        }
        for (f, d) in freqs.iter_mut().zip(divisors) {
            *f /= d;
        }
    }
    Ok(Rotary::new(freqs, device)?
        .with_pairing(Pairing::Interleaved)
        .with_position_scale(cfg.rope.position_scale)
        .with_attention_factor(cfg.rope.attention_factor))
}

/// Mixtral's experts, one tensor each, routed as Mixtral routes: softmax, top-k, weights
/// renormalised over the chosen experts.
fn mixture(w: &mut GgufWeights, prefix: &str, cfg: &Config, experts: Experts) -> Result<SparseMoe> {
    let (h, ff) = (cfg.dims.hidden_size, cfg.dims.intermediate_size);
    let stacked = format!("{prefix}.ffn_gate_exps.weight");
    if w.file().content.tensor_infos.contains_key(&stacked) {
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
