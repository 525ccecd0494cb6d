//! Fault injection (the `fail` crate, feature `failpoints`): crashes while requests are queued,
//! repeated failures, failed loads. Run with `cargo test --features failpoints --test pool_faults`.
#![cfg(feature = "failpoints")]

mod common;

use llm_pool::config::{Config, ModelConfig};
use llm_pool::pool::{GenerateRequest, ModelState, Pool};
use llm_pool::Error;
use std::time::{Duration, Instant};

fn tiny(name: &str, fixture: &str) -> ModelConfig {
    ModelConfig::new(name, common::hf_fixture(fixture))
}

fn restarts_metric(model: &str) -> f64 {
    let text = llm_pool::metrics::render();
    text.lines()
        .find(|l| {
            l.starts_with("llm_pool_worker_restarts_total")
                && l.contains(&format!("model=\"{model}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A panic in a batched step restarts the worker: every request of that batch gets
/// `WorkerRestarted` (none hangs), and every request still queued is served after the
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_restarts_the_worker_and_loses_no_queued_request() {
    let _scenario = fail::FailScenario::setup();
    let mut crashing = tiny("fx-crash", "llama3");
    // At most two requests share the batch that crashes; the rest wait in the queue.
    crashing.max_batch_size = 2;
    let config = Config {
        models: vec![crashing, tiny("fx-steady", "qwen2")],
        ..Config::default()
    };
    let pool = Pool::start(config).await.unwrap();
    // Every request on fx-crash waits a moment before it joins the batch, so that the six
    // below are all queued before the first step; that step panics, once.
    fail::cfg("llm_pool_worker_generate_fx-crash", "sleep(50)").unwrap();
    fail::cfg("llm_pool_worker_step_fx-crash", "1*panic").unwrap();
    let restarts_before = restarts_metric("fx-crash");
    let mut streams = Vec::new();
    for i in 0..6u32 {
        let pool = pool.clone();
        streams.push(tokio::spawn(async move {
            pool.generate(
                "fx-crash",
                GenerateRequest::ids(vec![1, 2 + i]).max_tokens(4),
            )
            .await
        }));
    }
    // The other model serves throughout.
    let steady = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 0..10u32 {
                pool.generate(
                    "fx-steady",
                    GenerateRequest::ids(vec![1, 3 + i]).max_tokens(3),
                )
                .await
                .expect("the other model is unaffected");
            }
        })
    };
    let mut restarted = 0;
    let mut completed = 0;
    for s in streams {
        let answered = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("a request hung after the crash");
        match answered.unwrap() {
            Ok(r) => {
                assert_eq!(r.completion_tokens(), 4);
                completed += 1;
            }
            Err(Error::WorkerRestarted { model, cause }) => {
                assert_eq!(model, "fx-crash");
                assert!(cause.contains("panic"), "{cause}");
                restarted += 1;
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert!(
        (1..=2).contains(&restarted),
        "the requests of the crashed batch (one or two) see the restart, not {restarted}"
    );
    assert_eq!(
        completed + restarted,
        6,
        "every queued request completes after the restart"
    );
    steady.await.unwrap();
    assert_eq!(restarts_metric("fx-crash") - restarts_before, 1.0);
    let status = pool.model("fx-crash").unwrap();
    assert_eq!(status.restarts, 1);
    assert_eq!(status.state, ModelState::Ready);
    assert_eq!(pool.model("fx-steady").unwrap().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_crashes_mark_the_model_failed() {
    let _scenario = fail::FailScenario::setup();
    let mut config = Config {
        models: vec![tiny("fx-broken", "llama3"), tiny("fx-fine", "qwen2")],
        ..Config::default()
    };
    config.pool.max_consecutive_failures = 2;
    config.pool.restart_backoff_ms = 10;
    let pool = Pool::start(config).await.unwrap();
    fail::cfg("llm_pool_worker_generate_fx-broken", "panic").unwrap();
    let mut results = Vec::new();
    for i in 0..4u32 {
        let pool = pool.clone();
        results.push(tokio::spawn(async move {
            pool.generate(
                "fx-broken",
                GenerateRequest::ids(vec![1, 2 + i]).max_tokens(2),
            )
            .await
        }));
    }
    for r in results {
        let err = r.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                Error::WorkerRestarted { .. } | Error::Unavailable { .. }
            ),
            "{err}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        pool.model("fx-broken").unwrap().state,
        ModelState::Failed(_)
    ) {
        assert!(Instant::now() < deadline, "model never marked failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = pool
        .generate("fx-broken", GenerateRequest::ids(vec![1]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fx-broken is unavailable") && err.contains("failed"),
        "{err}"
    );
    pool.generate("fx-fine", GenerateRequest::ids(vec![1, 2]).max_tokens(2))
        .await
        .unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_never_loads_is_marked_failed_with_the_cause() {
    let _scenario = fail::FailScenario::setup();
    fail::cfg("llm_pool_worker_load_fx-noload", "return").unwrap();
    let mut config = Config {
        models: vec![tiny("fx-noload", "llama3")],
        ..Config::default()
    };
    config.pool.max_consecutive_failures = 3;
    config.pool.restart_backoff_ms = 5;
    let err = match Pool::start(config).await {
        Ok(_) => panic!("the pool should report the failed model"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("fx-noload") && err.contains("load failed"),
        "{err}"
    );
}

/// Waits until the model has a request in flight and `queued` waiting.
async fn wait_busy(pool: &Pool, model: &str, queued: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = pool.model(model).unwrap();
        if m.in_flight == 1 && m.queue_depth == queued {
            return;
        }
        assert!(Instant::now() < deadline, "never busy: {m:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Regression (issue 9): `Pool::unload` answers queued requests at once instead of leaving
/// them to workers that are on their way out; the request in flight completes, and a request
/// after the unload loads the model again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_answers_queued_requests_and_a_later_request_reloads() {
    let _scenario = fail::FailScenario::setup();
    let mut model = tiny("fx-unload", "llama");
    model.queue_size = 4;
    let pool = Pool::start(Config {
        models: vec![model],
        ..Config::default()
    })
    .await
    .unwrap();
    // Each generation of this model takes 400 ms before its first token.
    fail::cfg("llm_pool_worker_generate_fx-unload", "sleep(400)").unwrap();
    let spawn = |first: u32| {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.generate(
                "fx-unload",
                GenerateRequest::ids(vec![1, first]).max_tokens(3),
            )
            .await
        })
    };
    let running = spawn(2);
    wait_busy(&pool, "fx-unload", 0).await;
    let queued: Vec<_> = (3..5).map(spawn).collect();
    wait_busy(&pool, "fx-unload", 2).await;
    let started = Instant::now();
    pool.unload("fx-unload").await.unwrap();
    for q in queued {
        let answered = tokio::time::timeout(Duration::from_secs(5), q)
            .await
            .expect("a queued request hung after the unload");
        match answered.unwrap() {
            Err(Error::Unavailable { model, reason }) => {
                assert_eq!(model, "fx-unload");
                assert!(reason.contains("unloaded"), "{reason}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "queued requests waited"
    );
    let done = running
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(done.completion_tokens(), 3);
    fail::cfg("llm_pool_worker_generate_fx-unload", "off").unwrap();
    let again = pool
        .generate("fx-unload", GenerateRequest::ids(vec![1, 9]).max_tokens(2))
        .await
        .expect("a request after the unload loads the model again");
    assert_eq!(again.completion_tokens(), 2);
    assert_eq!(pool.model("fx-unload").unwrap().state, ModelState::Ready);
}

/// Regression (issue 9): shutdown answers queued requests; none hangs, and a request after
/// the shutdown is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_queued_requests_and_refuses_new_ones() {
    let _scenario = fail::FailScenario::setup();
    let pool = Pool::start(Config {
        models: vec![tiny("fx-shutdown", "llama")],
        ..Config::default()
    })
    .await
    .unwrap();
    fail::cfg("llm_pool_worker_generate_fx-shutdown", "sleep(400)").unwrap();
    let spawn = |first: u32| {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.generate(
                "fx-shutdown",
                GenerateRequest::ids(vec![1, first]).max_tokens(2),
            )
            .await
        })
    };
    let running = spawn(2);
    wait_busy(&pool, "fx-shutdown", 0).await;
    let queued = spawn(3);
    wait_busy(&pool, "fx-shutdown", 1).await;
    pool.shutdown().await;
    let answered = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("the queued request was answered")
        .unwrap();
    assert!(
        matches!(answered, Err(Error::Unavailable { ref reason, .. }) if reason.contains("shutting down")),
        "{answered:?}"
    );
    let finished = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the request in flight was answered")
        .unwrap();
    assert!(finished.is_ok(), "{finished:?}");
    let after = pool
        .generate(
            "fx-shutdown",
            GenerateRequest::ids(vec![1, 2]).max_tokens(2),
        )
        .await;
    assert!(matches!(after, Err(Error::Unavailable { .. })), "{after:?}");
    fail::cfg("llm_pool_worker_generate_fx-shutdown", "off").unwrap();
}

fn loads_metric(model: &str) -> f64 {
    let text = llm_pool::metrics::render();
    text.lines()
        .find(|l| {
            l.starts_with("llm_pool_model_load_duration_seconds_count")
                && l.contains(&format!("model=\"{model}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Regression (issue 9, found by the soak): a load that arrives while an unloaded model is
/// still finishing a request keeps that worker instead of loading a second copy beside it.
/// Under unload/load churn with long requests, copies used to pile up (RSS in gigabytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_during_an_unload_keeps_the_finishing_worker() {
    let _scenario = fail::FailScenario::setup();
    let pool = Pool::start(Config {
        models: vec![tiny("fx-churn", "llama")],
        ..Config::default()
    })
    .await
    .unwrap();
    let loads = loads_metric("fx-churn");
    fail::cfg("llm_pool_worker_generate_fx-churn", "sleep(400)").unwrap();
    let running = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.generate("fx-churn", GenerateRequest::ids(vec![1, 2]).max_tokens(2))
                .await
        })
    };
    wait_busy(&pool, "fx-churn", 0).await;
    pool.unload("fx-churn").await.unwrap();
    assert_eq!(pool.model("fx-churn").unwrap().state, ModelState::Unloaded);
    // A request now would load the model again: the finishing worker serves it instead.
    fail::cfg("llm_pool_worker_generate_fx-churn", "off").unwrap();
    let after = pool
        .generate("fx-churn", GenerateRequest::ids(vec![1, 3]).max_tokens(2))
        .await
        .expect("served by the worker that was finishing");
    assert_eq!(after.completion_tokens(), 2);
    running
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(pool.model("fx-churn").unwrap().state, ModelState::Ready);
    assert_eq!(loads_metric("fx-churn"), loads, "a second copy was loaded");
    // And a real unload after that still unloads.
    pool.unload("fx-churn").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.model("fx-churn").unwrap().ready_workers > 0 {
        assert!(Instant::now() < deadline, "the worker never left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
