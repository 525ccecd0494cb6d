//! Gemma 3 GGUF files (`general.architecture = gemma3`).
//!
//! This is our own implementation, adapted from candle's `quantized_gemma3` (same tensors and
//! block structure; a unit test checks equal logits against it wherever candle is right): the
//! shared [`Decoder`] with Gemma's sandwich norms, read from the GGUF tensors, because
//! candle's model cannot serve the real files:
//!
//! - Memory. Every layer builds its own RoPE table for 131072 positions, 128 MiB per layer at
//!   head size 256 (2.3 GiB for the 18 layers of Gemma-3-270M, a 250 MB file), and the token
//!   embeddings are dequantized to F32 (640 MiB for 262144 x 640) next to the quantized copy
//!   the tied output projection reads: it peaks at 3.4 GiB resident generating with that file,
//!   this implementation at 380 MiB. Here there are two RoPE variants, one per distinct
//!   (base, scaling): local for the sliding layers, global for the others, shared by all
//!   layers of their kind and computed for the positions of each forward (no table at all).
//!   The embeddings stay quantized and rows are dequantized on lookup, as llama.cpp does; the
//!   tied output projection shares that tensor.
//! - Sliding window. candle masks nothing in a single-token decode step, so once the cache is
//!   longer than the window its sliding layers attend to everything; its prefill mask lets a
//!   query see `window + 1` keys where Gemma (HF and llama.cpp) sees `window` (itself
//!   included); and a multi-token forward after a cached prefix fails outright (it
//!   concatenates a u32 mask with an F32 one). Here a sliding layer's cache keeps only the last
//!   `window - 1` positions, which is exactly what the next token may see, so decode needs no
//!   mask; prefill chunks get a mask built from absolute positions.
//! - Activation. candle's MLP uses SiLU; Gemma 3 uses GELU with the tanh approximation
//!   (HF `gelu_pytorch_tanh`, llama.cpp `LLM_FFN_GELU`; candle issue #3745).
//! - RoPE scaling. The global layers of Gemma 3 4B and larger use linear scaling
//!   (`gemma3.rope.scaling.factor`, 8), which candle ignores and llama.cpp applies.
//! - Attention scale. llama.cpp (following gemma_pytorch) scales the 27B model's queries by
//!   `1/sqrt(embedding_length / head_count)` instead of `1/sqrt(head size)`; so does this.
//!
//! The sliding pattern is llama.cpp's: every 6th layer (5, 11, ...) is global. candle's
//! `gemma3.attention.sliding_window_type` key, which llama.cpp does not write, is honoured
//! when present.
//!
//! Checked on the real Gemma-3-270M Q4_K_M file against Hugging Face transformers' Gemma3
//! (weights dequantized to F32): with `CANDLE_DEQUANTIZE_ALL=1` the logits agree within 3e-5,
//! for a 5-token prompt and a 701-token one (past the 512-token window), in prefill and in
//! decode, and 20 greedy tokens are identical.
//!
//! The RoPE frequencies are computed in f32 and linear scaling multiplies the positions, as
//! candle's file and llama.cpp do.

use crate::error::Result;
use crate::models::adapter::Loaded;
use crate::models::gguf::GgufFile;
use crate::models::layers::attention::{Attention, Heads};
use crate::models::layers::decoder::{
    Block, Decoder, DecoderLayer, Dims, FeedForward, GgufDecoderConfig,
};
use crate::models::layers::gguf_weights::{GgufWeights, NormKind};
use crate::models::layers::mlp::Mlp;
use crate::models::layers::rotary::{inv_freq, Rotary, Rounding};
use crate::models::{GgufArchitecture, Names};
use candle_nn::Activation;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "gemma3";
/// llama.cpp's sliding-window pattern for Gemma 3: layer `i` is global when `(i + 1) % 6 == 0`.
const DEFAULT_SLIDING_PATTERN: usize = 6;
/// llama.cpp's RoPE base for the sliding layers (the file's `rope.freq_base` is the global one).
const DEFAULT_LOCAL_ROPE_BASE: f64 = 10_000.0;
/// llama.cpp's default global RoPE base when the file has none.
const DEFAULT_GLOBAL_ROPE_BASE: f64 = 1_000_000.0;
/// The layer count by which llama.cpp recognises Gemma 3 27B (see the module docs).
const LAYERS_27B: usize = 62;

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sizes, norms and context.
    decoder: GgufDecoderConfig,
    /// Keys a sliding layer's query sees, itself included.
    window: usize,
    /// Layer `i` is global when `(i + 1) % pattern == 0`.
    pattern: usize,
    local_rope_base: f64,
    global_rope_base: f64,
    /// Position multiplier of the global layers (1 / linear scaling factor).
    global_rope_scale: f64,
    attn_scale: f64,
    /// The MLP's activation: GELU with the tanh approximation.
    act: Activation,
}

impl Config {
    fn is_sliding(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.pattern)
    }
}

/// Quantized Gemma 3, as registered.
pub struct QuantizedGemma3;

impl GgufArchitecture for QuantizedGemma3 {
    const NAMES: Names = Names::gguf("quantized_gemma3", &[ARCH]);
    type Config = Config;

    fn config(file: &GgufFile) -> Result<Config> {
        let head_dim = |_| file.key_length(ARCH);
        let decoder = GgufDecoderConfig::from_gguf(file, ARCH, head_dim, NormKind::Rms)?;
        let Dims {
            hidden_size: hidden,
            num_hidden_layers: layers,
            heads:
                Heads {
                    num_heads: heads,
                    head_dim,
                    ..
                },
            ..
        } = decoder.dims;
        let pattern = match file.opt_u64("gemma3.attention.sliding_window_type")? {
            None => DEFAULT_SLIDING_PATTERN,
            Some(0) => {
                return Err(
                    file.config_error("gemma3.attention.sliding_window_type", "must be at least 1")
                )
            }
            Some(n) => n as usize,
        };
        file.rope_scaling(ARCH, &["none", "linear"])?;
        let global_rope_scale = 1.0 / file.positive("gemma3.rope.scaling.factor", Some(1.0))?;
        let attn_scale = if layers == LAYERS_27B {
            1.0 / ((hidden / heads) as f64).sqrt()
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        Ok(Config {
            decoder,
            window: file.count("gemma3.attention.sliding_window")?,
            pattern,
            local_rope_base: file
                .positive("gemma3.rope.local_freq_base", Some(DEFAULT_LOCAL_ROPE_BASE))?,
            global_rope_base: file
                .positive("gemma3.rope.freq_base", Some(DEFAULT_GLOBAL_ROPE_BASE))?,
            global_rope_scale,
            attn_scale,
            act: Activation::GeluPytorchTanh,
        })
    }

    /// The Gemma decoder with llama.cpp's Gemma 3 tensors (whose norms already hold
    /// `1 + weight`): sandwich norms, q/k norms, scaled embeddings, local and global RoPE. Every
    /// Gemma 3 ties its embeddings: the one quantized tensor serves the lookup and the head.
    fn network(cfg: &Config, w: &mut GgufWeights) -> Result<Loaded<Decoder>> {
        let GgufDecoderConfig { dims, norm, .. } = cfg.decoder;
        let (h, hd) = (dims.hidden_size, dims.heads.head_dim);
        // Two RoPE variants shared by all layers: 0 local (sliding layers), 1 global.
        let rotaries = vec![
            Rotary::new(inv_freq(hd, cfg.local_rope_base, Rounding::F32), w.device())?,
            Rotary::new(
                inv_freq(hd, cfg.global_rope_base, Rounding::F32),
                w.device(),
            )?
            .with_position_scale(cfg.global_rope_scale),
        ];
        let decoder = Decoder::from_gguf(w, &cfg.decoder, rotaries, |w, i, blk| {
            let (q_norm, k_norm) = w.qk_norms(blk, hd, norm)?;
            let mut norm_of = |name: &str| w.norm(norm, &format!("{blk}.{name}"), h);
            let block = Block::Sequential {
                attn_norm: norm_of("attn_norm")?,
                post_attn_norm: Some(norm_of("post_attention_norm")?),
                ffn_norm: norm_of("ffn_norm")?,
                post_ffn_norm: Some(norm_of("post_ffw_norm")?),
            };
            let attention = Attention::from_gguf(w, blk, h, dims.heads, false)?
                .with_qk_norms(q_norm, k_norm)
                .with_scale(cfg.attn_scale);
            let mlp = Mlp::gated_from_gguf(w, blk, (h, dims.intermediate_size), cfg.act)?;
            let sliding = cfg.is_sliding(i);
            Ok(DecoderLayer {
                attention,
                ffn: FeedForward::Mlp(mlp),
                block,
                window: sliding.then_some(cfg.window),
                rotary: if sliding { 0 } else { 1 },
            })
        })?;
        Ok(decoder
            .with_embed_scale((h as f64).sqrt())
            .loaded(dims.vocab_size, cfg.decoder.max_context))
    }
}

/// The tiny GGUF writers of the integration tests, shared so both test the same files.
#[cfg(test)]
#[path = "../../../tests/common/mod.rs"]
mod fixtures;

#[cfg(test)]
mod tests {
    use super::fixtures;
    use super::*;
    use crate::models::{Adapter, Architecture, LanguageModel, LoadOptions, ModelSource};
    use candle_core::quantized::gguf_file::Value;
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_gemma3 as candle_gemma3;

    fn tiny(dir: &std::path::Path) -> std::path::PathBuf {
        fixtures::tiny_gguf(QuantizedGemma3::NAME, dir).unwrap()
    }

    fn open(path: &std::path::Path, overrides: &[(&str, Value)]) -> GgufFile {
        let mut file = GgufFile::open(path).unwrap();
        for (k, v) in overrides {
            file.content.metadata.insert(k.to_string(), v.clone());
        }
        file
    }

    fn load(path: &std::path::Path, overrides: &[(&str, Value)]) -> Adapter<QuantizedGemma3> {
        load_with(path, overrides, |_| {})
    }

    /// Loads with the config edited after it was read from the file.
    fn load_with(
        path: &std::path::Path,
        overrides: &[(&str, Value)],
        edit: impl FnOnce(&mut Config),
    ) -> Adapter<QuantizedGemma3> {
        let file = open(path, overrides);
        let config = |file: &GgufFile| {
            let mut cfg = QuantizedGemma3::config(file)?;
            edit(&mut cfg);
            Ok(cfg)
        };
        let source = ModelSource::Gguf(file);
        let options = LoadOptions::cpu();
        Adapter::load_gguf(source, &options, config, QuantizedGemma3::network).unwrap()
    }

    fn ids(ids: &[u32]) -> Tensor {
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    }

    fn logits(model: &mut Adapter<QuantizedGemma3>, tokens: &[u32], position: usize) -> Vec<f32> {
        let out = model.forward(&ids(tokens), position).unwrap();
        out.squeeze(0).unwrap().to_vec1().unwrap()
    }

    fn candle_logits(
        model: &mut candle_gemma3::ModelWeights,
        tokens: &[u32],
        position: usize,
    ) -> Vec<f32> {
        let out = model.forward(&ids(tokens), position).unwrap();
        out.squeeze(0).unwrap().to_vec1().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The rewrite computes what candle's `quantized_gemma3` computes, where candle is right:
    /// with a window longer than the sequence (candle's decode ignores the window and its
    /// prefill window is one key wider) and with candle's SiLU activation switched in. This
    /// covers the weights, norms, both RoPE tables, embedding scale, GQA and attention scale.
    #[test]
    fn matches_candle_quantized_gemma3() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny(dir.path());
        let wide = [("gemma3.attention.sliding_window", Value::U32(64))];
        let mut ours = load_with(&path, &wide, |cfg| cfg.act = Activation::Silu);
        let mut file = open(&path, &wide);
        let mut theirs =
            candle_gemma3::ModelWeights::from_gguf(file.content, &mut file.reader, &Device::Cpu)
                .unwrap();
        let prompt = [2u32, 14, 15, 92, 65, 35, 8];
        let a = logits(&mut ours, &prompt, 0);
        let b = candle_logits(&mut theirs, &prompt, 0);
        let diff = max_diff(&a, &b);
        assert!(diff <= 1e-4, "prefill: max abs diff {diff}");
        for (position, token) in (prompt.len()..).zip([40u32, 41, 3]) {
            let a = logits(&mut ours, &[token], position);
            let b = candle_logits(&mut theirs, &[token], position);
            let diff = max_diff(&a, &b);
            assert!(diff <= 1e-4, "decode at {position}: max abs diff {diff}");
        }
    }

    /// The tiny fixture has the real layout: 5 sliding layers, then a global one.
    #[test]
    fn every_sixth_layer_is_global() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny(dir.path());
        let model = load(&path, &[]);
        let layers = model.network().layers();
        let windows: Vec<Option<usize>> = layers.iter().map(|l| l.window).collect();
        let w = QuantizedGemma3::config(&open(&path, &[])).unwrap().window;
        assert_eq!(windows, [Some(w), Some(w), Some(w), Some(w), Some(w), None]);
        // Sliding layers share one RoPE, global layers another: no per-layer copies (and no
        // table: the angles are computed per forward).
        assert_eq!(layers[0].rotary, layers[4].rotary);
        assert_ne!(layers[0].rotary, layers[5].rotary);
    }

    /// With only sliding layers (window 2), the last position sees `layers` tokens back at
    /// most, so the tokens before that cannot change its logits, in prefill or in decode.
    #[test]
    fn sliding_layers_do_not_see_past_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny(dir.path());
        let all_sliding = [
            ("gemma3.attention.sliding_window", Value::U32(2)),
            ("gemma3.attention.sliding_window_type", Value::U32(1000)),
        ];
        let a = [2u32, 14, 15, 92, 65, 35, 8, 40, 41];
        let mut b = a;
        b[0] = 50;
        b[1] = 51;
        let mut model = load(&path, &all_sliding);
        let la = logits(&mut model, &a, 0);
        model.reset_cache().unwrap();
        let lb = logits(&mut model, &b, 0);
        assert!(max_diff(&la, &lb) <= 1e-6, "prefill saw past the window");
        model.reset_cache().unwrap();
        let mut lb_steps = Vec::new();
        for (i, &t) in b.iter().enumerate() {
            lb_steps = logits(&mut model, &[t], i);
        }
        assert!(
            max_diff(&la, &lb_steps) <= 1e-4,
            "decode saw past the window"
        );
        // The default layout has a global layer, which does see the first tokens.
        let mut model = load(&path, &[]);
        let la = logits(&mut model, &a, 0);
        model.reset_cache().unwrap();
        let lb = logits(&mut model, &b, 0);
        assert!(max_diff(&la, &lb) > 1e-4);
    }

    /// A prompt chunk on top of a cache longer than the window (where candle fails).
    #[test]
    fn a_chunk_after_the_window_matches_one_prefill() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny(dir.path());
        let tokens = [2u32, 14, 15, 92, 65, 35, 8, 40, 41, 42, 43];
        let mut model = load(&path, &[]);
        logits(&mut model, &tokens[..6], 0);
        logits(&mut model, &tokens[6..7], 6);
        let chunked = logits(&mut model, &tokens[7..], 7);
        model.reset_cache().unwrap();
        let whole = logits(&mut model, &tokens, 0);
        let diff = max_diff(&chunked, &whole);
        assert!(diff <= 1e-4, "chunked differs by {diff}");
    }
}
