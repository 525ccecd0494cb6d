//! The text layer against references: tokenizers and greedy output against llama.cpp on the
//! real demo models, chat templates against Python's Jinja2, and the sampling, stop-string and
//! streaming behaviour users rely on.

mod common;

use common::{real_model, GEMMA3, SMOLLM2};
use llm_pool::engine::{generate, FinishReason, GenerateParams};
use llm_pool::models::{LoadOptions, Model, ModelInfo};
use llm_pool::text::sampling::SamplingParams;
use llm_pool::text::stream::StreamDecoder;
use llm_pool::text::{ChatMessage, ChatTemplate, ModelText};

/// The raw ChatML prompt from the llama.cpp reference run (no default system message).
const FRANCE_PROMPT: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
/// llama.cpp's ids for FRANCE_PROMPT and its greedy continuation on the same file.
const FRANCE_IDS: [u32; 16] = [
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];
const FRANCE_GREEDY: [u32; 8] = [504, 3575, 282, 4649, 314, 7042, 30, 2];

fn smollm2() -> (Model, ModelText) {
    let path = real_model(SMOLLM2);
    let model = Model::load(&path, &LoadOptions::cpu()).unwrap();
    let text = ModelText::load(&path, model.info(), None).unwrap().unwrap();
    (model, text)
}

/// The Gemma text side alone (tokenizer tests need no weights).
fn gemma3_text() -> ModelText {
    let path = real_model(GEMMA3);
    let info = ModelInfo {
        architecture: "quantized_gemma3",
        vocab_size: 262_144,
        max_context: 32_768,
        eos_token_ids: vec![1],
        bos_token_id: Some(2),
        dtype: candle_core::DType::F32,
        kv_bytes_per_token: 18 * 2 * 256 * 4,
    };
    ModelText::load(&path, &info, None).unwrap().unwrap()
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    }
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    let (_, text) = smollm2();
    assert_eq!(text.encode(FRANCE_PROMPT, true).unwrap(), FRANCE_IDS);
    assert_eq!(
        text.encode("Once upon a time", true).unwrap(),
        [6403, 1980, 253, 655]
    );
    // The words candle's GGUF tokenizer gets wrong (GPT-2 split with a prefix space).
    assert_eq!(
        text.decode(&text.encode("Hello user", true).unwrap())
            .unwrap(),
        "Hello user"
    );
}

#[test]
fn gemma3_sentencepiece_tokenizer_matches_llama_cpp() {
    let text = gemma3_text();
    assert_eq!(
        text.encode("Once upon a time", true).unwrap(),
        [2, 14946, 3324, 496, 990]
    );
    // Round trips, including byte fallback and special tokens.
    for s in [
        "Hello, world!",
        "  two  spaces",
        "日本語 🦀 crab",
        "<start_of_turn>user\nhi<end_of_turn>",
    ] {
        let ids = text.encode(s, false).unwrap();
        let back = text.tokenizer.decode(&ids, false).unwrap();
        assert_eq!(back, s);
    }
}

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    let (mut model, text) = smollm2();
    let ids = text.encode(FRANCE_PROMPT, true).unwrap();
    let out = generate(&mut model, Some(&text), &ids, &greedy(32), |_| true).unwrap();
    assert_eq!(out.token_ids, FRANCE_GREEDY);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text.as_deref(), Some("The capital of France is Paris."));
}

/// Below this gap (in nats) between llama.cpp's own two most likely tokens, a step is a
/// near-tie: which of the two comes out on top depends on the order of float sums, and
/// changes between builds of llama.cpp itself. In the fixture the near-ties are the steps under
/// 0.14 nats; every other step is over 0.22.
const NEAR_TIE_NATS: f64 = 0.2;

/// Teacher-forced agreement with llama.cpp (tests/fixtures/llama_cpp_greedy.json): the prompt,
/// then each of llama.cpp's 32 greedy tokens fed in turn; at every step our top-1 next token is
/// compared with llama.cpp's. Free-running text would diverge for good at the first near-tie;
/// this counts each step on its own. Every step where llama.cpp's choice is clear (its top two
/// [`NEAR_TIE_NATS`] or more apart: 26 of SmolLM2's 32 steps, 27 of Gemma-3's) must agree;
/// near-ties may go either way. (Measured: 29-31 of 32 agree on SmolLM2 and 30-31 on Gemma-3,
/// depending only on the summation order of the attention's dot products; candle's own
/// quantized paths scored 30 and 29 before our kernels.)
#[test]
fn teacher_forced_top1_agrees_with_llama_cpp() {
    let fixture = common::fixtures().join("llama_cpp_greedy.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (name, file) in [("smollm2", SMOLLM2), ("gemma3", GEMMA3)] {
        let r = &reference["models"][name];
        assert_eq!(r["model"], file, "{name}: the fixture is for another file");
        let (prompt, greedy) = (ids(&r["prompt"]), ids(&r["greedy"]));
        assert_eq!(greedy.len(), 32, "{name}");
        let gaps: Vec<f64> = r["top2_logprob_gap"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        assert_eq!(gaps.len(), 32, "{name}");
        let mut model = Model::load(real_model(file), &LoadOptions::cpu()).unwrap();
        let mut logits = model.forward_ids(&prompt, 0).unwrap();
        let mut disagreements = Vec::new();
        for (step, &expected) in greedy.iter().enumerate() {
            let ours = llm_pool::text::sampling::argmax(&logits);
            if ours != expected {
                disagreements.push((step, ours, expected, gaps[step]));
            }
            logits = model.forward_ids(&[expected], prompt.len() + step).unwrap();
        }
        let agreed = greedy.len() - disagreements.len();
        eprintln!("{name}: teacher-forced top-1 agreement {agreed}/32; (step, ours, llama.cpp, its top-2 gap): {disagreements:?}");
        let clear: Vec<_> = disagreements
            .iter()
            .filter(|d| d.3 >= NEAR_TIE_NATS)
            .collect();
        assert!(
            clear.is_empty(),
            "{name}: top-1 differs from llama.cpp where its choice is clear \
             (top two {NEAR_TIE_NATS} nats or more apart): {clear:?}"
        );
    }
}

#[test]
fn chat_templates_render_exactly_like_jinja2() {
    let fixtures = common::fixtures().join("templates");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("expected.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for (name, specials) in expected["specials"].as_object().unwrap() {
        let source = std::fs::read_to_string(fixtures.join(format!("{name}.jinja"))).unwrap();
        let template = ChatTemplate::new(
            &source,
            specials["bos_token"].as_str().map(String::from),
            specials["eos_token"].as_str().map(String::from),
        )
        .unwrap();
        for (conv, messages) in expected["conversations"].as_object().unwrap() {
            let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone()).unwrap();
            for gen in [true, false] {
                let key = format!("{name}/{conv}/{}", if gen { "gen" } else { "nogen" });
                let ours = template.render(&messages, gen).unwrap();
                assert_eq!(ours, expected["expected"][&key].as_str().unwrap(), "{key}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn template_errors_are_clear() {
    let source =
        std::fs::read_to_string(common::fixtures().join("templates/gemma3.jinja")).unwrap();
    let t = ChatTemplate::new(&source, Some("<bos>".into()), None).unwrap();
    let err = t
        .render(
            &[
                ChatMessage::new("assistant", "hi"),
                ChatMessage::new("assistant", "x"),
            ],
            true,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("messages") && err.contains("must alternate"),
        "{err}"
    );
    let err = ChatTemplate::new("{% for %}", None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat template does not compile"), "{err}");
}

#[test]
fn smollm2_template_comes_from_the_gguf_and_renders_chatml() {
    let (_, text) = smollm2();
    let template = text
        .chat_template
        .as_ref()
        .expect("SmolLM2 ships a template");
    let fixture =
        std::fs::read_to_string(common::fixtures().join("templates/smollm2.jinja")).unwrap();
    assert_eq!(template.source(), fixture);
    let rendered = template
        .render(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    assert!(rendered.ends_with(FRANCE_PROMPT), "{rendered:?}");
    assert!(rendered.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
}

#[test]
fn gemma3_base_model_has_no_template() {
    assert!(gemma3_text().chat_template.is_none());
}

#[test]
fn eos_sets_contain_the_end_of_turn_tokens() {
    let (_, smol) = smollm2();
    let im_end = smol.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(
        smol.stop_token_ids.contains(&im_end),
        "{:?}",
        smol.stop_token_ids
    );
    let gemma = gemma3_text();
    let end_of_turn = gemma.tokenizer.token_to_id("<end_of_turn>").unwrap();
    assert!(
        gemma.stop_token_ids.contains(&end_of_turn),
        "{:?}",
        gemma.stop_token_ids
    );
    assert!(
        gemma.stop_token_ids.contains(&1),
        "<eos> missing: {:?}",
        gemma.stop_token_ids
    );
}

#[test]
fn the_same_seed_gives_the_same_output_and_top_k_1_is_greedy() {
    let (mut model, text) = smollm2();
    let ids = text.encode("Once upon a time", true).unwrap();
    let sampled = |model: &mut Model, seed: u64, top_k: usize| {
        let params = GenerateParams {
            max_tokens: 12,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k,
                top_p: 0.95,
                seed,
                ..SamplingParams::default()
            },
            ..GenerateParams::default()
        };
        generate(model, Some(&text), &ids, &params, |_| true)
            .unwrap()
            .token_ids
    };
    let a = sampled(&mut model, 42, 0);
    let b = sampled(&mut model, 42, 0);
    assert_eq!(a, b, "same seed, different output");
    let others: Vec<Vec<u32>> = (0..4).map(|s| sampled(&mut model, 1000 + s, 0)).collect();
    assert!(others.iter().any(|o| o != &a), "sampling ignores the seed");
    let top1 = sampled(&mut model, 7, 1);
    let greedy_ids = generate(&mut model, Some(&text), &ids, &greedy(12), |_| true)
        .unwrap()
        .token_ids;
    assert_eq!(top1, greedy_ids);
}

#[test]
fn stop_strings_cut_the_output_within_and_across_tokens() {
    let (mut model, text) = smollm2();
    let ids = text.encode(FRANCE_PROMPT, true).unwrap();
    let with_stop = |model: &mut Model, stop: &str| {
        let params = GenerateParams {
            stop: vec![stop.to_string()],
            ..greedy(32)
        };
        let mut streamed = String::new();
        let out = generate(model, Some(&text), &ids, &params, |e| {
            streamed.push_str(e.text);
            true
        })
        .unwrap();
        assert_eq!(
            out.text.as_deref(),
            Some(streamed.as_str()),
            "stream and result differ"
        );
        (out.text.unwrap(), out.finish_reason)
    };
    // Inside one token (" Paris").
    assert_eq!(
        with_stop(&mut model, "aris"),
        ("The capital of France is P".into(), FinishReason::Stop)
    );
    // Across token boundaries (" France" + " is").
    assert_eq!(
        with_stop(&mut model, "France is"),
        ("The capital of ".into(), FinishReason::Stop)
    );
    // A stop string that never completes releases its held-back prefix at the end.
    assert_eq!(
        with_stop(&mut model, "Paris!"),
        ("The capital of France is Paris.".into(), FinishReason::Stop)
    );
}

#[test]
fn max_tokens_ends_with_length() {
    let (mut model, text) = smollm2();
    let ids = text.encode(FRANCE_PROMPT, true).unwrap();
    let out = generate(&mut model, Some(&text), &ids, &greedy(3), |_| true).unwrap();
    assert_eq!(out.token_ids, FRANCE_GREEDY[..3]);
    assert_eq!(out.finish_reason, FinishReason::Length);
}

#[test]
fn streamed_text_equals_the_final_text_for_multibyte_output() {
    let (mut model, text) = smollm2();
    let ids = text.encode("Emoji party: 🎉🎉", true).unwrap();
    let mut deltas = Vec::new();
    let out = generate(&mut model, Some(&text), &ids, &greedy(24), |e| {
        deltas.push(e.text.to_string());
        true
    })
    .unwrap();
    let streamed: String = deltas.concat();
    let full = out.text.unwrap();
    assert_eq!(streamed, full);
    assert!(
        full.contains('🎉'),
        "the output should contain emoji split across tokens: {full:?}"
    );
    assert!(!full.contains('\u{FFFD}'));
    // Emoji take several tokens each here, so some tokens emit nothing and none a broken char.
    assert!(deltas.iter().any(|d| d.is_empty()));
}

#[test]
fn stream_decoder_reassembles_byte_fallback_characters() {
    let text = gemma3_text();
    let s = "Crabs 🦀 and 日本語, café";
    let ids = text.encode(s, false).unwrap();
    let mut decoder = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let delta = decoder.push(&text.tokenizer, id).unwrap();
        assert!(
            !delta.contains('\u{FFFD}'),
            "broken character emitted for id {id}"
        );
        out.push_str(&delta);
    }
    out.push_str(&decoder.finish(&text.tokenizer).unwrap());
    assert_eq!(out, s);
}

#[test]
fn a_prompt_longer_than_the_context_states_both_numbers() {
    let (mut model, text) = smollm2();
    let ids = text.encode("Once upon a time", true).unwrap();
    let err = generate(&mut model, Some(&text), &ids, &greedy(100_000), |_| true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the prompt has 4 tokens") && err.contains("max_tokens is 100000"),
        "{err}"
    );
    assert!(
        err.contains(&format!("context of {}", model.info().max_context)),
        "{err}"
    );
}

#[test]
fn cancelling_stops_at_once() {
    let (mut model, text) = smollm2();
    let ids = text.encode("Once upon a time", true).unwrap();
    let mut seen = 0;
    let out = generate(&mut model, Some(&text), &ids, &greedy(50), |_| {
        seen += 1;
        seen < 3
    })
    .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.token_ids.len(), 3);
}

/// Gemma 3 end to end through the CLI (its own process, so its peak RSS is the model's):
/// it loads within 1 GiB and continues "Once upon a time" greedily.
#[test]
fn gemma3_loads_within_the_memory_bound_and_generates() {
    let path = real_model(GEMMA3);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-pool"))
        .args([
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
        ])
        .args(["--max-tokens", "12", "--temperature", "0", "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["architecture"], "quantized_gemma3");
    assert_eq!(
        json["prompt_ids"],
        serde_json::json!([2, 14946, 3324, 496, 990])
    );
    // The first tokens are far from any tie: ", there was a".
    assert_eq!(
        json["token_ids"].as_array().unwrap()[..4],
        [236764, 993, 691, 496]
    );
    let text = json["text"].as_str().unwrap();
    assert!(text.starts_with(", there was a"), "{text:?}");
    let rss = json["peak_rss_bytes"].as_u64().unwrap();
    assert!(rss <= 1 << 30, "peak RSS {} MiB exceeds 1 GiB", rss >> 20);
}
