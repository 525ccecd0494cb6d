//! `[metrics] vllm_compatible_names`: the gauges an inference router scrapes, under vLLM's
//! names and `model_name` label, alongside llm-pool's own; `[metrics] otel_genai_names`: the
//! request histograms under OpenTelemetry's GenAI names. Its own test binary: the switches are
//! process-wide, and other tests start pools without them.

mod common;

use llm_pool::config::{Config, MetricsSettings, ModelConfig};
use llm_pool::pool::{GenerateRequest, Pool};

fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_names_mirror_our_gauges_per_model() {
    let config = Config {
        models: vec![ModelConfig::new("rm-llama", common::hf_fixture("llama3"))],
        metrics: MetricsSettings {
            vllm_compatible_names: true,
            otel_genai_names: true,
        },
        ..Config::default()
    };
    let pool = Pool::start(config).await.unwrap();
    let before = llm_pool::metrics::render();
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ] {
        let series = format!("{name}{{model_name=\"rm-llama\"}}");
        assert_eq!(value(&before, &series), Some(0.0), "{series} in:\n{before}");
    }
    assert!(
        before
            .lines()
            .any(|l| l.starts_with("vllm:cache_config_info{")
                && l.contains("model_name=\"rm-llama\"")
                && l.contains("block_size=\"1\"")
                && l.contains("num_gpu_blocks=\"")
                && l.ends_with(" 1")),
        "{before}"
    );
    pool.generate(
        "rm-llama",
        GenerateRequest::ids(vec![1, 2, 3]).max_tokens(4),
    )
    .await
    .unwrap();
    // After the request the gauges agree with ours: nothing running or waiting, no KV in use.
    let after = llm_pool::metrics::render();
    for (vllm, ours) in [
        ("vllm:num_requests_running", "llm_pool_running_requests"),
        ("vllm:num_requests_waiting", "llm_pool_waiting_requests"),
        ("vllm:kv_cache_usage_perc", "llm_pool_kv_cache_usage_ratio"),
    ] {
        let theirs = value(&after, &format!("{vllm}{{model_name=\"rm-llama\"}}"));
        let mine = value(&after, &format!("{ours}{{model=\"rm-llama\"}}"));
        assert!(
            theirs.is_some() && theirs == mine,
            "{vllm} {theirs:?} against {ours} {mine:?}"
        );
    }
    // The model's state series: ready, and only ready.
    for (state, expected) in [("ready", 1.0), ("loading", 0.0), ("failed", 0.0)] {
        let series = format!("llm_pool_model_state{{model=\"rm-llama\",state=\"{state}\"}}");
        assert_eq!(
            value(&after, &series),
            Some(expected),
            "{series} in:\n{after}"
        );
    }
    // OpenTelemetry's names record the same observations as ours: one request, the same sums.
    let otel_labels = "gen_ai_request_model=\"rm-llama\",gen_ai_operation_name=\"text_completion\"";
    for (otel, ours) in [
        (
            "gen_ai_server_request_duration_seconds",
            "llm_pool_request_duration_seconds",
        ),
        (
            "gen_ai_server_time_to_first_token_seconds",
            "llm_pool_time_to_first_token_seconds",
        ),
        (
            "gen_ai_server_time_per_output_token_seconds",
            "llm_pool_time_per_output_token_seconds",
        ),
    ] {
        let count = value(&after, &format!("{otel}_count{{{otel_labels}}}"));
        assert_eq!(count, Some(1.0), "{otel}_count in:\n{after}");
        let theirs = value(&after, &format!("{otel}_sum{{{otel_labels}}}"));
        let mine = value(&after, &format!("{ours}_sum{{model=\"rm-llama\"}}"));
        assert!(
            theirs.is_some() && theirs == mine,
            "{otel} {theirs:?} against {ours} {mine:?}"
        );
    }
    pool.shutdown().await;
}
