//! The agents' API through the embedding `Pool`, on the real demo models: structured outputs
//! that always parse and validate, forced tool calls, logprobs consistent with greedy
//! decoding, reasoning switches, and the errors for bad agent fields.

mod common;

use common::{real_model, GEMMA3, SMOLLM2};
use futures::StreamExt;
use llm_pool::config::{Config, GrammarIndex, ModelConfig};
use llm_pool::engine::FinishReason;
use llm_pool::pool::{GenerateRequest, GenerationEvent, Pool};
use llm_pool::request::{Grammar, Tool, ToolChoice};
use llm_pool::text::ChatMessage;
use llm_pool::Error;
use serde_json::{json, Value};

async fn pool() -> Pool {
    // Gemma indexes its vocabulary on the first constrained request, SmolLM2 at load: both
    // must serve structured outputs.
    let mut gemma = ModelConfig::new("gemma3", real_model(GEMMA3));
    gemma.grammar_index = GrammarIndex::FirstUse;
    let config = Config {
        models: vec![ModelConfig::new("smollm2", real_model(SMOLLM2)), gemma],
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
            let text = result.text.clone().unwrap();
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
        .output
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
        .output
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
        assert_eq!(result.logprobs.len() + eos_end, result.completion_tokens());
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
        assert_eq!(String::from_utf8_lossy(&bytes), result.output.text.unwrap());
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

/// A Qwen3-style template: tools in `<tools>`, calls in `<tool_call>` blocks, tool results
/// as `<tool_response>`, and a thinking block the generation prompt opens (DeepSeek-R1 style)
/// unless `enable_thinking` is false, when it writes an empty one.
const HERMES_THINKING_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking == false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"#;

async fn hermes_pool() -> Pool {
    let mut model = ModelConfig::new("smollm2-hermes", real_model(SMOLLM2));
    model.chat_template = Some(HERMES_THINKING_TEMPLATE.into());
    let config = Config {
        models: vec![model],
        ..Config::default()
    };
    Pool::start(config).await.unwrap()
}

#[tokio::test]
async fn a_template_with_native_tools_gets_calls_in_its_own_syntax() {
    let pool = hermes_pool().await;
    let mut call = None;
    for stream in [false, true] {
        // `required` allows a few calls (a small model may repeat its call until the grammar
        // ends it); a named function, exactly one.
        let choice = if stream {
            ToolChoice::Function("get_weather".into())
        } else {
            ToolChoice::Required
        };
        let request = GenerateRequest::chat(user("What is the weather in Paris?"))
            .tool(weather_tool())
            .tool_choice(choice)
            .max_tokens(200);
        let result = if stream {
            let mut events = pool.generate_stream("smollm2-hermes", request).unwrap();
            let mut done = None;
            while let Some(event) = events.next().await {
                if let GenerationEvent::Done(r) = event.unwrap() {
                    done = Some(r);
                }
            }
            done.unwrap()
        } else {
            pool.generate("smollm2-hermes", request).await.unwrap()
        };
        assert_eq!(result.finish_reason, FinishReason::ToolCalls, "{result:?}");
        let most = if stream {
            1
        } else {
            llm_pool::text::tools::MAX_FORCED_CALLS
        };
        assert!((1..=most).contains(&result.tool_calls.len()), "{result:?}");
        let first = result.tool_calls.first().cloned().unwrap();
        assert_eq!(first.name, "get_weather");
        let args: Value = serde_json::from_str(&first.arguments).unwrap();
        assert!(args["city"].is_string(), "{args}");
        // A forced call leaves no room for a thinking block or other text.
        assert_eq!(result.reasoning, None);
        assert_eq!(result.text.as_deref(), Some(""));
        call = Some(first);
    }
    // The second turn: the call and its result render through the template's own syntax.
    let call = call.unwrap();
    let mut assistant = ChatMessage::new("assistant", "");
    assistant
        .tool_calls
        .push(llm_pool::text::chat::MessageToolCall {
            id: call.id.clone(),
            name: call.name.clone(),
            arguments: call.arguments.clone(),
        });
    let mut tool = ChatMessage::new("tool", "{\"temperature\": 18}");
    tool.tool_call_id = Some(call.id);
    let messages = vec![
        ChatMessage::new("user", "What is the weather in Paris?"),
        assistant,
        tool,
    ];
    let request = GenerateRequest::chat(messages)
        .tool(weather_tool())
        .tool_choice(ToolChoice::None)
        .template_kwarg("enable_thinking", json!(false))
        .max_tokens(16);
    let result = pool.generate("smollm2-hermes", request).await.unwrap();
    assert!(result.tool_calls.is_empty());
    assert!(result.prompt_tokens > 40, "{}", result.prompt_tokens);
    pool.shutdown().await;
}

#[tokio::test]
async fn reasoning_is_split_off_and_enable_thinking_turns_it_off() {
    let pool = hermes_pool().await;
    // The prompt opens a thinking block; SmolLM2 does not know to close it, so all it writes
    // is reasoning.
    let thinking = GenerateRequest::chat(user("Why is the sky blue?")).max_tokens(12);
    let r = pool
        .generate("smollm2-hermes", thinking.clone())
        .await
        .unwrap();
    let reasoning = r.reasoning.clone().expect("no reasoning");
    assert!(!reasoning.is_empty());
    assert_eq!(r.text.as_deref(), Some(""));
    // Streamed, the deltas add up to the same split.
    let mut events = pool.generate_stream("smollm2-hermes", thinking).unwrap();
    let (mut streamed_reasoning, mut streamed_text) = (String::new(), String::new());
    while let Some(event) = events.next().await {
        if let GenerationEvent::Token {
            text, reasoning, ..
        } = event.unwrap()
        {
            streamed_text.push_str(&text);
            streamed_reasoning.push_str(&reasoning);
        }
    }
    assert_eq!(
        (streamed_reasoning.as_str(), streamed_text.as_str()),
        (reasoning.as_str(), "")
    );
    // With thinking off the template closes an empty block itself: the output is the answer.
    let off = GenerateRequest::chat(user("Why is the sky blue?"))
        .template_kwarg("enable_thinking", json!(false))
        .max_tokens(12);
    let r = pool.generate("smollm2-hermes", off).await.unwrap();
    assert_eq!(r.reasoning, None);
    assert!(!r.output.text.unwrap().is_empty());
    pool.shutdown().await;
}
