//! StarCoder2 from a Hugging Face directory.
//!
//! The network is the shared pre-norm [`Decoder`] (LayerNorm, biases, a plain GELU MLP), not
//! candle-transformers' `starcoder2.rs`, because candle's model cannot be used as it is:
//!
//! - its `Config` has only private fields and needs `rope_theta` at the top level, so a
//!   transformers >= 5 config (`rope_parameters`) does not load;
//! - every StarCoder2 checkpoint has a sliding window (4096) and candle's mask lets a query see
//!   `sliding_window + 1` keys instead of `sliding_window`, and never masks cached keys (a
//!   single-token decode gets no mask), so it diverges from transformers past the window;
//! - it builds the RoPE tables in the model dtype, so under BF16 the positions themselves are
//!   rounded (every position above 256 is off);
//! - it ignores `head_dim` and `tie_word_embeddings` (it always ties).
//!
//! Here the config is read through [`HfConfig`] into [`Config`], the mask is transformers'
//! (window counted with the query itself, cached keys included), and the RoPE angles are
//! computed in F32.

use crate::error::Result;
use crate::models::adapter::Loaded;
use crate::models::hf::HfConfig;
use crate::models::layers::attention::Attention;
use crate::models::layers::decoder::{Decoder, DecoderLayer, Dims, FeedForward};
use crate::models::layers::linear::Linear;
use crate::models::layers::mlp::Mlp;
use crate::models::layers::norm::Norm;
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_nn::{Activation, VarBuilder};

/// StarCoder2, as registered.
pub struct Starcoder2;

/// The settings of a StarCoder2 checkpoint, read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary, widths, layers and heads.
    pub dims: Dims,
    /// The MLP activation.
    pub hidden_act: Activation,
    /// The longest sequence.
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    pub norm_epsilon: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Whether every linear layer has a bias.
    pub use_bias: bool,
    /// The attention window of every layer, or `None` for full attention.
    pub sliding_window: Option<usize>,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// Maps config.json to [`Config`], refusing what this implementation cannot compute.
pub fn config_from_hf(c: &HfConfig) -> Result<Config> {
    Ok(Config {
        dims: Dims::from_hf_derived(c, (None, Some(2)))?,
        hidden_act: c.activation_fn(
            &["gelu_pytorch_tanh", "gelu_new", "gelu"],
            "gelu_pytorch_tanh",
        )?,
        max_position_embeddings: c.usize_or("max_position_embeddings", 4096)?,
        norm_epsilon: c.f64_or("norm_epsilon", 1e-5)?,
        rope_theta: c.plain_rope(None, 10_000.0, "starcoder2")?,
        use_bias: c.bool_or("use_bias", true)?,
        sliding_window: c.sliding_window(None)?,
        // transformers' Starcoder2Config default: tied.
        tie_word_embeddings: c.bool_or("tie_word_embeddings", true)?,
    })
}

impl Architecture for Starcoder2 {
    const NAMES: Names = Names::hf("starcoder2", &["starcoder2"], &["Starcoder2ForCausalLM"]);
    type Network = Decoder;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_hf(source, options, config_from_hf, network)
    }
}

/// The pre-norm decoder with StarCoder2's weights.
fn network(cfg: &Config, vb: VarBuilder) -> Result<Loaded<Decoder>> {
    let Dims {
        hidden_size: h,
        intermediate_size: i,
        heads,
        ..
    } = cfg.dims;
    // StarCoder2 uses LayerNorm with a bias (not RMSNorm), whatever `use_bias` says.
    let norm = |vb: VarBuilder| Norm::layer(h, cfg.norm_epsilon, vb);
    let bias = cfg.use_bias;
    let layer = |_: usize, vb: VarBuilder| {
        let attention = Attention::load(&vb.pp("self_attn"), h, heads, (bias, bias), "o_proj")?;
        let mlp = FeedForward::Mlp(Mlp::Plain {
            fc1: Linear::load(vb.pp("mlp.c_fc"), h, i, bias)?,
            fc2: Linear::load(vb.pp("mlp.c_proj"), i, h, bias)?,
            act: cfg.hidden_act,
        });
        let layer = DecoderLayer::load_pre_norm(&vb, attention, mlp, norm)?;
        Ok(layer.with_window(cfg.sliding_window))
    };
    let rotary = Rotary::new(
        inv_freq(heads.head_dim, cfg.rope_theta, Rounding::F32Inverse),
        vb.device(),
    )?;
    let head = (&cfg.dims, cfg.tie_word_embeddings);
    let decoder = Decoder::load_hf(&vb, head, layer, norm, vec![rotary])?;
    Ok(decoder.loaded(cfg.dims.vocab_size, cfg.max_position_embeddings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::hf::both_layouts;
    use crate::models::hf::fixture_config as hf;

    #[test]
    fn real_configs_map() {
        let cfg = config_from_hf(&hf("real_configs/starcoder2-starcoder2-3b.json")).unwrap();
        assert_eq!(cfg.dims.hidden_size, 3072);
        assert_eq!(cfg.dims.heads.num_heads, 24);
        assert_eq!(cfg.dims.heads.num_kv_heads, 2);
        assert_eq!(cfg.dims.heads.head_dim, 128);
        // serde_json's default float parsing may be one ulp off the literal.
        assert!((cfg.rope_theta - 999_999.442_035_881_3).abs() < 1e-6);
        assert_eq!(cfg.sliding_window, Some(4096));
        assert_eq!(cfg.max_position_embeddings, 16384);
        assert_eq!(cfg.hidden_act, Activation::GeluPytorchTanh);
        assert!(cfg.use_bias);
        // No tie_word_embeddings key: transformers ties.
        assert!(cfg.tie_word_embeddings);

        let cfg = config_from_hf(&hf("real_configs/starcoder2-starcoder2-15b.json")).unwrap();
        assert_eq!(cfg.dims.hidden_size, 6144);
        assert_eq!(cfg.dims.heads.num_heads, 48);
        assert_eq!(cfg.dims.heads.num_kv_heads, 4);
        assert_eq!(cfg.rope_theta, 100_000.0);
        assert_eq!(cfg.sliding_window, Some(4096));
    }

    #[test]
    fn both_fixture_layouts_map_alike() {
        let new = both_layouts("starcoder2", config_from_hf);
        assert_eq!(new.sliding_window, Some(6));
    }
}
