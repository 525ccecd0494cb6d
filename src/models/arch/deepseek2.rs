//! DeepSeek-V2 (`DeepseekV2ForCausalLM`, `model_type: deepseek_v2`: DeepSeek-V2, V2-Lite,
//! V2-Chat, DeepSeek-Coder-V2) from a Hugging Face directory.
//!
//! This module runs its own network, adapted from candle-transformers' `deepseek2.rs`: the
//! shared [`Decoder`] with multi-head latent attention ([`LatentAttention`], this module's own
//! attention block), interleaved RoPE on the positional part of each head, and a
//! softmax-routed mixture of experts with shared experts. candle's model gets the
//! group-limited routing of the full DeepSeek-V2 wrong: it picks the top groups from the
//! expert scores instead of the per-group maxima, then selects experts from the group mask
//! rather than from the masked scores. Its config also has private fields, and its loader
//! unwraps `num_experts_per_tok`. Here routing, YaRN and the softmax scale follow
//! transformers:
//!
//! - routing: softmax over the routed experts in F32, top-k (`greedy`) or top-k within the
//!   best `topk_group` of `n_group` groups (`group_limited_greedy`), weights scaled by
//!   `routed_scaling_factor`;
//! - YaRN: frequencies blended between interpolation and extrapolation, cos/sin scaled by the
//!   attention factor, and the softmax scale multiplied by `mscale(factor, mscale_all_dim)^2`.
//!
//! Refused, because implementations disagree on them or candle cannot compute them:
//! `norm_topk_prob: true` (transformers ignores it, DeepSeek's own code renormalises),
//! `moe_layer_freq` other than 1 (transformers ignores it), scoring functions other than
//! softmax, routing methods of later DeepSeek versions, `num_key_value_heads` other than
//! `num_attention_heads`.
//!
//! The KV cache holds the keys and values expanded per head (as candle's model does), trading
//! memory for not re-expanding the latent cache at every step.
//!

use crate::error::{Error, Result};
use crate::models::adapter::Loaded;
use crate::models::hf::{HfConfig, RopeScaling};
use crate::models::layers::attention::{attend, Heads, Positions, SelfAttention};
use crate::models::layers::decoder::{Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::kv_cache::LayerCache;
use crate::models::layers::linear::Linear;
use crate::models::layers::mlp::Mlp;
use crate::models::layers::moe::{Router, Routing, SparseMoe};
use crate::models::layers::norm::Norm;
use crate::models::layers::rotary::{Pairing, Rotary};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_core::{DType, Tensor, D};
use candle_nn::{Activation, VarBuilder};
use serde_json::Value;

/// How routed experts are chosen.
#[derive(Debug, Clone, PartialEq)]
enum TopkMethod {
    Greedy,
    GroupLimited { n_group: usize, topk_group: usize },
}

/// The mixture-of-experts settings.
#[derive(Debug, Clone, PartialEq)]
struct MoeConfig {
    n_routed_experts: usize,
    num_experts_per_tok: usize,
    n_shared_experts: usize,
    moe_intermediate_size: usize,
    routed_scaling_factor: f64,
    topk_method: TopkMethod,
    /// Layers before this one use a dense MLP.
    first_k_dense_replace: usize,
}

/// YaRN or plain RoPE over the `qk_rope_head_dim` positional dimensions.
#[derive(Debug, Clone, PartialEq)]
struct RopeConfig {
    /// One inverse frequency per rotated pair.
    inv_freq: Vec<f64>,
    /// Multiplies cos and sin.
    attention_factor: f64,
    /// Multiplies the softmax scale.
    softmax_scale_factor: f64,
}

/// The DeepSeek-V2 settings llm-pool reads from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary, widths, layers and heads.
    dims: Dims,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    attention_bias: bool,
    activation: Activation,
    rms_norm_eps: f64,
    rope: RopeConfig,
    moe: Option<MoeConfig>,
    tie_word_embeddings: bool,
    max_position_embeddings: usize,
}

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Config> {
    const FAMILY: &str = "deepseek2";
    let activation = match c
        .activation(&["silu", "gelu", "gelu_pytorch_tanh", "gelu_new"], "silu")?
        .as_str()
    {
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluPytorchTanh,
        _ => Activation::Silu,
    };
    c.require_bool("mlp_bias", false, FAMILY)?;
    let num_attention_heads = c.usize("num_attention_heads")?;
    // Every head gets its own key and value out of the shared latent; transformers' grouped
    // path would not even run with fewer key/value heads.
    let kv_heads = c.usize_or("num_key_value_heads", num_attention_heads)?;
    if kv_heads != num_attention_heads {
        return Err(Error::config(
            "num_key_value_heads",
            format!("{kv_heads} is not supported; DeepSeek-V2 needs num_attention_heads ({num_attention_heads})"),
        ));
    }
    let qk_rope_head_dim = c.usize("qk_rope_head_dim")?;
    let qk_nope_head_dim = c.usize("qk_nope_head_dim")?;
    if qk_rope_head_dim == 0 || !qk_rope_head_dim.is_multiple_of(2) {
        return Err(Error::config(
            "qk_rope_head_dim",
            format!("{qk_rope_head_dim} must be even and positive"),
        ));
    }
    let q_head_dim = qk_nope_head_dim + qk_rope_head_dim;
    let heads = Heads::new(num_attention_heads, num_attention_heads, q_head_dim);
    let dims = Dims::from_hf(c, |_| Ok(heads))?;
    let max_position_embeddings = c.usize_or("max_position_embeddings", 2048)?;
    let rope = rope_config(c, qk_rope_head_dim)?;
    let first_k_dense_replace = c.usize_or("first_k_dense_replace", 0)?;
    let moe = if first_k_dense_replace >= dims.num_hidden_layers {
        None
    } else {
        Some(moe_config(c, first_k_dense_replace)?)
    };
    Ok(Config {
        dims,
        q_lora_rank: c.opt_usize("q_lora_rank")?,
        kv_lora_rank: c.usize("kv_lora_rank")?,
        qk_nope_head_dim,
        qk_rope_head_dim,
        v_head_dim: c.usize("v_head_dim")?,
        attention_bias: c.bool_or("attention_bias", false)?,
        activation,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        rope,
        moe,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
        max_position_embeddings,
    })
}

fn moe_config(c: &HfConfig, first_k_dense_replace: usize) -> Result<MoeConfig> {
    const FAMILY: &str = "deepseek2";
    // DeepSeek's own code renormalises the top-k weights when this is set; transformers
    // ignores it. With no agreed meaning, only the common value is accepted.
    c.require_bool("norm_topk_prob", false, FAMILY)?;
    if let Some(freq) = c.opt_usize("moe_layer_freq")? {
        if freq != 1 {
            return Err(Error::config(
                "moe_layer_freq",
                format!("{freq} is not supported; only 1 (every layer after first_k_dense_replace is a MoE layer)"),
            ));
        }
    }
    if let Some(f) = c.opt_str("scoring_func")? {
        if f != "softmax" {
            return Err(Error::config(
                "scoring_func",
                format!("{f:?} is not supported for {FAMILY}; allowed: softmax"),
            ));
        }
    }
    let n_routed_experts = c.usize("n_routed_experts")?;
    let num_experts_per_tok = c.usize("num_experts_per_tok")?;
    if num_experts_per_tok == 0 || num_experts_per_tok > n_routed_experts {
        return Err(Error::config(
            "num_experts_per_tok",
            format!(
                "{num_experts_per_tok} must be between 1 and n_routed_experts ({n_routed_experts})"
            ),
        ));
    }
    let topk_method = match c.opt_str("topk_method")?.unwrap_or("greedy") {
        "greedy" => TopkMethod::Greedy,
        "group_limited_greedy" => {
            let n_group = c.usize("n_group")?;
            let topk_group = c.usize("topk_group")?;
            if n_group == 0 || !n_routed_experts.is_multiple_of(n_group) {
                return Err(Error::config(
                    "n_group",
                    format!("{n_group} must be positive and divide n_routed_experts ({n_routed_experts})"),
                ));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(Error::config(
                    "topk_group",
                    format!("{topk_group} must be between 1 and n_group ({n_group})"),
                ));
            }
            TopkMethod::GroupLimited {
                n_group,
                topk_group,
            }
        }
        other => {
            return Err(Error::config(
                "topk_method",
                format!(
                    "{other:?} is not supported for {FAMILY}; allowed: greedy, group_limited_greedy"
                ),
            ))
        }
    };
    Ok(MoeConfig {
        n_routed_experts,
        num_experts_per_tok,
        n_shared_experts: c.usize("n_shared_experts")?,
        moe_intermediate_size: c.usize("moe_intermediate_size")?,
        routed_scaling_factor: c.f64_or("routed_scaling_factor", 1.0)?,
        topk_method,
        first_k_dense_replace,
    })
}

/// DeepSeek's `mscale`: `0.1 * m * ln(scale) + 1` past a scale of 1.
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// RoPE (default or YaRN) over `dim` dimensions, as transformers computes it for DeepSeek-V2.
fn rope_config(c: &HfConfig, dim: usize) -> Result<RopeConfig> {
    let rope = c.rope(None, 10_000.0)?;
    if rope.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err(Error::config(
            "partial_rotary_factor",
            "is not supported for deepseek2: qk_rope_head_dim is the rotated part",
        ));
    }
    let base = rope.theta;
    let pos_freqs: Vec<f64> = (0..dim)
        .step_by(2)
        .map(|i| base.powf(i as f64 / dim as f64))
        .collect();
    let params = match &rope.scaling {
        RopeScaling::None => {
            return Ok(RopeConfig {
                inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(),
                attention_factor: 1.0,
                softmax_scale_factor: 1.0,
            })
        }
        RopeScaling::Other { rope_type, params } if rope_type == "yarn" => params,
        _ => return Err(c.unsupported_rope(&rope, "deepseek2", &["default", "yarn"])),
    };
    let field = |key: &str| rope.scaling.param(key);
    let required = |key: &str| -> Result<f64> {
        field(key)?.ok_or_else(|| {
            Error::config(
                format!("rope_scaling.{key}"),
                "is required (a number) for rope_type \"yarn\"",
            )
        })
    };
    let factor = required("factor")?;
    let original = required("original_max_position_embeddings")?;
    if factor <= 0.0 || original < 1.0 {
        return Err(Error::config(
            "rope_scaling",
            format!(
                "factor {factor} and original_max_position_embeddings {original} must be positive"
            ),
        ));
    }
    // transformers treats 0 / absent as "not given" for these (Python truthiness).
    let beta_fast = field("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
    let beta_slow = field("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
    let mscale = field("mscale")?.filter(|&m| m != 0.0);
    let mscale_all_dim = field("mscale_all_dim")?.filter(|&m| m != 0.0);
    let truncate = match params.get("truncate") {
        None | Some(Value::Null) => true,
        Some(v) => v.as_bool().ok_or_else(|| {
            Error::config(
                "rope_scaling.truncate",
                format!("must be true or false, found {v}"),
            )
        })?,
    };
    let attention_factor = match (field("attention_factor")?, mscale, mscale_all_dim) {
        (Some(a), _, _) => a,
        (None, Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
        (None, _, _) => yarn_mscale(factor, 1.0),
    };
    let correction_dim = |rotations: f64| {
        dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001;
    }
    let inv_freq = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            (1.0 / (factor * p)) * (1.0 - extrapolation) + (1.0 / p) * extrapolation
        })
        .collect();
    let softmax_scale_factor = match mscale_all_dim {
        Some(all) => yarn_mscale(factor, all).powi(2),
        None => 1.0,
    };
    Ok(RopeConfig {
        inv_freq,
        attention_factor,
        softmax_scale_factor,
    })
}

/// DeepSeek-V2, as registered.
pub struct DeepSeek2;

impl Architecture for DeepSeek2 {
    const NAMES: Names = Names::hf("deepseek2", &["deepseek_v2"], &["DeepseekV2ForCausalLM"]);
    type Network = Decoder<LatentAttention>;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, network)
    }
}

/// The query projection: plain, or low-rank with a norm (`q_lora_rank`).
#[derive(Debug, Clone)]
enum QProj {
    Plain(Linear),
    Lora { a: Linear, norm: Norm, b: Linear },
}

/// Multi-head latent attention: keys and values come out of one compressed latent per token,
/// plus a positional key part shared by all heads. The KV cache holds the keys and values
/// expanded per head (as candle's model does), trading memory for not re-expanding the latent
/// cache at every step.
#[derive(Debug, Clone)]
pub struct LatentAttention {
    q: QProj,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: Norm,
    kv_b_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    softmax_scale: f64,
}

impl LatentAttention {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, nh, bias) = (
            cfg.dims.hidden_size,
            cfg.dims.heads.num_heads,
            cfg.attention_bias,
        );
        let q_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim;
        let (rank, eps) = (cfg.kv_lora_rank, cfg.rms_norm_eps);
        let q = match cfg.q_lora_rank {
            Some(q_rank) => QProj::Lora {
                a: Linear::load(vb.pp("q_a_proj"), h, q_rank, bias)?,
                norm: Norm::rms(q_rank, eps, vb.pp("q_a_layernorm"))?,
                b: Linear::load(vb.pp("q_b_proj"), q_rank, nh * q_head_dim, false)?,
            },
            None => QProj::Plain(Linear::load(vb.pp("q_proj"), h, nh * q_head_dim, false)?),
        };
        let kv_b = nh * (cfg.qk_nope_head_dim + cfg.v_head_dim);
        Ok(Self {
            q,
            kv_a_proj_with_mqa: Linear::load(
                vb.pp("kv_a_proj_with_mqa"),
                h,
                rank + cfg.qk_rope_head_dim,
                bias,
            )?,
            kv_a_layernorm: Norm::rms(rank, eps, vb.pp("kv_a_layernorm"))?,
            kv_b_proj: Linear::load(vb.pp("kv_b_proj"), rank, kv_b, false)?,
            o_proj: Linear::load(vb.pp("o_proj"), nh * cfg.v_head_dim, h, bias)?,
            num_heads: nh,
            kv_lora_rank: rank,
            qk_nope_head_dim: cfg.qk_nope_head_dim,
            qk_rope_head_dim: cfg.qk_rope_head_dim,
            v_head_dim: cfg.v_head_dim,
            softmax_scale: cfg.rope.softmax_scale_factor / (q_head_dim as f64).sqrt(),
        })
    }
}

impl SelfAttention for LatentAttention {
    /// The cache holds full per-head keys (no-RoPE part and the shared RoPE part) and values,
    /// as transformers' DeepSeek-V2 caches them.
    fn kv_values_per_token(&self) -> usize {
        self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
    }

    fn forward(&self, xs: &Tensor, at: &Positions, cache: &mut LayerCache) -> Result<Tensor> {
        let (b, seq_len, _) = xs.dims3()?;
        let (nope, rope, nh) = (self.qk_nope_head_dim, self.qk_rope_head_dim, self.num_heads);
        let q = match &self.q {
            QProj::Plain(l) => xs.apply(l)?,
            QProj::Lora { a, norm, b } => xs.apply(a)?.apply(norm)?.apply(b)?,
        };
        let q = q.reshape((b, seq_len, nh, nope + rope))?.transpose(1, 2)?;
        let q_nope = q.narrow(D::Minus1, 0, nope)?;
        let q_pe = q.narrow(D::Minus1, nope, rope)?.contiguous()?;

        let compressed = xs.apply(&self.kv_a_proj_with_mqa)?;
        let kv_latent = compressed
            .narrow(D::Minus1, 0, self.kv_lora_rank)?
            .apply(&self.kv_a_layernorm)?;
        let k_pe = compressed
            .narrow(D::Minus1, self.kv_lora_rank, rope)?
            .reshape((b, seq_len, 1, rope))?
            .transpose(1, 2)?
            .contiguous()?;
        // DeepSeek rotates interleaved pairs (complex multiplication in transformers).
        let (q_pe, k_pe) = (at.rotate(&q_pe)?, at.rotate(&k_pe)?);

        let kv = kv_latent
            .apply(&self.kv_b_proj)?
            .reshape((b, seq_len, nh, nope + self.v_head_dim))?
            .transpose(1, 2)?;
        let k_nope = kv.narrow(D::Minus1, 0, nope)?;
        let v = kv.narrow(D::Minus1, nope, self.v_head_dim)?.contiguous()?;
        let q = Tensor::cat(&[&q_nope, &q_pe], D::Minus1)?;
        let k = Tensor::cat(&[&k_nope, &k_pe.repeat((1, nh, 1, 1))?], D::Minus1)?;

        let (k, v) = cache.append(k, v)?;
        Ok(attend(&q, k, v, self.softmax_scale, None, at.mask)?
            .transpose(1, 2)?
            .reshape((b, seq_len, ()))?
            .apply(&self.o_proj)?)
    }
}

/// Routed experts plus shared experts, routed in F32 as transformers does.
fn moe(cfg: &Config, moe: &MoeConfig, vb: VarBuilder) -> Result<SparseMoe> {
    let (h, i, act) = (
        cfg.dims.hidden_size,
        moe.moe_intermediate_size,
        cfg.activation,
    );
    let experts = (0..moe.n_routed_experts)
        .map(|e| Mlp::load_gated(&vb.pp("experts").pp(e), h, i, act))
        .collect::<Result<Vec<_>>>()?;
    let shared = match moe.n_shared_experts {
        0 => None,
        n => Some(Mlp::load_gated(&vb.pp("shared_experts"), h, i * n, act)?),
    };
    // The router weights stay F32 whatever the model dtype, as transformers keeps them.
    let gate = vb
        .pp("gate")
        .set_dtype(DType::F32)
        .get((moe.n_routed_experts, h), "weight")?;
    Ok(SparseMoe {
        router: Router {
            gate: Linear::dense(gate, None),
            f32_input: true,
        },
        experts,
        shared,
        routing: routing(moe),
        weight_dtype: Some(DType::F32),
    })
}

/// The routing a config asks for: no renormalisation, weights scaled.
fn routing(moe: &MoeConfig) -> Routing {
    Routing {
        top_k: moe.num_experts_per_tok,
        groups: match moe.topk_method {
            TopkMethod::Greedy => None,
            TopkMethod::GroupLimited {
                n_group,
                topk_group,
            } => Some((n_group, topk_group)),
        },
        renormalize: false,
        scale: moe.routed_scaling_factor,
    }
}

/// The decoder with DeepSeek-V2's weights: latent attention, dense MLPs in the first
/// `first_k_dense_replace` layers, mixtures of experts after.
fn network(cfg: &Config, vb: VarBuilder) -> Result<Loaded<Decoder<LatentAttention>>> {
    let h = cfg.dims.hidden_size;
    let norm = |vb: VarBuilder| Norm::rms(h, cfg.rms_norm_eps, vb);
    let layer = |i: usize, vb: VarBuilder| {
        let mlp = vb.pp("mlp");
        let ffn = match &cfg.moe {
            Some(m) if i >= m.first_k_dense_replace => {
                FeedForward::Moe(Box::new(moe(cfg, m, mlp)?))
            }
            _ => FeedForward::Mlp(Mlp::load_gated(
                &mlp,
                h,
                cfg.dims.intermediate_size,
                cfg.activation,
            )?),
        };
        let attention = LatentAttention::load(cfg, vb.pp("self_attn"))?;
        DecoderLayer::load_pre_norm(&vb, attention, ffn, norm)
    };
    let inv_freq: Vec<f32> = cfg.rope.inv_freq.iter().map(|&f| f as f32).collect();
    let rotary = Rotary::new(inv_freq, vb.device())?
        .with_attention_factor(cfg.rope.attention_factor)
        .with_pairing(Pairing::Interleaved);
    let tied = cfg.tie_word_embeddings;
    let decoder = Decoder::load_hf(&vb, (&cfg.dims, tied), layer, norm, vec![rotary])?;
    Ok(decoder.loaded(cfg.dims.vocab_size, cfg.max_position_embeddings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::common::chunked_prefill_diff;
    use crate::models::hf::mapping_error;
    use crate::models::hf::real_config;

    #[test]
    fn deepseek_v2_lite_maps() {
        let c = config_from_hf(&real_config("deepseek2-DeepSeek-V2-Lite.json")).unwrap();
        assert_eq!(
            (
                c.dims.hidden_size,
                c.dims.num_hidden_layers,
                c.dims.heads.num_heads
            ),
            (2048, 27, 16)
        );
        assert_eq!(c.q_lora_rank, None);
        assert_eq!(
            (
                c.kv_lora_rank,
                c.qk_nope_head_dim,
                c.qk_rope_head_dim,
                c.v_head_dim
            ),
            (512, 128, 64, 128)
        );
        assert_eq!(c.max_position_embeddings, 163840);
        let moe = c.moe.clone().unwrap();
        assert_eq!(
            (
                moe.n_routed_experts,
                moe.num_experts_per_tok,
                moe.n_shared_experts
            ),
            (64, 6, 2)
        );
        assert_eq!(
            (moe.moe_intermediate_size, moe.first_k_dense_replace),
            (1408, 1)
        );
        assert_eq!(moe.topk_method, TopkMethod::Greedy);
        // YaRN with mscale == mscale_all_dim: no cos/sin scaling, softmax scale grows.
        assert_eq!(c.rope.inv_freq.len(), 32);
        assert!((c.rope.attention_factor - 1.0).abs() < 1e-12);
        let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((c.rope.softmax_scale_factor - m * m).abs() < 1e-12);
    }

    #[test]
    fn deepseek_v2_maps_group_limited_routing() {
        let c = config_from_hf(&real_config("deepseek2-DeepSeek-V2.json")).unwrap();
        assert_eq!(c.q_lora_rank, Some(1536));
        let moe = c.moe.unwrap();
        assert_eq!(moe.n_routed_experts, 160);
        assert_eq!(moe.routed_scaling_factor, 16.0);
        assert_eq!(
            moe.topk_method,
            TopkMethod::GroupLimited {
                n_group: 8,
                topk_group: 3
            }
        );
    }

    #[test]
    fn norm_topk_prob_is_refused() {
        let mut v = real_config("deepseek2-DeepSeek-V2-Lite.json")
            .value()
            .clone();
        v["norm_topk_prob"] = true.into();
        let err = mapping_error(config_from_hf, v);
        assert!(err.contains("norm_topk_prob"), "{err}");
    }

    #[test]
    fn group_limited_routing_picks_from_the_best_groups() {
        let moe = routing(&MoeConfig {
            n_routed_experts: 4,
            num_experts_per_tok: 2,
            n_shared_experts: 0,
            moe_intermediate_size: 1,
            routed_scaling_factor: 2.0,
            topk_method: TopkMethod::GroupLimited {
                n_group: 2,
                topk_group: 1,
            },
            first_k_dense_replace: 0,
        });
        // Group 1 (experts 2, 3) holds the best expert, so both picks come from it even though
        // expert 0 beats expert 3.
        let routed = moe.route(&[0.3, 0.05, 0.4, 0.25]);
        assert_eq!(routed, vec![(2, 0.8), (3, 0.5)]);
    }

    #[test]
    fn a_chunk_after_a_non_empty_cache_equals_one_prefill() {
        let ids = [1, 5, 9, 23, 42, 7, 100, 3, 77, 12];
        let diff = chunked_prefill_diff("deepseek2", &ids, &[4]);
        assert!(diff <= 1e-5, "chunked prefill differs by {diff}");
    }
}
