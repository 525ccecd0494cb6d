//! `layers`: llm-pool without the pool, one layer at a time: `Model::forward_ids` and argmax,
//! then `engine::generate` without and with the tokenizer (sampler, stop checks, streamed
//! detokenization), tg and pp tok/s each, so that a cost shows in the layer that adds it.

use crate::harness::{greedy, prompt_ids, secs, Bench};
use anyhow::{bail, Result};
use llm_pool::engine::{CachePolicy, CacheUse, GenerateOutput, GenerateParams, Prepared, Session};
use llm_pool::models::{LanguageModel, LoadOptions, Model};
use llm_pool::text::sampling::argmax;
use llm_pool::text::ModelText;
use serde_json::json;
use std::time::Instant;

/// `engine::generate` as it is written (a session that resets the cache first), with the
/// session's own account of the cache checked: a timed prefill must compute its whole prompt.
fn generate(
    model: &mut Model,
    text: Option<&ModelText>,
    prompt: &[u32],
    params: &GenerateParams,
) -> Result<GenerateOutput> {
    let prepared = Prepared::new(model.info(), text, prompt.to_vec(), params.clone())?;
    let mut session = Session::new(model);
    session.policy = CachePolicy::AlwaysReset;
    let out = session.generate(text, prepared, |_| true)?;
    if let Some(CacheUse::PrefixHit(n)) = session.last_cache_use {
        bail!(
            "the session reused {n} cached tokens of a {}-token prompt: a timed prefill must \
             compute its whole prompt",
            prompt.len()
        );
    }
    Ok(out)
}

pub(crate) fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let mut model = match Model::load(&b.o.model, &LoadOptions::cpu()) {
        Ok(m) => m,
        Err(e) => return b.skip("llm-pool", "layers", name, &e.to_string()),
    };
    let text = ModelText::load(&b.o.model, model.info(), None)?;
    let ids = prompt_ids(b.pp.iter().copied().max().unwrap_or(1).max(1));
    let one = b.tg_prompt()?;

    // Model::forward_ids + argmax over the returned Vec<f32>.
    let mut tps = Vec::new();
    for run in 0..b.runs() {
        model.reset_cache()?;
        let t = Instant::now();
        let mut tok = argmax(&model.forward_ids(&one, 0)?);
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
            // The cache is reset, so nothing can be reused; a fresh prompt all the same, the
            // one the other layers get in the same order.
            let prompt = b.fresh_prompt(&ids[..n])?;
            model.reset_cache()?;
            let t = Instant::now();
            argmax(&model.forward_ids(&prompt, 0)?);
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
            let out = generate(&mut model, text, &one, &greedy(b.tg))?;
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
                let prompt = b.fresh_prompt(&ids[..n])?;
                let t = Instant::now();
                generate(&mut model, text, &prompt, &greedy(1))?;
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
