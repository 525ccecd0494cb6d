//! `overhead`: what a request costs through the pool beyond its forward: a 1-token prompt with
//! `max_tokens = 1` through `Pool::generate_stream`, against a direct `Model::forward_ids` call
//! and a raw candle forward, interleaved so that drift hits all three alike (µs each, and the
//! pool's minus the direct call's).

use crate::harness::{model_config, pool_run, prompt_ids, start_pool, Bench};
use crate::raw::RawModel;
use anyhow::Result;
use llm_pool::models::{LanguageModel, LoadOptions, Model};
use llm_pool::text::sampling::argmax;
use serde_json::json;
use std::time::Instant;

pub(crate) async fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let pool = match start_pool(b, vec![model_config("m", &b.o.model, 1)]).await {
        Ok(p) => p,
        Err(e) => return b.skip("llm-pool", "overhead", name, &format!("{e:#}")),
    };
    let mut model = Model::load(&b.o.model, &LoadOptions::cpu())?;
    // Without candle's own model for the file, the other two rows are still measured.
    let raw = match RawModel::load(&b.o.model) {
        Ok(m) => Some(m),
        Err(e) => {
            b.skip("candle", "overhead", name, &format!("{e:#}"))?;
            None
        }
    };
    let base = prompt_ids(1);
    let (mut direct, mut via_pool, mut raw_us) = (Vec::new(), Vec::new(), Vec::new());
    let warm = 5.max(b.warmup);
    // Interleaved, so that drift (other load, frequency) hits all three alike.
    for run in 0..warm + b.overhead_reps {
        // One token, so nothing can be reused; a new one each run all the same, so that no run
        // differs from another in what a slot holds.
        let tok = b.fresh_prompt(&base)?;
        let t = Instant::now();
        model.reset_cache()?;
        argmax(&model.forward_ids(&tok, 0)?);
        let d = t.elapsed();
        let t = Instant::now();
        let r = pool_run(&pool, "m", &tok, 1, t).await?;
        let p = t.elapsed();
        anyhow::ensure!(r.tokens == 1, "expected 1 token");
        let rw = match &raw {
            Some(raw) => {
                let t = Instant::now();
                let mut m = raw.clone();
                m.step(&tok, 0)?;
                Some(t.elapsed())
            }
            None => None,
        };
        if run >= warm {
            direct.push(d.as_secs_f64() * 1e6);
            via_pool.push(p.as_secs_f64() * 1e6);
            if let Some(rw) = rw {
                raw_us.push(rw.as_secs_f64() * 1e6);
            }
        }
    }
    let diff: Vec<f64> = via_pool.iter().zip(&direct).map(|(p, d)| p - d).collect();
    b.emit(
        "llm-pool",
        "overhead",
        name,
        "request_1tok_direct",
        "us",
        &direct,
        json!({"what": "reset_cache + Model::forward_ids(1 token) + argmax"}),
    );
    b.emit(
        "llm-pool",
        "overhead",
        name,
        "request_1tok_pool",
        "us",
        &via_pool,
        json!({"what": "Pool::generate_stream, 1-token prompt, max_tokens 1, until Done"}),
    );
    b.emit(
        "llm-pool",
        "overhead",
        name,
        "request_1tok_pool_minus_direct",
        "us",
        &diff,
        json!({"what": "per-request routing, queue, worker hop, engine setup, events"}),
    );
    if !raw_us.is_empty() {
        b.emit(
            "candle",
            "overhead",
            name,
            "request_1tok_raw",
            "us",
            &raw_us,
            json!({"what": "clone pristine ModelWeights + forward(1 token) + argmax"}),
        );
    }
    pool.shutdown().await;
    Ok(())
}
