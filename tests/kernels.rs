//! Our quantized kernels (Q4_1, Q5_0, Q8_0) at every dispatch level this CPU has, against an
//! exact oracle over the same quantized activations (integer block sums, f64 scaling) and
//! against candle's `QMatMul` on the same blocks. Random and real (demo GGUF) tensors; output
//! counts not divisible by the column tile; activation row counts around the 4-row blocking.

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use llm_pool::kernels::blocks::{BlockQ8, Blocks, WeightBlock, QK};
use llm_pool::kernels::quantize::{quantize_into, SumForm};
use llm_pool::kernels::{Level, QuantizedWeight, WeightType};
use llm_pool::models::layers::linear::Linear;
use std::path::Path;

const TYPES: [(GgmlDType, WeightType); 3] = [
    (GgmlDType::Q4_1, WeightType::Q4_1),
    (GgmlDType::Q5_0, WeightType::Q5_0),
    (GgmlDType::Q8_0, WeightType::Q8_0),
];

/// Deterministic values in about [-1, 1) (xorshift), with a few larger outliers so block
/// scales vary as they do in real activations.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            if i % 97 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

/// A random `(n, k)` weight of `dtype`, as candle quantizes it, and ours over the same bytes.
fn weight(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (QMatMul, QuantizedWeight) {
    let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let ours = QuantizedWeight::from_qtensor(&q).unwrap().unwrap();
    (QMatMul::from_qtensor(q).unwrap(), ours)
}

/// The exact result of the integer kernels: per block `Σ code·q_a` in integers, then
/// `d_w·d_a·sum + correction` in f64. Also returns each output's `Σ|term|`, the scale the
/// f32 accumulation error is relative to.
fn oracle(w: &QuantizedWeight, acts: &[BlockQ8], m: usize) -> (Vec<f64>, Vec<f64>) {
    fn run<B: WeightBlock>(
        w: &[B],
        acts: &[BlockQ8],
        m: usize,
        n: usize,
        nb: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                for b in 0..nb {
                    let (wb, ab) = (&w[j * nb + b], &acts[r * nb + b]);
                    let codes = wb.codes();
                    let sum: i64 = (0..QK).map(|i| codes[i] as i64 * ab.qs[i] as i64).sum();
                    let main = wb.scale() as f64 * ab.d as f64 * sum as f64;
                    let corr = wb.correction(ab) as f64;
                    y[r * n + j] += main + corr;
                    mag[r * n + j] += main.abs() + corr.abs();
                }
            }
        }
        (y, mag)
    }
    let (n, k) = w.dims();
    match &*w.blocks() {
        Blocks::Q4_1(b) => run(b, acts, m, n, k / QK),
        Blocks::Q5_0(b) => run(b, acts, m, n, k / QK),
        Blocks::Q8_0(b) => run(b, acts, m, n, k / QK),
    }
}

/// Every level against the oracle, and the default level against candle.
fn check(q: &QMatMul, w: &QuantizedWeight, m: usize, seed: u64, what: &str) {
    let (n, k) = w.dims();
    let x = values(m * k, seed);
    let scalar_acts = w.quantize_activations(Level::Scalar, &x);
    for level in Level::available() {
        let acts = w.quantize_activations(level, &x);
        assert_eq!(
            acts, scalar_acts,
            "{what}: {level:?} activation codes differ from scalar"
        );
        let y = w.matmul_quantized(level, &acts, m).unwrap();
        let (exact, mag) = oracle(w, &acts, m);
        for i in 0..m * n {
            let err = (y[i] as f64 - exact[i]).abs();
            assert!(
                err <= 1e-5 * mag[i] + 1e-30,
                "{what} m={m} {level:?}: output {i}: {} vs exact {} (scale {})",
                y[i],
                exact[i],
                mag[i]
            );
        }
    }
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let theirs = q
        .forward(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ours = w
        .forward(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = theirs.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * scale,
            "{what} m={m}: output {i}: ours {a} vs candle {b} (scale {scale})"
        );
    }
}

#[test]
fn every_k_against_the_oracle_and_candle() {
    for (dtype, _) in TYPES {
        for (i, k) in [576, 640, 1024, 1536, 2048].into_iter().enumerate() {
            let (q, w) = weight(dtype, 37, k, 10 + i as u64);
            for m in [1, 5] {
                check(&q, &w, m, 100 + m as u64, &format!("{dtype:?} k={k}"));
            }
        }
    }
}

#[test]
fn every_row_count_against_the_oracle_and_candle() {
    for (dtype, _) in TYPES {
        let (q, w) = weight(dtype, 21, 576, 7);
        for m in [1, 2, 3, 4, 5, 7, 12, 16, 17, 64] {
            check(&q, &w, m, 200 + m as u64, &format!("{dtype:?} n=21"));
        }
        // A long prompt, on a narrow weight to keep the debug-build oracle quick.
        let (q, w) = weight(dtype, 5, 576, 8);
        check(&q, &w, 512, 300, &format!("{dtype:?} n=5"));
    }
}

/// Weights laid out for AVX-512 VNNI are interleaved eight rows to a group (the
/// last group padded), any other layout keeps the file's rows; the rows come back out of the
/// groups exactly, and both layouts give the oracle's results at every level.
#[test]
fn both_layouts_at_every_level() {
    for (dtype, _) in TYPES {
        let x = Tensor::from_vec(values(21 * 640, 3), (21, 640), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&x, dtype).unwrap();
        let rows = QuantizedWeight::from_qtensor_at(Level::Scalar, &q)
            .unwrap()
            .unwrap();
        let best = QuantizedWeight::from_qtensor_at(Level::detect(), &q)
            .unwrap()
            .unwrap();
        assert!(!rows.interleaved(), "{dtype:?}");
        let grouped = Level::detect() == Level::Avx512Vnni;
        assert_eq!(best.interleaved(), grouped, "{dtype:?}");
        assert_eq!(*rows.blocks(), *best.blocks(), "{dtype:?}");
        for j in [0, 7, 8, 20] {
            let (mut a, mut b) = (vec![0f32; 640], vec![0f32; 640]);
            rows.dequantize_row(j, &mut a);
            best.dequantize_row(j, &mut b);
            assert_eq!(a, b, "{dtype:?} row {j}");
        }
        let qm = QMatMul::from_qtensor(q).unwrap();
        for w in [&rows, &best] {
            for m in [1, 3, 9] {
                check(&qm, w, m, 400 + m as u64, &format!("{dtype:?} layouts"));
            }
        }
    }
}

#[test]
fn simd_activation_quantization_matches_scalar_with_the_sums() {
    let x = values(64 * 32, 5);
    for form in [SumForm::F16, SumForm::F32] {
        let mut scalar = Vec::new();
        quantize_into(Level::Scalar, &x, form, &mut scalar);
        for b in &scalar {
            let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
            let exact = b.d * sum as f32;
            // F16 sums are rounded through f16 like ggml's Q8_1; F32 ones are exact.
            let tol = if form == SumForm::F16 {
                exact.abs() * 2e-3
            } else {
                0.0
            };
            assert!((b.s - exact).abs() <= tol, "{form:?}: s {} vs {exact}", b.s);
        }
        for level in Level::available() {
            let mut simd = Vec::new();
            quantize_into(level, &x, form, &mut simd);
            assert_eq!(simd, scalar, "{level:?} {form:?}");
        }
    }
}

/// A prompt's activations are quantized in parallel ranges; the blocks are exactly those of
/// quantizing each row on its own (including a last range shorter than the others).
#[test]
fn parallel_activation_quantization_equals_row_by_row() {
    let (rows, k) = (257, 640);
    let x = values(rows * k, 9);
    for level in Level::available() {
        let mut whole = Vec::new();
        quantize_into(level, &x, SumForm::F16, &mut whole);
        let mut by_row = Vec::new();
        for row in x.chunks_exact(k) {
            let mut one = Vec::new();
            quantize_into(level, row, SumForm::F16, &mut one);
            by_row.extend(one);
        }
        assert_eq!(whole.len(), rows * k / 32);
        assert!(whole == by_row, "{level:?}");
    }
}

#[test]
fn zero_activations_give_zero() {
    for (dtype, _) in TYPES {
        let (_, w) = weight(dtype, 17, 64, 3);
        for level in Level::available() {
            let y = w.matmul_at(level, &[0.0; 3 * 64]).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{dtype:?} {level:?}: {y:?}");
        }
    }
}

#[test]
fn mis_sized_inputs_are_errors_not_panics() {
    let (_, w) = weight(GgmlDType::Q8_0, 4, 64, 1);
    assert!(w.matmul(&[0.0; 65]).is_err());
    assert!(w.matmul_quantized(Level::Scalar, &[], 1).is_err());
    assert!(QuantizedWeight::from_bytes(WeightType::Q4_1, &[0; 19], 1, 32).is_err());
    assert!(QuantizedWeight::from_bytes(WeightType::Q4_1, &[0; 20], 1, 33).is_err());
    let x = Tensor::zeros((2, 63), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(w.forward(&x).is_err());
}

#[test]
fn levels_parse_and_order() {
    for level in Level::ALL {
        assert_eq!(Level::parse(level.name()), Some(level));
    }
    assert_eq!(Level::parse("AVX2"), Some(Level::Avx2));
    assert_eq!(Level::parse("sse"), None);
    assert!(Level::Scalar < Level::Avx2 && Level::AvxVnni < Level::Avx512Vnni);
    assert!(Level::available().contains(&Level::Scalar));
    assert!(Level::available().contains(&llm_pool::kernels::level()));
}

#[test]
fn embedding_rows_match_candle() {
    for (dtype, _) in TYPES {
        let (q, w) = weight(dtype, 9, 64, 4);
        let ids = Tensor::new(&[[3u32, 0, 8]], &Device::Cpu).unwrap();
        let ours = w.embedding(&ids).unwrap();
        let theirs = q.embedding(&ids).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let (a, b) = (
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b, "{dtype:?}");
        assert!(w
            .embedding(&Tensor::new(&[9u32], &Device::Cpu).unwrap())
            .is_err());
    }
}

/// Real tensors from the demo models, where present: each type as the models store it.
#[test]
fn demo_model_tensors_against_the_oracle_and_candle() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let picks = [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", GgmlDType::Q4_1),
        ("gemma-3-270m-q4_k_m.gguf", GgmlDType::Q5_0),
        ("gemma-3-270m-q4_k_m.gguf", GgmlDType::Q8_0),
    ];
    for (file, dtype) in picks {
        let path = models.join(file);
        let Ok(mut f) = std::fs::File::open(&path) else {
            eprintln!("skipping {file}: not present");
            continue;
        };
        let content = Content::read(&mut f).unwrap();
        // The smallest tensor of the type: a whole real weight, quick in a debug build.
        let name = content
            .tensor_infos
            .iter()
            .filter(|(_, i)| i.ggml_dtype == dtype && i.shape.dims().len() == 2)
            .min_by_key(|(_, i)| i.shape.elem_count())
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| panic!("{file} has no {dtype:?} matrix"));
        let q = content.tensor(&mut f, &name, &Device::Cpu).unwrap();
        let w = QuantizedWeight::from_qtensor(&q).unwrap().unwrap();
        let q = QMatMul::from_qtensor(q).unwrap();
        for m in [1, 3] {
            check(&q, &w, m, 400 + m as u64, &format!("{file} {name}"));
        }
    }
}

#[test]
fn the_dispatched_level_honours_the_environment() {
    let detected = Level::detect();
    let expected = match std::env::var(llm_pool::kernels::LEVEL_ENV) {
        Ok(v) => Level::parse(&v).map_or(detected, |l| l.min(detected)),
        Err(_) => detected,
    };
    assert_eq!(llm_pool::kernels::level(), expected);
}

#[test]
fn the_linear_seam_takes_our_kernels_for_our_types_only() {
    let x = Tensor::from_vec(values(2 * 3 * 256, 9), (2, 3, 256), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(values(40 * 256, 6), (40, 256), &Device::Cpu).unwrap();
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
    ] {
        let theirs = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let linear = Linear::from_qtensor(QTensor::quantize(&w, dtype).unwrap(), None).unwrap();
        assert_eq!(
            linear.uses_own_kernels(),
            dtype != GgmlDType::Q4K,
            "{dtype:?}"
        );
        let (a, b) = (linear.forward(&x).unwrap(), theirs.forward(&x).unwrap());
        assert_eq!(a.dims(), &[2, 3, 40]);
        let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        let (diff, scale) = (
            diff.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        );
        assert!(diff <= 1e-4 * scale, "{dtype:?}: {diff} vs scale {scale}");
    }
}
