//! `pool`: the in-process `Pool` API (one model, one replica, greedy, token-id prompts), timed
//! from the enqueue to the final event: tg tok/s (end to end and decode after the first token),
//! TTFT, pp tok/s and TTFT, peak RSS.

use crate::harness::{model_config, ms, pool_run, prompt_ids, secs, start_pool, Bench};
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

pub(crate) async fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let pool = match start_pool(b, vec![model_config("m", &b.o.model, 1)]).await {
        Ok(p) => p,
        Err(e) => return b.skip("llm-pool", "pool", name, &format!("{e:#}")),
    };
    let ids = prompt_ids(b.pp.iter().copied().max().unwrap_or(1).max(1));
    let one = b.tg_prompt()?;
    let (mut tps, mut ttft, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    let mut tokens = 0;
    for run in 0..b.runs() {
        let r = pool_run(&pool, "m", &one, b.tg, Instant::now()).await?;
        tokens = r.tokens;
        if run >= b.warmup {
            tps.push(r.tokens as f64 / secs(r.total));
            ttft.push(ms(r.ttft));
            if r.tokens > 1 {
                decode.push((r.tokens - 1) as f64 / secs(r.total - r.ttft));
            }
        }
    }
    let tg = format!("tg{}", b.tg);
    b.emit(
        "llm-pool",
        "pool",
        name,
        &tg,
        "tok/s",
        &tps,
        json!({"tokens": tokens}),
    );
    b.emit(
        "llm-pool",
        "pool",
        name,
        &format!("{tg}_decode"),
        "tok/s",
        &decode,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "pool",
        name,
        &format!("ttft_{tg}"),
        "ms",
        &ttft,
        json!({}),
    );
    for &n in &b.pp {
        let (mut tps, mut ttft) = (Vec::new(), Vec::new());
        for run in 0..b.runs() {
            // A slot keeps the last prompt's cache: the same prompt again would prefill one
            // token (pool_run fails on any reuse).
            let prompt = b.fresh_prompt(&ids[..n])?;
            let r = pool_run(&pool, "m", &prompt, 1, Instant::now()).await?;
            if run >= b.warmup {
                tps.push(n as f64 / secs(r.total));
                ttft.push(ms(r.ttft));
            }
        }
        b.emit(
            "llm-pool",
            "pool",
            name,
            &format!("pp{n}"),
            "tok/s",
            &tps,
            json!({}),
        );
        b.emit(
            "llm-pool",
            "pool",
            name,
            &format!("ttft_pp{n}"),
            "ms",
            &ttft,
            json!({}),
        );
    }
    pool.shutdown().await;
    b.emit_rss(
        "llm-pool",
        "pool",
        name,
        llm_pool::resources::peak_rss_bytes(),
    );
    Ok(())
}
