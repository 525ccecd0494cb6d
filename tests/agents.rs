//! The agents' API through the embedding `Pool`, on the real demo models: structured outputs
//! that always parse and validate, forced tool calls, logprobs consistent with greedy
//! decoding, reasoning switches, and the errors for bad agent fields.

mod common;

use common::{real_model, GEMMA3, SMOLLM2};
use futures::StreamExt;
use llm_pool::config::{Config, ModelConfig};
use llm_pool::engine::FinishReason;
use llm_pool::pool::{GenerateRequest, GenerationEvent, Pool};
use llm_pool::request::{Grammar, Tool, ToolChoice};
use llm_pool::text::ChatMessage;
use llm_pool::Error;
use serde_json::{json, Value};

async fn pool() -> Pool {
    let config = Config {
        models: vec![
            ModelConfig::new("smollm2", real_model(SMOLLM2)),
            ModelConfig::new("gemma3", real_model(GEMMA3)),
        ],
        ..Config::default()
    };
    Pool::start(config).await.unwrap()
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", text)]
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    })
}

fn weather_tool() -> Tool {
    Tool::new(
        "get_weather",
        json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}),
    )
    .description("Current weather in a city")
}

fn param_of(e: &Error) -> String {
    match e {
        Error::InvalidParameter { param, .. } => param.clone(),
        Error::ContextLength { param, .. } => param.to_string(),
        other => panic!("expected a parameter error, got {other}"),
    }
}

#[tokio::test]
async fn json_schema_output_parses_and_validates_on_both_models() {
    let pool = pool().await;
    for (model, prompt) in [
        (
            "smollm2",
            GenerateRequest::chat(user("Describe a person as JSON.")),
        ),
        ("gemma3", GenerateRequest::text("A person, as JSON:")),
    ] {
        for seed in 0..3u64 {
            let request = prompt
                .clone()
                .response_format(Grammar::JsonSchema(person_schema()))
                .temperature(if seed == 0 { 0.0 } else { 1.0 })
                .seed(seed)
                .max_tokens(120);
            let result = pool.generate(model, request).await.unwrap();
            let text = result.text.unwrap();
            eprintln!("{model} seed {seed}: {text}");
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{model} seed {seed}: not JSON ({e}): {text:?}"));
            assert!(
                v["name"].as_str().is_some_and(|s| s.chars().count() <= 20),
                "{v}"
            );
            assert!(
                v["age"].as_i64().is_some_and(|a| (0..=150).contains(&a)),
                "{v}"
            );
            assert!(
                ["Paris", "London", "Tokyo"].contains(&v["city"].as_str().unwrap()),
                "{v}"
            );
            assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
            // The grammar ends the generation itself once the object is complete.
            assert_eq!(result.finish_reason, FinishReason::Stop, "{model}: {text}");
        }
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn json_object_and_regex_formats_hold() {
    let pool = pool().await;
    let request = GenerateRequest::chat(user("Say hello."))
        .response_format(Grammar::JsonObject)
        .max_tokens(60);
    let text = pool
        .generate("smollm2", request)
        .await
        .unwrap()
        .text
        .unwrap();
    // Cut by max_tokens it may be unfinished; when it finished it must be an object.
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        assert!(v.is_object(), "{text}");
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    let request = GenerateRequest::text("The year is")
        .response_format(Grammar::Regex(" (19|20)[0-9]{2}\\.".into()))
        .max_tokens(10);
    let text = pool
        .generate("gemma3", request)
        .await
        .unwrap()
        .text
        .unwrap();
    assert_eq!(text.len(), 6, "{text:?}");
    assert!(
        text.starts_with(" 19") || text.starts_with(" 20"),
        "{text:?}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_named_tool_choice_always_returns_a_call_that_parses() {
    let pool = pool().await;
    for stream in [false, true] {
        let request = GenerateRequest::chat(user("What is the weather in Paris?"))
            .tool(weather_tool())
            .tool(Tool::new(
                "get_time",
                json!({"type": "object", "properties": {}}),
            ))
            .tool_choice(ToolChoice::Function("get_weather".into()))
            .max_tokens(60);
        let mut events = if stream {
            pool.generate_stream("smollm2", request).unwrap().boxed()
        } else {
            futures::stream::once(async {
                pool.generate("smollm2", request)
                    .await
                    .map(GenerationEvent::Done)
            })
            .boxed()
        };
        let mut streamed = Vec::new();
        let mut done = None;
        while let Some(event) = events.next().await {
            match event.unwrap() {
                GenerationEvent::Token { tool_calls, .. } => streamed.extend(tool_calls),
                GenerationEvent::Done(r) => done = Some(r),
            }
        }
        let result = done.unwrap();
        assert_eq!(result.finish_reason, FinishReason::ToolCalls);
        assert!(!result.tool_calls.is_empty());
        for call in &result.tool_calls {
            assert_eq!(call.name, "get_weather");
            let args: Value = serde_json::from_str(&call.arguments).unwrap();
            assert!(args["city"].is_string(), "{args}");
            assert!(call.id.starts_with("call_"), "{}", call.id);
        }
        if stream {
            assert_eq!(streamed, result.tool_calls);
        }
        assert_eq!(result.text.as_deref(), Some(""));
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn logprobs_agree_with_greedy_choices() {
    let pool = pool().await;
    for model in ["smollm2", "gemma3"] {
        let request = GenerateRequest::text("The capital of France is")
            .logprobs(5)
            .max_tokens(8);
        let result = pool.generate(model, request).await.unwrap();
        let eos_end = usize::from(result.finish_reason == FinishReason::Stop);
        assert_eq!(result.logprobs.len() + eos_end, result.completion_tokens);
        for (lp, &id) in result.logprobs.iter().zip(&result.token_ids) {
            assert_eq!(lp.chosen.id, id);
            assert_eq!(lp.top.len(), 5);
            // Greedy: the chosen token is the most likely one.
            assert_eq!(lp.top[0].id, id, "{model}");
            assert!((lp.top[0].logprob - lp.chosen.logprob).abs() < 1e-6);
            assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
            assert!(lp.top.iter().all(|t| t.logprob <= 0.0));
        }
        // The tokens' bytes spell the text.
        let bytes: Vec<u8> = result
            .logprobs
            .iter()
            .flat_map(|lp| lp.chosen.bytes.clone())
            .collect();
        assert_eq!(String::from_utf8_lossy(&bytes), result.text.unwrap());
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn bad_agent_fields_name_the_parameter() {
    let pool = pool().await;
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest::chat(user("hi"))
                .tool(weather_tool())
                .tool_choice(ToolChoice::Function("get_time".into())),
            "tool_choice",
        ),
        (
            GenerateRequest::chat(user("hi")).response_format(Grammar::JsonSchema(json!("object"))),
            "response_format",
        ),
        (
            GenerateRequest::chat(user("hi"))
                .response_format(Grammar::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}))),
            "response_format",
        ),
        (GenerateRequest::text("hi").logprobs(21), "top_logprobs"),
        (GenerateRequest::text("hi").tool(weather_tool()), "tools"),
        (
            GenerateRequest::chat(user("hi")).tool_choice(ToolChoice::Required),
            "tool_choice",
        ),
    ];
    for (request, param) in cases {
        let err = pool.generate("smollm2", request).await.unwrap_err();
        assert_eq!(param_of(&err), param, "{err}");
    }
    pool.shutdown().await;
}
