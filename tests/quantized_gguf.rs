//! The quirks the phi2, phi3, qwen2, qwen3 and gemma3 GGUF adapters exist to hide, each pinned
//! by a test: candle parity of our own Qwen2, Qwen3's cache restarts and chunked prefill, clear
//! errors for metadata that is missing, mistyped or beyond what candle implements.

mod common;

use candle_core::quantized::gguf_file::{TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use llm_pool::models::gguf::GgufFile;
use llm_pool::models::quantized_llama::QuantizedLlama;
use llm_pool::models::quantized_qwen2::QuantizedQwen2;
use llm_pool::models::quantized_qwen3::QuantizedQwen3;
use llm_pool::models::{Adapter, Architecture, LanguageModel, LoadOptions, ModelSource};
use std::path::Path;

const ARCHITECTURES: [&str; 6] = [
    "quantized_llama",
    "quantized_phi2",
    "quantized_phi3",
    "quantized_qwen2",
    "quantized_qwen3",
    "quantized_gemma3",
];

fn load<A: Architecture>(path: &Path) -> Adapter<A> {
    let source = ModelSource::Gguf(GgufFile::open(path).unwrap());
    A::load(source, &LoadOptions::cpu()).unwrap_or_else(|e| panic!("{}: {e}", A::NAME))
}

fn ids(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn run(model: &mut impl LanguageModel, tokens: &[u32], position: usize) -> Vec<f32> {
    let logits = model.forward(&ids(tokens), position).unwrap();
    logits.squeeze(0).unwrap().to_vec1().unwrap()
}

/// Loads `path` with its metadata edited, through detection as a user would.
fn load_edited(path: &Path, edit: impl FnOnce(&mut GgufFile)) -> Result<(), String> {
    let (source, entry) = llm_pool::models::detect::detect(path).map_err(|e| e.to_string())?;
    let ModelSource::Gguf(mut file) = source else {
        panic!("not a GGUF source")
    };
    edit(&mut file);
    llm_pool::models::Model::load_detected(ModelSource::Gguf(file), entry, &LoadOptions::cpu())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `TensorInfo` is not `Clone`; a copy lets a test point another name at a tensor.
fn copy_info(info: &TensorInfo) -> TensorInfo {
    TensorInfo {
        ggml_dtype: info.ggml_dtype,
        shape: info.shape.clone(),
        offset: info.offset,
    }
}

/// Our Qwen2 computes what candle's `quantized_qwen2` computes: prefill, a decode step, then a
/// multi-token chunk on top of the cache.
#[test]
fn qwen2_matches_candle() {
    use candle_transformers::models::quantized_qwen2 as candle_qwen2;
    let tmp = tempfile::tempdir().unwrap();
    let path = common::tiny_gguf("quantized_qwen2", tmp.path()).unwrap();
    let mut ours: Adapter<QuantizedQwen2> = load(&path);
    let mut file = GgufFile::open(&path).unwrap();
    let mut theirs =
        candle_qwen2::ModelWeights::from_gguf(file.content, &mut file.reader, &Device::Cpu)
            .unwrap();
    matches_candle(&mut ours, |x, p| theirs.forward(x, p), "qwen2");
}

/// Runs a prefill, a decode step and a chunk on the cache through ours and candle's `forward`,
/// and checks the last-position logits agree within 1e-4.
fn matches_candle(
    ours: &mut impl LanguageModel,
    mut theirs: impl FnMut(&Tensor, usize) -> candle_core::Result<Tensor>,
    what: &str,
) {
    let mut position = 0;
    for chunk in [&[1u32, 5, 9, 33, 2, 60][..], &[7], &[11, 12, 13]] {
        let a = run(ours, chunk, position);
        let b: Vec<f32> = theirs(&ids(chunk), position)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let diff = common::max_abs_diff(&a, &b);
        assert!(
            diff <= 1e-4,
            "{what} at position {position}: max abs diff {diff}"
        );
        position += chunk.len();
    }
}

/// Our Llama computes what candle's `quantized_llama` computes (interleaved RoPE, SwiGLU),
/// in F32 and Q8_0 ([`f32_and_q8_0`]): prefill, a decode step, then a chunk on the cache.
#[test]
fn llama_matches_candle() {
    use candle_transformers::models::quantized_llama as candle_llama;
    f32_and_q8_0("quantized_llama", |path, dtype| {
        let mut ours: Adapter<QuantizedLlama> = load(path);
        let attention_fused = ours.network().layers()[0].attention.fused_projections();
        assert_eq!(attention_fused, dtype.is_some(), "{dtype:?}");
        let mut file = GgufFile::open(path).unwrap();
        let mut theirs =
            candle_llama::ModelWeights::from_gguf(file.content, &mut file.reader, &Device::Cpu)
                .unwrap();
        matches_candle(
            &mut ours,
            |x, p| theirs.forward(x, p),
            &format!("llama {dtype:?}"),
        );
    });
}

/// Runs `check` on the tiny fixture of `arch` in F32, then with every matrix quantized to
/// Q8_0 (`None` and `Some(Q8_0)`). Q8_0 is where our kernels multiply (fused q/k/v and
/// gate/up included) and candle its own `QMatMul`s. (Q4_1 and Q5_0 would need rows of an even
/// number of blocks for candle's debug assertions; the tiny models' are one or two blocks.
/// tests/kernels.rs compares those types with candle at real sizes.)
fn f32_and_q8_0(arch: &str, mut check: impl FnMut(&Path, Option<GgmlDType>)) {
    let tmp = tempfile::tempdir().unwrap();
    let f32_path = common::tiny_gguf(arch, tmp.path()).unwrap();
    check(&f32_path, None);
    let path = tmp.path().join(format!("{arch}-q8_0.gguf"));
    common::quantize_gguf(&f32_path, &path, GgmlDType::Q8_0);
    check(&path, Some(GgmlDType::Q8_0));
}

/// Our Qwen3 computes what candle's `quantized_qwen3` computes (per-head q/k RMSNorms, NEOX
/// RoPE, SwiGLU), in F32 and Q8_0: prefill, a decode step, then a chunk on the cache. candle is
/// set up where it is wrong by design, so that the comparison is fair: its RoPE tables are F32
/// (`general.dtype` = 0; by default they are F16, see
/// `qwen3_f16_rope_table_is_wrong_and_f32_is_not`), and after a decode step its CPU path only
/// has every token in its raw cache, which a multi-token chunk does not read, so that chunk is
/// fed to it one token at a time.
#[test]
fn qwen3_matches_candle() {
    use candle_transformers::models::quantized_qwen3 as candle_qwen3;
    f32_and_q8_0("quantized_qwen3", |path, dtype| {
        let mut ours: Adapter<QuantizedQwen3> = load(path);
        let attention_fused = ours.network().layers()[0].attention.fused_projections();
        assert_eq!(attention_fused, dtype.is_some(), "{dtype:?}");
        let mut file = GgufFile::open(path).unwrap();
        file.content
            .metadata
            .insert("general.dtype".into(), Value::U32(0));
        let mut theirs =
            candle_qwen3::ModelWeights::from_gguf(file.content, &mut file.reader, &Device::Cpu)
                .unwrap();
        let mut decoded = false;
        let theirs = |x: &Tensor, position: usize| {
            let n = x.dim(1)?;
            if n == 1 {
                decoded = true;
            } else if decoded {
                let mut logits = None;
                for i in 0..n {
                    logits = Some(theirs.forward(&x.narrow(1, i, 1)?, position + i)?);
                }
                return Ok(logits.unwrap());
            }
            theirs.forward(x, position)
        };
        matches_candle(&mut ours, theirs, &format!("qwen3 {dtype:?}"));
    });
}

/// Llama 3.1's RoPE scaling (the `rope_freqs.weight` divisors) changes the logits, as
/// llama.cpp applies it; divisors of 1 change nothing; a non-positive one is refused.
#[test]
fn llama_rope_freqs_divide_the_frequencies() {
    let tmp = tempfile::tempdir().unwrap();
    let path = common::tiny_gguf("quantized_llama", tmp.path()).unwrap();
    let pairs = common::TINY_HIDDEN / common::TINY_HEADS / 2;
    let with_divisors = |divisors: Vec<f32>, name: &str| {
        let dst = tmp.path().join(name);
        common::add_gguf_tensor(&path, &dst, "rope_freqs.weight", divisors);
        dst
    };
    let tokens = [1u32, 5, 9, 33, 2, 60, 7, 11];
    let plain = run(&mut load::<QuantizedLlama>(&path), &tokens, 0);
    let ones = with_divisors(vec![1.0; pairs], "ones.gguf");
    let same = run(&mut load::<QuantizedLlama>(&ones), &tokens, 0);
    assert!(common::max_abs_diff(&plain, &same) <= 1e-6);
    let scaled = with_divisors((0..pairs).map(|i| 1.0 + i as f32).collect(), "scaled.gguf");
    let differs = run(&mut load::<QuantizedLlama>(&scaled), &tokens, 0);
    assert!(common::max_abs_diff(&plain, &differs) > 1e-3);
    let bad = with_divisors(vec![0.0; pairs], "zero.gguf");
    let source = ModelSource::Gguf(GgufFile::open(&bad).unwrap());
    let err = QuantizedLlama::load(source, &LoadOptions::cpu())
        .err()
        .expect("a zero divisor loaded")
        .to_string();
    assert!(err.contains("rope_freqs.weight"), "{err}");
}

/// A prompt chunk after decode steps (a conversation continuing on its cache) must see the
/// decoded tokens (candle's CPU path for qwen3 attends without them).
#[test]
fn qwen3_chunk_after_decode_steps_sees_every_token() {
    let tmp = tempfile::tempdir().unwrap();
    let path = common::tiny_gguf("quantized_qwen3", tmp.path()).unwrap();
    let tokens = [1u32, 14, 15, 92, 65, 35, 8, 40, 41];
    let mut model: Adapter<QuantizedQwen3> = load(&path);
    run(&mut model, &tokens[..4], 0);
    run(&mut model, &tokens[4..5], 4);
    run(&mut model, &tokens[5..6], 5);
    let chunked = run(&mut model, &tokens[6..], 6);
    let whole = run(&mut load::<QuantizedQwen3>(&path), &tokens, 0);
    let diff = common::max_abs_diff(&chunked, &whole);
    assert!(diff <= 1e-4, "chunk after decode differs by {diff}");
}

/// Re-prefilling at position 0 without an explicit reset starts over (candle's qwen3 would
/// append to the old cache).
#[test]
fn qwen3_prefill_at_position_zero_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let path = common::tiny_gguf("quantized_qwen3", tmp.path()).unwrap();
    let mut model: Adapter<QuantizedQwen3> = load(&path);
    run(&mut model, &[1, 2, 3, 4], 0);
    run(&mut model, &[5], 4);
    let again = run(&mut model, &[1, 27, 18], 0);
    let fresh = run(&mut load::<QuantizedQwen3>(&path), &[1, 27, 18], 0);
    assert!(common::max_abs_diff(&again, &fresh) <= 1e-6);
}

/// Why `qwen3_matches_candle` asks candle for F32 RoPE tables (our Qwen3 computes the angles in
/// F32): candle's default F16 table is far off.
#[test]
fn qwen3_f16_rope_table_is_wrong_and_f32_is_not() {
    use candle_transformers::models::quantized_qwen3::RotaryEmbedding;
    let f16 = RotaryEmbedding::new(DType::F16, 128, 4096, 1e6, &Device::Cpu).unwrap();
    let f32 = RotaryEmbedding::new(DType::F32, 128, 4096, 1e6, &Device::Cpu).unwrap();
    let (cos16, _) = f16.cos_sin_at(3000);
    let (cos32, _) = f32.cos_sin_at(3000);
    let inv_freq_1 = 1e6f64.powf(-2.0 / 128.0);
    assert!((cos32[1] as f64 - (3000.0 * inv_freq_1).cos()).abs() < 1e-3);
    assert!(
        common::max_abs_diff(cos16, cos32) > 0.05,
        "F16 table unexpectedly exact"
    );
}

/// Every architecture-specific key, removed or given the wrong type, either is not needed or
/// fails the load with an error naming it; never a panic, never candle's bare message.
#[test]
fn missing_or_mistyped_metadata_is_named() {
    for arch in ARCHITECTURES {
        let tmp = tempfile::tempdir().unwrap();
        let path = common::tiny_gguf(arch, tmp.path()).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let prefix = format!("{}.", file.architecture().unwrap());
        let keys: Vec<String> = file
            .content
            .metadata
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for key in keys {
            for (what, value) in [
                ("missing", None),
                ("a string", Some(Value::String("x".into()))),
            ] {
                let result = load_edited(&path, |f| {
                    f.content.metadata.remove(&key);
                    if let Some(v) = value {
                        f.content.metadata.insert(key.clone(), v);
                    }
                });
                if let Err(e) = result {
                    assert!(e.contains(&key), "{arch}: {key} {what}: {e}");
                }
            }
        }
    }
}

/// Zero heads or layers, or shapes that do not divide, are errors naming the key.
#[test]
fn impossible_hyperparameters_are_named() {
    for arch in ARCHITECTURES {
        let tmp = tempfile::tempdir().unwrap();
        let path = common::tiny_gguf(arch, tmp.path()).unwrap();
        let a = GgufFile::open(&path).unwrap().architecture().unwrap();
        for (key, value) in [
            (format!("{a}.attention.head_count"), 0),
            (format!("{a}.attention.head_count_kv"), 0),
            (format!("{a}.attention.head_count_kv"), 3),
            (format!("{a}.block_count"), 0),
        ] {
            let err = load_edited(&path, |f| {
                f.content.metadata.insert(key.clone(), Value::U32(value));
            })
            .expect_err(&format!("{arch}: {key} = {value} loaded"));
            assert!(err.contains(&key), "{arch}: {key} = {value}: {err}");
        }
    }
}

/// What candle would silently get wrong is refused, with the reason.
#[test]
fn rope_settings_candle_ignores_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, Value, &str); 6] = [
        (
            "quantized_llama",
            "llama.rope.scaling.type",
            Value::String("yarn".into()),
            "allowed: none, linear",
        ),
        (
            "quantized_phi2",
            "phi2.rope.freq_base",
            Value::F32(25_000.0),
            "hard-codes",
        ),
        (
            "quantized_phi3",
            "phi3.rope.freq_base",
            Value::F32(250_000.0),
            "hard-codes",
        ),
        (
            "quantized_phi3",
            "phi3.rope.dimension_count",
            Value::U32(4),
            "partial",
        ),
        (
            "quantized_qwen2",
            "qwen2.rope.scaling.type",
            Value::String("yarn".into()),
            "yarn",
        ),
        (
            "quantized_gemma3",
            "gemma3.rope.scaling.type",
            Value::String("yarn".into()),
            "allowed: none, linear",
        ),
    ];
    for (arch, key, value, expected) in cases {
        let path = common::tiny_gguf(arch, tmp.path()).unwrap();
        let err = load_edited(&path, |f| {
            f.content.metadata.insert(key.to_string(), value);
        })
        .expect_err(&format!("{arch}: {key} loaded"));
        assert!(err.contains(key) && err.contains(expected), "{arch}: {err}");
    }
}

/// Tensor layouts candle's phi models cannot run are named at load.
#[test]
fn phi_layouts_candle_cannot_run_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = common::tiny_gguf("quantized_phi3", tmp.path()).unwrap();
    let err = load_edited(&path, |f| {
        let info = copy_info(&f.content.tensor_infos["output_norm.weight"]);
        f.content
            .tensor_infos
            .insert("rope_factors_long.weight".into(), info);
    })
    .unwrap_err();
    assert!(err.contains("longrope"), "{err}");

    let path = common::tiny_gguf("quantized_phi2", tmp.path()).unwrap();
    let err = load_edited(&path, |f| {
        let qkv = f
            .content
            .tensor_infos
            .remove("blk.0.attn_qkv.weight")
            .unwrap();
        f.content
            .tensor_infos
            .insert("blk.0.attn_q.weight".into(), qkv);
    })
    .unwrap_err();
    assert!(err.contains("attn_qkv"), "{err}");
    let err = load_edited(&path, |f| {
        f.content
            .metadata
            .insert("phi2.attention.head_count_kv".into(), Value::U32(2));
    })
    .unwrap_err();
    assert!(err.contains("grouped-query"), "{err}");
}

/// A tensor with the wrong shape is named at load by our own implementations, not found by a
/// matmul later.
#[test]
fn a_mis_shaped_tensor_is_named() {
    for arch in ["quantized_qwen2", "quantized_qwen3", "quantized_gemma3"] {
        let tmp = tempfile::tempdir().unwrap();
        let path = common::tiny_gguf(arch, tmp.path()).unwrap();
        let err = load_edited(&path, |f| {
            let other = copy_info(&f.content.tensor_infos["output_norm.weight"]);
            f.content
                .tensor_infos
                .insert("blk.1.ffn_down.weight".into(), other);
        })
        .unwrap_err();
        assert!(
            err.contains("blk.1.ffn_down.weight") && err.contains("expected"),
            "{arch}: {err}"
        );
    }
}

/// The vocabulary (tokenizer list) must match the embedding rows the logits come from.
#[test]
fn a_vocabulary_that_does_not_match_the_embeddings_is_an_error() {
    for arch in ARCHITECTURES {
        let tmp = tempfile::tempdir().unwrap();
        let path = common::tiny_gguf(arch, tmp.path()).unwrap();
        let err = load_edited(&path, |f| {
            let tokens = vec![Value::String("a".into()); 10];
            f.content
                .metadata
                .insert("tokenizer.ggml.tokens".into(), Value::Array(tokens));
        })
        .expect_err(arch);
        assert!(
            err.contains("token_embd.weight") && err.contains("10"),
            "{arch}: {err}"
        );
    }
}
