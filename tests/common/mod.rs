//! Shared test support: fixture paths, tiny GGUF writers, logits comparison.
#![allow(dead_code)]

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn hf_fixture(name: &str) -> PathBuf {
    fixtures().join("hf").join(name)
}

/// Largest absolute difference between two logit vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// One tensor of a tiny GGUF file: name and candle shape (rows first).
pub struct TinyTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Norm weights are set near 1, everything else random.
    pub norm: bool,
}

pub fn t(name: impl Into<String>, shape: &[usize]) -> TinyTensor {
    TinyTensor {
        name: name.into(),
        shape: shape.to_vec(),
        norm: false,
    }
}

pub fn norm(name: impl Into<String>, shape: &[usize]) -> TinyTensor {
    TinyTensor {
        name: name.into(),
        shape: shape.to_vec(),
        norm: true,
    }
}

/// Writes a GGUF file with random F32 tensors (deterministic for a given seed).
pub fn write_gguf(path: &Path, metadata: Vec<(&str, Value)>, tensors: &[TinyTensor], seed: u64) {
    let dev = Device::Cpu;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        // xorshift: deterministic without depending on candle's RNG.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
    };
    let qtensors: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    if spec.norm {
                        1.0 + 0.1 * next()
                    } else {
                        0.15 * next()
                    }
                })
                .collect();
            let tensor = Tensor::from_vec(data, spec.shape.as_slice(), &dev).unwrap();
            (
                spec.name.clone(),
                QTensor::quantize(&tensor, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md, &ts).unwrap();
}

pub const TINY_VOCAB: usize = 96;
pub const TINY_HIDDEN: usize = 32;
pub const TINY_HEADS: usize = 4;
pub const TINY_KV_HEADS: usize = 2;
pub const TINY_FF: usize = 64;
pub const TINY_LAYERS: usize = 2;

fn tokenizer_md(md: &mut Vec<(&'static str, Value)>) {
    md.push(("tokenizer.ggml.eos_token_id", Value::U32(2)));
    md.push(("tokenizer.ggml.bos_token_id", Value::U32(1)));
}

/// Writes the tiny GGUF file for a registered GGUF architecture, or returns None when this
/// table has no writer for it (the conformance test then fails, naming the architecture).
pub fn tiny_gguf(architecture: &str, dir: &Path) -> Option<PathBuf> {
    let (h, heads, kv, ff, v) = (TINY_HIDDEN, TINY_HEADS, TINY_KV_HEADS, TINY_FF, TINY_VOCAB);
    let hd = h / heads;
    let mut md: Vec<(&'static str, Value)> = Vec::new();
    let mut tensors = vec![
        t("token_embd.weight", &[v, h]),
        norm("output_norm.weight", &[h]),
    ];
    let path = dir.join(format!("{architecture}.gguf"));
    match architecture {
        "quantized_llama" => {
            md.push(("general.architecture", Value::String("llama".into())));
            md.push(("llama.attention.head_count", Value::U32(heads as u32)));
            md.push(("llama.attention.head_count_kv", Value::U32(kv as u32)));
            md.push(("llama.block_count", Value::U32(TINY_LAYERS as u32)));
            md.push(("llama.embedding_length", Value::U32(h as u32)));
            md.push(("llama.feed_forward_length", Value::U32(ff as u32)));
            md.push(("llama.rope.dimension_count", Value::U32(hd as u32)));
            md.push(("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)));
            md.push(("llama.rope.freq_base", Value::F32(10000.0)));
            md.push(("llama.context_length", Value::U32(256)));
            tokenizer_md(&mut md);
            tensors.push(t("output.weight", &[v, h]));
            for l in 0..TINY_LAYERS {
                tensors.push(t(format!("blk.{l}.attn_q.weight"), &[heads * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_k.weight"), &[kv * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_v.weight"), &[kv * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_output.weight"), &[h, heads * hd]));
                tensors.push(t(format!("blk.{l}.ffn_gate.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_up.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_down.weight"), &[h, ff]));
                tensors.push(norm(format!("blk.{l}.attn_norm.weight"), &[h]));
                tensors.push(norm(format!("blk.{l}.ffn_norm.weight"), &[h]));
            }
        }
        "quantized_phi2" => {
            // llama.cpp's phi2 layout: LayerNorms with biases, a fused QKV projection with a
            // bias, parallel attention and MLP, partial rotary (half the head here), kv heads =
            // heads as in Phi-2 (and as candle's phi2, the reference of the parity test,
            // needs). Tests derive the split q/k/v and grouped-query layouts from this file
            // (`rewrite_gguf`).
            md.push(("general.architecture", Value::String("phi2".into())));
            md.push(("phi2.context_length", Value::U32(256)));
            md.push(("phi2.embedding_length", Value::U32(h as u32)));
            md.push(("phi2.feed_forward_length", Value::U32(ff as u32)));
            md.push(("phi2.block_count", Value::U32(TINY_LAYERS as u32)));
            md.push(("phi2.attention.head_count", Value::U32(heads as u32)));
            md.push(("phi2.attention.head_count_kv", Value::U32(heads as u32)));
            md.push(("phi2.attention.layer_norm_epsilon", Value::F32(1e-5)));
            md.push(("phi2.rope.dimension_count", Value::U32((hd / 2) as u32)));
            tokenizer_md(&mut md);
            tensors.push(t("output_norm.bias", &[h]));
            tensors.push(t("output.weight", &[v, h]));
            tensors.push(t("output.bias", &[v]));
            for l in 0..TINY_LAYERS {
                tensors.push(norm(format!("blk.{l}.attn_norm.weight"), &[h]));
                tensors.push(t(format!("blk.{l}.attn_norm.bias"), &[h]));
                tensors.push(t(format!("blk.{l}.attn_qkv.weight"), &[3 * h, h]));
                tensors.push(t(format!("blk.{l}.attn_qkv.bias"), &[3 * h]));
                tensors.push(t(format!("blk.{l}.attn_output.weight"), &[h, h]));
                tensors.push(t(format!("blk.{l}.attn_output.bias"), &[h]));
                tensors.push(t(format!("blk.{l}.ffn_up.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_up.bias"), &[ff]));
                tensors.push(t(format!("blk.{l}.ffn_down.weight"), &[h, ff]));
                tensors.push(t(format!("blk.{l}.ffn_down.bias"), &[h]));
            }
        }
        "quantized_phi3" => {
            // llama.cpp's phi3 layout: fused QKV (with GQA here), fused gate+up (gate first).
            md.push(("general.architecture", Value::String("phi3".into())));
            md.push(("phi3.context_length", Value::U32(256)));
            md.push(("phi3.embedding_length", Value::U32(h as u32)));
            md.push(("phi3.feed_forward_length", Value::U32(ff as u32)));
            md.push(("phi3.block_count", Value::U32(TINY_LAYERS as u32)));
            md.push(("phi3.attention.head_count", Value::U32(heads as u32)));
            md.push(("phi3.attention.head_count_kv", Value::U32(kv as u32)));
            md.push(("phi3.attention.layer_norm_rms_epsilon", Value::F32(1e-5)));
            md.push(("phi3.rope.dimension_count", Value::U32(hd as u32)));
            md.push(("phi3.rope.freq_base", Value::F32(10000.0)));
            tokenizer_md(&mut md);
            tensors.push(t("output.weight", &[v, h]));
            for l in 0..TINY_LAYERS {
                tensors.push(norm(format!("blk.{l}.attn_norm.weight"), &[h]));
                tensors.push(t(
                    format!("blk.{l}.attn_qkv.weight"),
                    &[(heads + 2 * kv) * hd, h],
                ));
                tensors.push(t(format!("blk.{l}.attn_output.weight"), &[h, heads * hd]));
                tensors.push(norm(format!("blk.{l}.ffn_norm.weight"), &[h]));
                tensors.push(t(format!("blk.{l}.ffn_up.weight"), &[2 * ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_down.weight"), &[h, ff]));
            }
        }
        "quantized_qwen2" => {
            // llama.cpp's qwen2 layout: Q/K/V biases, GQA, tied embeddings (no output.weight,
            // as in Qwen2-0.5B).
            md.push(("general.architecture", Value::String("qwen2".into())));
            md.push(("qwen2.context_length", Value::U32(256)));
            md.push(("qwen2.embedding_length", Value::U32(h as u32)));
            md.push(("qwen2.feed_forward_length", Value::U32(ff as u32)));
            md.push(("qwen2.block_count", Value::U32(TINY_LAYERS as u32)));
            md.push(("qwen2.attention.head_count", Value::U32(heads as u32)));
            md.push(("qwen2.attention.head_count_kv", Value::U32(kv as u32)));
            md.push(("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6)));
            md.push(("qwen2.rope.freq_base", Value::F32(1_000_000.0)));
            tokenizer_md(&mut md);
            for l in 0..TINY_LAYERS {
                tensors.push(t(format!("blk.{l}.attn_q.weight"), &[heads * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_q.bias"), &[heads * hd]));
                tensors.push(t(format!("blk.{l}.attn_k.weight"), &[kv * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_k.bias"), &[kv * hd]));
                tensors.push(t(format!("blk.{l}.attn_v.weight"), &[kv * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_v.bias"), &[kv * hd]));
                tensors.push(t(format!("blk.{l}.attn_output.weight"), &[h, heads * hd]));
                tensors.push(t(format!("blk.{l}.ffn_gate.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_up.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_down.weight"), &[h, ff]));
                tensors.push(norm(format!("blk.{l}.attn_norm.weight"), &[h]));
                tensors.push(norm(format!("blk.{l}.ffn_norm.weight"), &[h]));
            }
        }
        "quantized_qwen3" => {
            // llama.cpp's qwen3 layout: per-head Q/K RMSNorm, no biases, GQA, and a head size
            // (key_length) that is not hidden / heads, as in the real models.
            let hd = 2 * hd;
            md.push(("general.architecture", Value::String("qwen3".into())));
            md.push(("qwen3.context_length", Value::U32(256)));
            md.push(("qwen3.embedding_length", Value::U32(h as u32)));
            md.push(("qwen3.feed_forward_length", Value::U32(ff as u32)));
            md.push(("qwen3.block_count", Value::U32(TINY_LAYERS as u32)));
            md.push(("qwen3.attention.head_count", Value::U32(heads as u32)));
            md.push(("qwen3.attention.head_count_kv", Value::U32(kv as u32)));
            md.push(("qwen3.attention.key_length", Value::U32(hd as u32)));
            md.push(("qwen3.attention.value_length", Value::U32(hd as u32)));
            md.push(("qwen3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)));
            md.push(("qwen3.rope.freq_base", Value::F32(1_000_000.0)));
            tokenizer_md(&mut md);
            tensors.push(t("output.weight", &[v, h]));
            for l in 0..TINY_LAYERS {
                tensors.push(t(format!("blk.{l}.attn_q.weight"), &[heads * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_k.weight"), &[kv * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_v.weight"), &[kv * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_output.weight"), &[h, heads * hd]));
                tensors.push(norm(format!("blk.{l}.attn_q_norm.weight"), &[hd]));
                tensors.push(norm(format!("blk.{l}.attn_k_norm.weight"), &[hd]));
                tensors.push(t(format!("blk.{l}.ffn_gate.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_up.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_down.weight"), &[h, ff]));
                tensors.push(norm(format!("blk.{l}.attn_norm.weight"), &[h]));
                tensors.push(norm(format!("blk.{l}.ffn_norm.weight"), &[h]));
            }
        }
        "quantized_gemma3" => {
            // llama.cpp's gemma3 layout: QK-norm, post-attention and post-FFN norms, tied
            // embeddings, a head size (key_length) that is not hidden / heads, GQA. Six layers
            // give llama.cpp's pattern (5 sliding, then 1 global), and the window (4) is
            // shorter than the conformance prompts (7 tokens plus decode steps).
            let hd = 2 * hd;
            let layers = 6;
            md.push(("general.architecture", Value::String("gemma3".into())));
            md.push(("gemma3.context_length", Value::U32(256)));
            md.push(("gemma3.embedding_length", Value::U32(h as u32)));
            md.push(("gemma3.feed_forward_length", Value::U32(ff as u32)));
            md.push(("gemma3.block_count", Value::U32(layers)));
            md.push(("gemma3.attention.head_count", Value::U32(heads as u32)));
            md.push(("gemma3.attention.head_count_kv", Value::U32(kv as u32)));
            md.push(("gemma3.attention.key_length", Value::U32(hd as u32)));
            md.push(("gemma3.attention.value_length", Value::U32(hd as u32)));
            md.push(("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)));
            md.push(("gemma3.attention.sliding_window", Value::U32(4)));
            md.push(("gemma3.rope.freq_base", Value::F32(1_000_000.0)));
            tokenizer_md(&mut md);
            for l in 0..layers {
                tensors.push(t(format!("blk.{l}.attn_q.weight"), &[heads * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_k.weight"), &[kv * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_v.weight"), &[kv * hd, h]));
                tensors.push(t(format!("blk.{l}.attn_output.weight"), &[h, heads * hd]));
                tensors.push(norm(format!("blk.{l}.attn_q_norm.weight"), &[hd]));
                tensors.push(norm(format!("blk.{l}.attn_k_norm.weight"), &[hd]));
                tensors.push(norm(format!("blk.{l}.attn_norm.weight"), &[h]));
                tensors.push(norm(format!("blk.{l}.post_attention_norm.weight"), &[h]));
                tensors.push(norm(format!("blk.{l}.ffn_norm.weight"), &[h]));
                tensors.push(norm(format!("blk.{l}.post_ffw_norm.weight"), &[h]));
                tensors.push(t(format!("blk.{l}.ffn_gate.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_up.weight"), &[ff, h]));
                tensors.push(t(format!("blk.{l}.ffn_down.weight"), &[h, ff]));
            }
        }
        _ => return None,
    }
    write_gguf(&path, md, &tensors, 7);
    Some(path)
}

/// Copies the GGUF file `src` to `dst` with every matrix whose rows are whole blocks of
/// `dtype` quantized to it; norms, biases and other vectors stay F32, as llama.cpp's quantizer
/// leaves them. The tiny files of [`tiny_gguf`] then exercise the quantized paths.
pub fn quantize_gguf(src: &Path, dst: &Path, dtype: GgmlDType) {
    use candle_core::quantized::gguf_file::Content;
    let mut file = std::fs::File::open(src).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|name| {
            let tensor = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            let dims = tensor.shape().dims().to_vec();
            let quantize = dims.len() == 2 && dims[1].is_multiple_of(dtype.block_size());
            let tensor = match quantize {
                true => {
                    QTensor::quantize(&tensor.dequantize(&Device::Cpu).unwrap(), dtype).unwrap()
                }
                false => tensor,
            };
            (name.clone(), tensor)
        })
        .collect();
    write_like(&content, &tensors, dst);
}

/// Writes `tensors` to `dst` with the metadata of `content`.
fn write_like(
    content: &candle_core::quantized::gguf_file::Content,
    tensors: &[(String, QTensor)],
    dst: &Path,
) {
    let md: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    candle_core::quantized::gguf_file::write(&mut out, &md, &ts).unwrap();
}

/// Copies the GGUF file `src` to `dst` with one more F32 tensor, `name` = `values` (1-D).
pub fn add_gguf_tensor(src: &Path, dst: &Path, name: &str, values: Vec<f32>) {
    use candle_core::quantized::gguf_file::Content;
    let mut file = std::fs::File::open(src).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut file, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let n = values.len();
    let extra = Tensor::from_vec(values, n, &Device::Cpu).unwrap();
    tensors.push((
        name.to_string(),
        QTensor::quantize(&extra, GgmlDType::F32).unwrap(),
    ));
    write_like(&content, &tensors, dst);
}

/// Copies the F32 GGUF file `src` to `dst` with each tensor replaced by what `map` makes of it
/// (none, one or several named tensors, F32) and the metadata keys of `metadata` set: how a
/// test derives another layout of a tiny file (split or regrouped projections) from it.
pub fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    mut map: impl FnMut(&str, Tensor) -> Vec<(String, Tensor)>,
    metadata: &[(&str, Value)],
) {
    use candle_core::quantized::gguf_file::Content;
    let mut file = std::fs::File::open(src).unwrap();
    let mut content = Content::read(&mut file).unwrap();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let tensor = content.tensor(&mut file, &name, &Device::Cpu).unwrap();
        let values = tensor.dequantize(&Device::Cpu).unwrap();
        for (name, t) in map(&name, values) {
            // A fresh buffer: `map` may return views (narrowed rows) of a larger one.
            let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let t = Tensor::from_vec(data, t.shape(), &Device::Cpu).unwrap();
            tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        }
    }
    for (key, value) in metadata {
        content.metadata.insert(key.to_string(), value.clone());
    }
    write_like(&content, &tensors, dst);
}

/// A real demo model fetched by scripts/fetch-models; fails with the fix when it is missing.
pub fn real_model(file: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models first",
        path.display()
    );
    path
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";
