//! The `llm-pool generate` contract that scripts and benchmarks depend on.

mod common;

use serde_json::Value;
use std::process::{Command, Output};

fn llm_pool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llm-pool"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the llm-pool binary runs")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "llm-pool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "the CLI panicked: {stderr}");
    stderr
}

#[test]
fn prompt_ids_work_without_a_tokenizer_and_json_has_the_contract_fields() {
    let dir = common::hf_fixture("llama3");
    assert!(!dir.join("tokenizer.json").exists());
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let prompt: Vec<String> = reference["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let out = llm_pool(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &prompt.join(","),
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]);
    let json = json_of(&out);
    let greedy: Vec<u64> = reference["greedy_ids"].as_array().unwrap()[..4]
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let ids: Vec<u64> = json["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids, greedy, "greedy ids differ from transformers'");
    assert_eq!(json["finish_reason"], "length");
    assert_eq!(json["prompt_tokens"], prompt.len());
    assert_eq!(json["completion_tokens"], 4);
    assert!(json["text"].is_null());
    for key in [
        "prefill_ms",
        "decode_ms",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    ] {
        assert!(json[key].as_f64().is_some(), "{key} missing: {json}");
    }
}

#[test]
fn text_prompts_use_tokenizer_json() {
    let dir = common::hf_fixture("llama");
    let out = llm_pool(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "3",
        "--json",
    ]);
    let json = json_of(&out);
    assert_eq!(json["prompt_ids"], serde_json::json!([1, 120, 96, 37, 99]));
    assert!(json["text"].is_string());

    let out = llm_pool(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--chat",
        "--system",
        "Be brief.",
        "--max-tokens",
        "2",
        "--json",
    ]);
    let json = json_of(&out);
    // <s> is not added to a rendered chat prompt: the template owns the special tokens.
    assert_eq!(json["prompt_ids"][0], 3, "{json}");
}

#[test]
fn a_text_prompt_without_a_tokenizer_says_to_use_prompt_ids() {
    let dir = common::hf_fixture("llama3");
    let err = failure(&llm_pool(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
    ]));
    assert!(err.contains("has no tokenizer; pass --prompt-ids"), "{err}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let err = failure(&llm_pool(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt-ids",
        "1",
    ]));
    assert!(
        err.contains("/nonexistent/model") && err.contains("no such file"),
        "{err}"
    );
    let dir = common::hf_fixture("llama");
    let err = failure(&llm_pool(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--temperature",
        "3",
    ]));
    assert!(
        err.contains("temperature") && err.contains("[0, 2]"),
        "{err}"
    );
    let err = failure(&llm_pool(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1,9999",
    ]));
    assert!(err.contains("9999") && err.contains("vocabulary"), "{err}");
    let err = failure(&llm_pool(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--device",
        "tpu",
    ]));
    assert!(err.contains("allowed: cpu, cuda:N, metal:N"), "{err}");
}

#[test]
fn help_describes_the_commands() {
    let out = llm_pool(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("generate") && help.contains("serve"),
        "{help}"
    );
    let out = llm_pool(&["generate", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--prompt-ids",
        "--temperature",
        "--seed",
        "--json",
        "--chat",
        "--stop",
        "--stream",
    ] {
        assert!(help.contains(flag), "{flag} missing from generate --help");
    }
}

#[test]
fn output_format_flags_constrain_the_output_and_name_themselves_in_errors() {
    let model = common::real_model(common::SMOLLM2);
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer"}}, "required": ["city", "population"],
            "additionalProperties": false}"#,
    )
    .unwrap();
    let model = model.to_str().unwrap();
    let base = [
        "generate",
        "--model",
        model,
        "--chat",
        "--prompt",
        "Biggest city in Japan?",
    ];
    let mut args = base.to_vec();
    args.extend([
        "--json-schema",
        schema.to_str().unwrap(),
        "--max-tokens",
        "60",
        "--json",
    ]);
    args.extend(["--logprobs", "2"]);
    let json = json_of(&llm_pool(&args));
    let answer: Value = serde_json::from_str(json["text"].as_str().unwrap()).unwrap();
    assert!(
        answer["city"].is_string() && answer["population"].is_i64(),
        "{answer}"
    );
    assert_eq!(answer.as_object().unwrap().len(), 2, "{answer}");
    let logprobs = json["logprobs"].as_array().unwrap();
    assert!(!logprobs.is_empty() && logprobs[0]["top"].as_array().unwrap().len() == 2);

    std::fs::write(&schema, r#""an object""#).unwrap();
    let mut args = base.to_vec();
    args.extend(["--json-schema", schema.to_str().unwrap()]);
    let stderr = failure(&llm_pool(&args));
    assert!(stderr.contains("--json-schema"), "{stderr}");
    let mut args = base.to_vec();
    args.extend(["--regex", "[0-9]+", "--json-object"]);
    let stderr = failure(&llm_pool(&args));
    assert!(
        stderr.contains("--json-object") || stderr.contains("--regex"),
        "{stderr}"
    );
}
