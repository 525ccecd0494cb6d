//! `layers`: llm-pool without the pool, one layer at a time: `Model::forward_ids` and argmax,
//! then `engine::generate` without and with the tokenizer (sampler, stop checks, streamed
//! detokenization), tg and pp tok/s each, so that a cost shows in the layer that adds it.

use crate::harness::{greedy, prompt_ids, secs, Bench};
use anyhow::Result;
use llm_pool::engine::generate;
use llm_pool::models::{LanguageModel, LoadOptions, Model};
use llm_pool::text::sampling::argmax;
use llm_pool::text::ModelText;
use serde_json::json;
use std::time::Instant;

pub(crate) fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let mut model = match Model::load(&b.o.model, &LoadOptions::cpu()) {
        Ok(m) => m,
        Err(e) => {
            b.skip("llm-pool", "layers", name, &e.to_string());
            return Ok(());
        }
    };
    let text = ModelText::load(&b.o.model, model.info(), None)?;
    let ids = prompt_ids(b.pp.iter().copied().max().unwrap_or(1).max(1));

    // Model::forward_ids + argmax over the returned Vec<f32>.
    let mut tps = Vec::new();
    for run in 0..b.runs() {
        model.reset_cache()?;
        let t = Instant::now();
        let mut tok = argmax(&model.forward_ids(&ids[..1], 0)?);
        for pos in 1..b.tg {
            tok = argmax(&model.forward_ids(&[tok], pos)?);
        }
        let dt = t.elapsed();
        if run >= b.warmup {
            tps.push(b.tg as f64 / secs(dt));
        }
    }
    b.emit(
        "llm-pool",
        "model",
        name,
        &format!("tg{}", b.tg),
        "tok/s",
        &tps,
        json!({}),
    );
    for &n in &b.pp {
        let mut tps = Vec::new();
        for run in 0..b.runs() {
            model.reset_cache()?;
            let t = Instant::now();
            argmax(&model.forward_ids(&ids[..n], 0)?);
            let dt = t.elapsed();
            if run >= b.warmup {
                tps.push(n as f64 / secs(dt));
            }
        }
        b.emit(
            "llm-pool",
            "model",
            name,
            &format!("pp{n}"),
            "tok/s",
            &tps,
            json!({}),
        );
    }

    // engine::generate (reset + prefill + decode loop + sampler), without and with the tokenizer.
    for (bench, text) in [("engine", None), ("engine+text", text.as_ref())] {
        let mut tps = Vec::new();
        let mut tokens = 0;
        for run in 0..b.runs() {
            let t = Instant::now();
            let out = generate(&mut model, text, &ids[..1], &greedy(b.tg), |_| true)?;
            let dt = t.elapsed();
            tokens = out.completion_tokens();
            if run >= b.warmup {
                // One forward per generated token (the prompt's, then one per token but the last).
                tps.push(out.completion_tokens() as f64 / secs(dt));
            }
        }
        b.emit(
            "llm-pool",
            bench,
            name,
            &format!("tg{}", b.tg),
            "tok/s",
            &tps,
            json!({"tokens": tokens}),
        );
        for &n in &b.pp {
            let mut tps = Vec::new();
            for run in 0..b.runs() {
                let t = Instant::now();
                generate(&mut model, text, &ids[..n], &greedy(1), |_| true)?;
                let dt = t.elapsed();
                if run >= b.warmup {
                    tps.push(n as f64 / secs(dt));
                }
            }
            b.emit(
                "llm-pool",
                bench,
                name,
                &format!("pp{n}"),
                "tok/s",
                &tps,
                json!({}),
            );
        }
    }
    b.emit_rss(
        "llm-pool",
        "layers",
        name,
        llm_pool::resources::peak_rss_bytes(),
    );
    Ok(())
}
