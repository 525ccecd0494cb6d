//! `structured`: constrained decoding. Decode time per token of `engine::generate` free and
//! constrained to a JSON schema, alternately from the same prompt, and their ratio; then the
//! grammar alone: its vocabulary index, compile time, and the check-and-advance and full-mask
//! costs per token.

use crate::harness::{greedy, secs, Bench};
use anyhow::{bail, Result};
use llm_pool::engine::generate;
use llm_pool::models::{LoadOptions, Model};
use llm_pool::text::ModelText;
use serde_json::{json, Value};
use std::time::Instant;

/// A schema with free text, numbers, an enum and an array: what a structured answer looks like.
fn report_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "summary": {"type": "string", "maxLength": 160},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 5},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "mood": {"type": "string", "enum": ["calm", "stormy", "foggy"]}
        },
        "required": ["title", "summary", "tags", "score", "mood"],
        "additionalProperties": false
    })
}

pub(crate) fn run(b: &Bench) -> Result<()> {
    use llm_pool::engine::Constrained;
    use llm_pool::request::Grammar;
    use llm_pool::text::{encode_prompt, ChatMessage, Prompt};
    let name = &b.model_name;
    let mut model = Model::load(&b.o.model, &LoadOptions::cpu())?;
    let Some(text) = ModelText::load(&b.o.model, model.info(), None)? else {
        return b.skip("llm-pool", "structured", name, "the model has no tokenizer");
    };
    let request =
        "Write a report about the sea, with a title, a long summary, tags, a score and the mood.";
    let prompt = if text.chat_template.is_some() {
        Prompt::Chat(vec![ChatMessage::new("user", request)])
    } else {
        Prompt::Text(format!("{request}\nReport (JSON):"))
    };
    let ids = encode_prompt(name, Some(&text), &prompt)?;
    let grammar = Grammar::JsonSchema(report_schema());

    // The vocabulary index, built once per model on its first constrained request.
    let t = Instant::now();
    let env = text.constraint_env()?;
    let index_ms = secs(t.elapsed()) * 1e3;
    b.emit(
        "llm-pool",
        "structured",
        name,
        "vocab_index",
        "ms",
        &[index_ms],
        json!({}),
    );

    let free = greedy(b.tg);
    let mut constrained = greedy(b.tg);
    constrained.grammar = Some(Constrained {
        grammar: grammar.clone(),
        param: "response_format".into(),
    });
    // Alternate free and constrained runs, so that drift of the machine hits both alike.
    let (mut free_ms, mut json_ms, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut output = Vec::new();
    for run in 0..b.runs() {
        let mut per_token = [0.0f64; 2];
        // Constrained first: the free run then generates as many tokens, so that both pay for
        // attention over the same positions.
        // Index 1 is the constrained run, 0 the free one.
        for (i, params) in [(1, &constrained), (0, &free)] {
            let mut params = params.clone();
            if i == 0 && !output.is_empty() {
                params.max_tokens = output.len();
            }
            let out = generate(&mut model, Some(&text), &ids, &params, |_| true)?;
            let steps = out.completion_tokens().saturating_sub(1).max(1);
            per_token[i] = secs(out.decode) * 1e3 / steps as f64;
            if i == 1 {
                output = out.token_ids.clone();
                let parsed: Result<Value, _> =
                    serde_json::from_str(out.text.as_deref().unwrap_or(""));
                if out.finish_reason == llm_pool::engine::FinishReason::Stop && parsed.is_err() {
                    bail!("the constrained output is not JSON: {:?}", out.text);
                }
            }
        }
        if run >= b.warmup {
            free_ms.push(per_token[0]);
            json_ms.push(per_token[1]);
            ratios.push(per_token[1] / per_token[0]);
        }
    }
    let tokens = json!({"constrained_tokens": output.len()});
    b.emit(
        "llm-pool",
        "structured",
        name,
        "decode_free",
        "ms/tok",
        &free_ms,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "structured",
        name,
        "decode_json_schema",
        "ms/tok",
        &json_ms,
        tokens.clone(),
    );
    b.emit(
        "llm-pool",
        "structured",
        name,
        "json_over_free",
        "x",
        &ratios,
        tokens,
    );

    // The grammar alone, replaying the constrained output.
    let width = model.info().vocab_size;
    let mut logits = vec![0.0f32; width];
    let (mut compile_us, mut check_us, mut mask_us) = (Vec::new(), Vec::new(), Vec::new());
    let replay: Vec<u32> = output
        .iter()
        .copied()
        .filter(|id| !text.stop_token_ids.contains(id))
        .collect();
    for run in 0..b.runs() {
        let t = Instant::now();
        let mut c = env.compile(&grammar, "response_format")?;
        let compile = secs(t.elapsed()) * 1e6;
        let t = Instant::now();
        for &id in &replay {
            if !c.allows(id) {
                bail!("the grammar refuses its own output at token {id}");
            }
            c.accept(id)?;
        }
        let check = secs(t.elapsed()) * 1e6 / replay.len().max(1) as f64;
        let mut c = env.compile(&grammar, "response_format")?;
        let t = Instant::now();
        for &id in &replay {
            c.mask(&mut logits)?;
            c.accept(id)?;
        }
        let mask = secs(t.elapsed()) * 1e6 / replay.len().max(1) as f64;
        if run >= b.warmup {
            compile_us.push(compile);
            check_us.push(check);
            mask_us.push(mask);
        }
    }
    let extra = json!({"tokens": replay.len()});
    b.emit(
        "llm-pool",
        "structured",
        name,
        "compile",
        "us",
        &compile_us,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "structured",
        name,
        "check_and_advance",
        "us/tok",
        &check_us,
        extra.clone(),
    );
    b.emit(
        "llm-pool",
        "structured",
        name,
        "mask_every_token",
        "us/tok",
        &mask_us,
        extra,
    );
    Ok(())
}
