//! The GGUF architectures, each pinned by a test: our networks against candle's stock models
//! (Llama, Qwen2, Qwen3, Phi-2, Phi-3, in F32 and Q8_0), what candle could not run and ours
//! does (Llama 3.1's RoPE divisors, the file's RoPE settings, Phi-3's partial rotation and
//! LongRoPE, Phi-2's separate q/k/v and grouped-query attention, Qwen3's chunks after decode
//! steps), and clear errors for metadata that is missing, mistyped or beyond what is
//! implemented.

mod common;

use candle_core::quantized::gguf_file::{TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use llm_pool::models::gguf::GgufFile;
use llm_pool::models::quantized_llama::QuantizedLlama;
use llm_pool::models::quantized_phi2::QuantizedPhi2;
use llm_pool::models::quantized_phi3::QuantizedPhi3;
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

/// Our Phi-3 computes what candle's `quantized_phi3` computes (fused q/k/v, fused gate/up
/// SwiGLU, NEOX RoPE), in F32 and Q8_0: prefill, a decode step, then a chunk on the cache. The
/// fixture is one candle computes right: RoPE base 10000 (candle hard-codes it) over whole
/// heads (candle cannot rotate part of a head).
#[test]
fn phi3_matches_candle() {
    use candle_transformers::models::quantized_phi3 as candle_phi3;
    f32_and_q8_0("quantized_phi3", |path, dtype| {
        let mut ours: Adapter<QuantizedPhi3> = load(path);
        assert!(ours.network().layers()[0].attention.fused_projections());
        let mut file = GgufFile::open(path).unwrap();
        let mut theirs = candle_phi3::ModelWeights::from_gguf(
            false,
            file.content,
            &mut file.reader,
            &Device::Cpu,
        )
        .unwrap();
        matches_candle(
            &mut ours,
            |x, p| theirs.forward(x, p),
            &format!("phi3 {dtype:?}"),
        );
    });
}

/// Our Phi-2 computes what candle's `quantized_phi` computes (parallel block, LayerNorms and
/// biases, GELU, partial NEOX RoPE), in F32 and Q8_0: prefill, a decode step, then a chunk on
/// the cache. The fixture is one candle computes right: fused q/k/v, as many kv heads as
/// heads, RoPE base 10000, and positions far below candle's fixed 4096-row RoPE table.
#[test]
fn phi2_matches_candle() {
    use candle_transformers::models::quantized_phi as candle_phi2;
    f32_and_q8_0("quantized_phi2", |path, dtype| {
        let mut ours: Adapter<QuantizedPhi2> = load(path);
        assert!(ours.network().layers()[0].attention.fused_projections());
        let mut file = GgufFile::open(path).unwrap();
        let mut theirs =
            candle_phi2::ModelWeights::from_gguf(file.content, &mut file.reader, &Device::Cpu)
                .unwrap();
        matches_candle(
            &mut ours,
            |x, p| theirs.forward(x, p),
            &format!("phi2 {dtype:?}"),
        );
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

/// RoPE scalings we do not compute (YaRN) are refused, with the key and what is allowed.
#[test]
fn rope_scalings_we_do_not_compute_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHITECTURES {
        let path = common::tiny_gguf(arch, tmp.path()).unwrap();
        let prefix = GgufFile::open(&path).unwrap().architecture().unwrap();
        let key = format!("{prefix}.rope.scaling.type");
        let err = load_edited(&path, |f| {
            let yarn = Value::String("yarn".into());
            f.content.metadata.insert(key.clone(), yarn);
        })
        .expect_err(&format!("{arch}: {key} = yarn loaded"));
        assert!(
            err.contains(&key) && err.contains("yarn") && err.contains("not supported"),
            "{arch}: {err}"
        );
    }
}

/// What candle's llama, phi and qwen3 models ignored or refused is computed now: the file's
/// RoPE base (candle hard-coded 10000 for Phi), linear RoPE scaling and its attention factor,
/// and Phi-3's partial rotation. Each changes the logits; a scaling type `none` ignores the
/// factor, as llama.cpp does; a rotation that is odd or wider than the head is refused, naming
/// the key.
#[test]
fn rope_settings_of_the_file_are_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = [1u32, 5, 9, 33, 2, 60, 7, 11];
    let logits = |arch: &str, edit: &[(&str, Value)]| -> Result<Vec<f32>, String> {
        let path = common::tiny_gguf(arch, tmp.path()).unwrap();
        let mut file = GgufFile::open(&path).unwrap();
        for (key, value) in edit {
            file.content.metadata.insert(key.to_string(), value.clone());
        }
        let (_, entry) = llm_pool::models::detect::detect(&path).unwrap();
        let mut model = llm_pool::models::Model::load_detected(
            ModelSource::Gguf(file),
            entry,
            &LoadOptions::cpu(),
        )
        .map_err(|e| e.to_string())?;
        Ok(model.forward_ids(&tokens, 0).unwrap())
    };
    let head_dim = (common::TINY_HIDDEN / common::TINY_HEADS) as u32;
    let linear = |arch: &str| {
        vec![
            (
                format!("{arch}.rope.scaling.type"),
                Value::String("linear".into()),
            ),
            (format!("{arch}.rope.scaling.factor"), Value::F32(4.0)),
        ]
    };
    for (arch, prefix) in [
        ("quantized_llama", "llama"),
        ("quantized_phi2", "phi2"),
        ("quantized_phi3", "phi3"),
        ("quantized_qwen3", "qwen3"),
    ] {
        let plain = logits(arch, &[]).unwrap();
        let base = format!("{prefix}.rope.freq_base");
        let changes: Vec<Vec<(String, Value)>> = vec![
            vec![(base.clone(), Value::F32(100.0))],
            linear(prefix),
            vec![(
                format!("{prefix}.rope.scaling.attn_factor"),
                Value::F32(1.5),
            )],
        ];
        for change in changes {
            let edit: Vec<(&str, Value)> = change
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            let other = logits(arch, &edit).unwrap();
            assert!(
                common::max_abs_diff(&plain, &other) > 1e-3,
                "{arch}: {change:?} changed nothing"
            );
        }
        // The default base is llama.cpp's 10000, which the fixtures of phi2 and phi3 state or
        // imply; the same base stated changes nothing.
        if prefix != "qwen3" {
            let same = logits(arch, &[(&base, Value::F32(10_000.0))]).unwrap();
            assert!(common::max_abs_diff(&plain, &same) <= 1e-6, "{arch}");
        }
        // `none` means no scaling, whatever the factor says (llama.cpp).
        let none = [
            (
                &*format!("{prefix}.rope.scaling.type"),
                Value::String("none".into()),
            ),
            (&*format!("{prefix}.rope.scaling.factor"), Value::F32(4.0)),
        ];
        let unscaled = logits(arch, &none).unwrap();
        assert!(common::max_abs_diff(&plain, &unscaled) <= 1e-6, "{arch}");
    }
    // Phi-3 rotating half of each head (as Phi-4-mini rotates three quarters).
    let full = logits("quantized_phi3", &[]).unwrap();
    let key = "phi3.rope.dimension_count";
    let half = logits("quantized_phi3", &[(key, Value::U32(head_dim / 2))]).unwrap();
    assert!(common::max_abs_diff(&full, &half) > 1e-3);
    for (arch, key) in [
        ("quantized_phi2", "phi2.rope.dimension_count"),
        ("quantized_phi3", "phi3.rope.dimension_count"),
    ] {
        for bad in [head_dim - 1, head_dim + 2] {
            let err = logits(arch, &[(key, Value::U32(bad))]).unwrap_err();
            assert!(err.contains(key) && err.contains("even"), "{arch}: {err}");
        }
    }
    let err = logits(
        "quantized_qwen3",
        &[("qwen3.rope.dimension_count", Value::U32(4))],
    )
    .unwrap_err();
    assert!(err.contains("qwen3.rope.dimension_count"), "{err}");
}

/// Phi-3's LongRoPE files (128k Phi-3, Phi-3.5, Phi-4-mini) run as llama.cpp runs them in a
/// context up to `rope.scaling.original_context_length`: the frequencies divided by the short
/// factors, cos and sin by `rope.scaling.attn_factor`, and that context is the limit.
#[test]
fn phi3_longrope_short_factors_apply_within_the_original_context() {
    let tmp = tempfile::tempdir().unwrap();
    let path = common::tiny_gguf("quantized_phi3", tmp.path()).unwrap();
    let pairs = common::TINY_HIDDEN / common::TINY_HEADS / 2;
    let tokens = [1u32, 5, 9, 33, 2, 60, 7, 11];
    let with_factors = |short: Vec<f32>, name: &str| {
        let long = tmp.path().join(format!("long-{name}"));
        common::add_gguf_tensor(&path, &long, "rope_factors_long.weight", vec![8.0; pairs]);
        let dst = tmp.path().join(name);
        common::add_gguf_tensor(&long, &dst, "rope_factors_short.weight", short);
        dst
    };
    let load_with = |path: &Path, original: Option<u32>| {
        let mut file = GgufFile::open(path).unwrap();
        if let Some(n) = original {
            let key = "phi3.rope.scaling.original_context_length";
            file.content.metadata.insert(key.into(), Value::U32(n));
        }
        QuantizedPhi3::load(ModelSource::Gguf(file), &LoadOptions::cpu())
    };
    let plain = run(&mut load::<QuantizedPhi3>(&path), &tokens, 0);
    // Short factors of 1 change nothing (the long ones, 8, are not used); the context is the
    // original one.
    let ones = with_factors(vec![1.0; pairs], "ones.gguf");
    let mut model = load_with(&ones, Some(64)).unwrap();
    assert_eq!(model.info().max_context, 64);
    let same = run(&mut model, &tokens, 0);
    assert!(common::max_abs_diff(&plain, &same) <= 1e-6);
    // Without the key, the original context is the trained one (llama.cpp's default).
    assert_eq!(load_with(&ones, None).unwrap().info().max_context, 256);
    let scaled = with_factors((0..pairs).map(|i| 1.0 + i as f32).collect(), "scaled.gguf");
    let differs = run(&mut load_with(&scaled, Some(64)).unwrap(), &tokens, 0);
    assert!(common::max_abs_diff(&plain, &differs) > 1e-3);
    let bad = with_factors(vec![0.0; pairs], "zero.gguf");
    let err = load_with(&bad, None).err().expect("a zero factor loaded");
    assert!(
        err.to_string().contains("rope_factors_short.weight"),
        "{err}"
    );
}

/// The Phi-2 tiny file (fused `attn_qkv` and its bias) rewritten with separate `attn_q`,
/// `attn_k`, `attn_v` and their biases, as newer llama.cpp conversions write Phi-2: the same
/// logits (candle's phi2 refused this layout). In Q8_0 the three are fused again at load.
#[test]
fn phi2_separate_qkv_equals_fused() {
    let tmp = tempfile::tempdir().unwrap();
    let fused = common::tiny_gguf("quantized_phi2", tmp.path()).unwrap();
    let split = tmp.path().join("split.gguf");
    let h = common::TINY_HIDDEN;
    common::rewrite_gguf(
        &fused,
        &split,
        |name, t| match name.strip_suffix(".attn_qkv.weight") {
            Some(prefix) => rows_split(prefix, "weight", &t, h),
            None => match name.strip_suffix(".attn_qkv.bias") {
                Some(prefix) => rows_split(prefix, "bias", &t, h),
                None => vec![(name.to_string(), t)],
            },
        },
        &[],
    );
    let tokens = [1u32, 5, 9, 33, 2, 60, 7, 11];
    for dtype in [None, Some(GgmlDType::Q8_0)] {
        let (fused, split) = match dtype {
            None => (fused.clone(), split.clone()),
            Some(dtype) => {
                let (a, b) = (
                    tmp.path().join("fused-q.gguf"),
                    tmp.path().join("split-q.gguf"),
                );
                common::quantize_gguf(&fused, &a, dtype);
                common::quantize_gguf(&split, &b, dtype);
                (a, b)
            }
        };
        let expected = run(&mut load::<QuantizedPhi2>(&fused), &tokens, 0);
        let mut model = load::<QuantizedPhi2>(&split);
        let attention_fused = model.network().layers()[0].attention.fused_projections();
        assert_eq!(attention_fused, dtype.is_some(), "{dtype:?}");
        let got = run(&mut model, &tokens, 0);
        let diff = common::max_abs_diff(&expected, &got);
        assert!(
            diff <= 1e-5,
            "{dtype:?}: split differs from fused by {diff}"
        );
    }
}

/// `{prefix}.attn_qkv.{kind}` (rows `[q | k | v]`, `h` each) as three tensors.
fn rows_split(prefix: &str, kind: &str, t: &Tensor, h: usize) -> Vec<(String, Tensor)> {
    ["attn_q", "attn_k", "attn_v"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                format!("{prefix}.{n}.{kind}"),
                t.narrow(0, i * h, h).unwrap(),
            )
        })
        .collect()
}

/// Phi-2 with grouped-query attention (candle's phi2 refused it): a file whose two kv heads
/// serve two query heads each computes what the same file with four kv heads, each of the two
/// repeated, computes. Both derive from the tiny file's fused `attn_qkv`: kv heads 0 and 2 of
/// its four.
#[test]
fn phi2_grouped_query_attention_equals_repeated_kv_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::tiny_gguf("quantized_phi2", tmp.path()).unwrap();
    let (h, heads) = (common::TINY_HIDDEN, common::TINY_HEADS);
    let hd = h / heads;
    // The rows of `attn_qkv` for q, then the k and v heads in `kv_heads` order.
    let regroup = |kv_heads: &'static [usize]| {
        move |name: &str, t: Tensor| {
            if !name.contains(".attn_qkv.") {
                return vec![(name.to_string(), t)];
            }
            let mut parts = vec![t.narrow(0, 0, h).unwrap()];
            for part in [1, 2] {
                for &head in kv_heads {
                    parts.push(t.narrow(0, part * h + head * hd, hd).unwrap());
                }
            }
            vec![(name.to_string(), Tensor::cat(&parts, 0).unwrap())]
        }
    };
    let gqa = tmp.path().join("gqa.gguf");
    let kv = [("phi2.attention.head_count_kv", Value::U32(2))];
    common::rewrite_gguf(&src, &gqa, regroup(&[0, 2]), &kv);
    let repeated = tmp.path().join("repeated.gguf");
    common::rewrite_gguf(&src, &repeated, regroup(&[0, 0, 2, 2]), &[]);
    let tokens = [1u32, 5, 9, 33, 2, 60, 7, 11];
    let mut ours = load::<QuantizedPhi2>(&gqa);
    let mut reference = load::<QuantizedPhi2>(&repeated);
    let (a, b) = (run(&mut ours, &tokens, 0), run(&mut reference, &tokens, 0));
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff <= 1e-5, "prefill differs by {diff}");
    let (a, b) = (run(&mut ours, &[3], 8), run(&mut reference, &[3], 8));
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff <= 1e-5, "decode differs by {diff}");
}

/// A tensor with the wrong shape is named at load by our own implementations, not found by a
/// matmul later.
#[test]
fn a_mis_shaped_tensor_is_named() {
    for arch in ARCHITECTURES {
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
