//! `scrape`: what an inference router's scrapes cost and see. `GET /metrics` of `llm-pool serve`
//! 20 times a second, idle and while streams generate: scrape latency, and the streams'
//! aggregate tok/s scraped against unscraped phases of the same server.

use crate::harness::{
    default_server_bin, http_run, ms, secs, start_server_with, wait_ready, Bench,
};
use anyhow::{bail, Result};
use serde_json::json;
use std::time::{Duration, Instant};

/// Scrapes `/metrics` 20 times a second until `until`, over one kept-alive connection (as
/// Prometheus and the inference gateway's endpoint picker scrape), and returns each scrape's
/// latency in ms.
async fn scrape_for(client: &reqwest::Client, url: &str, until: Instant) -> Result<Vec<f64>> {
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < until {
        tick.tick().await;
        let t = Instant::now();
        let body = client
            .get(format!("{url}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        latencies.push(ms(t.elapsed()));
        if !body.contains("vllm:num_requests_running") {
            bail!("the scrape lacks the router gauges");
        }
    }
    Ok(latencies)
}

pub(crate) async fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let bin = b.o.server_bin.clone().unwrap_or_else(default_server_bin);
    if !bin.is_file() {
        return b.skip(
            "llm-pool",
            "scrape",
            name,
            &format!("{} not built", bin.display()),
        );
    }
    let secs_per_phase =
        b.o.scrape_secs
            .unwrap_or(if b.o.smoke { 1.0 } else { 10.0 });
    let phase = Duration::from_secs_f64(secs_per_phase.max(0.1));
    let server = start_server_with(b, &bin, 1, "[metrics]\nvllm_compatible_names = true\n")?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    wait_ready(&client, &server.url).await?;
    let url = server.url.clone();
    let scraper = reqwest::Client::new();
    let idle = scrape_for(&scraper, &url, Instant::now() + phase).await?;

    // Streams that generate back to back for the whole phase: first without scraping (the
    // baseline of the same server), then while scraped.
    let streams = b.streams.iter().copied().max().unwrap_or(1);
    let prompt = b.stream_prompt();
    let generate_until = |stop: Instant| {
        let (client, url, prompt) = (client.clone(), url.clone(), prompt.clone());
        let generators = (0..streams).map(move |_| {
            let (client, url, prompt) = (client.clone(), url.clone(), prompt.clone());
            let gen = b.gen;
            async move {
                let mut tokens = 0usize;
                while Instant::now() < stop {
                    // A fresh prompt per request, as everywhere a prompt is timed: a repeated
                    // one would be served from a slot's cache (http_run fails on that).
                    let prompt = b.fresh_prompt(&prompt)?;
                    tokens += http_run(&client, &url, &prompt, gen, Instant::now(), true)
                        .await?
                        .tokens;
                }
                Ok::<usize, anyhow::Error>(tokens)
            }
        });
        async move {
            let counts = futures::future::join_all(generators).await;
            Ok::<usize, anyhow::Error>(
                counts
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .sum(),
            )
        }
    };
    // Unscraped phases before and after the scraped one, so that drift over the run hits the
    // baseline as it hits the measurement.
    let unscraped_phase = || async {
        let started = Instant::now();
        let tokens = generate_until(Instant::now() + phase).await?;
        Ok::<f64, anyhow::Error>(tokens as f64 / secs(started.elapsed()))
    };
    let before = unscraped_phase().await?;
    let stop = Instant::now() + phase;
    let started = Instant::now();
    let (loaded, generated) =
        futures::future::join(scrape_for(&scraper, &url, stop), generate_until(stop)).await;
    let wall = started.elapsed();
    let loaded = loaded?;
    let scraped = generated? as f64 / secs(wall);
    let unscraped = (before + unscraped_phase().await?) / 2.0;
    let extra = json!({"scrapes_per_s": 20, "secs": secs_per_phase, "streams": streams});
    b.emit(
        "llm-pool",
        "scrape",
        name,
        "idle",
        "ms",
        &idle,
        extra.clone(),
    );
    b.emit(
        "llm-pool",
        "scrape",
        name,
        &format!("c{streams}_generating"),
        "ms",
        &loaded,
        extra.clone(),
    );
    b.emit(
        "llm-pool",
        "scrape",
        name,
        &format!("c{streams}_aggregate_unscraped"),
        "tok/s",
        &[unscraped],
        extra.clone(),
    );
    b.emit(
        "llm-pool",
        "scrape",
        name,
        &format!("c{streams}_aggregate_while_scraped"),
        "tok/s",
        &[scraped],
        {
            let mut extra = extra;
            extra["vs_unscraped"] = json!(scraped / unscraped);
            extra
        },
    );
    drop(server);
    Ok(())
}
