//! Soak test: `llm-pool serve` on the demo models under mixed traffic and faults, for a set
//! duration, then checks that nothing was lost or leaked. `scripts/soak` builds and runs it.
//!
//! The server gets small queues, two tenants (one with concurrency and token limits), an admin
//! key, an eager model (SmolLM2) and a lazy one with a short `keep_alive` (Gemma 3). Concurrent
//! clients then send chat and completions, streamed and not, with random `max_tokens`; some
//! disconnect mid-stream, some go over their tenant's limits, some send bad bodies. An admin
//! task unloads and reloads models; with `--faults` (a server built with the `failpoints`
//! feature) a fault task injects worker panics and failed loads.
//!
//! At the end it asserts, and prints:
//! - every request got an answer from the documented table (or a completed stream), none timed
//!   out, and the server never exited;
//! - per model and outcome, `llm_pool_requests_total` equals what the clients saw, and worker
//!   restarts equal the faults injected;
//! - no 5xx but the documented 503s;
//! - RSS at the end and in the second half within `--rss-bound-mib` of the first half's peak, and open file descriptors
//!   back to their idle level.
//!
//! ```sh
//! cargo build --release --features failpoints --bin llm-pool --example soak
//! target/release/examples/soak --server target/release/llm-pool --duration 600 --faults
//! ```

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "soak",
    about = "Soak llm-pool serve with mixed traffic and faults"
)]
struct Args {
    /// The llm-pool binary to run.
    #[arg(long, default_value = "target/release/llm-pool")]
    server: PathBuf,
    /// Directory with the demo models (scripts/fetch-models).
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// How long to send traffic, in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 12)]
    clients: usize,
    /// Inject worker panics and failed loads (needs a server built with `failpoints`).
    #[arg(long)]
    faults: bool,
    /// Seconds between admin unload/load cycles and between fault injections.
    #[arg(long, default_value_t = 8)]
    cycle_secs: u64,
    /// Allowed RSS growth past the first half's peak, at the end and in the second half, in MiB.
    #[arg(long, default_value_t = 128)]
    rss_bound_mib: u64,
    /// Seconds a single request may take before it counts as hung (generous: a loaded 2-core
    /// machine serves a full queue slowly, and a hang is forever).
    #[arg(long, default_value_t = 300)]
    request_timeout: u64,
    /// Random seed for the traffic mix.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Write the summary as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
}

const ADMIN_KEY: &str = "soak-admin";
const ALPHA_KEY: &str = "soak-alpha";
const BETA_KEY: &str = "soak-beta";
const MODELS: [&str; 2] = ["smollm2", "gemma3"];

fn sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// What the clients saw, per model and pool outcome (only requests that reach the pool count).
#[derive(Default)]
struct Tally {
    /// (model, outcome) -> count, as `llm_pool_requests_total` should show it.
    outcomes: BTreeMap<(String, String), u64>,
    /// Streams the client dropped mid-way: the pool counts each as `cancelled`, or as `ok` when
    /// the generation ended before the disconnect was noticed.
    disconnects: BTreeMap<String, u64>,
    /// HTTP status -> count, for every request sent.
    statuses: BTreeMap<u16, u64>,
    /// Requests by kind.
    kinds: BTreeMap<&'static str, u64>,
    /// Anything that breaks the promise: hangs, unexpected statuses, 5xx other than 503.
    failures: Vec<String>,
    requests: u64,
}

type Shared = Arc<Mutex<Tally>>;

fn record(tally: &Shared, f: impl FnOnce(&mut Tally)) {
    if let Ok(mut t) = tally.lock() {
        f(&mut t);
    }
}

/// The pool outcome a documented HTTP answer stands for, or `None` when the request never
/// reached the pool (rejected by the server: body, auth, model name, tenant limits).
fn outcome_of(status: u16, body: &Value) -> Result<Option<&'static str>, String> {
    let code = body["error"]["code"].as_str().unwrap_or("");
    match (status, code) {
        (200, _) => Ok(Some("ok")),
        (400, _) => Ok(None),
        (401 | 403 | 404 | 413 | 429, _) => Ok(None),
        (503, "overloaded") => Ok(Some("overloaded")),
        (503, "model_unavailable") => Ok(Some("unavailable")),
        (503, "worker_restarted") => Ok(Some("restarted")),
        _ => Err(format!("undocumented answer {status}: {body}")),
    }
}

/// The pool outcome of the error event that ended a stream, when it is a documented one.
fn stream_error(text: &str) -> Option<&'static str> {
    let event = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v.get("error").is_some())?;
    outcome_of(503, &event).ok().flatten()
}

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(args: &Args) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let models = args
            .models_dir
            .canonicalize()
            .context("the models directory (run scripts/fetch-models)")?;
        let config = format!(
            r#"[pool]
max_consecutive_failures = 1000
restart_backoff_ms = 50
restart_backoff_max_ms = 500

[server]
listen = "127.0.0.1:0"
max_body_bytes = 65536
admin_key_sha256 = "{admin}"

[[models]]
name = "smollm2"
path = "{models}/SmolLM2-135M-Instruct.Q4_1.gguf"
queue_size = 4
load = "eager"

[[models]]
name = "gemma3"
path = "{models}/gemma-3-270m-q4_k_m.gguf"
queue_size = 4
load = "lazy"
keep_alive = "3s"

[[tenants]]
name = "alpha"
api_key_sha256 = ["{alpha}"]
models = ["*"]

[[tenants]]
name = "beta"
api_key_sha256 = ["{beta}"]
models = ["smollm2"]
max_concurrent_requests = 1
tokens_per_minute = 3000
"#,
            admin = sha256(ADMIN_KEY),
            alpha = sha256(ALPHA_KEY),
            beta = sha256(BETA_KEY),
            models = models.display(),
        );
        let path = dir.path().join("soak.toml");
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut child = Command::new(&args.server)
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn,llm_pool=info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", args.server.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .to_string();
        eprintln!(
            "soak: server pid {} at {base}, log {}",
            child.id(),
            dir.path().join("server.log").display()
        );
        Ok(Server {
            child,
            base,
            _dir: dir,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Threads of a process: workers that never exit would show here.
fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A client that opens a fresh connection per request, so that the server's descriptors go
/// back to their idle level when traffic stops.
fn client(timeout: Duration) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(timeout)
        .build()?)
}

/// `llm_pool_requests_total` and `llm_pool_worker_restarts_total`, per model (and outcome).
fn scrape(text: &str) -> (BTreeMap<(String, String), u64>, BTreeMap<String, u64>) {
    let label = |line: &str, name: &str| -> Option<String> {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let end = line[start..].find('"')? + start;
        Some(line[start..end].to_string())
    };
    let value = |line: &str| -> u64 {
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let mut requests = BTreeMap::new();
    let mut restarts = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("llm_pool_requests_total{") {
            if let (Some(m), Some(o)) = (label(line, "model"), label(line, "outcome")) {
                requests.insert((m, o), value(line));
            }
        } else if line.starts_with("llm_pool_worker_restarts_total{") {
            if let Some(m) = label(line, "model") {
                restarts.insert(m, value(line));
            }
        }
    }
    (requests, restarts)
}

async fn metrics(server_url: &str) -> Result<String> {
    Ok(client(Duration::from_secs(10))?
        .get(format!("{server_url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// One request of the traffic mix, as built by a client.
struct Shot {
    kind: &'static str,
    route: &'static str,
    key: &'static str,
    body: Vec<u8>,
    model: Option<&'static str>,
    /// Read one content chunk, then hang up.
    disconnect: bool,
}

fn shot(rng: &mut StdRng) -> Shot {
    let model = if rng.random_bool(0.7) {
        "smollm2"
    } else {
        "gemma3"
    };
    let max_tokens = rng.random_range(1..=48);
    let stream = rng.random_bool(0.5);
    let chat = json!({"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": max_tokens, "stream": stream, "temperature": 0.7, "seed": rng.random::<u32>()});
    let completion = json!({"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
        "stream": stream, "temperature": 0.7, "seed": rng.random::<u32>()});
    let body = |v: Value| v.to_string().into_bytes();
    let pick = rng.random_range(0..100);
    let valid = |kind, route, v: Value| Shot {
        kind,
        route,
        key: ALPHA_KEY,
        body: body(v),
        model: Some(model),
        disconnect: false,
    };
    match pick {
        0..=29 => valid("completion", "/v1/completions", completion),
        30..=49 => valid("chat", "/v1/chat/completions", chat),
        50..=59 => Shot {
            kind: "disconnect",
            route: "/v1/completions",
            key: ALPHA_KEY,
            body: body(
                json!({"model": model, "prompt": "Once upon a time", "max_tokens": 200, "stream": true}),
            ),
            model: Some(model),
            disconnect: true,
        },
        60..=71 => Shot {
            kind: "beta_tenant",
            route: "/v1/completions",
            key: BETA_KEY,
            body: body(
                json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": max_tokens}),
            ),
            model: Some("smollm2"),
            disconnect: false,
        },
        72..=79 => {
            // Valid JSON the pool refuses: it reaches the pool and counts as `invalid`.
            let bad = match rng.random_range(0..3) {
                0 => json!({"model": model, "prompt": "x", "temperature": 9.5}),
                1 => json!({"model": model, "prompt": "x", "max_tokens": 10_000_000}),
                _ => json!({"model": model, "prompt": "x", "min_p": 2.0}),
            };
            Shot {
                kind: "invalid_parameter",
                route: "/v1/completions",
                key: ALPHA_KEY,
                body: body(bad),
                model: Some(model),
                disconnect: false,
            }
        }
        _ => {
            // Bodies the server refuses before the pool: syntax, types, names, auth.
            let (key, raw): (&'static str, Vec<u8>) = match rng.random_range(0..7) {
                0 => (ALPHA_KEY, b"{not json".to_vec()),
                1 => (ALPHA_KEY, vec![0xff, 0xfe, 0x00, 0x7b]),
                2 => (ALPHA_KEY, body(json!({"model": model, "messages": "hi"}))),
                3 => (
                    ALPHA_KEY,
                    body(json!({"model": "no-such-model", "prompt": "x"})),
                ),
                4 => (
                    ALPHA_KEY,
                    body(json!({"model": model, "prompt": "x", "n": 3})),
                ),
                5 => ("wrong-key", body(json!({"model": model, "prompt": "x"}))),
                _ => (
                    ALPHA_KEY,
                    body(json!({"model": model, "prompt": "x".repeat(70_000)})),
                ),
            };
            Shot {
                kind: "bad_body",
                route: if rng.random_bool(0.5) {
                    "/v1/completions"
                } else {
                    "/v1/chat/completions"
                },
                key,
                body: raw,
                model: None,
                disconnect: false,
            }
        }
    }
}

/// Sends one request and records what came back; returns the HTTP status, if any.
async fn fire(base: &str, http: &reqwest::Client, shot: &Shot, tally: &Shared) -> Option<u16> {
    let sent = http
        .post(format!("{base}{}", shot.route))
        .bearer_auth(shot.key)
        .header("content-type", "application/json")
        .body(shot.body.clone())
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) => {
            let what = if e.is_timeout() { "hung" } else { "failed" };
            record(tally, |t| {
                t.failures
                    .push(format!("{} request {what}: {e}", shot.kind))
            });
            return None;
        }
    };
    let status = response.status().as_u16();
    record(tally, |t| *t.statuses.entry(status).or_default() += 1);
    let streamed = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
    if status == 200 && streamed {
        let mut body = response.bytes_stream();
        let mut text = String::new();
        loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    text.push_str(&String::from_utf8_lossy(&chunk));
                    if shot.disconnect && text.contains("data: {") {
                        break;
                    }
                    if text.contains("data: [DONE]") {
                        break;
                    }
                }
                Some(Err(e)) => {
                    record(tally, |t| {
                        t.failures.push(format!("{} stream broke: {e}", shot.kind))
                    });
                    return Some(status);
                }
                None => break,
            }
        }
        let model = shot.model.unwrap_or("?").to_string();
        let finished = text.contains("data: [DONE]");
        if shot.disconnect && !finished {
            drop(body);
            record(tally, |t| *t.disconnects.entry(model).or_default() += 1);
        } else if finished && !text.contains("\"error\"") {
            record(tally, |t| {
                *t.outcomes.entry((model, "ok".into())).or_default() += 1
            });
        } else if let Some(outcome) = finished.then(|| stream_error(&text)).flatten() {
            // With continuous batching a request can fail after its first tokens: a panic in
            // a batched step ends every request of the batch with `worker_restarted`.
            record(tally, |t| {
                *t.outcomes.entry((model, outcome.into())).or_default() += 1
            });
        } else {
            record(tally, |t| {
                t.failures.push(format!(
                    "{} stream ended without a result: {text}",
                    shot.kind
                ))
            });
        }
        return Some(status);
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match outcome_of(status, &body) {
        Ok(outcome) => {
            // 400s of requests that reached the pool count there as `invalid`.
            let outcome = match (status, shot.kind) {
                (400, "invalid_parameter") => Some("invalid"),
                (400, _)
                    if body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("chat template")) =>
                {
                    Some("invalid")
                }
                _ => outcome,
            };
            if status == 400 && shot.kind != "bad_body" && outcome.is_none() {
                record(tally, |t| {
                    t.failures
                        .push(format!("{} got an unexpected 400: {body}", shot.kind))
                });
            }
            if let (Some(outcome), Some(model)) = (outcome, shot.model) {
                record(tally, |t| {
                    *t.outcomes
                        .entry((model.to_string(), outcome.to_string()))
                        .or_default() += 1
                });
            }
        }
        Err(e) => record(tally, |t| t.failures.push(format!("{}: {e}", shot.kind))),
    }
    Some(status)
}

async fn admin(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<u16> {
    let mut r = client(Duration::from_secs(120))?
        .request(method, format!("{base}{path}"))
        .bearer_auth(ADMIN_KEY);
    if let Some(b) = body {
        r = r.json(&b);
    }
    Ok(r.send().await?.status().as_u16())
}

async fn restarts(base: &str, model: &str) -> u64 {
    match metrics(base).await {
        Ok(text) => scrape(&text).1.get(model).copied().unwrap_or(0),
        Err(_) => 0,
    }
}

/// Injected faults per model: panics and failed loads.
#[derive(Default, Debug)]
struct Injected {
    panics: BTreeMap<String, u64>,
    failed_loads: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut server = Server::start(&args)?;
    let base = server.base.clone();
    let pid = server.pid();
    let timeout = Duration::from_secs(args.request_timeout);

    // Warm-up: both models loaded, every code path once, then the baseline.
    let http = client(timeout)?;
    for model in MODELS {
        for stream in [false, true] {
            let r = http
                .post(server.url("/v1/completions"))
                .bearer_auth(ALPHA_KEY)
                .json(&json!({"model": model, "prompt": "Once upon a time", "max_tokens": 8, "stream": stream}))
                .send()
                .await?;
            if r.status() != 200 {
                bail!("warm-up request to {model} failed: {}", r.status());
            }
            let _ = r.bytes().await?;
        }
    }
    let baseline_metrics = scrape(&metrics(&base).await?);
    let fds_idle = open_fds(pid);
    let threads_idle = threads(pid);
    eprintln!("soak: warmed up; {fds_idle} open descriptors, {threads_idle} threads");

    let tally: Shared = Arc::default();
    let injected = Arc::new(Mutex::new(Injected::default()));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let tally = tally.clone();
        let base = base.clone();
        let seed = args.seed.wrapping_mul(1000).wrapping_add(c as u64);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let Ok(http) = client(timeout) else { return };
            while Instant::now() < deadline {
                let shot = shot(&mut rng);
                record(&tally, |t| {
                    t.requests += 1;
                    *t.kinds.entry(shot.kind).or_default() += 1;
                });
                let status = fire(&base, &http, &shot, &tally).await;
                // Clients back off when told to, as OpenAI's clients do on 429 and 503.
                if matches!(status, Some(429 | 503)) {
                    let pause = rng.random_range(100..400);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }));
    }
    // Admin: unload and reload the lazy model every cycle; the eager one once, mid-run.
    {
        let base = base.clone();
        let tally = tally.clone();
        let cycle = Duration::from_secs(args.cycle_secs);
        tasks.push(tokio::spawn(async move {
            let mut round = 0;
            while Instant::now() + cycle < deadline {
                tokio::time::sleep(cycle).await;
                round += 1;
                let model = if round % 3 == 2 { "smollm2" } else { "gemma3" };
                for (path, want) in [("unload", 200), ("load", 200)] {
                    let status = admin(
                        &base,
                        reqwest::Method::POST,
                        &format!("/admin/models/{model}/{path}"),
                        None,
                    )
                    .await;
                    match status {
                        Ok(s) if s == want => {}
                        other => record(&tally, |t| {
                            t.failures.push(format!("admin {path} {model}: {other:?}"))
                        }),
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }));
    }
    // Faults: a panic in a worker, or a failed load, every cycle, one at a time (each is
    // confirmed by the restart it causes before the next is set).
    if args.faults {
        let base = base.clone();
        let tally = tally.clone();
        let injected = injected.clone();
        let cycle = Duration::from_secs(args.cycle_secs);
        tasks.push(tokio::spawn(async move {
            let mut round = 0u32;
            tokio::time::sleep(cycle / 2).await;
            while Instant::now() + cycle < deadline {
                round += 1;
                // Odd rounds: SmolLM2's worker panics on its next request. Even rounds: Gemma 3's
                // worker panics, and the load that restarts it fails once (a second restart).
                let (model, wanted) = if round % 2 == 1 {
                    ("smollm2", 1)
                } else {
                    ("gemma3", 2)
                };
                let generate = format!("llm_pool_worker_generate_{model}");
                let load = format!("llm_pool_worker_load_{model}");
                let before = restarts(&base, model).await;
                let mut set = Vec::new();
                if wanted == 2 {
                    set.push((load.clone(), "1*return"));
                }
                set.push((generate.clone(), "1*panic"));
                for (failpoint, actions) in &set {
                    let status = admin(
                        &base,
                        reqwest::Method::PUT,
                        &format!("/admin/failpoints/{failpoint}"),
                        Some(json!({ "actions": actions })),
                    )
                    .await;
                    if !matches!(status, Ok(200)) {
                        record(&tally, |t| {
                            t.failures.push(format!(
                                "setting failpoint {failpoint}: {status:?} (is the server built with --features failpoints?)"
                            ))
                        });
                        return;
                    }
                }
                // Traffic fires them; whatever has not fired by the deadline is turned off,
                // and only faults that fired are counted as injected.
                let fired_by = (Instant::now() + Duration::from_secs(60)).min(deadline);
                while restarts(&base, model).await < before + wanted && Instant::now() < fired_by
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                for (failpoint, _) in &set {
                    let _ = admin(
                        &base,
                        reqwest::Method::PUT,
                        &format!("/admin/failpoints/{failpoint}"),
                        Some(json!({ "actions": "off" })),
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                let fired = restarts(&base, model).await.saturating_sub(before);
                if let Ok(mut i) = injected.lock() {
                    *i.panics.entry(model.to_string()).or_default() += fired.min(1);
                    *i.failed_loads.entry(model.to_string()).or_default() +=
                        fired.saturating_sub(1);
                }
                tokio::time::sleep(cycle).await;
            }
        }));
    }
    // RSS every 10 s, to tell a leak (a climb) from a plateau.
    let rss_series = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    {
        let series = rss_series.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if let Ok(mut s) = series.lock() {
                    s.push((started.elapsed().as_secs(), rss_bytes(pid) >> 20));
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    // The baseline: the peak of the first half of the run. RSS swings by tens of MiB as models
    // unload and load; a leak shows as the end (or the second half) climbing past that peak.
    let half = args.duration / 2;
    let series: Vec<(u64, u64)> = rss_series.lock().map(|s| s.clone()).unwrap_or_default();
    let peak = |keep: &dyn Fn(u64) -> bool| {
        series
            .iter()
            .filter(|(t, _)| keep(*t))
            .map(|(_, mib)| *mib << 20)
            .max()
            .unwrap_or(0)
    };
    let rss_first_half = peak(&|t| t <= half);
    let rss_second_half = peak(&|t| t > half);
    let traffic_secs = started.elapsed().as_secs_f64();

    // Any injected panic not yet fired fires now, on a request of its own.
    let http = client(timeout)?;
    let flush = |model: &'static str| {
        let http = http.clone();
        let url = server.url("/v1/completions");
        let tally = tally.clone();
        async move {
            let shot = Shot {
                kind: "final",
                route: "/v1/completions",
                key: ALPHA_KEY,
                body: json!({"model": model, "prompt": "The end", "max_tokens": 4})
                    .to_string()
                    .into_bytes(),
                model: Some(model),
                disconnect: false,
            };
            record(&tally, |t| {
                t.requests += 1;
                *t.kinds.entry("final").or_default() += 1;
            });
            let base = url.trim_end_matches("/v1/completions").to_string();
            fire(&base, &http, &shot, &tally).await;
        }
    };
    for model in MODELS {
        flush(model).await;
        flush(model).await;
    }
    // A quiet moment, then the end state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_end = rss_bytes(pid);
    let fds_end = open_fds(pid);
    let threads_end = threads(pid);
    let end_metrics = scrape(&metrics(&base).await?);
    let alive = server.alive();
    let log = server._dir.path().join("server.log");
    let kept = PathBuf::from("target/soak-server.log");
    if std::fs::copy(&log, &kept).is_ok() {
        eprintln!("soak: server log kept in {}", kept.display());
    }

    let tally = tally.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let injected = injected.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut failures = tally.failures.clone();
    if !alive {
        failures.push("the server exited".into());
    }
    for (&status, &n) in &tally.statuses {
        if status >= 500 && status != 503 {
            failures.push(format!("{n} answers with status {status}"));
        }
    }
    // Per model and outcome: the pool's count against the clients'.
    let mut table = Vec::new();
    for model in MODELS {
        let delta = |outcome: &str| {
            let key = (model.to_string(), outcome.to_string());
            end_metrics.0.get(&key).copied().unwrap_or(0)
                - baseline_metrics.0.get(&key).copied().unwrap_or(0)
        };
        let seen = |outcome: &str| {
            tally
                .outcomes
                .get(&(model.to_string(), outcome.to_string()))
                .copied()
                .unwrap_or(0)
        };
        let disconnects = tally.disconnects.get(model).copied().unwrap_or(0);
        for outcome in [
            "ok",
            "cancelled",
            "invalid",
            "overloaded",
            "unavailable",
            "restarted",
            "error",
        ] {
            let client_side = match outcome {
                "cancelled" => disconnects,
                other => seen(other),
            };
            table.push(json!({"model": model, "outcome": outcome, "pool": delta(outcome), "clients": client_side}));
        }
        // A disconnect is `cancelled`; or `ok` when the generation ended before the pool saw
        // the client go; or `restarted` when a panic ended its batch first. Those three are
        // checked together, every other outcome exactly.
        let (ok, cancelled, restarted) = (delta("ok"), delta("cancelled"), delta("restarted"));
        if ok + cancelled + restarted != seen("ok") + disconnects + seen("restarted")
            || cancelled > disconnects
            || restarted < seen("restarted")
        {
            failures.push(format!(
                "{model}: pool ok+cancelled+restarted = {ok}+{cancelled}+{restarted}, clients ok = {} and restarted = {} with {disconnects} disconnects",
                seen("ok"),
                seen("restarted")
            ));
        }
        for outcome in ["invalid", "overloaded", "unavailable", "error"] {
            if delta(outcome) != seen(outcome) {
                failures.push(format!(
                    "{model}: pool counted {} {outcome}, clients saw {}",
                    delta(outcome),
                    seen(outcome)
                ));
            }
        }
        let restarted = end_metrics.1.get(model).copied().unwrap_or(0)
            - baseline_metrics.1.get(model).copied().unwrap_or(0);
        let faults = injected.panics.get(model).copied().unwrap_or(0)
            + injected.failed_loads.get(model).copied().unwrap_or(0);
        if restarted != faults {
            failures.push(format!(
                "{model}: {restarted} worker restarts, {faults} faults injected"
            ));
        }
    }
    if rss_second_half > rss_first_half + (args.rss_bound_mib << 20) {
        failures.push(format!(
            "RSS peaked at {} MiB in the second half, {} MiB in the first (bound {} MiB)",
            rss_second_half >> 20,
            rss_first_half >> 20,
            args.rss_bound_mib
        ));
    }
    let growth = rss_end.saturating_sub(rss_first_half);
    if growth > args.rss_bound_mib << 20 {
        failures.push(format!(
            "RSS grew by {} MiB (bound {} MiB): {} -> {} MiB",
            growth >> 20,
            args.rss_bound_mib,
            rss_first_half >> 20,
            rss_end >> 20
        ));
    }
    if threads_end > threads_idle {
        failures.push(format!(
            "{threads_end} threads after the run, {threads_idle} at idle"
        ));
    }
    if fds_end > fds_idle {
        failures.push(format!(
            "{fds_end} open descriptors after the run, {fds_idle} at idle"
        ));
    }

    let summary = json!({
        "duration_s": traffic_secs,
        "clients": args.clients,
        "requests": tally.requests,
        "requests_per_s": tally.requests as f64 / traffic_secs,
        "kinds": tally.kinds,
        "statuses": tally.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "outcomes": table,
        "faults": {"panics": injected.panics, "failed_loads": injected.failed_loads},
        "rss_mib": {"first_half_peak": rss_first_half >> 20, "second_half_peak": rss_second_half >> 20, "after_run": rss_end >> 20, "bound": args.rss_bound_mib},
        "rss_mib_every_10s": rss_series.lock().map(|s| s.iter().map(|(_, m)| *m).collect::<Vec<_>>()).unwrap_or_default(),
        "open_fds": {"idle": fds_idle, "after_run": fds_end},
        "threads": {"idle": threads_idle, "after_run": threads_end},
        "server_alive": alive,
        "failures": failures,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }
    eprintln!(
        "soak: {} requests from {} clients in {:.0} s ({:.1}/s); statuses {:?}",
        tally.requests,
        args.clients,
        traffic_secs,
        tally.requests as f64 / traffic_secs,
        tally.statuses
    );
    eprintln!(
        "soak: faults injected {:?}; RSS {} -> {} MiB; descriptors {fds_idle} -> {fds_end}",
        *injected,
        rss_first_half >> 20,
        rss_end >> 20
    );
    if failures.is_empty() {
        eprintln!("soak: passed");
        Ok(())
    } else {
        for f in &failures {
            eprintln!("soak: FAILED: {f}");
        }
        bail!("{} soak checks failed", failures.len())
    }
}
