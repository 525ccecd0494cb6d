//! `concurrency`: N concurrent streams to one model through the in-process `Pool`, with one
//! replica and (unless `--no-replica-match`) with N replicas: aggregate tok/s of the burst, TTFT
//! and per-stream tok/s.

use crate::harness::{model_config_with, ms, pool_run, secs, start_pool, Bench, Fingerprint};
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

pub(crate) async fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let prompt = b.stream_prompt();
    let mut replica_sets = vec![1usize];
    if !b.o.no_replica_match {
        for &s in &b.streams {
            if s > 1 && !replica_sets.contains(&s) {
                replica_sets.push(s);
            }
        }
    }
    for replicas in replica_sets {
        let config = model_config_with("m", &b.o.model, replicas, &b.o.model_config)?;
        let pool = match start_pool(b, vec![config]).await {
            Ok(p) => p,
            Err(e) => return b.skip("llm-pool", "concurrency", name, &format!("{e:#}")),
        };
        let streams: Vec<usize> = if replicas == 1 {
            b.streams.clone()
        } else {
            vec![replicas]
        };
        for n in streams {
            let (mut agg, mut ttft, mut per_stream) = (Vec::new(), Vec::new(), Vec::new());
            let mut generated = 0usize;
            let mut sent = Fingerprint::default();
            for run in 0..b.runs() {
                // Each stream of each burst its own prompt: a repeated one would be served
                // from a slot's cache but for its last token (pool_run fails on any reuse).
                let prompts = b.stream_prompts(&prompt, n, run)?;
                sent.add_all(&prompts);
                let t0 = Instant::now();
                let runs = futures::future::join_all(
                    prompts.iter().map(|p| pool_run(&pool, "m", p, b.gen, t0)),
                )
                .await;
                let wall = t0.elapsed();
                let runs = runs.into_iter().collect::<Result<Vec<_>>>()?;
                if run >= b.warmup {
                    let tokens: usize = runs.iter().map(|r| r.tokens).sum();
                    generated += tokens;
                    agg.push(tokens as f64 / secs(wall));
                    for r in &runs {
                        ttft.push(ms(r.ttft));
                        per_stream.push(r.tokens as f64 / secs(r.end_since));
                    }
                }
            }
            let tag = format!("c{n}_r{replicas}");
            b.emit(
                "llm-pool",
                "concurrency",
                name,
                &format!("{tag}_aggregate"),
                "tok/s",
                &agg,
                json!({"streams": n, "replicas": replicas, "gen": b.gen, "prompt_ids": prompt,
                       "prompts": "fresh first id per stream and burst",
                       "prompts_fingerprint": sent.hex(),
                       "tokens_per_stream": generated as f64 / ttft.len().max(1) as f64,
                       "model_config": b.o.model_config}),
            );
            b.emit(
                "llm-pool",
                "concurrency",
                name,
                &format!("{tag}_ttft"),
                "ms",
                &ttft,
                json!({"streams": n, "replicas": replicas}),
            );
            b.emit(
                "llm-pool",
                "concurrency",
                name,
                &format!("{tag}_per_stream"),
                "tok/s",
                &per_stream,
                json!({"streams": n, "replicas": replicas}),
            );
        }
        pool.shutdown().await;
    }
    b.emit_rss(
        "llm-pool",
        "concurrency",
        name,
        llm_pool::resources::peak_rss_bytes(),
    );
    Ok(())
}
