//! Cache conformance for every registered architecture. The tests walk the registration list
//! (`llm_pool::models::ARCHITECTURES`), so a newly registered line is covered at once, and
//! fails until its fixture (a tiny HF model, or a tiny GGUF writer in tests/common) exists.

mod common;

use common::max_abs_diff;
use llm_pool::models::{
    LanguageModel, LoadOptions, Model, SequenceChunk, WeightFormat, ARCHITECTURES,
};
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

/// The logits of `tokens` at `position` run alone, on a model whose only slot holds the
/// sequence's earlier chunks.
fn alone(model: &mut Model, chunks: &[&[u32]]) -> Vec<f32> {
    model.reset_cache().unwrap();
    let mut position = 0;
    let mut logits = Vec::new();
    for chunk in chunks {
        logits = model.forward_ids(chunk, position).unwrap();
        position += chunk.len();
    }
    logits
}

/// A batched step gives every sequence, in its own slot, the logits it gets alone: three
/// sequences at once, one starting its prompt, one on its prompt's second chunk, one
/// decoding, and then all three decoding together.
#[test]
fn a_batch_gives_each_sequence_what_it_gets_alone() {
    for entry in ARCHITECTURES {
        let tmp = tempfile::tempdir().unwrap();
        let path = fixture(entry.name, entry.format, &tmp);
        let mut single = load(&path, entry.name);
        let mut batched = load(&path, entry.name);
        batched.set_slots(3).unwrap();
        let vocab = batched.info().vocab_size;
        let chunk = |slot, tokens, position| SequenceChunk {
            slot,
            tokens,
            position,
        };
        let mut out = Vec::new();
        // Step 1: slots 1 and 2 start their prompts.
        batched
            .forward_batch_into(
                &[chunk(1, &PROMPT_B[..3], 0), chunk(2, &PROMPT_A[..4], 0)],
                &mut out,
            )
            .unwrap();
        assert_eq!(out.len(), 2 * vocab, "{}", entry.name);
        // Step 2: slot 0 starts, slot 1 finishes its prompt, slot 2 takes one more token.
        batched
            .forward_batch_into(
                &[
                    chunk(0, &PROMPT_A, 0),
                    chunk(1, &PROMPT_B[3..], 3),
                    chunk(2, &PROMPT_A[4..5], 4),
                ],
                &mut out,
            )
            .unwrap();
        let expected = [
            alone(&mut single, &[&PROMPT_A]),
            alone(&mut single, &[&PROMPT_B[..3], &PROMPT_B[3..]]),
            alone(&mut single, &[&PROMPT_A[..4], &PROMPT_A[4..5]]),
        ];
        for (row, want) in expected.iter().enumerate() {
            let diff = max_abs_diff(&out[row * vocab..(row + 1) * vocab], want);
            assert!(
                diff <= 1e-4,
                "{}: sequence {row} of the batch differs from it alone by {diff}",
                entry.name
            );
        }
        // Step 3: all three decode their greedy token together.
        let next: Vec<u32> = (0..3)
            .map(|row| llm_pool::text::sampling::argmax(&out[row * vocab..(row + 1) * vocab]))
            .collect();
        batched
            .forward_batch_into(
                &[
                    chunk(2, &next[2..3], 5),
                    chunk(0, &next[0..1], PROMPT_A.len()),
                    chunk(1, &next[1..2], PROMPT_B.len()),
                ],
                &mut out,
            )
            .unwrap();
        let expected = [
            alone(&mut single, &[&PROMPT_A[..4], &PROMPT_A[4..5], &next[2..3]]),
            alone(&mut single, &[&PROMPT_A, &next[0..1]]),
            alone(&mut single, &[&PROMPT_B, &next[1..2]]),
        ];
        for (row, want) in expected.iter().enumerate() {
            let diff = max_abs_diff(&out[row * vocab..(row + 1) * vocab], want);
            assert!(
                diff <= 1e-4,
                "{}: decode row {row} of the batch differs from it alone by {diff}",
                entry.name
            );
        }
        assert_eq!(
            (0..3).map(|s| batched.slot_tokens(s)).collect::<Vec<_>>(),
            [8, 6, 6]
        );
    }
}

/// A slot cut back to a prefix continues exactly as a fresh sequence over that prefix would;
/// a model that cannot cut its cache there says so and keeps it as it was. Every
/// architecture also states its KV bytes per token, which the KV budget counts in.
#[test]
fn a_slot_cut_to_a_prefix_continues_from_it() {
    for entry in ARCHITECTURES {
        let tmp = tempfile::tempdir().unwrap();
        let path = fixture(entry.name, entry.format, &tmp);
        let mut model = load(&path, entry.name);
        assert!(model.info().kv_bytes_per_token > 0, "{}", entry.name);
        model.set_slots(2).unwrap();
        let mut out = Vec::new();
        let run = |model: &mut Model, tokens: &[u32], position, out: &mut Vec<f32>| {
            let c = SequenceChunk {
                slot: 1,
                tokens,
                position,
            };
            model.forward_batch_into(&[c], out).unwrap();
        };
        run(&mut model, &PROMPT_B, 0, &mut out);
        if model.truncate_slot(1, 3).unwrap() {
            assert_eq!(model.slot_tokens(1), 3);
            run(&mut model, &PROMPT_A[3..], 3, &mut out);
            let mut fresh = load(&path, entry.name);
            let want = fresh
                .forward_ids(&[&PROMPT_B[..3], &PROMPT_A[3..]].concat(), 0)
                .unwrap();
            let diff = max_abs_diff(&out, &want);
            assert!(diff <= 1e-4, "{}: after a cut, off by {diff}", entry.name);
        } else {
            assert_eq!(model.slot_tokens(1), PROMPT_B.len(), "{}", entry.name);
        }
        // Slot 0 was never touched.
        assert_eq!(model.slot_tokens(0), 0);
    }
}
