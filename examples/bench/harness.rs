//! What every subcommand shares: the resolved settings ([`Bench`]), the output of a figure
//! (a JSON line on stdout, a text line on stderr) or of a skip, the statistics of the samples,
//! the fixed prompt ids, and the helpers that start an in-process [`Pool`] or an `llm-pool serve`
//! and time one streamed request through either.

use crate::Opts;
use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use llm_pool::config::{Config, ModelConfig};
use llm_pool::engine::GenerateParams;
use llm_pool::pool::{GenerateRequest, GenerationEvent, Pool};
use llm_pool::text::sampling::SamplingParams;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Resolved settings.
pub(crate) struct Bench {
    pub(crate) o: Opts,
    pub(crate) model_name: String,
    pub(crate) threads: usize,
    pub(crate) reps: usize,
    pub(crate) warmup: usize,
    pub(crate) tg: usize,
    pub(crate) pp: Vec<usize>,
    pub(crate) gen: usize,
    pub(crate) streams: Vec<usize>,
    pub(crate) overhead_reps: usize,
}

impl Bench {
    pub(crate) fn new(o: Opts) -> Self {
        let smoke = o.smoke;
        Bench {
            model_name: o.name.clone().unwrap_or_else(|| label_of(&o.model)),
            threads: candle_core::utils::get_num_threads(),
            reps: o.reps.unwrap_or(if smoke { 1 } else { 5 }).max(1),
            warmup: o.warmup.unwrap_or(1),
            tg: o.tg.unwrap_or(if smoke { 8 } else { 128 }).max(1),
            pp: o
                .pp
                .clone()
                .unwrap_or(if smoke { vec![16] } else { vec![64, 512] }),
            gen: o.gen.unwrap_or(if smoke { 4 } else { 64 }).max(1),
            streams: o
                .streams
                .clone()
                .unwrap_or(if smoke { vec![1, 4] } else { vec![1, 4, 8] }),
            overhead_reps: o
                .overhead_reps
                .unwrap_or(if smoke { 5 } else { 100 })
                .max(1),
            o,
        }
    }

    /// The prompt of each concurrent stream: `--prompt-ids`, or 8 fixed ids.
    pub(crate) fn stream_prompt(&self) -> Vec<u32> {
        self.o.prompt_ids.clone().unwrap_or_else(|| prompt_ids(8))
    }

    pub(crate) fn runs(&self) -> usize {
        self.warmup + self.reps
    }

    /// Prints one figure: a JSON line on stdout, a text line on stderr.
    // The arguments are the columns of one result row; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit(
        &self,
        imp: &str,
        bench: &str,
        model: &str,
        test: &str,
        unit: &str,
        samples: &[f64],
        extra: Value,
    ) {
        let s = Stats::of(samples);
        let mut line = json!({
            "impl": imp,
            "bench": bench,
            "model": model,
            "threads": self.threads,
            "test": test,
            "unit": unit,
            "median": s.median,
            "min": s.min,
            "max": s.max,
            "p10": s.p10,
            "p50": s.median,
            "p90": s.p90,
            "p99": s.p99,
            "n": samples.len(),
            "smoke": self.o.smoke,
        });
        if let (Some(m), Value::Object(e)) = (line.as_object_mut(), extra) {
            m.extend(e);
        }
        println!("{line}");
        eprintln!(
            "{imp:<10} {bench:<11} {model:<26} t={} {test:<22} {:>10.2} {unit:<5} (min {:.2}, max {:.2}, p90 {:.2}, n={})",
            self.threads,
            s.median,
            s.min,
            s.max,
            s.p90,
            samples.len()
        );
    }

    pub(crate) fn emit_rss(&self, imp: &str, bench: &str, model: &str, bytes: Option<u64>) {
        if let Some(b) = bytes {
            let mib = b as f64 / (1024.0 * 1024.0);
            self.emit(imp, bench, model, "peak_rss", "MiB", &[mib], json!({}));
        }
    }

    pub(crate) fn skip(&self, imp: &str, bench: &str, model: &str, reason: &str) {
        println!(
            "{}",
            json!({"impl": imp, "bench": bench, "model": model, "threads": self.threads,
                   "skipped": reason, "smoke": self.o.smoke})
        );
        eprintln!("{imp:<10} {bench:<11} {model:<26} skipped: {reason}");
    }
}

pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) p10: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
}

impl Stats {
    pub(crate) fn of(samples: &[f64]) -> Stats {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Stats {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                p10: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
            };
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| {
            // Linear interpolation between closest ranks.
            let r = p * (v.len() - 1) as f64;
            let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (r - lo as f64)
        };
        Stats {
            median: pct(0.5),
            min: v[0],
            max: v[v.len() - 1],
            p10: pct(0.1),
            p90: pct(0.9),
            p99: pct(0.99),
        }
    }
}

pub(crate) fn label_of(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| "model".into())
}

/// Fixed, deterministic prompt ids (inside every supported vocabulary), the same for all
/// implementations. The first one alone is the tg prompt.
pub(crate) fn prompt_ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1000 + ((i as u32 * 7919) % 20000)).collect()
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ..GenerateParams::default()
    }
}

/// Median-able samples of `f`'s wall time in seconds, after the warm-up runs.
pub(crate) fn time_runs(b: &Bench, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(b.reps);
    for i in 0..b.runs() {
        let t = Instant::now();
        f()?;
        if i >= b.warmup {
            samples.push(secs(t.elapsed()));
        }
    }
    Ok(samples)
}

pub(crate) fn model_config(name: &str, path: &Path, replicas: usize) -> ModelConfig {
    let mut m = ModelConfig::new(name, path);
    m.replicas = replicas;
    m.queue_size = 256;
    m
}

/// The `[[models]]` table of `name` (path made absolute) with `extra` TOML lines appended:
/// what `concurrency` parses for its pool and `http` writes into the server's config.
pub(crate) fn model_toml(
    name: &str,
    path: &Path,
    replicas: usize,
    extra: &[String],
) -> Result<String> {
    let path = std::fs::canonicalize(path).with_context(|| format!("model {}", path.display()))?;
    let mut t = format!(
        "[[models]]\nname = {name:?}\npath = {:?}\nreplicas = {replicas}\nqueue_size = 256\n",
        path.display().to_string()
    );
    for line in extra {
        t.push_str(line.trim());
        t.push('\n');
    }
    Ok(t)
}

/// `model_config` from `model_toml`, so that `--model-config` lines apply; errors name the key.
pub(crate) fn model_config_with(
    name: &str,
    path: &Path,
    replicas: usize,
    extra: &[String],
) -> Result<ModelConfig> {
    let toml = model_toml(name, path, replicas, extra)?;
    let mut config = Config::from_toml(&toml)
        .map_err(|e| anyhow!("{e} (model config with --model-config lines:\n{toml})"))?;
    config
        .models
        .pop()
        .ok_or_else(|| anyhow!("no [[models]] table in\n{toml}"))
}

pub(crate) async fn start_pool(models: Vec<ModelConfig>) -> Result<Pool> {
    let config = Config {
        models,
        ..Config::default()
    };
    Ok(Pool::start(config).await?)
}

/// One streamed generation through the pool, timed from the enqueue.
pub(crate) struct Timed {
    pub(crate) ttft: Duration,
    pub(crate) total: Duration,
    pub(crate) tokens: usize,
    /// Time from `t0` (a shared start) to the end, for concurrent runs.
    pub(crate) end_since: Duration,
}

pub(crate) async fn pool_run(
    pool: &Pool,
    model: &str,
    prompt: &[u32],
    max_tokens: usize,
    t0: Instant,
) -> Result<Timed> {
    let started = Instant::now();
    let request = GenerateRequest::ids(prompt.to_vec())
        .max_tokens(max_tokens)
        .temperature(0.0)
        .seed(0);
    let mut stream = pool.generate_stream(model, request)?;
    let mut ttft = None;
    while let Some(event) = stream.next().await {
        match event? {
            GenerationEvent::Token { .. } => {
                ttft.get_or_insert_with(|| started.elapsed());
            }
            GenerationEvent::Done(r) => {
                let total = started.elapsed();
                return Ok(Timed {
                    ttft: ttft.unwrap_or(total),
                    total,
                    tokens: r.completion_tokens,
                    end_since: t0.elapsed(),
                });
            }
        }
    }
    bail!("the stream ended without a result")
}

/// `llm-pool serve` with a temporary config on port 0.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn default_server_bin() -> PathBuf {
    // target/release/examples/bench -> target/release/llm-pool
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(|d| d.join("llm-pool")))
        .unwrap_or_else(|| PathBuf::from("target/release/llm-pool"))
}

/// Starts `bin serve` on a config with the model `m` (`extra`: TOML lines for its table). Its
/// stderr goes to a file in the temporary directory, quoted when it does not come up.
pub(crate) fn start_server(
    bin: &Path,
    model: &Path,
    replicas: usize,
    extra: &[String],
) -> Result<Server> {
    start_server_with(bin, model, replicas, extra, "")
}

/// `start_server` with `tables` (TOML) added to the config before the model's table.
pub(crate) fn start_server_with(
    bin: &Path,
    model: &Path,
    replicas: usize,
    extra: &[String],
    tables: &str,
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{tables}\n{}",
        model_toml("m", model, replicas, extra)?
    );
    std::fs::write(&config, &text)?;
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(60));
    let server = Server {
        child,
        url: url.clone().unwrap_or_default(),
        _dir: dir,
    };
    if url.is_err() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        // The error, not the backtrace that RUST_BACKTRACE adds after it.
        let log = log.split("Stack backtrace:").next().unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} serve did not print its address; config:\n{text}stderr (last lines):\n{}",
            bin.display(),
            tail.join("\n")
        );
    }
    Ok(server)
}

pub(crate) async fn wait_ready(client: &reqwest::Client, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for path in ["/ready", "/health"] {
            if let Ok(r) = client.get(format!("{url}{path}")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{url} not ready after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) struct HttpRun {
    pub(crate) ttft: Duration,
    pub(crate) total: Duration,
    pub(crate) tokens: usize,
    pub(crate) end_since: Duration,
}

/// One streamed /v1/completions request: the time of the first non-empty text chunk, of the
/// end, and the completion tokens (from `usage`, or llama-server's `timings`, or chunks counted).
pub(crate) async fn http_run(
    client: &reqwest::Client,
    url: &str,
    prompt: &[u32],
    max_tokens: usize,
    t0: Instant,
) -> Result<HttpRun> {
    let body = json!({
        "model": "m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let resp = client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        bail!(
            "{url}/v1/completions: {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let (mut first, mut chunks, mut usage) = (None, 0usize, None);
    while let Some(bytes) = body.next().await {
        buf.extend_from_slice(&bytes?);
        while let Some(nl) = buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" || data.is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(data).with_context(|| format!("SSE data {data:?}"))?;
            let has_text = v["choices"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["text"].as_str().is_some_and(|t| !t.is_empty()))
            });
            if has_text {
                first.get_or_insert_with(|| started.elapsed());
                chunks += 1;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
            if let Some(n) = v["timings"]["predicted_n"].as_u64() {
                usage.get_or_insert(n as usize);
            }
        }
    }
    let total = started.elapsed();
    Ok(HttpRun {
        ttft: first.unwrap_or(total),
        total,
        tokens: usage.unwrap_or(chunks),
        end_since: t0.elapsed(),
    })
}

pub(crate) fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
