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
//! The program is a folder: `main.rs` (this CLI and the dispatch), `harness.rs` (settings,
//! output, statistics, prompts, pool and server helpers) and one module per subcommand, each
//! saying what it measures.
//!
//! `scripts/bench` runs the whole comparison (with llama.cpp) and writes docs/BENCHMARKS.md;
//! `scripts/bench-concurrency` sweeps concurrent streams (`concurrency` and `http` against
//! `llm-pool serve` and `llama-server` with as many slots as streams) and writes its section of
//! it and docs/concurrency.png.
//!
//! `--model-config KEY=VALUE` (repeatable) adds TOML lines to the benchmarked model's
//! `[[models]]` table, for `concurrency` (the in-process pool) and `http` (the config of the
//! `llm-pool serve` it starts), e.g. batching settings; unknown keys fail as the config does.
//! `--compute-nice N` (or `LLM_POOL__POOL__COMPUTE_NICE`) sets `[pool] compute_nice` of every
//! pool and server the run starts; each result row records it (null for a `--url` server).
//!
//! Subcommands (each in its own module):
//! - `raw`: candle-transformers directly (`ModelWeights::from_gguf`, `forward`, argmax);
//! - `layers`: llm-pool's `Model::forward_ids` loop, `engine::generate` without and with the
//!   tokenizer (streamed detokenization), to attribute costs layer by layer;
//! - `pool`: the in-process `Pool` API (one model, one replica, greedy, token-id prompts);
//! - `overhead`: a 1-token prompt with `max_tokens = 1` through the pool against a direct
//!   `Model::forward_ids` call and a raw candle forward (per-request routing and actor hops);
//! - `compare`: raw candle and the `Pool` alternately in one process: paired throughput ratios;
//! - `concurrency`: 1, 4 and 8 concurrent streams to one model (or `--streams`), replicas 1 and
//!   replicas = streams (`--no-replica-match`: replicas 1 only);
//! - `multi`: two models generating at once in one pool, against each alone;
//! - `http`: `llm-pool serve` (started with a temporary config on port 0) or any server given by
//!   `--url`, streamed `/v1/completions`: TTFT, decode tok/s (skipped with `--no-single`),
//!   aggregate tok/s under concurrency;
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
//! - `step`: the model's batched decode step alone (`--streams` sequences, default
//!   1,2,4,8,16, each prefilled with the stream prompt, then `--gen` steps of one token per
//!   sequence through `Model::forward_batch_into`): aggregate tok/s per batch size and the
//!   ratio to one sequence, the ceiling continuous batching can reach before sampling, queues
//!   and HTTP;
//! - `kernels`: our quantized matmul kernels against candle's `QMatMul` on the same random
//!   tensors, per type (Q4_1, Q5_0, Q8_0) and dispatch level: GB/s of weights at m = 1, GOP/s
//!   at m = 64 and 512, and the ratio to candle (time of candle / ours);
//! - `memory`: the machine's memory bandwidth at this thread count, read (a sum over 512 MiB,
//!   what a decode step's weight streaming is) and STREAM-like copy, and the bytes of weights
//!   one decode step of `--model` reads, for the share of bandwidth a decode rate reaches
//!   (`scripts/bench` puts them together);
//! - `context`: not a measurement; the context one sequence gets in llm-pool, which
//!   `scripts/bench-concurrency` gives each llama-server slot;
//! - `all`: every one of the above in this process (`kernels` and `memory` take minutes at
//!   full size; `--smoke` shrinks them with the rest).
//!
//! `--smoke`: few tokens, small sizes, one repetition, to prove that every part still runs. A
//! part that cannot run here (a model that does not load, no `llm-pool` binary next to this
//! example's directory) is a skip, a JSON line with `skipped`; under `--smoke` a skip is an
//! error, so that the smoke run cannot pass by skipping.
//!
//! Test names follow llama-bench: `tg128` generates 128 tokens (128 single-token forwards from a
//! 1-token prompt), `pp64` / `pp512` run one prompt of 64 / 512 tokens. Prompts are fixed,
//! deterministic token ids, the same for every implementation, inside every supported
//! vocabulary and checked against the model's. A timed prompt must be computed whole: the pool
//! reuses the cached prefix a slot shares with a new prompt (and llama-server does the same per
//! slot), so every prompt longer than one token starts with an id no earlier prompt of the run
//! started with (the fixed ids after it), and a run fails when the pool's result
//! (`CacheUse::PrefixHit`), a session, or a server's `usage.prompt_tokens_details.cached_tokens`
//! / `timings.cache_n` reports a reused token. A 1-token prompt (tg, `overhead`, `multi`)
//! cannot be reused, since one token is always computed for the logits.

mod compare;
mod concurrency;
mod context;
mod harness;
mod http;
mod kernels;
mod layers;
mod memory;
mod multi;
mod overhead;
mod pool;
mod raw;
mod scrape;
mod step;
mod structured;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use harness::Bench;
use std::path::PathBuf;
use std::time::Instant;

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
    /// Every subcommand, in this process.
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
    /// Not a measurement: the context one sequence of --model gets in llm-pool (for sizing
    /// llama-server's -c to its -np slots).
    Context,
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
    /// Few tokens, small sizes, one repetition: everything in about a minute (release). A part
    /// that cannot run (a skip) is then an error.
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
    /// The base of each concurrent stream's prompt in `concurrency`, `http` and `scrape` (and
    /// of `step`'s), as token ids [default: 8 fixed ids]; every stream of every burst sends it
    /// with its first id replaced by one no earlier prompt of the run started with. Greedy
    /// decoding from the default ends at once (end of sequence) for Gemma-3, so
    /// scripts/bench-concurrency gives it the ids of a short text.
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
    /// `[pool] compute_nice` (0-19) of the in-process pools and of the `llm-pool serve` this
    /// run starts [default: llm-pool's, 5]; recorded in every result row.
    #[arg(
        long,
        global = true,
        env = "LLM_POOL__POOL__COMPUTE_NICE",
        value_parser = clap::value_parser!(i32).range(0..=19)
    )]
    compute_nice: Option<i32>,
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
            Cmd::Step,
            Cmd::Kernels,
            Cmd::Memory,
            Cmd::Context,
        ],
        c => vec![c],
    };
    for cmd in cmds {
        match cmd {
            Cmd::Raw => raw::run(&b)?,
            Cmd::Layers => layers::run(&b)?,
            Cmd::Pool => rt.block_on(pool::run(&b))?,
            Cmd::Overhead => rt.block_on(overhead::run(&b))?,
            Cmd::Compare => rt.block_on(compare::run(&b))?,
            Cmd::Concurrency => rt.block_on(concurrency::run(&b))?,
            Cmd::Multi => rt.block_on(multi::run(&b))?,
            Cmd::Http => rt.block_on(http::run(&b))?,
            Cmd::Kernels => kernels::run(&b)?,
            Cmd::Memory => memory::run(&b)?,
            Cmd::Step => step::run(&b)?,
            Cmd::Structured => structured::run(&b)?,
            Cmd::Scrape => rt.block_on(scrape::run(&b))?,
            Cmd::Context => context::run(&b)?,
            // Expanded above.
            Cmd::All => {}
        }
    }
    eprintln!("bench: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
