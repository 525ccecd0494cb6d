//! Every metric llm-pool exports, in one place, with the helpers that record them.
//!
//! Names are prefixed `llm_pool_`; every per-model series carries the label `model`. The
//! recorder is a process-wide Prometheus exporter from `metrics-exporter-prometheus`, installed
//! on first use; [`render`] gives the text `/metrics` serves.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Requests by outcome (`ok`, `invalid`, `error`, `cancelled`, `overloaded`, `unavailable`,
/// `restarted`).
pub const REQUESTS_TOTAL: &str = "llm_pool_requests_total";
/// Prompt tokens processed.
pub const PROMPT_TOKENS_TOTAL: &str = "llm_pool_prompt_tokens_total";
/// Tokens generated; throughput is `rate()` of this.
pub const GENERATED_TOKENS_TOTAL: &str = "llm_pool_generated_tokens_total";
/// Whole request time, from enqueue to the last token.
pub const REQUEST_DURATION: &str = "llm_pool_request_duration_seconds";
/// From enqueue to the first generated token.
pub const TIME_TO_FIRST_TOKEN: &str = "llm_pool_time_to_first_token_seconds";
/// Decode time per generated token after the first.
pub const TIME_PER_OUTPUT_TOKEN: &str = "llm_pool_time_per_output_token_seconds";
/// Time a request waited in its model's queue.
pub const QUEUE_WAIT: &str = "llm_pool_queue_wait_seconds";
/// Requests waiting in a model's queue.
pub const QUEUE_DEPTH: &str = "llm_pool_queue_depth";
/// Requests a model's worker is running (in its batch).
pub const RUNNING_REQUESTS: &str = "llm_pool_running_requests";
/// Requests waiting for a place in the batch: in the queue, or taken from it and waiting for
/// KV budget.
pub const WAITING_REQUESTS: &str = "llm_pool_waiting_requests";
/// Sequences per batched step (one forward).
pub const BATCH_SIZE: &str = "llm_pool_batch_size";
/// Share of the model's KV budget (`kv_cache_mb`) its slots hold, 0 to 1.
pub const KV_CACHE_USAGE: &str = "llm_pool_kv_cache_usage_ratio";
/// Models loaded, by device (label `device`).
pub const MODELS_LOADED: &str = "llm_pool_models_loaded";
/// KV-cache resets by reason (`new_prompt`, `policy`).
pub const CACHE_RESETS_TOTAL: &str = "llm_pool_cache_resets_total";
/// Requests that reused a cached prompt prefix.
pub const PREFIX_CACHE_HITS_TOTAL: &str = "llm_pool_prefix_cache_hits_total";
/// Prompt tokens not recomputed thanks to the prefix cache.
pub const PREFIX_CACHE_TOKENS_REUSED_TOTAL: &str = "llm_pool_prefix_cache_tokens_reused_total";
/// Worker restarts after a crash or an unrecoverable error.
pub const WORKER_RESTARTS_TOTAL: &str = "llm_pool_worker_restarts_total";
/// Time to load a model (each worker's load).
pub const MODEL_LOAD_DURATION: &str = "llm_pool_model_load_duration_seconds";
/// A model's lifecycle state, one series per state (`unloaded`, `loading`, `ready`, `failed`):
/// 1 for the state it is in, 0 for the others. `llm_pool_model_state{state="failed"} == 1`
/// is a model that failed too often and serves nothing until an admin reloads it.
pub const MODEL_STATE: &str = "llm_pool_model_state";

/// HTTP requests by route, status and tenant.
pub const HTTP_REQUESTS_TOTAL: &str = "llm_pool_http_requests_total";
/// HTTP request time by route (for streams: until the response headers).
pub const HTTP_REQUEST_DURATION: &str = "llm_pool_http_request_duration_seconds";
/// Clients that disconnected mid-stream (their generation is cancelled).
pub const CLIENT_DISCONNECTS_TOTAL: &str = "llm_pool_client_disconnects_total";

/// Every metric the pool records (with the label `model`, or `device` for
/// [`MODELS_LOADED`]), for documentation and tests; the HTTP host's are in [`HTTP_ALL`].
pub const ALL: &[&str] = &[
    REQUESTS_TOTAL,
    PROMPT_TOKENS_TOTAL,
    GENERATED_TOKENS_TOTAL,
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    TIME_PER_OUTPUT_TOKEN,
    QUEUE_WAIT,
    QUEUE_DEPTH,
    RUNNING_REQUESTS,
    WAITING_REQUESTS,
    BATCH_SIZE,
    KV_CACHE_USAGE,
    MODELS_LOADED,
    CACHE_RESETS_TOTAL,
    PREFIX_CACHE_HITS_TOTAL,
    PREFIX_CACHE_TOKENS_REUSED_TOTAL,
    WORKER_RESTARTS_TOTAL,
    MODEL_LOAD_DURATION,
    MODEL_STATE,
];

/// Every metric the HTTP host records.
pub const HTTP_ALL: &[&str] = &[
    HTTP_REQUESTS_TOTAL,
    HTTP_REQUEST_DURATION,
    CLIENT_DISCONNECTS_TOTAL,
];

/// vLLM's names for the gauges an inference router scrapes (`[metrics] vllm_compatible_names`),
/// labelled `model_name` as vLLM labels them.
pub const VLLM_WAITING: &str = "vllm:num_requests_waiting";
/// Requests running (vLLM's name).
pub const VLLM_RUNNING: &str = "vllm:num_requests_running";
/// KV cache in use, 0 to 1 (vLLM's name).
pub const VLLM_KV_CACHE_USAGE: &str = "vllm:kv_cache_usage_perc";
/// The KV cache's shape, for prefix-aware routers: labels `block_size` (1: llm-pool's cache is
/// token-granular) and `num_gpu_blocks` (the KV budget in tokens); value 1.
pub const VLLM_CACHE_CONFIG: &str = "vllm:cache_config_info";

/// OpenTelemetry GenAI semantic conventions' server histograms (`[metrics] otel_genai_names`),
/// in their Prometheus spelling (dots to underscores, unit suffix), labelled
/// `gen_ai_request_model` and `gen_ai_operation_name` (`chat` or `text_completion`).
/// `gen_ai.server.request.duration`: the request from enqueue to its last token.
pub const OTEL_REQUEST_DURATION: &str = "gen_ai_server_request_duration_seconds";
/// `gen_ai.server.time_to_first_token`: enqueue to the first generated token.
pub const OTEL_TIME_TO_FIRST_TOKEN: &str = "gen_ai_server_time_to_first_token_seconds";
/// `gen_ai.server.time_per_output_token`: decode time per token after the first.
pub const OTEL_TIME_PER_OUTPUT_TOKEN: &str = "gen_ai_server_time_per_output_token_seconds";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Whether the vLLM-named series are exported (process-wide: the last pool started decides).
static VLLM_NAMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the OpenTelemetry-named histograms are recorded (process-wide, as `VLLM_NAMES`).
static OTEL_NAMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Applies the `[metrics]` settings.
pub fn configure(settings: &crate::config::MetricsSettings) {
    VLLM_NAMES.store(
        settings.vllm_compatible_names,
        std::sync::atomic::Ordering::Relaxed,
    );
    OTEL_NAMES.store(
        settings.otel_genai_names,
        std::sync::atomic::Ordering::Relaxed,
    );
}

fn vllm_names() -> bool {
    VLLM_NAMES.load(std::sync::atomic::Ordering::Relaxed)
}

fn otel_names() -> bool {
    OTEL_NAMES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the Prometheus recorder (once per process) and returns its handle. `None` when
/// another recorder was installed first by the embedding program.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0,
            ];
            let sequences = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sequences)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe_all();
            Some(handle)
        })
        .as_ref()
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    install().map(|h| h.render()).unwrap_or_default()
}

fn describe_all() {
    describe_counter!(REQUESTS_TOTAL, "Requests by model and outcome");
    describe_counter!(PROMPT_TOKENS_TOTAL, Unit::Count, "Prompt tokens processed");
    describe_counter!(GENERATED_TOKENS_TOTAL, Unit::Count, "Tokens generated");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Request time from enqueue to the last token"
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Time from enqueue to the first token"
    );
    describe_histogram!(
        TIME_PER_OUTPUT_TOKEN,
        Unit::Seconds,
        "Decode time per token after the first"
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time spent waiting in the model's queue"
    );
    describe_gauge!(
        VLLM_WAITING,
        Unit::Count,
        "Requests waiting (vLLM's name; [metrics] vllm_compatible_names)"
    );
    describe_gauge!(
        VLLM_RUNNING,
        Unit::Count,
        "Requests running (vLLM's name; [metrics] vllm_compatible_names)"
    );
    describe_gauge!(
        VLLM_KV_CACHE_USAGE,
        "KV cache budget in use, 0 to 1 (vLLM's name; [metrics] vllm_compatible_names)"
    );
    describe_gauge!(
        VLLM_CACHE_CONFIG,
        "KV cache shape: block_size (1 token) and num_gpu_blocks (budget in tokens); value 1"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Requests waiting in the model's queue"
    );
    describe_gauge!(
        RUNNING_REQUESTS,
        Unit::Count,
        "Requests running in the model's batch"
    );
    describe_gauge!(
        WAITING_REQUESTS,
        Unit::Count,
        "Requests waiting for a place in the model's batch"
    );
    describe_histogram!(
        BATCH_SIZE,
        Unit::Count,
        "Sequences per batched step of the model"
    );
    describe_gauge!(
        KV_CACHE_USAGE,
        "Share of the model's KV cache budget in use, 0 to 1"
    );
    describe_gauge!(MODELS_LOADED, Unit::Count, "Models loaded, by device");
    describe_counter!(CACHE_RESETS_TOTAL, "KV-cache resets by reason");
    describe_counter!(
        PREFIX_CACHE_HITS_TOTAL,
        "Requests that reused a cached prompt prefix"
    );
    describe_counter!(
        PREFIX_CACHE_TOKENS_REUSED_TOTAL,
        Unit::Count,
        "Prompt tokens reused from the cache"
    );
    describe_counter!(
        WORKER_RESTARTS_TOTAL,
        "Worker restarts after a crash or unrecoverable error"
    );
    describe_histogram!(MODEL_LOAD_DURATION, Unit::Seconds, "Model load time");
    describe_histogram!(
        OTEL_REQUEST_DURATION,
        Unit::Seconds,
        "GenAI server request duration (OpenTelemetry gen_ai.server.request.duration)"
    );
    describe_histogram!(
        OTEL_TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Time to first token (OpenTelemetry gen_ai.server.time_to_first_token)"
    );
    describe_histogram!(
        OTEL_TIME_PER_OUTPUT_TOKEN,
        Unit::Seconds,
        "Time per output token after the first (OpenTelemetry gen_ai.server.time_per_output_token)"
    );
    describe_gauge!(
        MODEL_STATE,
        "Model lifecycle state: 1 for the current state (unloaded, loading, ready, failed)"
    );
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests by route, status and tenant"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request time by route"
    );
    describe_counter!(
        CLIENT_DISCONNECTS_TOTAL,
        "Clients that disconnected mid-stream"
    );
}

/// Counts an HTTP request.
pub fn http_request(route: &str, status: u16, tenant: &str, took: Duration) {
    counter!(HTTP_REQUESTS_TOTAL, "route" => route.to_string(), "status" => status.to_string(), "tenant" => tenant.to_string()).increment(1);
    histogram!(HTTP_REQUEST_DURATION, "route" => route.to_string()).record(took.as_secs_f64());
}

/// Counts a client that went away mid-stream.
pub fn client_disconnect(model: &str) {
    counter!(CLIENT_DISCONNECTS_TOTAL, "model" => model.to_string()).increment(1);
}

/// Registers every per-model series at zero, so that a scrape shows the model before traffic.
pub fn register_model(model: &str) {
    install();
    let m = model.to_string();
    for outcome in [
        "ok",
        "invalid",
        "error",
        "cancelled",
        "overloaded",
        "unavailable",
        "restarted",
    ] {
        counter!(REQUESTS_TOTAL, "model" => m.clone(), "outcome" => outcome).absolute(0);
    }
    counter!(PROMPT_TOKENS_TOTAL, "model" => m.clone()).absolute(0);
    counter!(GENERATED_TOKENS_TOTAL, "model" => m.clone()).absolute(0);
    for reason in ["new_prompt", "policy"] {
        counter!(CACHE_RESETS_TOTAL, "model" => m.clone(), "reason" => reason).absolute(0);
    }
    counter!(PREFIX_CACHE_HITS_TOTAL, "model" => m.clone()).absolute(0);
    counter!(PREFIX_CACHE_TOKENS_REUSED_TOTAL, "model" => m.clone()).absolute(0);
    counter!(WORKER_RESTARTS_TOTAL, "model" => m.clone()).absolute(0);
    counter!(CLIENT_DISCONNECTS_TOTAL, "model" => m.clone()).absolute(0);
    gauge!(QUEUE_DEPTH, "model" => m.clone()).set(0.0);
    gauge!(RUNNING_REQUESTS, "model" => m.clone()).set(0.0);
    gauge!(WAITING_REQUESTS, "model" => m.clone()).set(0.0);
    gauge!(KV_CACHE_USAGE, "model" => m.clone()).set(0.0);
    if vllm_names() {
        for name in [VLLM_WAITING, VLLM_RUNNING, VLLM_KV_CACHE_USAGE] {
            gauge!(name, "model_name" => m.clone()).set(0.0);
        }
    }
    let _ = histogram!(BATCH_SIZE, "model" => m.clone());
    // Histograms appear with their first observation; touching them registers the series.
    let _ = histogram!(REQUEST_DURATION, "model" => m.clone());
    let _ = histogram!(TIME_TO_FIRST_TOKEN, "model" => m.clone());
    let _ = histogram!(TIME_PER_OUTPUT_TOKEN, "model" => m.clone());
    let _ = histogram!(QUEUE_WAIT, "model" => m.clone());
    let _ = histogram!(MODEL_LOAD_DURATION, "model" => m);
}

/// The states [`model_state`] reports, in `ModelState::as_str` spelling.
const MODEL_STATES: [&str; 4] = ["unloaded", "loading", "ready", "failed"];

/// Sets a model's state series: 1 for `state`, 0 for the others.
pub fn model_state(model: &str, state: &str) {
    for s in MODEL_STATES {
        let value = if s == state { 1.0 } else { 0.0 };
        gauge!(MODEL_STATE, "model" => model.to_string(), "state" => s).set(value);
    }
}

/// Counts a finished request.
pub fn request(model: &str, outcome: &'static str) {
    counter!(REQUESTS_TOTAL, "model" => model.to_string(), "outcome" => outcome).increment(1);
}

/// What a finished generation reports to [`generation`].
#[derive(Debug, Clone, Copy)]
pub struct GenerationTimes {
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// From enqueue to the last token.
    pub total: Duration,
    /// From enqueue to the first token.
    pub first_token: Duration,
    /// Decode time after the first token.
    pub decode: Duration,
    /// OpenTelemetry's `gen_ai.operation.name`: `chat` or `text_completion`.
    pub operation: &'static str,
}

/// Records a completed generation's tokens and timings.
pub fn generation(model: &str, g: GenerationTimes) {
    let m = model.to_string();
    counter!(PROMPT_TOKENS_TOTAL, "model" => m.clone()).increment(g.prompt_tokens as u64);
    counter!(GENERATED_TOKENS_TOTAL, "model" => m.clone()).increment(g.generated_tokens as u64);
    let per_token =
        (g.generated_tokens > 1).then(|| g.decode.as_secs_f64() / (g.generated_tokens - 1) as f64);
    histogram!(REQUEST_DURATION, "model" => m.clone()).record(g.total.as_secs_f64());
    histogram!(TIME_TO_FIRST_TOKEN, "model" => m.clone()).record(g.first_token.as_secs_f64());
    if let Some(t) = per_token {
        histogram!(TIME_PER_OUTPUT_TOKEN, "model" => m.clone()).record(t);
    }
    if otel_names() {
        let labels = [
            ("gen_ai_request_model", m),
            ("gen_ai_operation_name", g.operation.to_string()),
        ];
        histogram!(OTEL_REQUEST_DURATION, &labels).record(g.total.as_secs_f64());
        histogram!(OTEL_TIME_TO_FIRST_TOKEN, &labels).record(g.first_token.as_secs_f64());
        if let Some(t) = per_token {
            histogram!(OTEL_TIME_PER_OUTPUT_TOKEN, &labels).record(t);
        }
    }
}

/// Records the time a request waited in the queue.
pub fn queue_wait(model: &str, wait: Duration) {
    histogram!(QUEUE_WAIT, "model" => model.to_string()).record(wait.as_secs_f64());
}

/// Sets a model's queue depth.
pub fn queue_depth(model: &str, depth: usize) {
    gauge!(QUEUE_DEPTH, "model" => model.to_string()).set(depth as f64);
}

/// The load of one model summed over its workers (`replicas`), so that its gauges are the
/// model's and not whichever worker stepped last. Each worker adds the change in its own
/// figures; integers, so the sums are exact.
#[derive(Debug, Default)]
pub struct ModelLoad {
    running: AtomicUsize,
    /// Requests a worker took from the queue and holds until the batch has room.
    held: AtomicUsize,
    kv_used_tokens: AtomicUsize,
    kv_budget_tokens: AtomicUsize,
}

/// One worker's figures as last added to its model's [`ModelLoad`].
#[derive(Debug, Default, Clone, Copy)]
struct WorkerLoad {
    running: usize,
    held: usize,
    kv_used_tokens: usize,
}

fn apply(total: &AtomicUsize, from: usize, to: usize) {
    if to > from {
        total.fetch_add(to - from, Ordering::Relaxed);
    } else if from > to {
        total.fetch_sub(from - to, Ordering::Relaxed);
    }
}

/// The per-step metrics of one model's worker, resolved once: a step records through these
/// handles without building labels or looking series up.
pub struct BatchMetrics<'a> {
    batch_size: metrics::Histogram,
    running: metrics::Gauge,
    waiting: metrics::Gauge,
    kv_usage: metrics::Gauge,
    /// The same three under vLLM's names, when they are exported.
    vllm: Option<[metrics::Gauge; 3]>,
    load: &'a ModelLoad,
    kv_budget_tokens: usize,
    reported: Cell<WorkerLoad>,
    /// The queue length at the last step (the queue is the model's, shared by its workers).
    queued: Cell<usize>,
}

impl<'a> BatchMetrics<'a> {
    /// The handles of `model`'s series, for a worker with a KV budget of `kv_budget_tokens`
    /// adding its figures to `load`; the worker's share is taken back when this is dropped.
    pub fn new(model: &str, load: &'a ModelLoad, kv_budget_tokens: usize) -> Self {
        let m = model.to_string();
        load.kv_budget_tokens
            .fetch_add(kv_budget_tokens, Ordering::Relaxed);
        BatchMetrics {
            load,
            kv_budget_tokens,
            reported: Cell::new(WorkerLoad::default()),
            queued: Cell::new(0),
            batch_size: histogram!(BATCH_SIZE, "model" => m.clone()),
            running: gauge!(RUNNING_REQUESTS, "model" => m.clone()),
            waiting: gauge!(WAITING_REQUESTS, "model" => m.clone()),
            kv_usage: gauge!(KV_CACHE_USAGE, "model" => m.clone()),
            vllm: vllm_names().then(|| {
                [VLLM_RUNNING, VLLM_WAITING, VLLM_KV_CACHE_USAGE]
                    .map(|name| gauge!(name, "model_name" => m.clone()))
            }),
        }
    }

    /// Publishes the KV cache's shape (`vllm:cache_config_info`), when vLLM names are on.
    pub fn cache_config(&self, model: &str, kv_budget_tokens: usize) {
        if self.vllm.is_some() {
            gauge!(VLLM_CACHE_CONFIG, "model_name" => model.to_string(), "block_size" => "1",
                "num_gpu_blocks" => kv_budget_tokens.to_string())
            .set(1.0);
        }
    }

    /// Records one batched step of this worker: its sequences, and after it the requests it
    /// runs, whether it holds one waiting for room, and the KV tokens its slots hold; the
    /// model's gauges become the sums over its workers (`queued`: the model's queue length).
    pub fn step(
        &self,
        sequences: usize,
        running: usize,
        held: bool,
        kv_used_tokens: usize,
        queued: usize,
    ) {
        if sequences > 0 {
            self.batch_size.record(sequences as f64);
        }
        self.report(WorkerLoad {
            running,
            held: usize::from(held),
            kv_used_tokens,
        });
        self.queued.set(queued);
        self.publish();
    }

    fn report(&self, now: WorkerLoad) {
        let last = self.reported.replace(now);
        apply(&self.load.running, last.running, now.running);
        apply(&self.load.held, last.held, now.held);
        apply(
            &self.load.kv_used_tokens,
            last.kv_used_tokens,
            now.kv_used_tokens,
        );
    }

    fn publish(&self) {
        let queued = self.queued.get();
        let running = self.load.running.load(Ordering::Relaxed) as f64;
        let waiting = (queued + self.load.held.load(Ordering::Relaxed)) as f64;
        let budget = self.load.kv_budget_tokens.load(Ordering::Relaxed);
        let kv_usage = if budget == 0 {
            0.0
        } else {
            self.load.kv_used_tokens.load(Ordering::Relaxed) as f64 / budget as f64
        };
        self.running.set(running);
        self.waiting.set(waiting);
        self.kv_usage.set(kv_usage);
        if let Some([vllm_running, vllm_waiting, vllm_kv]) = &self.vllm {
            vllm_running.set(running);
            vllm_waiting.set(waiting);
            vllm_kv.set(kv_usage);
        }
    }
}

impl Drop for BatchMetrics<'_> {
    /// A worker that exits (unload, restart, crash) takes its share back.
    fn drop(&mut self) {
        self.report(WorkerLoad::default());
        self.load
            .kv_budget_tokens
            .fetch_sub(self.kv_budget_tokens, Ordering::Relaxed);
        self.publish();
    }
}

/// Adjusts the models-loaded gauge of a device.
pub fn model_loaded(device: &str, delta: f64) {
    gauge!(MODELS_LOADED, "device" => device.to_string()).increment(delta);
}

/// Counts a cache reset.
pub fn cache_reset(model: &str, reason: &'static str) {
    counter!(CACHE_RESETS_TOTAL, "model" => model.to_string(), "reason" => reason).increment(1);
}

/// Counts a prefix-cache hit and the tokens it saved.
pub fn prefix_hit(model: &str, tokens: usize) {
    counter!(PREFIX_CACHE_HITS_TOTAL, "model" => model.to_string()).increment(1);
    counter!(PREFIX_CACHE_TOKENS_REUSED_TOTAL, "model" => model.to_string())
        .increment(tokens as u64);
}

/// Counts a worker restart.
pub fn worker_restart(model: &str) {
    counter!(WORKER_RESTARTS_TOTAL, "model" => model.to_string()).increment(1);
}

/// Records a model load.
pub fn model_load(model: &str, took: Duration) {
    histogram!(MODEL_LOAD_DURATION, "model" => model.to_string()).record(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(series: &str) -> Option<f64> {
        render()
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// With `replicas = 2`, a model's gauges are the sums over its workers (the KV share is
    /// of their budgets together), and a worker that exits takes its share back.
    #[test]
    fn gauges_sum_over_a_models_workers() {
        install();
        let load = ModelLoad::default();
        let running = "llm_pool_running_requests{model=\"metrics-unit\"}";
        let waiting = "llm_pool_waiting_requests{model=\"metrics-unit\"}";
        let kv = "llm_pool_kv_cache_usage_ratio{model=\"metrics-unit\"}";
        let first = BatchMetrics::new("metrics-unit", &load, 100);
        {
            let second = BatchMetrics::new("metrics-unit", &load, 300);
            first.step(2, 2, false, 60, 3);
            second.step(1, 1, true, 100, 3);
            assert_eq!(value(running), Some(3.0));
            assert_eq!(value(waiting), Some(4.0), "3 queued and 1 held");
            assert_eq!(value(kv), Some(0.4), "160 of 400 tokens");
            second.step(1, 1, false, 20, 3);
            assert_eq!(value(kv), Some(0.2), "80 of 400 tokens");
        }
        assert_eq!(
            value(running),
            Some(2.0),
            "the second worker's share is gone"
        );
        assert_eq!(value(waiting), Some(3.0));
        assert_eq!(value(kv), Some(0.6), "60 of 100 tokens");
        first.step(0, 0, false, 0, 0);
        assert_eq!(value(running), Some(0.0));
        drop(first);
        assert_eq!(value(kv), Some(0.0));
    }
}
