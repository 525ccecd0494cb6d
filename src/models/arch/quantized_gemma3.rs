//! Gemma 3 GGUF files (`general.architecture = gemma3`).
//!
//! This is our own implementation, adapted from candle's `quantized_gemma3` (same tensors and
//! block structure; a unit test checks equal logits against it wherever candle is right),
//! because candle's model cannot serve the real files:
//!
//! - Memory. Every layer builds its own RoPE table for 131072 positions, 128 MiB per layer at
//!   head size 256 (2.3 GiB for the 18 layers of Gemma-3-270M, a 250 MB file), and the token
//!   embeddings are dequantized to F32 (640 MiB for 262144 x 640) next to the quantized copy
//!   the tied output projection reads: it peaks at 3.4 GiB resident generating with that file,
//!   this implementation at 380 MiB. Here there are two RoPE tables, one per distinct
//!   (base, scaling): local for the sliding layers, global for the others, sized to the
//!   model's context (`gemma3.context_length`, capped at [`MAX_CONTEXT`]) and shared by all
//!   layers (tensor clones share storage). The embeddings stay quantized and rows are
//!   dequantized on lookup, as llama.cpp does; the tied output projection shares that tensor.
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
//! Reset: all mutable state is the per-layer KV cache plus the token count, held apart from the
//! read-only weights and tables, and the reset empties both. There is no mask cache.

use crate::error::{Error, Result};
use crate::models::common::attention_mask;
use crate::models::gguf::GgufFile;
use crate::models::{Adapter, Architecture, LoadOptions, ModelInfo, ModelSource, WeightFormat};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::Activation;
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::repeat_kv;
use std::sync::Arc;

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "gemma3";
/// The longest context run here: Gemma 3 is trained for 128k (the 270M and 1B for 32k).
pub const MAX_CONTEXT: usize = 131_072;
/// llama.cpp's sliding-window pattern for Gemma 3: layer `i` is global when `(i + 1) % 6 == 0`.
const DEFAULT_SLIDING_PATTERN: usize = 6;
/// llama.cpp's RoPE base for the sliding layers (the file's `rope.freq_base` is the global one).
const DEFAULT_LOCAL_ROPE_BASE: f64 = 10_000.0;
/// llama.cpp's default global RoPE base when the file has none.
const DEFAULT_GLOBAL_ROPE_BASE: f64 = 1_000_000.0;
/// The layer count by which llama.cpp recognises Gemma 3 27B (see the module docs).
const LAYERS_27B: usize = 62;

/// An optional positive number, with a default.
fn positive(file: &GgufFile, key: &str, default: f64) -> Result<f64> {
    match file.opt_f64(key)? {
        None => Ok(default),
        Some(v) if v > 0.0 && v.is_finite() => Ok(v),
        Some(v) => Err(file.config_error(key, format!("must be positive, found {v}"))),
    }
}

/// The hyperparameters, all read and checked before any tensor is.
#[derive(Debug, Clone)]
struct Config {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    ffn: usize,
    layers: usize,
    eps: f64,
    /// Keys a sliding layer's query sees, itself included.
    window: usize,
    /// Layer `i` is global when `(i + 1) % pattern == 0`.
    pattern: usize,
    local_rope_base: f64,
    global_rope_base: f64,
    /// Position multiplier of the global layers (1 / linear scaling factor).
    global_rope_scale: f64,
    attn_scale: f64,
    max_context: usize,
    vocab: usize,
}

impl Config {
    fn read(file: &GgufFile) -> Result<Self> {
        let heads = file.count("gemma3.attention.head_count")?;
        let kv_heads = file.count("gemma3.attention.head_count_kv")?;
        let head_dim = file.count("gemma3.attention.key_length")?;
        let hidden = file.count("gemma3.embedding_length")?;
        let ffn = file.count("gemma3.feed_forward_length")?;
        let layers = file.count("gemma3.block_count")?;
        let window = file.count("gemma3.attention.sliding_window")?;
        file.count("gemma3.context_length")?;
        let eps = file
            .opt_f64("gemma3.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| {
                file.config_error("gemma3.attention.layer_norm_rms_epsilon", "is missing")
            })?;
        if heads % kv_heads != 0 {
            return Err(file.config_error(
                "gemma3.attention.head_count_kv",
                format!("{kv_heads} does not divide head_count {heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(file.config_error(
                "gemma3.attention.key_length",
                format!("the head size {head_dim} must be even for RoPE"),
            ));
        }
        if let Some(v) = file.opt_u64("gemma3.attention.value_length")? {
            if v as usize != head_dim {
                return Err(file.config_error(
                    "gemma3.attention.value_length",
                    format!("is {v}, but must equal key_length ({head_dim})"),
                ));
            }
        }
        let pattern = match file.opt_u64("gemma3.attention.sliding_window_type")? {
            None => DEFAULT_SLIDING_PATTERN,
            Some(0) => {
                return Err(
                    file.config_error("gemma3.attention.sliding_window_type", "must be at least 1")
                )
            }
            Some(n) => n as usize,
        };
        let global_rope_scale = match file.get("gemma3.rope.scaling.type") {
            Some(kind)
                if !matches!(kind.to_string().map(String::as_str), Ok("none" | "linear")) =>
            {
                return Err(file.config_error(
                    "gemma3.rope.scaling.type",
                    format!("{kind:?} is not supported (allowed: none, linear)"),
                ))
            }
            _ => 1.0 / positive(file, "gemma3.rope.scaling.factor", 1.0)?,
        };
        let attn_scale = if layers == LAYERS_27B {
            1.0 / ((hidden / heads) as f64).sqrt()
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        Ok(Config {
            heads,
            kv_heads,
            head_dim,
            hidden,
            ffn,
            layers,
            eps,
            window,
            pattern,
            local_rope_base: positive(
                file,
                "gemma3.rope.local_freq_base",
                DEFAULT_LOCAL_ROPE_BASE,
            )?,
            global_rope_base: positive(file, "gemma3.rope.freq_base", DEFAULT_GLOBAL_ROPE_BASE)?,
            global_rope_scale,
            attn_scale,
            max_context: file.context_length(ARCH, MAX_CONTEXT)?,
            vocab: file.vocab_size(ARCH)?,
        })
    }

    fn is_sliding(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.pattern)
    }
}

/// A RoPE table: `(positions, head_dim / 2)` cosines and sines, shared by every layer of one
/// kind.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The same arithmetic as candle's table (F32 inverse frequencies, F32 positions times
    /// frequencies), with the positions scaled for linear RoPE scaling.
    fn new(cfg: &Config, base: f64, scale: f64, device: &Device) -> Result<Self> {
        let base = base as f32;
        let inv_freq: Vec<f32> = (0..cfg.head_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / cfg.head_dim as f32))
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
        let positions = Tensor::arange(0, cfg.max_context as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_context, 1))?;
        let positions = if scale == 1.0 {
            positions
        } else {
            (positions * scale)?
        };
        let angles = positions.matmul(&inv_freq)?;
        Ok(Rope {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    fn apply(&self, x: &Tensor, position: usize) -> Result<Tensor> {
        let l = x.dim(2)?;
        let cos = self.cos.narrow(0, position, l)?;
        let sin = self.sin.narrow(0, position, l)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    /// `Some(window)` for a sliding layer.
    window: Option<usize>,
    rope: Rope,
}

/// Everything read-only: weights and RoPE tables.
#[derive(Debug, Clone)]
pub struct Network {
    embed: QMatMul,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    act: Activation,
    cfg: Config,
}

impl Network {
    fn load(file: &mut GgufFile, cfg: Config, device: &Device) -> Result<Self> {
        let (h, hd, ff) = (cfg.hidden, cfg.head_dim, cfg.ffn);
        let (q_dim, kv_dim) = (cfg.heads * hd, cfg.kv_heads * hd);
        let embed = file.read_tensor("token_embd.weight", &[cfg.vocab, h], device)?;
        let block = embed.dtype().block_size();
        if h % block != 0 {
            return Err(Error::model_file(
                &file.path,
                format!(
                    "token_embd.weight rows ({h} values) are not whole {:?} blocks of {block}",
                    embed.dtype()
                ),
            ));
        }
        let embed = Arc::new(embed);
        let output = if file.content.tensor_infos.contains_key("output.weight") {
            QMatMul::from_qtensor(file.read_tensor("output.weight", &[cfg.vocab, h], device)?)?
        } else {
            // Tied embeddings (every Gemma 3): the one quantized tensor serves both.
            QMatMul::from_arc(embed.clone())?
        };
        let norm = RmsNorm::from_qtensor(
            file.read_tensor("output_norm.weight", &[h], device)?,
            cfg.eps,
        )?;
        let local = Rope::new(&cfg, cfg.local_rope_base, 1.0, device)?;
        let global = Rope::new(&cfg, cfg.global_rope_base, cfg.global_rope_scale, device)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut qm = |name: &str, shape: &[usize]| -> Result<QMatMul> {
                let t = file.read_tensor(&format!("blk.{i}.{name}.weight"), shape, device)?;
                Ok(QMatMul::from_qtensor(t)?)
            };
            let wq = qm("attn_q", &[q_dim, h])?;
            let wk = qm("attn_k", &[kv_dim, h])?;
            let wv = qm("attn_v", &[kv_dim, h])?;
            let wo = qm("attn_output", &[h, q_dim])?;
            let gate = qm("ffn_gate", &[ff, h])?;
            let up = qm("ffn_up", &[ff, h])?;
            let down = qm("ffn_down", &[h, ff])?;
            let mut norm = |name: &str, size: usize| -> Result<RmsNorm> {
                let t = file.read_tensor(&format!("blk.{i}.{name}.weight"), &[size], device)?;
                Ok(RmsNorm::from_qtensor(t, cfg.eps)?)
            };
            let q_norm = norm("attn_q_norm", hd)?;
            let k_norm = norm("attn_k_norm", hd)?;
            let attn_norm = norm("attn_norm", h)?;
            let post_attn_norm = norm("post_attention_norm", h)?;
            let ffn_norm = norm("ffn_norm", h)?;
            let post_ffn_norm = norm("post_ffw_norm", h)?;
            let sliding = cfg.is_sliding(i);
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                q_norm,
                k_norm,
                attn_norm,
                post_attn_norm,
                ffn_norm,
                post_ffn_norm,
                gate,
                up,
                down,
                window: sliding.then_some(cfg.window),
                rope: if sliding {
                    local.clone()
                } else {
                    global.clone()
                },
            });
        }
        Ok(Network {
            embed: QMatMul::from_arc(embed)?,
            embed_scale: (h as f64).sqrt(),
            layers,
            norm,
            output,
            act: Activation::GeluPytorchTanh,
            cfg,
        })
    }
}

/// One layer's cached keys and values, `(batch, kv_heads, positions, head_dim)`: every position
/// for a global layer, the last `window - 1` for a sliding one.
pub type KvCache = Option<(Tensor, Tensor)>;

/// Cached positions a layer holds once `seen` tokens went through it.
fn cached_positions(window: Option<usize>, seen: usize) -> usize {
    match window {
        Some(w) => seen.min(w - 1),
        None => seen,
    }
}

impl Layer {
    fn attention(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
        position: usize,
        cfg: &Config,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (hd, heads, kv_heads) = (cfg.head_dim, cfg.heads, cfg.kv_heads);
        let q = self.wq.forward(x)?;
        let k = self.wk.forward(x)?;
        let v = self.wv.forward(x)?;
        let q = q.reshape((b, l, heads, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, l, kv_heads, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, l, kv_heads, hd))?.transpose(1, 2)?;
        let q = self.q_norm.forward(&q.contiguous()?)?;
        let k = self.k_norm.forward(&k.contiguous()?)?;
        let q = self.rope.apply(&q, position)?;
        let k = self.rope.apply(&k, position)?;
        let (k, v) = match cache.take() {
            None => (k, v),
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
        };
        // A sliding layer keeps only what the next query can still see.
        let total = k.dim(2)?;
        let keep = match self.window {
            Some(w) => total.min(w - 1),
            None => total,
        };
        *cache = match keep {
            0 => None,
            n if n == total => Some((k.clone(), v.clone())),
            n => Some((k.narrow(2, total - n, n)?, v.narrow(2, total - n, n)?)),
        };
        let k = repeat_kv(k, heads / kv_heads)?;
        let v = repeat_kv(v, heads / kv_heads)?.contiguous()?;
        let att = (q.matmul(&k.transpose(2, 3)?)? * cfg.attn_scale)?;
        let att = match mask {
            Some(mask) => att.broadcast_add(mask)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, heads * hd))?;
        Ok(self.wo.forward(&y)?)
    }

    fn mlp(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let gate = self.gate.forward(x)?.apply(&act)?;
        let up = self.up.forward(x)?;
        Ok(self.down.forward(&(gate * up)?)?)
    }
}

/// Quantized Gemma 3, as registered.
pub struct QuantizedGemma3;

impl crate::models::Network for Network {
    /// One entry per layer: all the mutable state there is.
    type Cache = Vec<KvCache>;

    fn forward(
        &self,
        input_ids: &Tensor,
        position: usize,
        cache: &mut Vec<KvCache>,
    ) -> Result<Tensor> {
        let w = self;
        let (_b, l) = input_ids.dims2()?;
        let device = input_ids.device();
        let mut x = (w.embed.embedding(input_ids)? * w.embed_scale)?;
        // Two masks at most per forward, one per layer kind, each built only if some key is
        // hidden (never for a single token).
        let global_mask = attention_mask(l, position, 0, None, device)?;
        let local_start = position - cached_positions(Some(w.cfg.window), position);
        let local_mask = attention_mask(l, position, local_start, Some(w.cfg.window), device)?;
        for (layer, cache) in w.layers.iter().zip(cache.iter_mut()) {
            let mask = match layer.window {
                Some(_) => local_mask.as_ref(),
                None => global_mask.as_ref(),
            };
            let h = layer.attn_norm.forward(&x)?;
            let h = layer.attention(&h, cache, mask, position, &w.cfg)?;
            x = (layer.post_attn_norm.forward(&h)? + x)?;
            let h = layer.mlp(&layer.ffn_norm.forward(&x)?, w.act)?;
            x = (layer.post_ffn_norm.forward(&h)? + x)?;
        }
        // Only the last position's logits are returned, so only it is projected.
        let x = w.norm.forward(&x.i((.., l - 1, ..))?.contiguous()?)?;
        Ok(w.output.forward(&x)?)
    }

    fn reset(&self, cache: &mut Vec<KvCache>) -> Result<()> {
        cache.iter_mut().for_each(|c| *c = None);
        Ok(())
    }
}

impl Architecture for QuantizedGemma3 {
    const NAME: &'static str = "quantized_gemma3";
    const FORMAT: WeightFormat = WeightFormat::Gguf;
    const MODEL_TYPES: &'static [&'static str] = &[ARCH];
    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let mut file = source.into_gguf(Self::NAME)?;
        let cfg = Config::read(&file)?;
        let info = ModelInfo::from_gguf(Self::NAME, &file, cfg.vocab, cfg.max_context)?;
        let layers = cfg.layers;
        let network = Network::load(&mut file, cfg, &options.device)?;
        Ok(Adapter::new(network, vec![None; layers], info))
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
    use crate::models::LanguageModel;
    use candle_core::quantized::gguf_file::Value;
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
        let file = open(path, overrides);
        QuantizedGemma3::load(ModelSource::Gguf(file), &LoadOptions::cpu()).unwrap()
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
        let mut ours = load(&path, &wide);
        ours.network_mut().act = Activation::Silu;
        let mut file = open(&path, &wide);
        let mut theirs =
            candle_gemma3::ModelWeights::from_gguf(file.content, &mut file.reader, &Device::Cpu)
                .unwrap();
        let prompt = [2u32, 14, 15, 92, 65, 35, 8];
        let a = logits(&mut ours, &prompt, 0);
        let b: Vec<f32> = theirs
            .forward(&ids(&prompt), 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let diff = max_diff(&a, &b);
        assert!(diff <= 1e-4, "prefill: max abs diff {diff}");
        for (position, token) in (prompt.len()..).zip([40u32, 41, 3]) {
            let a = logits(&mut ours, &[token], position);
            let b: Vec<f32> = theirs
                .forward(&ids(&[token]), position)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let diff = max_diff(&a, &b);
            assert!(diff <= 1e-4, "decode at {position}: max abs diff {diff}");
        }
    }

    /// The tiny fixture has the real layout: 5 sliding layers, then a global one.
    #[test]
    fn every_sixth_layer_is_global() {
        let dir = tempfile::tempdir().unwrap();
        let model = load(&tiny(dir.path()), &[]);
        let windows: Vec<Option<usize>> = model.network().layers.iter().map(|l| l.window).collect();
        let w = model.network().cfg.window;
        assert_eq!(windows, [Some(w), Some(w), Some(w), Some(w), Some(w), None]);
        // Sliding layers share one table, global layers another: no per-layer copies.
        let (first, global) = (
            &model.network().layers[0].rope,
            &model.network().layers[5].rope,
        );
        // (a clone keeps the tensor's id, and shares its storage)
        assert_eq!(first.cos.id(), model.network().layers[4].rope.cos.id());
        assert_ne!(first.cos.id(), global.cos.id());
        assert_eq!(first.cos.dims(), [256, model.network().cfg.head_dim / 2]);
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
