//! The pool's behaviour: routing, concurrency, queue limits, load/unload, lazy load,
//! keep-alive, LRU eviction, prefix reuse, cancellation, metrics and config errors. Uses the
//! tiny fixtures, so it runs in seconds; each test uses its own model names because metrics
//! are process-wide.

mod common;

use futures::StreamExt;
use llm_pool::config::{Config, LoadPolicy, ModelConfig};
use llm_pool::engine::{generate, CacheUse, FinishReason, GenerateParams};
use llm_pool::models::{LoadOptions, Model};
use llm_pool::pool::{GenerateRequest, GenerationEvent, ModelState, Pool};
use llm_pool::Error;
use std::time::{Duration, Instant};

fn tiny(name: &str, fixture: &str) -> ModelConfig {
    ModelConfig::new(name, common::hf_fixture(fixture))
}

fn config(models: Vec<ModelConfig>) -> Config {
    Config {
        models,
        ..Config::default()
    }
}

/// Greedy ids computed directly with the engine, the reference for pool outputs.
fn direct_greedy(fixture: &str, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut model = Model::load(common::hf_fixture(fixture), &LoadOptions::cpu()).unwrap();
    let params = GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    };
    generate(&mut model, None, prompt, &params, |_| true)
        .unwrap()
        .token_ids
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(labels) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_two_models_all_complete_correctly() {
    let pool = Pool::start(config(vec![
        tiny("cc-llama", "llama3"),
        tiny("cc-qwen", "qwen2"),
    ]))
    .await
    .unwrap();
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| vec![1, 5 + i, 9, 23, 42]).collect();
    let mut tasks = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (model, fixture) = if i % 2 == 0 {
            ("cc-llama", "llama3")
        } else {
            ("cc-qwen", "qwen2")
        };
        let pool = pool.clone();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let r = pool
                .generate(model, GenerateRequest::ids(p.clone()).max_tokens(8))
                .await
                .unwrap();
            (fixture, p, r.output.token_ids)
        }));
    }
    for t in tasks {
        let (fixture, p, ids) = t.await.unwrap();
        assert_eq!(ids, direct_greedy(fixture, &p, 8), "{fixture} {p:?}");
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_overloaded_at_once() {
    let mut m = tiny("ov-llama", "llama3");
    m.queue_size = 1;
    let pool = Pool::start(config(vec![m])).await.unwrap();
    let mut streams = Vec::new();
    let mut overloaded = Vec::new();
    for _ in 0..5 {
        match pool.generate_stream(
            "ov-llama",
            GenerateRequest::ids(vec![1, 2, 3]).max_tokens(400),
        ) {
            Ok(s) => streams.push(s),
            Err(e) => overloaded.push(e),
        }
    }
    assert!(
        overloaded.len() >= 3,
        "expected overloaded errors, got {} streams",
        streams.len()
    );
    let msg = overloaded[0].to_string();
    assert!(matches!(overloaded[0], Error::Overloaded { .. }));
    assert!(
        msg.contains("ov-llama") && msg.contains("queue of 1"),
        "{msg}"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_lists_the_available_ones() {
    let pool = Pool::start(config(vec![tiny("un-a", "llama3"), tiny("un-b", "qwen2")]))
        .await
        .unwrap();
    let err = pool
        .generate("nope", GenerateRequest::ids(vec![1]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"nope\"") && err.contains("un-a, un-b"),
        "{err}"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_unload_while_another_model_serves() {
    let mut other = tiny("lu-other", "qwen2");
    other.load = LoadPolicy::Lazy;
    let pool = Pool::start(config(vec![tiny("lu-main", "llama3"), other]))
        .await
        .unwrap();
    assert_eq!(pool.model("lu-other").unwrap().state, ModelState::Unloaded);
    let traffic = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 0..20u32 {
                let r = pool
                    .generate(
                        "lu-main",
                        GenerateRequest::ids(vec![1, 2 + i]).max_tokens(4),
                    )
                    .await;
                assert!(r.is_ok(), "traffic failed: {r:?}");
            }
        })
    };
    pool.load("lu-other").await.unwrap();
    assert_eq!(pool.model("lu-other").unwrap().state, ModelState::Ready);
    pool.generate("lu-other", GenerateRequest::ids(vec![1, 2]).max_tokens(2))
        .await
        .unwrap();
    pool.unload("lu-other").await.unwrap();
    wait_until("unload", || {
        pool.model("lu-other").unwrap().ready_workers == 0
    })
    .await;
    assert_eq!(pool.model("lu-other").unwrap().state, ModelState::Unloaded);
    traffic.await.unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_models_load_on_first_request_and_keep_alive_unloads_them() {
    let mut m = tiny("ka-lazy", "llama3");
    m.load = LoadPolicy::Lazy;
    m.keep_alive = Some("300ms".into());
    let pool = Pool::start(config(vec![m])).await.unwrap();
    assert_eq!(pool.model("ka-lazy").unwrap().state, ModelState::Unloaded);
    let r = pool
        .generate("ka-lazy", GenerateRequest::ids(vec![1, 2, 3]).max_tokens(3))
        .await
        .unwrap();
    assert_eq!(r.token_ids, direct_greedy("llama3", &[1, 2, 3], 3));
    assert_eq!(pool.model("ka-lazy").unwrap().state, ModelState::Ready);
    wait_until("keep_alive unload", || {
        pool.model("ka-lazy").unwrap().state == ModelState::Unloaded
    })
    .await;
    // And it comes back on demand.
    pool.generate("ka-lazy", GenerateRequest::ids(vec![1, 2, 3]).max_tokens(3))
        .await
        .unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_keep_alive_replaces_the_configured_one_until_the_model_unloads() {
    use llm_pool::pool::KeepAlive;
    // Configured: never unload. A request's keep_alive 0 (Ollama: unload when idle) wins.
    let mut m = tiny("ka-req", "llama3");
    m.load = LoadPolicy::Lazy;
    // A pinned model ignores a request's keep_alive.
    let mut pinned = tiny("ka-pin", "qwen2");
    pinned.pin = true;
    // Configured: 100 ms. A request's negative keep_alive keeps it loaded.
    let mut short = tiny("ka-short", "mistral");
    short.load = LoadPolicy::Lazy;
    short.keep_alive = Some("100ms".into());
    let pool = Pool::start(config(vec![m, pinned, short])).await.unwrap();
    let ask = || GenerateRequest::ids(vec![1, 2, 3]).max_tokens(2);
    let now = KeepAlive::For(Duration::ZERO);
    pool.generate("ka-req", ask().keep_alive(now))
        .await
        .unwrap();
    pool.generate("ka-pin", ask().keep_alive(now))
        .await
        .unwrap();
    pool.generate("ka-short", ask().keep_alive(KeepAlive::Forever))
        .await
        .unwrap();
    wait_until("keep_alive 0 unload", || {
        pool.model("ka-req").unwrap().state == ModelState::Unloaded
    })
    .await;
    // Several supervisor ticks (200 ms) and the 100 ms configured keep-alive over again.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.model("ka-pin").unwrap().state, ModelState::Ready);
    assert_eq!(pool.model("ka-short").unwrap().state, ModelState::Ready);
    // Loaded again without a keep_alive, "ka-req" is back to its configured one: it stays.
    pool.generate("ka-req", ask()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.model("ka-req").unwrap().state, ModelState::Ready);
    // A later request's keep_alive replaces the earlier one: "ka-short" may go again.
    pool.generate(
        "ka-short",
        ask().keep_alive(KeepAlive::For(Duration::from_millis(50))),
    )
    .await
    .unwrap();
    wait_until("keep_alive 50ms unload", || {
        pool.model("ka-short").unwrap().state == ModelState::Unloaded
    })
    .await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_loaded_models_evicts_the_least_recently_used_idle_model() {
    let mut c = config(vec![
        tiny("lru-a", "llama3"),
        tiny("lru-b", "qwen2"),
        tiny("lru-c", "mistral"),
    ]);
    for m in c.models.iter_mut() {
        m.load = LoadPolicy::Lazy;
    }
    c.pool.max_loaded_models = 2;
    let pool = Pool::start(c).await.unwrap();
    pool.generate("lru-a", GenerateRequest::ids(vec![1, 2]).max_tokens(2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    pool.generate("lru-b", GenerateRequest::ids(vec![1, 2]).max_tokens(2))
        .await
        .unwrap();
    pool.generate("lru-c", GenerateRequest::ids(vec![1, 2]).max_tokens(2))
        .await
        .unwrap();
    assert_eq!(
        pool.model("lru-a").unwrap().state,
        ModelState::Unloaded,
        "a was least recently used"
    );
    assert_eq!(pool.model("lru-b").unwrap().state, ModelState::Ready);
    assert_eq!(pool.model("lru-c").unwrap().state, ModelState::Ready);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_reuse_gives_the_same_output_as_a_full_reset() {
    let pool = Pool::start(config(vec![tiny("px-llama", "llama3")]))
        .await
        .unwrap();
    let before = llm_pool::metrics::render();
    let first_prompt = vec![1, 5, 9, 23, 42, 7];
    let first = pool
        .generate(
            "px-llama",
            GenerateRequest::ids(first_prompt.clone()).max_tokens(5),
        )
        .await
        .unwrap();
    assert_eq!(first.cache, CacheUse::Reset("new_prompt"));
    // A follow-up turn: the previous prompt, the answer, then more.
    let mut second_prompt = first_prompt.clone();
    second_prompt.extend_from_slice(&first.token_ids);
    second_prompt.extend_from_slice(&[100, 3, 77]);
    let second = pool
        .generate(
            "px-llama",
            GenerateRequest::ids(second_prompt.clone()).max_tokens(6),
        )
        .await
        .unwrap();
    assert_eq!(
        second.cache,
        CacheUse::PrefixHit(first_prompt.len() + first.token_ids.len() - 1)
    );
    assert_eq!(
        second.token_ids,
        direct_greedy("llama3", &second_prompt, 6),
        "reuse changed the output"
    );
    // An unrelated prompt resets.
    let third = pool
        .generate(
            "px-llama",
            GenerateRequest::ids(vec![1, 2, 3]).max_tokens(2),
        )
        .await
        .unwrap();
    assert_eq!(third.cache, CacheUse::Reset("new_prompt"));
    let after = llm_pool::metrics::render();
    let label = "model=\"px-llama\"";
    let delta = |name: &str, extra: &str| {
        metric(&after, name, &format!("{label}{extra}"))
            - metric(&before, name, &format!("{label}{extra}"))
    };
    assert_eq!(delta("llm_pool_prefix_cache_hits_total", ""), 1.0);
    assert_eq!(
        delta("llm_pool_prefix_cache_tokens_reused_total", ""),
        (first_prompt.len() + first.token_ids.len() - 1) as f64
    );
    assert_eq!(
        delta("llm_pool_cache_resets_total", ",reason=\"new_prompt\""),
        2.0
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_cancels_and_frees_the_worker() {
    let mut m = tiny("cx-llama", "llama3");
    m.queue_size = 4;
    let pool = Pool::start(config(vec![m])).await.unwrap();
    let mut stream = pool
        .generate_stream(
            "cx-llama",
            GenerateRequest::ids(vec![1, 2, 3]).max_tokens(450),
        )
        .unwrap();
    for _ in 0..2 {
        assert!(matches!(
            stream.next().await,
            Some(Ok(GenerationEvent::Token { .. }))
        ));
    }
    drop(stream);
    // The worker is free again: the next request completes, and nothing is left in flight.
    let r = pool
        .generate(
            "cx-llama",
            GenerateRequest::ids(vec![1, 2, 3]).max_tokens(3),
        )
        .await
        .unwrap();
    assert_eq!(r.finish_reason, FinishReason::Length);
    wait_until("in_flight 0", || {
        pool.model("cx-llama").unwrap().in_flight == 0
    })
    .await;
    let text = llm_pool::metrics::render();
    assert_eq!(
        metric(
            &text,
            "llm_pool_requests_total",
            "model=\"cx-llama\",outcome=\"cancelled\""
        ),
        1.0
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_text_has_every_metric_with_the_model_label() {
    let pool = Pool::start(config(vec![tiny("pm-llama", "llama3")]))
        .await
        .unwrap();
    pool.generate(
        "pm-llama",
        GenerateRequest::ids(vec![1, 2, 3]).max_tokens(4),
    )
    .await
    .unwrap();
    let text = llm_pool::metrics::render();
    for name in llm_pool::metrics::ALL {
        let label = if *name == llm_pool::metrics::MODELS_LOADED {
            "device=\"cpu\""
        } else {
            "model=\"pm-llama\""
        };
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains(label)),
            "{name} with {label} missing from:\n{text}"
        );
    }
    pool.shutdown().await;
}

#[test]
fn config_errors_name_the_key_and_what_is_allowed() {
    let path = common::hf_fixture("llama3");
    let path = path.display();
    let err = Config::from_toml(&format!(
        "[[models]]\nname = \"a\"\npath = \"{path}\"\nquue_size = 3\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("quue_size"), "{err}");
    let err = Config::from_toml(&format!(
        "[[models]]\nname = \"a\"\npath = \"{path}\"\ndevice = \"gpu:0\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("device") && err.contains("allowed: cpu, cuda:N, metal:N"),
        "{err}"
    );
    let err = Config::from_toml("[[models]]\nname = \"a\"\npath = \"/no/such/model.gguf\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("path")
            && err.contains("/no/such/model.gguf")
            && err.contains("does not exist"),
        "{err}"
    );
    let err = Config::from_toml("[pool]\nmax_loaded_model = 2\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_loaded_model"), "{err}");
    let err = Config::from_toml(&format!(
        "[[models]]\nname = \"a\"\npath = \"{path}\"\nkeep_alive = \"5 parsecs\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("keep_alive") && err.contains("allowed units"),
        "{err}"
    );
}

#[test]
fn the_shipped_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let config = Config::load(&path, None).unwrap();
    assert!(config.models.iter().any(|m| m.name == "smollm2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_evicts_an_idle_model_to_make_room() {
    // Each tiny fixture is about 0.4 MB on disk, counted twice as F32 on CPU: one fits in 1 MiB.
    let mut c = config(vec![tiny("mem-a", "llama3"), tiny("mem-b", "qwen2")]);
    c.models[1].load = LoadPolicy::Lazy;
    c.pool.memory_budget_mb = 1;
    let pool = Pool::start(c).await.unwrap();
    assert_eq!(pool.model("mem-a").unwrap().state, ModelState::Ready);
    pool.generate("mem-b", GenerateRequest::ids(vec![1, 2]).max_tokens(2))
        .await
        .unwrap();
    assert_eq!(pool.model("mem-a").unwrap().state, ModelState::Unloaded);
    assert_eq!(pool.model("mem-b").unwrap().state, ModelState::Ready);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_model_is_never_evicted_and_outlives_keep_alive() {
    // max_loaded_models = 2: a pinned model that is the least recently used stays; the
    // unpinned one goes instead.
    let mut c = config(vec![
        tiny("pin-a", "llama3"),
        tiny("pin-b", "qwen2"),
        tiny("pin-c", "mistral"),
    ]);
    for m in c.models.iter_mut() {
        m.load = LoadPolicy::Lazy;
    }
    c.models[0].pin = true;
    c.models[0].keep_alive = Some("100ms".into());
    c.pool.max_loaded_models = 2;
    let pool = Pool::start(c).await.unwrap();
    assert!(pool.model("pin-a").unwrap().pinned);
    for name in ["pin-a", "pin-b", "pin-c"] {
        pool.generate(name, GenerateRequest::ids(vec![1, 2]).max_tokens(2))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(pool.model("pin-a").unwrap().state, ModelState::Ready);
    assert_eq!(pool.model("pin-b").unwrap().state, ModelState::Unloaded);
    assert_eq!(pool.model("pin-c").unwrap().state, ModelState::Ready);
    // Its keep_alive (100 ms) has passed many times over: still loaded.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.model("pin-a").unwrap().state, ModelState::Ready);
    // An explicit unload still unloads it.
    pool.unload("pin-a").await.unwrap();
    assert_eq!(pool.model("pin-a").unwrap().state, ModelState::Unloaded);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_models_over_the_memory_budget_fail_to_load_naming_the_pins() {
    // Each tiny fixture counts about 0.8 MiB (F32 on CPU): two do not fit in 1 MiB, and the
    // pinned one that is loaded cannot be evicted for the other.
    let mut c = config(vec![tiny("pinmem-a", "llama3"), tiny("pinmem-b", "qwen2")]);
    c.models[0].pin = true;
    c.models[1].pin = true;
    c.models[1].load = LoadPolicy::Lazy;
    c.pool.memory_budget_mb = 1;
    let pool = Pool::start(c).await.unwrap();
    assert_eq!(pool.model("pinmem-a").unwrap().state, ModelState::Ready);
    let err = pool
        .generate("pinmem-b", GenerateRequest::ids(vec![1, 2]).max_tokens(2))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("memory budget") && message.contains("pinned: pinmem-a"),
        "{message}"
    );
    assert_eq!(pool.model("pinmem-a").unwrap().state, ModelState::Ready);
    pool.shutdown().await;
}
