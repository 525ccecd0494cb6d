//! Benchmarks: raw candle against llm-pool's layers (model, engine, in-process pool, HTTP host),
//! plus concurrency, multi-model and per-request pool overhead.
//!
//! Every figure is measured with warm-up runs and several repetitions, and reported as the
//! median with its spread (min-max, and p50/p90/p99 where latencies are concerned). Results go
//! to stdout as JSON lines (one object per figure); a human-readable line per figure goes to
//! stderr.
//!
//! ```sh
//! cargo build --release --bin llm-pool --example bench
//! # everything, with a few tokens and one repetition (CI):
//! target/release/examples/bench all --smoke
//! # one part, real sizes; candle's CPU thread pool is global, so set the thread count per process:
//! CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 target/release/examples/bench raw --model models/SmolLM2-135M-Instruct.Q4_1.gguf
//! # the same HTTP client against another OpenAI-compatible server (e.g. llama-server):
//! target/release/examples/bench http --url http://127.0.0.1:8081 --server-pid 1234 --label llama.cpp
//! ```
//!
//! `scripts/bench` runs the whole comparison (with llama.cpp) and writes docs/BENCHMARKS.md;
//! `scripts/bench-concurrency` sweeps concurrent streams (`concurrency` and `http` against
//! `llm-pool serve` and `llama-server -np 4`) and writes its section of it and docs/concurrency.png.
//!
//! `--model-config KEY=VALUE` (repeatable) adds TOML lines to the benchmarked model's
//! `[[models]]` table, for `concurrency` (the in-process pool) and `http` (the config of the
//! `llm-pool serve` it starts), e.g. batching settings; unknown keys fail as the config does.
//!
//! Subcommands:
//! - `raw`: candle-transformers directly (`ModelWeights::from_gguf`, `forward`, argmax);
//! - `layers`: llm-pool's `Model::forward_ids` loop, `engine::generate` without and with the
//!   tokenizer (streamed detokenization), to attribute costs layer by layer;
//! - `pool`: the in-process `Pool` API (one model, one replica, greedy, token-id prompts);
//! - `overhead`: a 1-token prompt with `max_tokens = 1` through the pool against a direct
//!   `Model::forward_ids` call and a raw candle forward (per-request routing and actor hops);
//! - `concurrency`: 1, 4 and 8 concurrent streams to one model (or `--streams`), replicas 1 and
//!   replicas = streams (`--no-replica-match`: replicas 1 only);
//! - `multi`: two models generating at once in one pool, against each alone;
//! - `http`: `llm-pool serve` (started with a temporary config on port 0) or any server given by
//!   `--url`, streamed `/v1/completions`: TTFT, decode tok/s (skipped with `--no-single`),
//!   aggregate tok/s under concurrency;
//! - `all`: every one of the above in this process;
//! - `kernels` (not part of `all`): our quantized matmul kernels against candle's `QMatMul` on
//!   the same random tensors, per type (Q4_1, Q5_0, Q8_0) and dispatch level: GB/s of weights
//!   at m = 1, GOP/s at m = 64 and 512, and the ratio to candle (time of candle / ours);
//! - `step` (not part of `all`): the model's batched decode step alone (`--streams` sequences,
//!   default 1,2,4,8,16, each prefilled with the stream prompt, then `--gen` steps of one token
//!   per sequence through `Model::forward_batch_into`): aggregate tok/s per batch size and the
//!   ratio to one sequence, the ceiling continuous batching can reach before sampling, queues
//!   and HTTP;
//! - `structured`: constrained decoding. `engine::generate` from the same prompt, free and
//!   constrained to a JSON schema, alternately: decode ms per token of each and their ratio (the
//!   grammar's cost per token as the engine pays it: one check of the sampled token, a full
//!   mask only when the check refuses it). Then the grammar alone, replaying the constrained
//!   output: µs per token of the check-and-advance path, of a full mask at every position (the
//!   worst case), the grammar's compile time per request, and the one-off vocabulary index;
//! - `scrape`: `GET /metrics` of `llm-pool serve` (with `[metrics] vllm_compatible_names`),
//!   20 scrapes per second for `--scrape-secs`, first idle, then while the largest of
//!   `--streams` streams generate without pause: scrape latency p50/p99 (ms) and the streams'
//!   aggregate tok/s during the scraping;
//! - `memory` (not part of `all`): the machine's memory bandwidth at this thread count, read
//!   (a sum over 512 MiB, what a decode step's weight streaming is) and STREAM-like copy, and
//!   the bytes of weights one decode step of `--model` reads, for the share of bandwidth a
//!   decode rate reaches (`scripts/bench` puts them together).
//!
//! Test names follow llama-bench: `tg128` generates 128 tokens (128 single-token forwards from a
//! 1-token prompt), `pp64` / `pp512` run one prompt of 64 / 512 tokens. Prompts are fixed,
//! deterministic token ids, the same for every implementation.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor, D};
use candle_transformers::models::quantized_gemma3 as qgemma3;
use candle_transformers::models::quantized_llama as qllama;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use llm_pool::config::{Config, ModelConfig};
use llm_pool::engine::{generate, GenerateParams};
use llm_pool::models::{LanguageModel, LoadOptions, Model};
use llm_pool::pool::{GenerateRequest, GenerationEvent, Pool};
use llm_pool::text::sampling::{argmax, SamplingParams};
use llm_pool::text::ModelText;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "llm-pool benchmarks (JSON lines on stdout, text on stderr)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// candle-transformers directly.
    Raw,
    /// llm-pool's Model::forward_ids and engine::generate (without and with the tokenizer).
    Layers,
    /// The in-process Pool API.
    Pool,
    /// Per-request pool overhead against direct calls.
    Overhead,
    /// Raw candle and the Pool alternately in one process: paired throughput ratios.
    Compare,
    /// Concurrent streams to one model (replicas 1 and replicas = streams).
    Concurrency,
    /// Two models at once in one pool.
    Multi,
    /// Streamed /v1/completions over HTTP (llm-pool serve, or --url).
    Http,
    /// Everything above, in this process.
    All,
    /// Our quantized kernels against candle's QMatMul, per type and dispatch level.
    Kernels,
    /// Memory bandwidth (STREAM-like read and copy) at this thread count, and the weight
    /// bytes one decode step of --model reads.
    Memory,
    /// Batched decode steps (Model::forward_batch_into) per batch size: tok/s and the ratio
    /// to one sequence.
    Step,
    /// Structured outputs: decode time per token with and without a JSON-schema grammar, and
    /// the grammar's own costs (vocabulary index, compile, check, full mask).
    Structured,
    /// /metrics scrape latency of `llm-pool serve`, idle and while it generates (20 scrapes/s,
    /// as an inference router scrapes).
    Scrape,
}

#[derive(Args, Clone)]
struct Opts {
    /// The GGUF model.
    #[arg(
        long,
        global = true,
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// The model's label in the results (default: the file name without .gguf).
    #[arg(long, global = true)]
    name: Option<String>,
    /// The second model of `multi` (falls back to a second copy of --model if it fails to load).
    #[arg(long, global = true, default_value = "models/gemma-3-270m-q4_k_m.gguf")]
    model2: PathBuf,
    /// Few tokens, one repetition: everything in well under a minute.
    #[arg(long, global = true)]
    smoke: bool,
    /// Measured repetitions per figure [default: 5, smoke: 1].
    #[arg(long, global = true)]
    reps: Option<usize>,
    /// Warm-up runs before the measured ones [default: 1].
    #[arg(long, global = true)]
    warmup: Option<usize>,
    /// Tokens generated by the tg test [default: 128, smoke: 8].
    #[arg(long, global = true)]
    tg: Option<usize>,
    /// Prompt lengths of the pp tests [default: 64,512, smoke: 16].
    #[arg(long, global = true, value_delimiter = ',')]
    pp: Option<Vec<usize>>,
    /// Tokens generated per stream in concurrency, multi and HTTP load tests [default: 64, smoke: 4].
    #[arg(long, global = true)]
    gen: Option<usize>,
    /// Concurrent streams [default: 1,4,8, smoke: 1,4].
    #[arg(long, global = true, value_delimiter = ',')]
    streams: Option<Vec<usize>>,
    /// Concurrency: only replicas = 1 (skip replicas = streams).
    #[arg(long, global = true)]
    no_replica_match: bool,
    /// The prompt of each concurrent stream of `concurrency` and `http`, as token ids
    /// [default: 8 fixed ids]. Greedy decoding from the default ends at once (end of sequence)
    /// for Gemma-3, so scripts/bench-concurrency gives it the ids of a short text.
    #[arg(long, global = true, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// HTTP: skip the single-stream test (TTFT and decode of tg tokens); only concurrent streams.
    #[arg(long, global = true)]
    no_single: bool,
    /// A TOML line (`key = value`) added to the model's `[[models]]` table, for `concurrency`
    /// and the `http` server's config; repeatable, e.g. `--model-config 'replicas = 1'`.
    #[arg(long = "model-config", global = true, alias = "server-model-config")]
    model_config: Vec<String>,
    /// Repetitions of the overhead test [default: 100, smoke: 5].
    #[arg(long, global = true)]
    overhead_reps: Option<usize>,
    /// Seconds of scraping per phase of `scrape` [default: 10, smoke: 1].
    #[arg(long, global = true)]
    scrape_secs: Option<f64>,
    /// The llm-pool binary for `http` [default: llm-pool next to this example's directory].
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Replicas of the model in the `http` server's config.
    #[arg(long, global = true, default_value_t = 1)]
    server_replicas: usize,
    /// Benchmark an already running OpenAI-compatible server instead of starting llm-pool.
    #[arg(long, global = true)]
    url: Option<String>,
    /// The pid of the --url server, for its peak RSS.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// The implementation's label for `http` results [default: llm-pool].
    #[arg(long, global = true)]
    label: Option<String>,
}

/// Resolved settings.
struct Bench {
    o: Opts,
    model_name: String,
    threads: usize,
    reps: usize,
    warmup: usize,
    tg: usize,
    pp: Vec<usize>,
    gen: usize,
    streams: Vec<usize>,
    overhead_reps: usize,
}

impl Bench {
    fn new(o: Opts) -> Self {
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
    fn stream_prompt(&self) -> Vec<u32> {
        self.o.prompt_ids.clone().unwrap_or_else(|| prompt_ids(8))
    }

    fn runs(&self) -> usize {
        self.warmup + self.reps
    }

    /// Prints one figure: a JSON line on stdout, a text line on stderr.
    // The arguments are the columns of one result row; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn emit(
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

    fn emit_rss(&self, imp: &str, bench: &str, model: &str, bytes: Option<u64>) {
        if let Some(b) = bytes {
            let mib = b as f64 / (1024.0 * 1024.0);
            self.emit(imp, bench, model, "peak_rss", "MiB", &[mib], json!({}));
        }
    }

    fn skip(&self, imp: &str, bench: &str, model: &str, reason: &str) {
        println!(
            "{}",
            json!({"impl": imp, "bench": bench, "model": model, "threads": self.threads,
                   "skipped": reason, "smoke": self.o.smoke})
        );
        eprintln!("{imp:<10} {bench:<11} {model:<26} skipped: {reason}");
    }
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
    p10: f64,
    p90: f64,
    p99: f64,
}

impl Stats {
    fn of(samples: &[f64]) -> Stats {
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

fn label_of(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| "model".into())
}

/// Fixed, deterministic prompt ids (inside every supported vocabulary), the same for all
/// implementations. The first one alone is the tg prompt.
fn prompt_ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1000 + ((i as u32 * 7919) % 20000)).collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// Raw candle

/// A candle-transformers quantized model, called directly.
#[derive(Clone)]
enum RawModel {
    Llama(qllama::ModelWeights),
    Gemma3(qgemma3::ModelWeights),
}

impl RawModel {
    fn load(path: &Path) -> Result<RawModel> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(path))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        Ok(match arch.as_str() {
            "llama" => RawModel::Llama(qllama::ModelWeights::from_gguf(
                content,
                &mut file,
                &Device::Cpu,
            )?),
            "gemma3" => RawModel::Gemma3(qgemma3::ModelWeights::from_gguf(
                content,
                &mut file,
                &Device::Cpu,
            )?),
            other => bail!("raw candle baseline: unsupported GGUF architecture {other:?}"),
        })
    }

    /// One forward over `ids` at `pos`, then greedy argmax of the last position.
    fn step(&mut self, ids: &[u32], pos: usize) -> Result<u32> {
        let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let logits = match self {
            RawModel::Llama(m) => m.forward(&input, pos)?,
            RawModel::Gemma3(m) => m.forward(&input, pos)?,
        };
        Ok(logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?)
    }
}

fn bench_raw(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let pristine = match RawModel::load(&b.o.model) {
        Ok(m) => m,
        Err(e) => {
            b.skip("candle", "raw", name, &format!("{e:#}"));
            return Ok(());
        }
    };
    let ids = prompt_ids(b.pp.iter().copied().max().unwrap_or(1).max(1));
    // tg: b.tg single-token forwards from a 1-token prompt (a fresh KV cache each run).
    let mut tps = Vec::new();
    for run in 0..b.runs() {
        let mut m = pristine.clone();
        let t = Instant::now();
        let mut tok = m.step(&ids[..1], 0)?;
        for pos in 1..b.tg {
            tok = m.step(&[tok], pos)?;
        }
        let dt = t.elapsed();
        if run >= b.warmup {
            tps.push(b.tg as f64 / secs(dt));
        }
    }
    b.emit(
        "candle",
        "raw",
        name,
        &format!("tg{}", b.tg),
        "tok/s",
        &tps,
        json!({}),
    );
    for &n in &b.pp {
        let mut tps = Vec::new();
        let mut ttft = Vec::new();
        for run in 0..b.runs() {
            let mut m = pristine.clone();
            let t = Instant::now();
            m.step(&ids[..n], 0)?;
            let dt = t.elapsed();
            if run >= b.warmup {
                tps.push(n as f64 / secs(dt));
                ttft.push(ms(dt));
            }
        }
        b.emit(
            "candle",
            "raw",
            name,
            &format!("pp{n}"),
            "tok/s",
            &tps,
            json!({}),
        );
        b.emit(
            "candle",
            "raw",
            name,
            &format!("ttft_pp{n}"),
            "ms",
            &ttft,
            json!({}),
        );
    }
    b.emit_rss("candle", "raw", name, llm_pool::resources::peak_rss_bytes());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// llm-pool layers without the pool: Model::forward_ids, engine::generate

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ..GenerateParams::default()
    }
}

fn bench_layers(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let mut model = match Model::load(&b.o.model, &LoadOptions::cpu()) {
        Ok(m) => m,
        Err(e) => {
            b.skip("llm-pool", "layers", name, &e.to_string());
            return Ok(());
        }
    };
    let text = ModelText::load(&b.o.model, model.info(), None)?;
    let ids = prompt_ids(b.pp.iter().copied().max().unwrap_or(1).max(1));

    // Model::forward_ids + argmax over the returned Vec<f32>.
    let mut tps = Vec::new();
    for run in 0..b.runs() {
        model.reset_cache()?;
        let t = Instant::now();
        let mut tok = argmax(&model.forward_ids(&ids[..1], 0)?);
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
            model.reset_cache()?;
            let t = Instant::now();
            argmax(&model.forward_ids(&ids[..n], 0)?);
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
            let out = generate(&mut model, text, &ids[..1], &greedy(b.tg), |_| true)?;
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
                let t = Instant::now();
                generate(&mut model, text, &ids[..n], &greedy(1), |_| true)?;
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

// ---------------------------------------------------------------------------------------------
// The in-process pool

fn model_config(name: &str, path: &Path, replicas: usize) -> ModelConfig {
    let mut m = ModelConfig::new(name, path);
    m.replicas = replicas;
    m.queue_size = 256;
    m
}

/// The `[[models]]` table of `name` (path made absolute) with `extra` TOML lines appended:
/// what `concurrency` parses for its pool and `http` writes into the server's config.
fn model_toml(name: &str, path: &Path, replicas: usize, extra: &[String]) -> Result<String> {
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
fn model_config_with(
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

async fn start_pool(models: Vec<ModelConfig>) -> Result<Pool> {
    let config = Config {
        models,
        ..Config::default()
    };
    Ok(Pool::start(config).await?)
}

/// One streamed generation through the pool, timed from the enqueue.
struct Timed {
    ttft: Duration,
    total: Duration,
    tokens: usize,
    /// Time from `t0` (a shared start) to the end, for concurrent runs.
    end_since: Duration,
}

async fn pool_run(
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
                    tokens: r.completion_tokens(),
                    end_since: t0.elapsed(),
                });
            }
        }
    }
    bail!("the stream ended without a result")
}

async fn bench_pool(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let pool = match start_pool(vec![model_config("m", &b.o.model, 1)]).await {
        Ok(p) => p,
        Err(e) => {
            b.skip("llm-pool", "pool", name, &format!("{e:#}"));
            return Ok(());
        }
    };
    let ids = prompt_ids(b.pp.iter().copied().max().unwrap_or(1).max(1));
    let (mut tps, mut ttft, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    let mut tokens = 0;
    for run in 0..b.runs() {
        let r = pool_run(&pool, "m", &ids[..1], b.tg, Instant::now()).await?;
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
            let r = pool_run(&pool, "m", &ids[..n], 1, Instant::now()).await?;
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

async fn bench_overhead(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let pool = match start_pool(vec![model_config("m", &b.o.model, 1)]).await {
        Ok(p) => p,
        Err(e) => {
            b.skip("llm-pool", "overhead", name, &format!("{e:#}"));
            return Ok(());
        }
    };
    let mut model = Model::load(&b.o.model, &LoadOptions::cpu())?;
    let raw = RawModel::load(&b.o.model).ok();
    let tok = prompt_ids(1);
    let (mut direct, mut via_pool, mut raw_us) = (Vec::new(), Vec::new(), Vec::new());
    let warm = 5.max(b.warmup);
    // Interleaved, so that drift (other load, frequency) hits all three alike.
    for run in 0..warm + b.overhead_reps {
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

/// Raw candle and the Pool, alternating in one process (order swapped every run), so that
/// drift on a shared machine hits both alike: the paired ratio Pool / raw is the pool's cost.
async fn bench_compare(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let raw = match RawModel::load(&b.o.model) {
        Ok(m) => m,
        Err(e) => {
            b.skip("llm-pool", "compare", name, &format!("{e:#}"));
            return Ok(());
        }
    };
    let pool = match start_pool(vec![model_config("m", &b.o.model, 1)]).await {
        Ok(p) => p,
        Err(e) => {
            b.skip("llm-pool", "compare", name, &format!("{e:#}"));
            return Ok(());
        }
    };
    let pp = b.pp.iter().copied().min().unwrap_or(64).max(1);
    let ids = prompt_ids(pp);
    let tests: Vec<(String, usize, usize)> =
        vec![(format!("tg{}", b.tg), 1, b.tg), (format!("pp{pp}"), pp, 1)];
    for (test, prompt_len, gen) in tests {
        let (mut r_tps, mut p_tps, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        let reps = if b.o.smoke { 1 } else { b.reps.max(5) };
        for run in 0..b.warmup + reps {
            let mut pair = [0.0f64; 2];
            for k in 0..2 {
                if (run + k) % 2 == 1 {
                    let r = pool_run(&pool, "m", &ids[..prompt_len], gen, Instant::now()).await?;
                    // One forward per generated token (the prompt's, then all but the last).
                    let work = if gen == 1 { prompt_len } else { r.tokens };
                    pair[1] = work as f64 / secs(r.total);
                } else {
                    let mut m = raw.clone();
                    let t = Instant::now();
                    let mut tok = m.step(&ids[..prompt_len], 0)?;
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

async fn bench_concurrency(b: &Bench) -> Result<()> {
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
        let pool = match start_pool(vec![config]).await {
            Ok(p) => p,
            Err(e) => {
                b.skip("llm-pool", "concurrency", name, &format!("{e:#}"));
                return Ok(());
            }
        };
        let streams: Vec<usize> = if replicas == 1 {
            b.streams.clone()
        } else {
            vec![replicas]
        };
        for n in streams {
            let (mut agg, mut ttft, mut per_stream) = (Vec::new(), Vec::new(), Vec::new());
            let mut generated = 0usize;
            for run in 0..b.runs() {
                let t0 = Instant::now();
                let runs = futures::future::join_all(
                    (0..n).map(|_| pool_run(&pool, "m", &prompt, b.gen, t0)),
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

async fn bench_multi(b: &Bench) -> Result<()> {
    let name_a = b.model_name.clone();
    let mut name_b = label_of(&b.o.model2);
    let pool = match start_pool(vec![
        model_config("a", &b.o.model, 1),
        model_config("b", &b.o.model2, 1),
    ])
    .await
    {
        Ok(p) => p,
        Err(e) => {
            b.skip(
                "llm-pool",
                "multi",
                &name_b,
                &format!("second model fails to load ({e:#}); using two copies of {name_a}"),
            );
            name_b = format!("{name_a} (2nd copy)");
            start_pool(vec![
                model_config("a", &b.o.model, 1),
                model_config("b", &b.o.model, 1),
            ])
            .await?
        }
    };
    // The tg prompt (1 token): with the 8-token prompt Gemma-3 ends at once (end of sequence).
    let prompt = prompt_ids(1);
    let pair = format!("{name_a} + {name_b}");
    let (mut alone_a, mut alone_b, mut tog_a, mut tog_b, mut agg) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut last_tokens = (0, 0);
    for run in 0..b.runs() {
        let a = pool_run(&pool, "a", &prompt, b.gen, Instant::now()).await?;
        let bb = pool_run(&pool, "b", &prompt, b.gen, Instant::now()).await?;
        let t0 = Instant::now();
        let (x, y) = tokio::join!(
            pool_run(&pool, "a", &prompt, b.gen, t0),
            pool_run(&pool, "b", &prompt, b.gen, t0)
        );
        let wall = t0.elapsed();
        let (x, y) = (x?, y?);
        last_tokens = (a.tokens, bb.tokens);
        if run >= b.warmup {
            alone_a.push(a.tokens as f64 / secs(a.total));
            alone_b.push(bb.tokens as f64 / secs(bb.total));
            tog_a.push(x.tokens as f64 / secs(x.total));
            tog_b.push(y.tokens as f64 / secs(y.total));
            agg.push((x.tokens + y.tokens) as f64 / secs(wall));
        }
    }
    let g = b.gen;
    let tokens = json!({"tokens_a": last_tokens.0, "tokens_b": last_tokens.1});
    b.emit(
        "llm-pool",
        "multi",
        &name_a,
        &format!("alone_tg{g}"),
        "tok/s",
        &alone_a,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "multi",
        &name_b,
        &format!("alone_tg{g}"),
        "tok/s",
        &alone_b,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "multi",
        &name_a,
        &format!("together_tg{g}"),
        "tok/s",
        &tog_a,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "multi",
        &name_b,
        &format!("together_tg{g}"),
        "tok/s",
        &tog_b,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "multi",
        &pair,
        &format!("together_aggregate_tg{g}"),
        "tok/s",
        &agg,
        tokens.clone(),
    );
    pool.shutdown().await;
    b.emit_rss(
        "llm-pool",
        "multi",
        &pair,
        llm_pool::resources::peak_rss_bytes(),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// `llm-pool serve` with a temporary config on port 0.
struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn default_server_bin() -> PathBuf {
    // target/release/examples/bench -> target/release/llm-pool
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(|d| d.join("llm-pool")))
        .unwrap_or_else(|| PathBuf::from("target/release/llm-pool"))
}

/// Starts `bin serve` on a config with the model `m` (`extra`: TOML lines for its table). Its
/// stderr goes to a file in the temporary directory, quoted when it does not come up.
fn start_server(bin: &Path, model: &Path, replicas: usize, extra: &[String]) -> Result<Server> {
    start_server_with(bin, model, replicas, extra, "")
}

/// `start_server` with `tables` (TOML) added to the config before the model's table.
fn start_server_with(
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

async fn wait_ready(client: &reqwest::Client, url: &str) -> Result<()> {
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

struct HttpRun {
    ttft: Duration,
    total: Duration,
    tokens: usize,
    end_since: Duration,
}

/// One streamed /v1/completions request: the time of the first non-empty text chunk, of the
/// end, and the completion tokens (from `usage`, or llama-server's `timings`, or chunks counted).
async fn http_run(
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

fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

async fn bench_http(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let imp = b.o.label.clone().unwrap_or_else(|| "llm-pool".into());
    let (server, url, pid) = match &b.o.url {
        Some(url) => (None, url.trim_end_matches('/').to_string(), b.o.server_pid),
        None => {
            let bin = b.o.server_bin.clone().unwrap_or_else(default_server_bin);
            if !bin.is_file() {
                b.skip(
                    &imp,
                    "http",
                    name,
                    &format!(
                        "{} not built (cargo build --release --bin llm-pool)",
                        bin.display()
                    ),
                );
                return Ok(());
            }
            let s = start_server(&bin, &b.o.model, b.o.server_replicas, &b.o.model_config)?;
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
        b.skip(&imp, "http", name, &format!("{e:#}"));
        return Ok(());
    }
    let extra = if b.o.url.is_some() {
        json!({"server_replicas": Value::Null})
    } else {
        json!({"server_replicas": b.o.server_replicas, "model_config": b.o.model_config})
    };
    if !b.o.no_single {
        bench_http_single(b, &client, &url, &imp, &extra).await?;
    }
    // Concurrent streams.
    let prompt = b.stream_prompt();
    for &n in &b.streams {
        let (mut agg, mut ttft, mut per_stream) = (vec![], vec![], vec![]);
        let mut generated = 0usize;
        for run in 0..b.runs() {
            let t0 = Instant::now();
            let runs = futures::future::join_all(
                (0..n).map(|_| http_run(&client, &url, &prompt, b.gen, t0)),
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
        let mut e = extra.clone();
        e["streams"] = json!(n);
        e["gen"] = json!(b.gen);
        e["prompt_ids"] = json!(prompt);
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
async fn bench_http_single(
    b: &Bench,
    client: &reqwest::Client,
    url: &str,
    imp: &str,
    extra: &Value,
) -> Result<()> {
    let name = &b.model_name;
    let one = prompt_ids(1);
    let (mut ttft, mut decode, mut tps) = (vec![], vec![], vec![]);
    let mut tokens = 0;
    for run in 0..b.runs() {
        let r = http_run(client, url, &one, b.tg, Instant::now()).await?;
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
    b.emit(
        imp,
        "http",
        name,
        &format!("ttft_{tg}"),
        "ms",
        &ttft,
        extra.clone(),
    );
    Ok(())
}

/// Median-able samples of `f`'s wall time in seconds, after the warm-up runs.
fn time_runs(b: &Bench, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
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

/// `step`: per batch size, `gen` batched decode steps (one token per sequence) after a prefill
/// of the stream prompt in every slot; tok/s of the decode steps and the ratio to batch 1.
fn bench_step(b: &Bench) -> Result<()> {
    use llm_pool::models::SequenceChunk;
    let mut model = Model::load(&b.o.model, &LoadOptions::cpu())?;
    let prompt = b.stream_prompt();
    let sizes = b.o.streams.clone().unwrap_or(if b.o.smoke {
        vec![1, 2]
    } else {
        vec![1, 2, 4, 8, 16]
    });
    let mut logits = Vec::new();
    let mut single = None;
    for &n in &sizes {
        model.set_slots(n)?;
        let mut rates = Vec::with_capacity(b.reps);
        for run in 0..b.runs() {
            for slot in 0..n {
                model.reset_slot(slot)?;
            }
            let chunks: Vec<_> = (0..n)
                .map(|slot| SequenceChunk {
                    slot,
                    tokens: &prompt,
                    position: 0,
                })
                .collect();
            model.forward_batch_into(&chunks, &mut logits)?;
            let started = Instant::now();
            for step in 0..b.gen {
                // The same token for every sequence: a step's cost does not depend on it.
                let token = [prompt[step % prompt.len()]];
                let chunks: Vec<_> = (0..n)
                    .map(|slot| SequenceChunk {
                        slot,
                        tokens: &token,
                        position: prompt.len() + step,
                    })
                    .collect();
                model.forward_batch_into(&chunks, &mut logits)?;
            }
            if run >= b.warmup {
                rates.push((n * b.gen) as f64 / secs(started.elapsed()));
            }
        }
        let median = Stats::of(&rates).median;
        let base = *single.get_or_insert(if n == 1 { median } else { f64::NAN });
        let ratio = median / base;
        b.emit(
            "llm-pool",
            "step",
            &b.model_name,
            &format!("batch{n}"),
            "tok/s",
            &rates,
            json!({"batch": n, "vs_batch1": ratio, "gen": b.gen, "prompt": prompt.len()}),
        );
        if ratio.is_finite() {
            eprintln!("{:>58} {ratio:.2}x batch 1", "");
        }
    }
    Ok(())
}

/// `kernels`: per type, a decode-sized weight (m = 1, bytes streamed from memory) and a
/// layer-sized one (m = 64, 512), each multiplied by candle's `QMatMul` and by our kernels at
/// every level this CPU has. Both sides include activation quantization and the output.
fn bench_kernels(b: &Bench) -> Result<()> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    use llm_pool::kernels::{Level, QuantizedWeight};

    let types = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0];
    // (n, k, rows): 65536 x 1024 is 42-71 MB of blocks, beyond the caches, like a decode step's
    // weights (candle repacks Q8_0 when k % 256 == 0 and n % 16 == 0, as here); 65536 x 640 is
    // a quarter of Gemma 3's Q8_0 head (k = 640: no repack); 1536 x 576 is SmolLM2's MLP gate.
    let shapes: [(usize, usize, &[usize]); 3] = [
        (65536, 1024, &[1]),
        (65536, 640, &[1]),
        (1536, 576, &[64, 512]),
    ];
    let levels = Level::available();
    eprintln!(
        "kernels: levels {:?}, dispatched {:?}",
        levels,
        llm_pool::kernels::level()
    );
    for dtype in types {
        for &(n, k, rows) in &shapes {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let q = QTensor::quantize(&w, dtype)?;
            drop(w);
            let bytes = q.storage_size_in_bytes() as f64;
            // One weight per level, laid out as that level computes it (Q4_1/Q5_0 are
            // interleaved for AVX-512 VNNI), so no level pays for another's layout.
            let ours = levels
                .iter()
                .map(|&level| {
                    QuantizedWeight::from_qtensor_at(level, &q)?
                        .ok_or_else(|| anyhow!("no kernel for {dtype:?}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let theirs = QMatMul::from_qtensor(q)?;
            for &m in rows {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
                let xv = x.flatten_all()?.to_vec1::<f32>()?;
                let (unit, per_sec) = if m == 1 {
                    ("GB/s", bytes / 1e9)
                } else {
                    ("GOP/s", 2.0 * (m * n * k) as f64 / 1e9)
                };
                let model = format!("{dtype:?} {n}x{k}");
                let test = format!("m{m}");
                let candle = time_runs(b, || {
                    theirs.forward(&x)?;
                    Ok(())
                })?;
                let rate = |t: &[f64]| t.iter().map(|s| per_sec / s).collect::<Vec<_>>();
                b.emit(
                    "candle",
                    "kernels",
                    &model,
                    &test,
                    unit,
                    &rate(&candle),
                    json!({}),
                );
                let candle_median = Stats::of(&candle).median;
                for (&level, ours) in levels.iter().zip(&ours) {
                    let t = time_runs(b, || {
                        ours.matmul_at(level, &xv)?;
                        Ok(())
                    })?;
                    let ratio = candle_median / Stats::of(&t).median;
                    b.emit(
                        "llm-pool",
                        "kernels",
                        &model,
                        &format!("{test}_{}", level.name()),
                        unit,
                        &rate(&t),
                        json!({"level": level.name(), "vs_candle": ratio}),
                    );
                    eprintln!("{:>58} {ratio:.2}x candle", "");
                }
            }
        }
    }
    Ok(())
}

/// `memory`: read and copy bandwidth over buffers far beyond the caches, split into contiguous
/// ranges over this run's thread count (as our kernels split a matmul), and the weight bytes
/// per decode step of the model.
fn bench_memory(b: &Bench) -> Result<()> {
    const BYTES: usize = 512 << 20;
    let threads = b.threads.max(1);
    let src: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let mut dst = vec![0u64; BYTES / 8];
    let chunk = src.len().div_ceil(threads);
    let read = time_runs(b, || {
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = src
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(total);
        Ok(())
    })?;
    let copy = time_runs(b, || {
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        std::hint::black_box(&dst);
        Ok(())
    })?;
    let gbs =
        |t: &[f64], bytes: usize| t.iter().map(|s| bytes as f64 / s / 1e9).collect::<Vec<_>>();
    b.emit(
        "machine",
        "memory",
        "-",
        "read",
        "GB/s",
        &gbs(&read, BYTES),
        json!({}),
    );
    // STREAM counts a copy's bytes read and written.
    b.emit(
        "machine",
        "memory",
        "-",
        "copy",
        "GB/s",
        &gbs(&copy, 2 * BYTES),
        json!({}),
    );
    if let Some(bytes) = decode_weight_bytes(&b.o.model)? {
        b.emit(
            "llm-pool",
            "memory",
            &b.model_name,
            "decode_weight_bytes",
            "MB",
            &[bytes as f64 / 1e6],
            json!({}),
        );
    }
    Ok(())
}

/// The bytes of weights one decode step reads from a GGUF file: every matrix, except that the
/// token embeddings are one looked-up row unless the output head is tied to them (then the
/// head reads the whole table). Norms and other vectors are counted too (they are small).
fn decode_weight_bytes(path: &std::path::Path) -> Result<Option<u64>> {
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Ok(None);
    }
    let file = llm_pool::models::gguf::GgufFile::open(path)?;
    let infos = &file.content.tensor_infos;
    let tied = !infos.contains_key("output.weight");
    let bytes = infos
        .iter()
        .filter(|(name, _)| tied || name.as_str() != "token_embd.weight")
        .map(|(_, info)| {
            let elems = info.shape.elem_count();
            (elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
        })
        .sum();
    Ok(Some(bytes))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let b = Bench::new(cli.opts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let cmds: Vec<Cmd> = match cli.command {
        Cmd::All => vec![
            Cmd::Raw,
            Cmd::Layers,
            Cmd::Pool,
            Cmd::Overhead,
            Cmd::Compare,
            Cmd::Concurrency,
            Cmd::Multi,
            Cmd::Http,
            Cmd::Structured,
            Cmd::Scrape,
        ],
        c => vec![c],
    };
    for cmd in cmds {
        match cmd {
            Cmd::Raw => bench_raw(&b)?,
            Cmd::Layers => bench_layers(&b)?,
            Cmd::Pool => rt.block_on(bench_pool(&b))?,
            Cmd::Overhead => rt.block_on(bench_overhead(&b))?,
            Cmd::Compare => rt.block_on(bench_compare(&b))?,
            Cmd::Concurrency => rt.block_on(bench_concurrency(&b))?,
            Cmd::Multi => rt.block_on(bench_multi(&b))?,
            Cmd::Http => rt.block_on(bench_http(&b))?,
            Cmd::Kernels => bench_kernels(&b)?,
            Cmd::Memory => bench_memory(&b)?,
            Cmd::Step => bench_step(&b)?,
            Cmd::Structured => bench_structured(&b)?,
            Cmd::Scrape => rt.block_on(bench_scrape(&b))?,
            Cmd::All => unreachable!(),
        }
    }
    eprintln!("bench: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Structured outputs: the grammar's cost per token

/// A schema with free text, numbers, an enum and an array: what a structured answer looks like.
fn report_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "summary": {"type": "string", "maxLength": 160},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 5},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "mood": {"type": "string", "enum": ["calm", "stormy", "foggy"]}
        },
        "required": ["title", "summary", "tags", "score", "mood"],
        "additionalProperties": false
    })
}

fn bench_structured(b: &Bench) -> Result<()> {
    use llm_pool::engine::Constrained;
    use llm_pool::request::Grammar;
    use llm_pool::text::{encode_prompt, ChatMessage, Prompt};
    let name = &b.model_name;
    let mut model = Model::load(&b.o.model, &LoadOptions::cpu())?;
    let Some(text) = ModelText::load(&b.o.model, model.info(), None)? else {
        b.skip("llm-pool", "structured", name, "the model has no tokenizer");
        return Ok(());
    };
    let request =
        "Write a report about the sea, with a title, a long summary, tags, a score and the mood.";
    let prompt = if text.chat_template.is_some() {
        Prompt::Chat(vec![ChatMessage::new("user", request)])
    } else {
        Prompt::Text(format!("{request}\nReport (JSON):"))
    };
    let ids = encode_prompt(name, Some(&text), &prompt)?;
    let grammar = Grammar::JsonSchema(report_schema());

    // The vocabulary index, built once per model on its first constrained request.
    let t = Instant::now();
    let env = text.constraint_env()?;
    let index_ms = secs(t.elapsed()) * 1e3;
    b.emit(
        "llm-pool",
        "structured",
        name,
        "vocab_index",
        "ms",
        &[index_ms],
        json!({}),
    );

    let free = greedy(b.tg);
    let mut constrained = greedy(b.tg);
    constrained.grammar = Some(Constrained {
        grammar: grammar.clone(),
        param: "response_format".into(),
    });
    // Alternate free and constrained runs, so that drift of the machine hits both alike.
    let (mut free_ms, mut json_ms, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut output = Vec::new();
    for run in 0..b.runs() {
        let mut per_token = [0.0f64; 2];
        // Constrained first: the free run then generates as many tokens, so that both pay for
        // attention over the same positions.
        // Index 1 is the constrained run, 0 the free one.
        for (i, params) in [(1, &constrained), (0, &free)] {
            let mut params = params.clone();
            if i == 0 && !output.is_empty() {
                params.max_tokens = output.len();
            }
            let out = generate(&mut model, Some(&text), &ids, &params, |_| true)?;
            let steps = out.completion_tokens().saturating_sub(1).max(1);
            per_token[i] = secs(out.decode) * 1e3 / steps as f64;
            if i == 1 {
                output = out.token_ids.clone();
                let parsed: Result<Value, _> =
                    serde_json::from_str(out.text.as_deref().unwrap_or(""));
                if out.finish_reason == llm_pool::engine::FinishReason::Stop && parsed.is_err() {
                    bail!("the constrained output is not JSON: {:?}", out.text);
                }
            }
        }
        if run >= b.warmup {
            free_ms.push(per_token[0]);
            json_ms.push(per_token[1]);
            ratios.push(per_token[1] / per_token[0]);
        }
    }
    let tokens = json!({"constrained_tokens": output.len()});
    b.emit(
        "llm-pool",
        "structured",
        name,
        "decode_free",
        "ms/tok",
        &free_ms,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "structured",
        name,
        "decode_json_schema",
        "ms/tok",
        &json_ms,
        tokens.clone(),
    );
    b.emit(
        "llm-pool",
        "structured",
        name,
        "json_over_free",
        "x",
        &ratios,
        tokens,
    );

    // The grammar alone, replaying the constrained output.
    let width = model.info().vocab_size;
    let mut logits = vec![0.0f32; width];
    let (mut compile_us, mut check_us, mut mask_us) = (Vec::new(), Vec::new(), Vec::new());
    let replay: Vec<u32> = output
        .iter()
        .copied()
        .filter(|id| !text.stop_token_ids.contains(id))
        .collect();
    for run in 0..b.runs() {
        let t = Instant::now();
        let mut c = env.compile(&grammar, "response_format")?;
        let compile = secs(t.elapsed()) * 1e6;
        let t = Instant::now();
        for &id in &replay {
            if !c.allows(id) {
                bail!("the grammar refuses its own output at token {id}");
            }
            c.accept(id)?;
        }
        let check = secs(t.elapsed()) * 1e6 / replay.len().max(1) as f64;
        let mut c = env.compile(&grammar, "response_format")?;
        let t = Instant::now();
        for &id in &replay {
            c.mask(&mut logits)?;
            c.accept(id)?;
        }
        let mask = secs(t.elapsed()) * 1e6 / replay.len().max(1) as f64;
        if run >= b.warmup {
            compile_us.push(compile);
            check_us.push(check);
            mask_us.push(mask);
        }
    }
    let extra = json!({"tokens": replay.len()});
    b.emit(
        "llm-pool",
        "structured",
        name,
        "compile",
        "us",
        &compile_us,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "structured",
        name,
        "check_and_advance",
        "us/tok",
        &check_us,
        extra.clone(),
    );
    b.emit(
        "llm-pool",
        "structured",
        name,
        "mask_every_token",
        "us/tok",
        &mask_us,
        extra,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /metrics under load: what an inference router's scrapes cost and see

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

async fn bench_scrape(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let bin = b.o.server_bin.clone().unwrap_or_else(default_server_bin);
    if !bin.is_file() {
        b.skip(
            "llm-pool",
            "scrape",
            name,
            &format!("{} not built", bin.display()),
        );
        return Ok(());
    }
    let secs_per_phase =
        b.o.scrape_secs
            .unwrap_or(if b.o.smoke { 1.0 } else { 10.0 });
    let phase = Duration::from_secs_f64(secs_per_phase.max(0.1));
    let server = start_server_with(
        &bin,
        &b.o.model,
        1,
        &b.o.model_config,
        "[metrics]\nvllm_compatible_names = true\n",
    )?;
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
                    tokens += http_run(&client, &url, &prompt, gen, Instant::now())
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
