//! Mixtral (sparse mixture of experts) from a Hugging Face directory.
//!
//! The network is the shared pre-norm [`Decoder`] with a mixture of experts as its
//! feed-forward part, not candle-transformers' `mixtral.rs`, because candle's model cannot be
//! used as it is:
//!
//! - its `Config` has only `pub(crate)` fields and requires `sliding_window` as a number and
//!   `use_flash_attn`, so real configs (Mixtral-8x7B has `sliding_window: null`, none has
//!   `use_flash_attn`) do not load and cannot be built by hand;
//! - it has no way to clear its KV cache;
//! - its sliding-window mask lets a query see `sliding_window + 1` keys instead of
//!   `sliding_window`, and never masks cached keys (a single-token decode gets no mask), so it
//!   diverges from transformers once a sequence is longer than the window;
//! - it ignores `head_dim` and runs the router softmax in the model dtype (transformers runs it
//!   in F32).
//!
//! Here the config is read through [`HfConfig`] into [`Config`], the mask is transformers'
//! (window counted with the query itself, cached keys included), and RoPE angles and router
//! probabilities are computed in F32. Each token goes through its top `k` experts, weighted by
//! the router's softmax probabilities renormalised over those `k`.

use crate::error::{Error, Result};
use crate::models::adapter::Loaded;
use crate::models::hf::HfConfig;
use crate::models::layers::attention::Attention;
use crate::models::layers::decoder::{Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::linear::Linear;
use crate::models::layers::mlp::Mlp;
use crate::models::layers::moe::{Router, Routing, SparseMoe};
use crate::models::layers::norm::Norm;
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_nn::{Activation, VarBuilder};

/// Mixtral, as registered.
pub struct Mixtral;

/// The settings of a Mixtral checkpoint, read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary, widths, layers and heads.
    pub dims: Dims,
    /// The longest sequence.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// The attention window of every layer, or `None` for full attention.
    pub sliding_window: Option<usize>,
    /// Experts per layer.
    pub num_local_experts: usize,
    /// Experts each token is routed to.
    pub num_experts_per_tok: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Config> {
    let dims = Dims::from_hf_derived(c, (Some(32), Some(8)))?;
    c.activation(&["silu"], "silu")?;
    let num_local_experts = c.usize_or("num_local_experts", 8)?;
    let num_experts_per_tok = c.usize_or("num_experts_per_tok", 2)?;
    if num_experts_per_tok == 0 || num_experts_per_tok > num_local_experts {
        return Err(Error::config(
            "num_experts_per_tok",
            format!(
                "{num_experts_per_tok} must be between 1 and num_local_experts {num_local_experts}"
            ),
        ));
    }
    Ok(Config {
        dims,
        // transformers' MixtralConfig default.
        max_position_embeddings: c.usize_or("max_position_embeddings", 4096 * 32)?,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-5)?,
        rope_theta: c.plain_rope(None, 1_000_000.0, "mixtral")?,
        sliding_window: c.sliding_window(None)?,
        num_local_experts,
        num_experts_per_tok,
        tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
    })
}

impl Architecture for Mixtral {
    const NAMES: Names = Names::hf("mixtral", &["mixtral"], &["MixtralForCausalLM"]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, network)
    }
}

/// The pre-norm decoder with Mixtral's weights: no biases, a mixture of experts per layer.
fn network(cfg: &Config, vb: VarBuilder) -> Result<Loaded<Decoder>> {
    let (dims, h) = (cfg.dims, cfg.dims.hidden_size);
    let norm = |vb: VarBuilder| Norm::rms(h, cfg.rms_norm_eps, vb);
    let layer = |_: usize, vb: VarBuilder| {
        let attention =
            Attention::load(&vb.pp("self_attn"), h, dims.heads, (false, false), "o_proj")?;
        let moe = FeedForward::Moe(Box::new(experts(cfg, vb.pp("block_sparse_moe"))?));
        let layer = DecoderLayer::load_pre_norm(&vb, attention, moe, norm)?;
        Ok(layer.with_window(cfg.sliding_window))
    };
    let inv_freq = inv_freq(dims.heads.head_dim, cfg.rope_theta, Rounding::F32Inverse);
    let rotaries = vec![Rotary::new(inv_freq, vb.device())?];
    let decoder = Decoder::load_hf(&vb, (&dims, cfg.tie_word_embeddings), layer, norm, rotaries)?;
    Ok(decoder.loaded(dims.vocab_size, cfg.max_position_embeddings))
}

/// The routed MLP: `gate` routes, each expert is a SwiGLU MLP (`w1` gate, `w3` up, `w2` down).
fn experts(cfg: &Config, vb: VarBuilder) -> Result<SparseMoe> {
    let (h, i) = (cfg.dims.hidden_size, cfg.dims.intermediate_size);
    let experts = (0..cfg.num_local_experts)
        .map(|e| {
            let vb = vb.pp("experts").pp(e);
            Mlp::load_gated_named(&vb, ["w1", "w3", "w2"], h, i, Activation::Silu)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SparseMoe {
        // The router in the model dtype, its softmax in F32, as transformers computes it.
        router: Router {
            gate: Linear::load(vb.pp("gate"), h, cfg.num_local_experts, false)?,
            f32_input: false,
        },
        experts,
        shared: None,
        routing: Routing {
            top_k: cfg.num_experts_per_tok,
            groups: None,
            renormalize: true,
            scale: 1.0,
        },
        // Expert outputs are weighted in the activations' dtype.
        weight_dtype: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::hf::both_layouts;
    use crate::models::hf::fixture_config as hf;
    use crate::models::hf::mapping_error;

    #[test]
    fn real_configs_map() {
        let cfg = config_from_hf(&hf("real_configs/mixtral-Mixtral-8x7B-v0.1.json")).unwrap();
        assert_eq!(cfg.dims.hidden_size, 4096);
        assert_eq!(cfg.dims.heads.num_heads, 32);
        assert_eq!(cfg.dims.heads.num_kv_heads, 8);
        assert_eq!(cfg.dims.heads.head_dim, 128);
        assert_eq!(cfg.rope_theta, 1_000_000.0);
        // `sliding_window: null`, which candle's own Config cannot even parse.
        assert_eq!(cfg.sliding_window, None);
        assert_eq!((cfg.num_local_experts, cfg.num_experts_per_tok), (8, 2));

        let cfg = config_from_hf(&hf("real_configs/mixtral-Mixtral-8x22B-v0.1.json")).unwrap();
        assert_eq!(cfg.dims.hidden_size, 6144);
        assert_eq!(cfg.dims.heads.num_heads, 48);
        assert_eq!(cfg.dims.num_hidden_layers, 56);
        assert_eq!(cfg.max_position_embeddings, 65536);
        assert_eq!(cfg.rope_theta, 1_000_000.0);
    }

    #[test]
    fn both_fixture_layouts_map_alike() {
        let new = both_layouts("mixtral", config_from_hf);
        assert_eq!(new.sliding_window, Some(6));
        assert_eq!((new.num_local_experts, new.num_experts_per_tok), (4, 2));
    }

    #[test]
    fn too_many_experts_per_token_is_an_error() {
        let mut value = hf("real_configs/mixtral-Mixtral-8x7B-v0.1.json")
            .value()
            .clone();
        value["num_experts_per_tok"] = serde_json::json!(9);
        let err = mapping_error(config_from_hf, value);
        assert!(
            err.contains("num_experts_per_tok") && err.contains('9'),
            "{err}"
        );
    }
}
