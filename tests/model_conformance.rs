//! Cache conformance for every registered architecture. The tests walk the registration list
//! (`llm_pool::models::ARCHITECTURES`), so a newly registered line is covered at once, and
//! fails until its fixture (a tiny HF model, or a tiny GGUF writer in tests/common) exists.

mod common;

use common::max_abs_diff;
use llm_pool::models::{LanguageModel, LoadOptions, Model, WeightFormat, ARCHITECTURES};
use std::path::PathBuf;

const PROMPT_A: [u32; 7] = [1, 14, 15, 92, 65, 35, 8];
const PROMPT_B: [u32; 5] = [1, 27, 18, 28, 18];

/// The fixture for an architecture; the tempdir keeps generated files alive.
fn fixture(name: &str, format: WeightFormat, tmp: &tempfile::TempDir) -> PathBuf {
    match format {
        WeightFormat::Safetensors => {
            let dir = common::hf_fixture(name);
            assert!(
                dir.join("config.json").is_file(),
                "architecture {name} has no fixture at {}; add it to tests/fixtures/make_hf_fixtures.py",
                dir.display()
            );
            dir
        }
        WeightFormat::Gguf => common::tiny_gguf(name, tmp.path()).unwrap_or_else(|| {
            panic!("architecture {name} has no tiny GGUF writer; add one to tests/common/mod.rs")
        }),
    }
}

fn load(path: &PathBuf, expected: &str) -> Model {
    let model = Model::load(path, &LoadOptions::cpu())
        .unwrap_or_else(|e| panic!("{expected}: load failed: {e}"));
    assert_eq!(
        model.info().architecture,
        expected,
        "detection picked the wrong architecture"
    );
    model
}

/// Runs prompt A (prefill and a few decode steps), resets, runs prompt B: the logits must be
/// those of a freshly loaded model on B.
#[test]
fn reset_cache_restores_the_freshly_loaded_state() {
    for entry in ARCHITECTURES {
        let tmp = tempfile::tempdir().unwrap();
        let path = fixture(entry.name, entry.format, &tmp);
        let mut used = load(&path, entry.name);
        let mut logits = used.forward_ids(&PROMPT_A, 0).unwrap();
        for pos in PROMPT_A.len()..PROMPT_A.len() + 3 {
            let next = llm_pool::text::sampling::argmax(&logits);
            logits = used.forward_ids(&[next], pos).unwrap();
        }
        used.reset_cache().unwrap();
        assert_eq!(used.cached_tokens(), 0);
        let after_reset = used.forward_ids(&PROMPT_B, 0).unwrap();

        let mut fresh = load(&path, entry.name);
        let expected = fresh.forward_ids(&PROMPT_B, 0).unwrap();
        let diff = max_abs_diff(&after_reset, &expected);
        assert!(
            diff <= 1e-6,
            "{}: logits after reset differ from a fresh model by {diff}",
            entry.name
        );
        // And the decode step after that agrees too.
        let next = llm_pool::text::sampling::argmax(&expected);
        let a = used.forward_ids(&[next], PROMPT_B.len()).unwrap();
        let b = fresh.forward_ids(&[next], PROMPT_B.len()).unwrap();
        assert!(
            max_abs_diff(&a, &b) <= 1e-6,
            "{}: decode after reset differs",
            entry.name
        );
    }
}

/// `forward` at position p after a prefill of p tokens equals the last row of one prefill of
/// the same p + 1 tokens.
#[test]
fn incremental_forward_equals_single_prefill() {
    for entry in ARCHITECTURES {
        let tmp = tempfile::tempdir().unwrap();
        let path = fixture(entry.name, entry.format, &tmp);
        let mut model = load(&path, entry.name);
        let p = PROMPT_A.len() - 1;
        model.forward_ids(&PROMPT_A[..p], 0).unwrap();
        let incremental = model.forward_ids(&PROMPT_A[p..], p).unwrap();
        model.reset_cache().unwrap();
        let whole = model.forward_ids(&PROMPT_A, 0).unwrap();
        let diff = max_abs_diff(&incremental, &whole);
        assert!(
            diff <= 1e-4,
            "{}: incremental forward differs from a single prefill by {diff}",
            entry.name
        );
    }
}

/// Token-by-token feeding gives the same logits as one prefill, at every position.
#[test]
fn token_by_token_equals_prefill() {
    for entry in ARCHITECTURES {
        let tmp = tempfile::tempdir().unwrap();
        let path = fixture(entry.name, entry.format, &tmp);
        let mut model = load(&path, entry.name);
        let mut last = Vec::new();
        for (i, &id) in PROMPT_A.iter().enumerate() {
            last = model.forward_ids(&[id], i).unwrap();
        }
        model.reset_cache().unwrap();
        let whole = model.forward_ids(&PROMPT_A, 0).unwrap();
        let diff = max_abs_diff(&last, &whole);
        assert!(
            diff <= 1e-4,
            "{}: token-by-token differs from prefill by {diff}",
            entry.name
        );
    }
}

/// The model refuses a position that does not follow its cache instead of computing garbage.
#[test]
fn a_position_that_skips_the_cache_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let entry = llm_pool::models::architecture("quantized_llama").unwrap();
    let path = fixture(entry.name, entry.format, &tmp);
    let mut model = load(&path, entry.name);
    model.forward_ids(&PROMPT_A, 0).unwrap();
    let err = model.forward_ids(&[3], 0).unwrap_err().to_string();
    assert!(
        err.contains("position 0") && err.contains("7 tokens"),
        "{err}"
    );
    let err = model.forward_ids(&[3, 4], 9).unwrap_err().to_string();
    assert!(err.contains("continue at position 7"), "{err}");
}
