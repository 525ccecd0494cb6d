//! `http`: streamed `/v1/completions` over HTTP against `llm-pool serve` (started here with a
//! temporary config on port 0) or any OpenAI-compatible server given by `--url` (e.g.
//! llama-server), with the same client: single-stream TTFT, decode and end-to-end tok/s
//! (unless `--no-single`), then aggregate tok/s, TTFT and per-stream tok/s of N concurrent
//! streams, and the server's peak RSS.

use crate::harness::{
    default_server_bin, http_run, ms, secs, start_server, vm_hwm, wait_ready, Bench, Fingerprint,
};
use anyhow::Result;
use serde_json::{json, Value};
use std::time::Instant;

pub(crate) async fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let imp = b.o.label.clone().unwrap_or_else(|| "llm-pool".into());
    let (server, url, pid) = match &b.o.url {
        Some(url) => (None, url.trim_end_matches('/').to_string(), b.o.server_pid),
        None => {
            let bin = b.o.server_bin.clone().unwrap_or_else(default_server_bin);
            if !bin.is_file() {
                return b.skip(
                    &imp,
                    "http",
                    name,
                    &format!(
                        "{} not built (cargo build --release --bin llm-pool)",
                        bin.display()
                    ),
                );
            }
            let s = start_server(b, &bin, b.o.server_replicas)?;
            let (url, pid) = (s.url.clone(), s.child.id());
            (Some(s), url, Some(pid))
        }
    };
    let client = reqwest::Client::builder()
        // A fresh connection per request, the same for every server: llama-server may close a
        // streamed connection that a pooled client would try to reuse.
        .pool_max_idle_per_host(0)
        .build()?;
    if let Err(e) = wait_ready(&client, &url).await {
        return b.skip(&imp, "http", name, &format!("{e:#}"));
    }
    let extra = if b.o.url.is_some() {
        // Another server: neither llm-pool's replicas nor its compute priority apply.
        json!({"server_replicas": Value::Null, "compute_nice": Value::Null})
    } else {
        json!({"server_replicas": b.o.server_replicas, "model_config": b.o.model_config})
    };
    if !b.o.no_single {
        single(b, &client, &url, &imp, &extra).await?;
    }
    // Concurrent streams.
    let prompt = b.stream_prompt();
    for &n in &b.streams {
        let (mut agg, mut ttft, mut per_stream) = (vec![], vec![], vec![]);
        let mut generated = 0usize;
        let mut sent = Fingerprint::default();
        let mut checked = true;
        for run in 0..b.runs() {
            // Each stream of each burst its own prompt, the same for every server and however
            // the sweep is split into processes: a repeated one would be served from a slot's
            // cache but for its last token (http_run fails when the server reports any reuse).
            let prompts = b.stream_prompts(&prompt, n, run)?;
            sent.add_all(&prompts);
            let t0 = Instant::now();
            let runs = futures::future::join_all(
                prompts
                    .iter()
                    .map(|p| http_run(&client, &url, p, b.gen, t0, b.o.url.is_none())),
            )
            .await;
            let wall = t0.elapsed();
            let runs = runs.into_iter().collect::<Result<Vec<_>>>()?;
            checked &= runs.iter().all(|r| r.cache_reported);
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
        let mut e = extra.clone();
        e["streams"] = json!(n);
        e["gen"] = json!(b.gen);
        e["prompt_ids"] = json!(prompt);
        e["prompts"] = json!("fresh first id per stream and burst");
        e["prompts_fingerprint"] = json!(sent.hex());
        // Whether the server reported its cached prompt tokens for every request (all 0).
        e["prefix_cache_checked"] = json!(checked);
        e["tokens_per_stream"] = json!(generated as f64 / ttft.len().max(1) as f64);
        b.emit(
            &imp,
            "http",
            name,
            &format!("c{n}_aggregate"),
            "tok/s",
            &agg,
            e.clone(),
        );
        b.emit(
            &imp,
            "http",
            name,
            &format!("c{n}_ttft"),
            "ms",
            &ttft,
            e.clone(),
        );
        b.emit(
            &imp,
            "http",
            name,
            &format!("c{n}_per_stream"),
            "tok/s",
            &per_stream,
            e,
        );
    }
    if let Some(pid) = pid {
        b.emit_rss(&imp, "http", name, vm_hwm(pid));
    }
    drop(server);
    Ok(())
}

/// Single stream over HTTP, a 1-token prompt and tg tokens: TTFT, decode and end-to-end tok/s.
async fn single(
    b: &Bench,
    client: &reqwest::Client,
    url: &str,
    imp: &str,
    extra: &Value,
) -> Result<()> {
    let name = &b.model_name;
    let one = b.tg_prompt()?;
    let (mut ttft, mut decode, mut tps) = (vec![], vec![], vec![]);
    let mut tokens = 0;
    let mut checked = true;
    for run in 0..b.runs() {
        // One token cannot be served from a cache, so it may repeat (http_run checks anyway).
        let r = http_run(client, url, &one, b.tg, Instant::now(), b.o.url.is_none()).await?;
        checked &= r.cache_reported;
        tokens = r.tokens;
        if run >= b.warmup {
            ttft.push(ms(r.ttft));
            tps.push(r.tokens as f64 / secs(r.total));
            if r.tokens > 1 {
                decode.push((r.tokens - 1) as f64 / secs(r.total - r.ttft));
            }
        }
    }
    let tg = format!("tg{}", b.tg);
    let mut extra = extra.clone();
    extra["prefix_cache_checked"] = json!(checked);
    let mut e = extra.clone();
    e["tokens"] = json!(tokens);
    b.emit(imp, "http", name, &tg, "tok/s", &tps, e);
    b.emit(
        imp,
        "http",
        name,
        &format!("{tg}_decode"),
        "tok/s",
        &decode,
        extra.clone(),
    );
    b.emit(imp, "http", name, &format!("ttft_{tg}"), "ms", &ttft, extra);
    Ok(())
}
