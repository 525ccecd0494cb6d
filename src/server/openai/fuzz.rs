//! Property-based fuzzing of both completion routes' request parsing and checking: random
//! bytes, random JSON, and valid bodies with one field mutated go through exactly what the
//! handlers run before a request is queued (`value_from_bytes`, `parse_chat` /
//! `parse_completion`, then the pool's `GenerateRequest::check`). Every input must come out as
//! a parsed request or a typed 4xx error naming what was wrong; none may panic.
//!
//! Case counts: `FUZZ_CASES` (default 2000 per property; `PROPTEST_CASES` overrides it).

use super::super::body::value_from_bytes;
use super::{parse_chat, parse_completion, Parsed};
use crate::config::SamplingDefaults;
use crate::request::Limits;
use crate::server::errors::ApiError;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const FUZZ_CASES: u32 = 2000;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FUZZ_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The fields the routes read, so random objects hit real code paths, not only "unknown".
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "user",
    "stream",
    "stream_options",
    "role",
    "content",
    "type",
    "text",
    "include_usage",
    "response_format",
    "json_schema",
    "schema",
    "tools",
    "function",
    "name",
    "parameters",
    "tool_choice",
    "parallel_tool_calls",
    "tool_calls",
    "tool_call_id",
    "logprobs",
    "top_logprobs",
    "chat_template_kwargs",
    "keep_alive",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        prop_oneof![Just(f64::MAX), Just(f64::MIN_POSITIVE), Just(-0.0)].prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "user",
            "system",
            "assistant",
            "tool",
            "developer",
            "text",
            "image_url",
            "",
            "\u{0}",
            "\u{10ffff}"
        ])
        .prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(FIELDS).prop_map(String::from),
                        ".{0,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn valid_chat() -> Value {
    json!({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "repetition_penalty": 1.1, "seed": 7, "stop": ["\n"], "presence_penalty": 0.5,
        "frequency_penalty": 0.5, "n": 1, "stream": true, "stream_options": {"include_usage": true}})
}

/// A chat body with every agent field: tools, a named choice, a schema, logprobs, and a
/// conversation with a call and its result.
fn valid_agent_chat() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": false,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "logprobs": true, "top_logprobs": 3, "chat_template_kwargs": {"enable_thinking": false}})
}

fn valid_completion() -> Value {
    json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.7,
        "stop": "x", "seed": -3, "stream": false})
}

/// A valid body with one field replaced (or added) by an arbitrary value.
fn mutated(base: fn() -> Value) -> impl Strategy<Value = Value> {
    (prop::sample::select(FIELDS), json_value()).prop_map(move |(field, v)| {
        let mut body = base();
        body[field] = v;
        body
    })
}

/// What the handler does before admission, then the pool's own check against a known context.
fn check(parsed: Result<Parsed, ApiError>) -> Result<(), TestCaseError> {
    let defaults = SamplingDefaults::default();
    let limits = Limits {
        model: "m",
        context: Some(512),
        defaults: &defaults,
    };
    let error = match parsed {
        Ok(p) => match p.request.check(&limits) {
            Ok(_) => return Ok(()),
            Err(e) => super::api_error(e, &p.sampling),
        },
        Err(e) => e,
    };
    prop_assert!(
        error.status.is_client_error(),
        "{} for a bad body",
        error.status
    );
    prop_assert!(!error.message.is_empty());
    prop_assert!(
        error.param.is_some(),
        "a 400 names the parameter: {}",
        error.message
    );
    Ok(())
}

fn both_routes(value: &Value) -> Result<(), TestCaseError> {
    check(parse_chat(value))?;
    check(parse_completion(value))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        match value_from_bytes(&bytes) {
            Ok(v) => both_routes(&v)?,
            Err(e) => prop_assert_eq!(e.param.as_deref(), Some("body")),
        }
    }

    #[test]
    fn random_json_objects_get_typed_errors(v in json_value()) {
        let text = v.to_string();
        match value_from_bytes(text.as_bytes()) {
            Ok(v) => both_routes(&v)?,
            Err(e) => prop_assert!(!v.is_object(), "an object was refused: {}", e.message),
        }
    }

    #[test]
    fn mutated_chat_bodies_get_typed_errors(v in mutated(valid_chat)) {
        both_routes(&v)?;
    }

    #[test]
    fn mutated_agent_bodies_get_typed_errors(v in mutated(valid_agent_chat)) {
        check(parse_chat(&v))?;
    }

    #[test]
    fn mutated_completion_bodies_get_typed_errors(v in mutated(valid_completion)) {
        both_routes(&v)?;
    }
}

#[test]
fn the_valid_bodies_are_accepted() {
    let defaults = SamplingDefaults::default();
    let limits = Limits {
        model: "m",
        context: Some(512),
        defaults: &defaults,
    };
    for parsed in [
        parse_chat(&valid_chat()),
        parse_chat(&valid_agent_chat()),
        parse_completion(&valid_completion()),
    ] {
        let parsed = parsed.map_err(|e| e.message).unwrap();
        parsed.request.check(&limits).unwrap();
    }
}
