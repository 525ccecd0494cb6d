//! `compare`: raw candle and the `Pool` alternately in one process, run by run with the order
//! swapped each time, so that a shared machine's drift hits both alike: tok/s of each and the
//! paired ratio Pool / raw (the pool's cost) for tg and the shortest pp.

use crate::harness::{model_config, pool_run, prompt_ids, secs, start_pool, Bench};
use crate::raw::RawModel;
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

/// Raw candle and the Pool, alternating in one process (order swapped every run), so that
/// drift on a shared machine hits both alike: the paired ratio Pool / raw is the pool's cost.
pub(crate) async fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let raw = match RawModel::load(&b.o.model) {
        Ok(m) => m,
        Err(e) => return b.skip("llm-pool", "compare", name, &format!("{e:#}")),
    };
    let pool = match start_pool(b, vec![model_config("m", &b.o.model, 1)]).await {
        Ok(p) => p,
        Err(e) => return b.skip("llm-pool", "compare", name, &format!("{e:#}")),
    };
    let pp = b.pp.iter().copied().min().unwrap_or(64).max(1);
    let ids = prompt_ids(pp);
    let tests: Vec<(String, usize, usize)> =
        vec![(format!("tg{}", b.tg), 1, b.tg), (format!("pp{pp}"), pp, 1)];
    for (test, prompt_len, gen) in tests {
        let (mut r_tps, mut p_tps, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        let reps = if b.o.smoke { 1 } else { b.reps.max(5) };
        for run in 0..b.warmup + reps {
            // Both of a pair get the same prompt; a prefill's is fresh every run, since a slot
            // keeps the last prompt's cache (pool_run fails on any reuse). tg's one token
            // cannot be reused and stays the same.
            let prompt = if prompt_len == 1 {
                b.tg_prompt()?
            } else {
                b.fresh_prompt(&ids[..prompt_len])?
            };
            let mut pair = [0.0f64; 2];
            for k in 0..2 {
                if (run + k) % 2 == 1 {
                    let r = pool_run(&pool, "m", &prompt, gen, Instant::now()).await?;
                    // One forward per generated token (the prompt's, then all but the last).
                    let work = if gen == 1 { prompt_len } else { r.tokens };
                    pair[1] = work as f64 / secs(r.total);
                } else {
                    let mut m = raw.clone();
                    let t = Instant::now();
                    let mut tok = m.step(&prompt, 0)?;
                    for pos in prompt_len..prompt_len + gen - 1 {
                        tok = m.step(&[tok], pos)?;
                    }
                    let work = if gen == 1 { prompt_len } else { gen };
                    pair[0] = work as f64 / secs(t.elapsed());
                }
            }
            if run >= b.warmup {
                r_tps.push(pair[0]);
                p_tps.push(pair[1]);
                ratio.push(pair[1] / pair[0]);
            }
        }
        let cost: Vec<f64> = ratio.iter().map(|r| (1.0 - r) * 100.0).collect();
        b.emit("candle", "compare", name, &test, "tok/s", &r_tps, json!({}));
        b.emit(
            "llm-pool",
            "compare",
            name,
            &test,
            "tok/s",
            &p_tps,
            json!({}),
        );
        b.emit(
            "llm-pool",
            "compare",
            name,
            &format!("{test}_pool_over_raw"),
            "x",
            &ratio,
            json!({}),
        );
        b.emit(
            "llm-pool",
            "compare",
            name,
            &format!("{test}_pool_cost_pct"),
            "%",
            &cost,
            json!({"what": "(1 - Pool/raw) * 100, paired runs"}),
        );
    }
    pool.shutdown().await;
    Ok(())
}
