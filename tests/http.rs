//! Black-box tests of `llm-pool serve`: the binary runs on 127.0.0.1 with a free port and
//! reqwest talks to it, as any OpenAI client would.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `llm-pool serve` with `extra` TOML appended to a config listening on port 0.
    fn start(models: &str, extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 65536\nshutdown_timeout_secs = 30\n{extra}\n{models}"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_llm-pool"))
            .args(["serve", "--config", path.to_str().unwrap()])
            .env("RUST_LOG", "warn,llm_pool=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        let server = Server {
            child,
            base,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = raw::blocking_get(&self.url("/ready")) {
                if r == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server never became ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny blocking GET for readiness polling (std only, no runtime).
mod raw {
    pub fn blocking_get(url: &str) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(host)?;
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    }
}

fn tiny_models() -> String {
    format!(
        "[[models]]\nname = \"tiny\"\npath = \"{}\"\nqueue_size = 8\n",
        common::hf_fixture("llama").display()
    )
}

fn smollm2_models() -> String {
    format!(
        "[[models]]\nname = \"smollm2\"\npath = \"{}\"\n",
        common::real_model(common::SMOLLM2).display()
    )
}

async fn post(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = client.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>, contains: &str) {
    assert_eq!(status, want_status, "{body}");
    let err = &body["error"];
    assert!(
        err["message"].as_str().unwrap().contains(contains),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    assert!(
        err.get("code").is_some() && err.get("param").is_some(),
        "{body}"
    );
    if let Some(p) = param {
        assert_eq!(err["param"], p, "{body}");
    }
}

#[tokio::test]
async fn openai_routes_and_operations_endpoints() {
    let server = Server::start(&tiny_models(), "");
    let client = reqwest::Client::new();
    let health: Value = client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let models: Value = client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    // Chat, with fields OpenAI clients commonly send and we ignore.
    let (status, body) = post(
        &client,
        &server.url("/v1/chat/completions"),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5,
               "temperature": 0, "user": "u1", "logit_bias": {}, "n": 1, "stop": "zzz", "seed": 3,
               "presence_penalty": 0.1, "frequency_penalty": 0.1, "top_p": 0.9}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["choices"][0]["message"]["content"].is_string());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(
        body["usage"]["total_tokens"].as_u64().unwrap(),
        body["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );
    // max_completion_tokens works too.
    let (_, body) = post(
        &client,
        &server.url("/v1/chat/completions"),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 2}),
    )
    .await;
    assert_eq!(body["usage"]["completion_tokens"], 2);

    // Streaming chat with usage.
    let text = client
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                      "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    // Completions, plain and streamed (without usage when not asked).
    let (status, body) = post(
        &client,
        &server.url("/v1/completions"),
        json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["choices"][0]["text"].is_string());
    let text = client
        .post(server.url("/v1/completions"))
        .json(&json!({"model": "tiny", "prompt": [1, 5, 9], "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"usage\""), "{text}");

    // Operations.
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("llm_pool_requests_total{model=\"tiny\",outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("llm_pool_http_requests_total{route=\"/v1/chat/completions\",status=\"200\",tenant=\"anonymous\"}"));
    let r = client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// The usage object of a streamed response (the chunk with `usage`), as sent.
async fn streamed_usage(client: &reqwest::Client, url: &str, body: Value) -> Value {
    let text = client
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|c| c["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk in {text}"))["usage"]
        .clone()
}

#[tokio::test]
async fn usage_reports_the_prompt_tokens_served_from_the_prefix_cache() {
    // OpenAI's usage.prompt_tokens_details.cached_tokens, as vLLM and llama.cpp report it:
    // benchmarks read it to prove that a timed prefill computed its whole prompt. SmolLM2, since
    // a GGUF model's cache can be cut back to a shared prefix (the tiny HF fixtures' cannot).
    let server = Server::start(&smollm2_models(), "");
    let client = reqwest::Client::new();
    let completions = server.url("/v1/completions");
    let cached = |usage: &Value| {
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cached_tokens in {usage}"))
    };
    let prompt = json!([5, 9, 23, 42, 7, 11]);
    let (status, body) = post(
        &client,
        &completions,
        json!({"model": "smollm2", "prompt": prompt, "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cached(&body["usage"]), 0, "a first prompt: {body}");
    // The same prompt again: a slot holds it, so all but its last token are reused.
    let (_, body) = post(
        &client,
        &completions,
        json!({"model": "smollm2", "prompt": prompt, "max_tokens": 3}),
    )
    .await;
    let reused = cached(&body["usage"]);
    assert!(reused > 0, "a repeated prompt: {body}");
    assert!(
        reused < body["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{body}"
    );
    // A prompt no slot shares a first token with: nothing reused, in the streamed usage too.
    let usage = streamed_usage(
        &client,
        &completions,
        json!({"model": "smollm2", "prompt": [8, 6, 4, 2, 13, 17], "max_tokens": 3, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(cached(&usage), 0, "{usage}");
    // Chat, non-streamed then streamed: the repeated conversation reuses its prompt.
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story"}],
                      "max_tokens": 2});
    let (status, body) = post(&client, &server.url("/v1/chat/completions"), chat.clone()).await;
    assert_eq!(status, 200, "{body}");
    cached(&body["usage"]);
    let mut streamed = chat;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let usage = streamed_usage(&client, &server.url("/v1/chat/completions"), streamed).await;
    assert!(cached(&usage) > 0, "a repeated conversation: {usage}");
}

#[tokio::test]
async fn bad_requests_get_4xx_naming_the_parameter() {
    let server = Server::start(&tiny_models(), "");
    let client = reqwest::Client::new();
    let chat = server.url("/v1/chat/completions");
    let user = json!([{"role": "user", "content": "hi"}]);

    let r = client
        .post(&chat)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(
        s,
        &r.json().await.unwrap(),
        400,
        Some("body"),
        "malformed JSON",
    );
    let r = client
        .post(&chat)
        .body(vec![b'{', 0xff, 0xfe, b'}'])
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 400, Some("body"), "UTF-8");
    let big = "x".repeat(70_000);
    let r = client
        .post(&chat)
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": big}]}))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(
        s,
        &r.json().await.unwrap(),
        413,
        None,
        "larger than the limit of 65536 bytes",
    );

    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (
            json!({"messages": user}),
            400,
            Some("model"),
            "model is required",
        ),
        (
            json!({"model": "tiny"}),
            400,
            Some("messages"),
            "messages is required",
        ),
        (
            json!({"model": "ghost", "messages": user}),
            404,
            None,
            "available: tiny",
        ),
        (
            json!({"model": "tiny", "messages": []}),
            400,
            Some("messages"),
            "at least one message",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
            "allowed: system",
        ),
        (
            json!({"model": "tiny", "messages": user, "temperature": 2.5}),
            400,
            Some("temperature"),
            "outside [0, 2]",
        ),
        (
            json!({"model": "tiny", "messages": user, "temperature": -0.1}),
            400,
            Some("temperature"),
            "outside [0, 2]",
        ),
        (
            json!({"model": "tiny", "messages": user, "temperature": "hot"}),
            400,
            Some("temperature"),
            "invalid type",
        ),
        (
            json!({"model": "tiny", "messages": user, "top_p": 0}),
            400,
            Some("top_p"),
            "outside (0, 1]",
        ),
        (
            json!({"model": "tiny", "messages": user, "top_p": 1.5}),
            400,
            Some("top_p"),
            "outside (0, 1]",
        ),
        (
            json!({"model": "tiny", "messages": user, "max_tokens": 0}),
            400,
            Some("max_tokens"),
            "at least 1",
        ),
        (
            json!({"model": "tiny", "messages": user, "max_tokens": 100000}),
            400,
            Some("max_tokens"),
            "context of 512",
        ),
        (
            json!({"model": "tiny", "messages": user, "n": 2}),
            400,
            Some("n"),
            "only n = 1",
        ),
        (
            json!({"model": "tiny", "messages": user, "stop": vec!["a"; 17]}),
            400,
            Some("stop"),
            "at most 16",
        ),
        (
            json!({"model": "tiny", "messages": "hello"}),
            400,
            Some("messages"),
            "invalid type",
        ),
        (
            json!({"model": "tiny", "messages": user, "keep_alive": "5 parsecs"}),
            400,
            Some("keep_alive"),
            "allowed: a duration",
        ),
        (
            json!({"model": "tiny", "messages": user, "keep_alive": [1]}),
            400,
            Some("keep_alive"),
            "neither a string nor a number",
        ),
    ];
    for (body, status, param, msg) in cases {
        let (s, b) = post(&client, &chat, body.clone()).await;
        assert_error(s, &b, status, param, msg);
    }
    // A prompt longer than the context.
    let long: Vec<u32> = (0..600).map(|i| 3 + i % 100).collect();
    let (s, b) = post(
        &client,
        &server.url("/v1/completions"),
        json!({"model": "tiny", "prompt": long, "max_tokens": 4}),
    )
    .await;
    assert_error(s, &b, 400, None, "context of 512");
    assert_eq!(b["error"]["code"], "context_length_exceeded");

    // And the server still serves.
    let (s, _) = post(
        &client,
        &chat,
        json!({"model": "tiny", "messages": user, "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, 200);
}

fn sha256(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

#[tokio::test]
async fn tenants_get_401_403_and_429_as_configured() {
    let models = format!(
        "{}[[models]]\nname = \"tiny2\"\npath = \"{}\"\n",
        tiny_models(),
        common::hf_fixture("qwen2").display()
    );
    let tenants = format!(
        "[[tenants]]\nname = \"alpha\"\napi_key_sha256 = [\"{}\"]\nmodels = [\"tiny\"]\nmax_concurrent_requests = 1\ntokens_per_minute = 60\n\
         [[tenants]]\nname = \"beta\"\napi_key_sha256 = [\"{}\"]\nmodels = [\"*\"]\n",
        sha256("alpha-key"),
        sha256("beta-key")
    );
    let server = Server::start(&models, &tenants);
    let client = reqwest::Client::new();
    let chat = server.url("/v1/chat/completions");
    let body = |model: &str, n: u32| json!({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": n});

    let r = client
        .post(&chat)
        .json(&body("tiny", 2))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 401, None, "no API key");
    let r = client
        .post(&chat)
        .bearer_auth("wrong")
        .json(&body("tiny", 2))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 401, None, "invalid API key");
    let r = client.get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let models: Value = client
        .get(server.url("/v1/models"))
        .bearer_auth("alpha-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models["data"].as_array().unwrap().len(),
        1,
        "alpha sees only its model: {models}"
    );
    let r = client
        .post(&chat)
        .bearer_auth("alpha-key")
        .json(&body("tiny2", 2))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(
        s,
        &r.json().await.unwrap(),
        403,
        None,
        "may not use model \"tiny2\"",
    );

    // Concurrency: alpha may have one request in flight; a held stream occupies it.
    let held = client
        .post(&chat)
        .bearer_auth("alpha-key")
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 40, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let r = client
        .post(&chat)
        .bearer_auth("alpha-key")
        .json(&body("tiny", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let b: Value = r.json().await.unwrap();
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight"),
        "{b}"
    );
    // Tenant beta is not affected by alpha's load.
    for _ in 0..3 {
        let (s, b) = {
            let r = client
                .post(&chat)
                .bearer_auth("beta-key")
                .json(&body("tiny", 2))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        };
        assert_eq!(s, 200, "{b}");
    }
    let _ = held.text().await.unwrap();

    // Tokens per minute: alpha's 60 are used up by now (prompt + 40 generated tokens).
    let r = client
        .post(&chat)
        .bearer_auth("alpha-key")
        .json(&body("tiny", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=61).contains(&retry));
    let b: Value = r.json().await.unwrap();
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per minute"),
        "{b}"
    );
    let r = client
        .post(&chat)
        .bearer_auth("beta-key")
        .json(&body("tiny", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tenant=\"alpha\""), "{metrics}");
    assert!(metrics.contains("tenant=\"beta\""));
}

#[tokio::test]
async fn admin_api_needs_its_key_and_loads_and_unloads() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("qwen2-tiny");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(common::hf_fixture("qwen2")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
    }
    // A link out of models_dir must not be followed.
    std::os::unix::fs::symlink(common::hf_fixture("llama"), dir.path().join("escape")).unwrap();
    let pool_section = format!("[pool]\nmodels_dir = \"{}\"\n", dir.path().display());
    let server = Server::start(&tiny_models(), &pool_section);
    let client = reqwest::Client::new();
    // No admin key configured: the admin API is disabled.
    let r = client
        .get(server.url("/admin/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    drop(server);

    // admin_key_sha256 continues the [server] section that Server::start opens.
    let cfg_extra = format!("admin_key_sha256 = \"{}\"\n{pool_section}", sha256("root"));
    let server = Server::start(&tiny_models(), &cfg_extra);
    let r = client
        .get(server.url("/admin/models"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let list: Value = client
        .get(server.url("/admin/models"))
        .bearer_auth("root")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["models"][0]["name"], "tiny");
    assert_eq!(list["models"][0]["state"], "ready");
    assert_eq!(list["models"][0]["restarts"], 0);
    let r = client
        .post(server.url("/admin/models/tiny/unload"))
        .bearer_auth("root")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(server.url("/admin/models/tiny/load"))
        .bearer_auth("root")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Paths only under models_dir.
    for bad in [
        "../etc/passwd",
        "/etc/passwd",
        "qwen2-tiny/../../x",
        "escape",
    ] {
        let r = client
            .post(server.url("/admin/models/evil/load"))
            .bearer_auth("root")
            .json(&json!({"path": bad}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let r = client
        .post(server.url("/admin/models/extra/load"))
        .bearer_auth("root")
        .json(&json!({"path": "qwen2-tiny"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (s, _) = post(
        &client,
        &server.url("/v1/completions"),
        json!({"model": "extra", "prompt": [1, 2], "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, 200);
}

/// Reads SSE chunks until `n` content deltas arrived.
async fn read_deltas(resp: &mut reqwest::Response, n: usize) {
    let mut seen = 0;
    let mut buf = String::new();
    while seen < n {
        let chunk = resp.chunk().await.unwrap().expect("stream ended early");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        seen = buf.matches("\"content\":\"").count().saturating_sub(1);
    }
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_client_disconnect_cancels_its_generation_and_frees_the_worker() {
    let server = Server::start(&smollm2_models(), "");
    let client = reqwest::Client::new();
    let chat = server.url("/v1/chat/completions");
    let mut resp = client
        .post(&chat)
        .json(&json!({"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                      "max_tokens": 400, "stream": true}))
        .send()
        .await
        .unwrap();
    read_deltas(&mut resp, 3).await;
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let m = client
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric(&m, "llm_pool_requests_total", "outcome=\"cancelled\"") >= 1.0 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the generation was not cancelled:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric(
            &metrics,
            "llm_pool_client_disconnects_total",
            "model=\"smollm2\""
        ),
        1.0
    );
    let generated = metric(
        &metrics,
        "llm_pool_generated_tokens_total",
        "model=\"smollm2\"",
    );
    assert!(
        generated < 20.0,
        "the worker went on for {generated} tokens after the disconnect"
    );
    // The worker is free for the next request.
    let (s, b) = post(&client, &chat, json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})).await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let mut server = Server::start(&smollm2_models(), "");
    let client = reqwest::Client::new();
    let url = server.url("/v1/completions");
    let request = tokio::spawn(async move {
        let r = client
            .post(url)
            .json(&json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 40);
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "serve exited with {exit:?}");
}

/// Polls `/admin/models` until `check` holds for the named model.
async fn wait_admin(
    client: &reqwest::Client,
    server: &Server,
    model: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list: Value = client
            .get(server.url("/admin/models"))
            .bearer_auth("root")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let entry = list["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == model)
            .cloned()
            .unwrap();
        if check(&entry) {
            return entry;
        }
        assert!(Instant::now() < deadline, "never {what}: {entry}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Regression (issue 9, bug 1): a request queued behind a running one used to hang forever
/// when its model was unloaded. Now the running request completes, the queued one is answered
/// at once with a 503 naming the model, and a request after the unload loads the model again.
#[tokio::test]
async fn unloading_a_model_answers_its_queued_requests() {
    // A batch of one, so that the second request waits in the queue behind the first.
    let models = format!(
        "[[models]]\nname = \"smollm2\"\npath = \"{}\"\nqueue_size = 2\nreplicas = 1\nmax_batch_size = 1\n",
        common::real_model(common::SMOLLM2).display()
    );
    let server = Server::start(
        &models,
        &format!("admin_key_sha256 = \"{}\"\n", sha256("root")),
    );
    let client = reqwest::Client::new();
    let url = server.url("/v1/completions");
    let send = |max_tokens: u32| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = client
                .post(url)
                .timeout(Duration::from_secs(300))
                .json(&json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0}))
                .send()
                .await
                .expect("no answer");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap(), started.elapsed())
        })
    };
    let running = send(40);
    wait_admin(&client, &server, "smollm2", "busy", |m| m["in_flight"] == 1).await;
    let queued = send(48);
    wait_admin(&client, &server, "smollm2", "queued", |m| {
        m["queue_depth"] == 1
    })
    .await;
    let r = client
        .post(server.url("/admin/models/smollm2/unload"))
        .bearer_auth("root")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (status, body, took) = queued.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "model_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("smollm2") && message.contains("unloaded"),
        "{body}"
    );
    let (status, body, running_took) = running.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 40, "{body}");
    assert!(
        took < running_took,
        "the queued request waited for the running one ({took:?} against {running_took:?})"
    );
    wait_admin(&client, &server, "smollm2", "unloaded", |m| {
        m["state"] == "unloaded" && m["ready_workers"] == 0
    })
    .await;

    // After the unload a request loads the model again.
    let (status, body, _) = send(4).await.unwrap();
    assert_eq!(status, 200, "{body}");
    wait_admin(&client, &server, "smollm2", "ready", |m| {
        m["state"] == "ready"
    })
    .await;
}

/// Regression (issue 9, bug 2): an oversized `max_tokens` gets the same 400 naming the same
/// parameter whether or not the model has been loaded, streamed or not; a streamed request
/// the worker refuses gets an HTTP error status, not a 200 followed by an error event.
#[tokio::test]
async fn the_same_bad_request_gets_the_same_answer_before_and_after_the_first_load() {
    let models = format!(
        "[[models]]\nname = \"tiny\"\npath = \"{}\"\nload = \"lazy\"\n",
        common::hf_fixture("llama").display()
    );
    let server = Server::start(
        &models,
        &format!("admin_key_sha256 = \"{}\"\n", sha256("root")),
    );
    let client = reqwest::Client::new();
    let chat = server.url("/v1/chat/completions");
    let user = json!([{"role": "user", "content": "Hello"}]);
    let oversized = |stream: bool| json!({"model": "tiny", "messages": user, "max_tokens": 100000, "stream": stream});
    let long: Vec<u32> = (0..600).map(|i| 3 + i % 100).collect();
    let long_prompt = json!({"model": "tiny", "prompt": long, "max_tokens": 4, "stream": true});

    // Not loaded yet: the context is unknown until the worker has the model.
    let before_stream = post(&client, &chat, oversized(true)).await;
    wait_admin(&client, &server, "tiny", "ready", |m| m["state"] == "ready").await;
    let after_stream = post(&client, &chat, oversized(true)).await;
    let after = post(&client, &chat, oversized(false)).await;
    for (status, body) in [&before_stream, &after_stream, &after] {
        assert_error(*status, body, 400, Some("max_tokens"), "context of 512");
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    }
    assert_eq!(before_stream.1["error"]["type"], after.1["error"]["type"]);

    // Unload, then the long prompt: refused by the worker after the load, before any token.
    let r = client
        .post(server.url("/admin/models/tiny/unload"))
        .bearer_auth("root")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, body) = post(&client, &server.url("/v1/completions"), long_prompt.clone()).await;
    assert_error(status, &body, 400, Some("prompt"), "context of 512");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    let again = post(&client, &server.url("/v1/completions"), long_prompt).await;
    assert_eq!((status, body), again);

    // The max_completion_tokens spelling is named as sent.
    let (status, body) = post(
        &client,
        &chat,
        json!({"model": "tiny", "messages": user, "max_completion_tokens": 0}),
    )
    .await;
    assert_error(
        status,
        &body,
        400,
        Some("max_completion_tokens"),
        "at least 1",
    );
}
