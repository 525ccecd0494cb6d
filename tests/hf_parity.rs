//! Parity with Hugging Face transformers for every safetensors fixture.
//!
//! `tests/fixtures/make_hf_fixtures.py` saved each tiny random-weight model and the logits
//! transformers computes for a fixed prompt and a few greedy steps. Our logits must match within
//! `TOLERANCE` (max abs diff, F32), and our greedy ids must equal transformers' ids, for the
//! config.json transformers >= 5 writes and for the same model stated in the legacy layout.

mod common;

use common::{hf_fixture, max_abs_diff};
use llm_pool::models::{LoadOptions, Model};
use serde::Deserialize;
use std::path::Path;

/// Max abs difference allowed between our F32 logits and transformers' F32 logits.
const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    prompt_ids: Vec<u32>,
    step_logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
}

fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(common::fixtures().join("hf"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("reference.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn check_against_reference(name: &str, model_dir: &Path, reference: &Reference) {
    let mut model = Model::load(model_dir, &LoadOptions::cpu())
        .unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let mut logits = model.forward_ids(&reference.prompt_ids, 0).unwrap();
    let mut position = reference.prompt_ids.len();
    for (step, expected) in reference.step_logits.iter().enumerate() {
        let diff = max_abs_diff(&logits, expected);
        assert!(
            diff <= TOLERANCE,
            "{name} ({}): step {step} logits differ from transformers by {diff} (tolerance {TOLERANCE})",
            model_dir.display()
        );
        let ours = llm_pool::text::sampling::argmax(&logits);
        assert_eq!(
            ours, reference.greedy_ids[step],
            "{name}: greedy id at step {step} differs from transformers"
        );
        if step + 1 < reference.step_logits.len() {
            logits = model.forward_ids(&[ours], position).unwrap();
            position += 1;
        }
    }
}

#[test]
fn every_safetensors_fixture_matches_transformers() {
    let names = fixture_names();
    assert!(!names.is_empty(), "no fixtures under tests/fixtures/hf");
    for name in names {
        let dir = hf_fixture(&name);
        let reference: Reference =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        check_against_reference(&name, &dir, &reference);

        // The same weights under the legacy config layout.
        let legacy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let file = p.file_name().unwrap().to_string_lossy().into_owned();
            match file.as_str() {
                "config.json" => {}
                "config.legacy.json" => {
                    std::fs::copy(&p, legacy.path().join("config.json")).unwrap();
                }
                _ => {
                    std::fs::copy(&p, legacy.path().join(&file)).unwrap();
                }
            }
        }
        check_against_reference(
            &format!("{name} (legacy config)"),
            legacy.path(),
            &reference,
        );
    }
}
