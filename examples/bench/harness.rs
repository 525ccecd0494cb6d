//! What every subcommand shares: the resolved settings ([`Bench`]), the output of a figure
//! (a JSON line on stdout, a text line on stderr) or of a skip, the statistics of the samples,
//! the fixed prompt ids, and the helpers that start an in-process [`Pool`] or an `llm-pool serve`
//! and time one streamed request through either.

use crate::Opts;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use futures::StreamExt;
use llm_pool::config::{Config, ModelConfig};
use llm_pool::engine::{CacheUse, GenerateParams};
use llm_pool::pool::{GenerateRequest, GenerationEvent, Pool};
use llm_pool::text::sampling::SamplingParams;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The vocabulary size of `--model`, when its file says: prompt ids are checked against it.
    pub(crate) vocab: Option<usize>,
    /// Fresh prompts handed out so far (see [`Bench::fresh_prompt`]).
    prompts: AtomicUsize,
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
            vocab: vocab_size(&o.model),
            prompts: AtomicUsize::new(0),
            o,
        }
    }

    /// The base of each concurrent stream's prompt: `--prompt-ids`, or 8 fixed ids. Every
    /// timed stream sends it through [`Bench::fresh_prompt`], so with its own first token.
    pub(crate) fn stream_prompt(&self) -> Vec<u32> {
        self.o.prompt_ids.clone().unwrap_or_else(|| prompt_ids(8))
    }

    /// The tg prompt: the first fixed id alone, the same in every run and implementation. A
    /// 1-token prompt cannot be served from a cache (at least its one token is computed, for
    /// the logits), so it needs no fresh first token, and a fixed one keeps tg generating the
    /// same tokens run after run.
    pub(crate) fn tg_prompt(&self) -> Result<Vec<u32>> {
        let p = prompt_ids(1);
        self.check_vocab(&p)?;
        Ok(p)
    }

    /// `base` with its first token replaced by one that no earlier prompt of this process
    /// started with. The pool's batcher reuses the cached prefix a free slot shares with a new
    /// prompt (all but its last token when the prompt repeats), and llama-server does the same
    /// per slot, so a repeated prompt would time the prefill of one token; a new first token
    /// shares no prefix with anything a slot holds. Deterministic: the k-th fresh prompt is the
    /// same in every process that asks in the same order, so llm-pool, raw candle and
    /// llama-server get the same prompts.
    pub(crate) fn fresh_prompt(&self, base: &[u32]) -> Result<Vec<u32>> {
        // k = 0 is the tg prompt's first id; the stream prompts have their own range.
        let k = self.prompts.fetch_add(1, Ordering::Relaxed) + 1;
        if k >= STREAM_FIRST_IDS {
            bail!(
                "more than {} fresh prompts in one run: their first ids would repeat",
                STREAM_FIRST_IDS - 1
            );
        }
        self.with_first_id(base, k)
    }

    /// The prompts of the `n` concurrent streams of burst `run` (warm-up bursts included): `base`
    /// with a first id of their own, as in [`Bench::fresh_prompt`], but chosen by (n, run,
    /// stream) alone, so that a sweep over several stream counts in one process (llm-pool) and
    /// one process per stream count (llama-server with as many slots as streams) send the same
    /// prompts. Bursts of n streams take ids `runs * (1 + 2 + ... + (n - 1))` onwards in a range
    /// of their own, so no two (n, run, stream) share one.
    pub(crate) fn stream_prompts(
        &self,
        base: &[u32],
        n: usize,
        run: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let start = STREAM_FIRST_IDS + self.runs() * n * n.saturating_sub(1) / 2 + run * n;
        if start + n > DISTINCT_FIRST_IDS {
            bail!(
                "{n} streams x {} bursts need more distinct first ids than there are ({})",
                self.runs(),
                DISTINCT_FIRST_IDS - STREAM_FIRST_IDS
            );
        }
        (start..start + n)
            .map(|k| self.with_first_id(base, k))
            .collect()
    }

    fn with_first_id(&self, base: &[u32], k: usize) -> Result<Vec<u32>> {
        let mut p = base.to_vec();
        match p.first_mut() {
            Some(first) => *first = first_id(k),
            None => p.push(first_id(k)),
        }
        self.check_vocab(&p)?;
        Ok(p)
    }

    /// Fails on an id outside `--model`'s vocabulary (when its file says how large it is): a
    /// model would index past its embeddings, and a server would refuse the request.
    pub(crate) fn check_vocab(&self, ids: &[u32]) -> Result<()> {
        if let Some(vocab) = self.vocab {
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                bail!(
                    "prompt id {id} is outside the vocabulary of {} ({vocab} tokens)",
                    self.o.model.display()
                );
            }
        }
        Ok(())
    }

    /// The `[pool] compute_nice` of the pools and servers this run starts: `--compute-nice`
    /// (or `LLM_POOL__POOL__COMPUTE_NICE`), else llm-pool's default.
    pub(crate) fn compute_nice(&self) -> i32 {
        self.o
            .compute_nice
            .unwrap_or(llm_pool::resources::DEFAULT_COMPUTE_NICE)
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
            // Part of every row: llm-pool's compute threads run at this nice value, and so do
            // candle's barrier pool threads (raw candle's too) once a pool has started.
            "compute_nice": self.compute_nice(),
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

    /// Reports a part that cannot run here: a JSON line with `skipped`, a text line. Under
    /// `--smoke` it is an error, printed with its reason: the smoke run exists to prove that
    /// every part still runs, and a skip that exits 0 would hide the part that broke.
    pub(crate) fn skip(&self, imp: &str, bench: &str, model: &str, reason: &str) -> Result<()> {
        println!(
            "{}",
            json!({"impl": imp, "bench": bench, "model": model, "threads": self.threads,
                   "skipped": reason, "smoke": self.o.smoke})
        );
        eprintln!("{imp:<10} {bench:<11} {model:<26} skipped: {reason}");
        if self.o.smoke {
            bail!(
                "{bench} ({imp}, {model}) skipped under --smoke, which runs every part: {reason}"
            );
        }
        Ok(())
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

/// How many distinct ids [`first_id`] gives: 7919 is prime to 20000, so `k * 7919 % 20000`
/// takes every value once for k below it.
const DISTINCT_FIRST_IDS: usize = 20000;

/// Where the first ids of [`Bench::stream_prompts`] begin; those of [`Bench::fresh_prompt`]
/// end before.
const STREAM_FIRST_IDS: usize = 10000;

/// The k-th id of the fixed sequence, in [1000, 21000): inside every supported vocabulary
/// (and checked against the model's, see [`Bench::check_vocab`]).
fn first_id(k: usize) -> u32 {
    1000 + ((k % DISTINCT_FIRST_IDS) * 7919 % DISTINCT_FIRST_IDS) as u32
}

/// Fixed, deterministic prompt ids, the same for all implementations: the base of the pp
/// prompts (each run gives it a fresh first id, see [`Bench::fresh_prompt`]); the first one
/// alone is the tg prompt.
pub(crate) fn prompt_ids(n: usize) -> Vec<u32> {
    (0..n).map(first_id).collect()
}

/// A fingerprint (FNV-1a, 64 bits) of every prompt a sweep sent, in order: equal in the rows of
/// two implementations when both got the same prompts.
#[derive(Default)]
pub(crate) struct Fingerprint(Option<u64>);

impl Fingerprint {
    pub(crate) fn add(&mut self, prompt: &[u32]) {
        let mut h = self.0.unwrap_or(0xcbf2_9ce4_8422_2325);
        // The length first, so that two splits of the same ids differ.
        for x in std::iter::once(prompt.len() as u32).chain(prompt.iter().copied()) {
            for byte in x.to_le_bytes() {
                h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        self.0 = Some(h);
    }

    pub(crate) fn add_all(&mut self, prompts: &[Vec<u32>]) {
        for p in prompts {
            self.add(p);
        }
    }

    pub(crate) fn hex(&self) -> String {
        format!("{:016x}", self.0.unwrap_or(0))
    }
}

/// The vocabulary size a GGUF file declares (its token list, else its embedding's rows);
/// `None` for other formats or an unreadable file (loading it then fails with the reason).
fn vocab_size(path: &Path) -> Option<usize> {
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let content = gguf_file::Content::read(&mut file).ok()?;
    if let Some(gguf_file::Value::Array(tokens)) = content.metadata.get("tokenizer.ggml.tokens") {
        return Some(tokens.len());
    }
    // The embedding is hidden x vocab; the vocabulary is the larger side in every model here.
    let embedding = content.tensor_infos.get("token_embd.weight")?;
    embedding.shape.dims().iter().copied().max()
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

/// A pool of `models` with this run's `[pool] compute_nice`.
pub(crate) async fn start_pool(b: &Bench, models: Vec<ModelConfig>) -> Result<Pool> {
    let mut config = Config {
        models,
        ..Config::default()
    };
    config.pool.compute_nice = b.compute_nice();
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
                // Every request timed here times its prompt too: see `Bench::fresh_prompt`.
                if let CacheUse::PrefixHit(n) = r.cache {
                    bail!(
                        "the pool reused {n} cached tokens of a {}-token prompt ({:?}...): a \
                         timed prefill must compute its whole prompt",
                        prompt.len(),
                        &prompt[..prompt.len().min(4)]
                    );
                }
                return Ok(Timed {
                    ttft: ttft.unwrap_or(total),
                    total,
                    tokens: r.completion_tokens(),
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

/// Starts `bin serve` on a config with `--model` as `m` (plus the `--model-config` lines) and
/// this run's compute nice value. Its stderr goes to a file in the temporary directory, quoted
/// when it does not come up.
pub(crate) fn start_server(b: &Bench, bin: &Path, replicas: usize) -> Result<Server> {
    start_server_with(b, bin, replicas, "")
}

/// `start_server` with `tables` (TOML) added to the config before the model's table.
pub(crate) fn start_server_with(
    b: &Bench,
    bin: &Path,
    replicas: usize,
    tables: &str,
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{tables}\n{}",
        model_toml("m", &b.o.model, replicas, &b.o.model_config)?
    );
    std::fs::write(&config, &text)?;
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        // The environment overrides the config file, so an inherited value cannot differ from
        // the one this run reports.
        .env("LLM_POOL__POOL__COMPUTE_NICE", b.compute_nice().to_string())
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
    /// Whether the server said how many prompt tokens it served from its cache (it said 0:
    /// more is an error).
    pub(crate) cache_reported: bool,
}

/// One streamed /v1/completions request: the time of the first non-empty text chunk, of the
/// end, and the completion tokens (from `usage`, or llama-server's `timings`, or chunks counted).
/// Fails when the server reports prompt tokens served from its cache (OpenAI's
/// `usage.prompt_tokens_details.cached_tokens`, which llm-pool, vLLM and llama-server send, or
/// llama-server's `timings.cache_n`): a timed prefill must compute its whole prompt. With
/// `require_cache_report` (an `llm-pool serve` this run started) a response without the field
/// fails too: the check would be empty, and the binary is not a build of this tree.
pub(crate) async fn http_run(
    client: &reqwest::Client,
    url: &str,
    prompt: &[u32],
    max_tokens: usize,
    t0: Instant,
    require_cache_report: bool,
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
    let mut cached: Option<u64> = None;
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
            for n in [
                &v["usage"]["prompt_tokens_details"]["cached_tokens"],
                &v["timings"]["cache_n"],
            ]
            .iter()
            .filter_map(|n| n.as_u64())
            {
                cached = Some(cached.unwrap_or(0).max(n));
            }
        }
    }
    let total = started.elapsed();
    if require_cache_report && cached.is_none() {
        bail!(
            "{url} reported no usage.prompt_tokens_details.cached_tokens: is the llm-pool binary \
             a build of this tree?"
        );
    }
    if let Some(n) = cached.filter(|&n| n > 0) {
        bail!(
            "{url} served {n} tokens of a {}-token prompt ({:?}...) from its cache: a timed \
             prefill must compute its whole prompt",
            prompt.len(),
            &prompt[..prompt.len().min(4)]
        );
    }
    Ok(HttpRun {
        ttft: first.unwrap_or(total),
        total,
        tokens: usage.unwrap_or(chunks),
        end_since: t0.elapsed(),
        cache_reported: cached.is_some(),
    })
}

pub(crate) fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
