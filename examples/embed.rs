//! Embedding llm-pool in an ordinary tokio program: build a pool in code, generate, stream,
//! constrain the output to a JSON schema, and call a tool.
//!
//! ```sh
//! scripts/fetch-models
//! cargo run --release --example embed
//! ```

use futures::StreamExt;
use llm_pool::config::{Config, ModelConfig};
use llm_pool::pool::{GenerateRequest, GenerationEvent, Pool};
use llm_pool::request::{Grammar, Tool, ToolChoice};
use llm_pool::text::ChatMessage;
use serde_json::json;
use std::io::Write;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model_path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let config = Config {
        models: vec![ModelConfig::new("smollm2", model_path)],
        ..Config::default()
    };
    // Starts the supervisor and the model's worker thread, and waits until the model is ready.
    let pool = Pool::start(config).await?;

    // A whole result at once.
    let request = GenerateRequest::chat(vec![
        ChatMessage::new("system", "You are a helpful assistant."),
        ChatMessage::new("user", "What is the capital of France?"),
    ])
    .max_tokens(32);
    let result = pool.generate("smollm2", request).await?;
    println!(
        "generate: {:?} ({} tokens, finish: {})",
        result.text.as_deref().unwrap_or_default(),
        result.completion_tokens(),
        result.finish_reason.as_str()
    );

    // A stream of tokens; dropping the stream would cancel the generation.
    print!("stream: ");
    let mut stream = pool.generate_stream(
        "smollm2",
        GenerateRequest::text("Once upon a time").max_tokens(24),
    )?;
    let mut streamed = 0;
    while let Some(event) = stream.next().await {
        match event? {
            GenerationEvent::Token { text, .. } => {
                streamed += 1;
                print!("{text}");
                std::io::stdout().flush()?;
            }
            GenerationEvent::Done(r) => println!(
                "\n({} tokens, finish: {})",
                r.completion_tokens(),
                r.finish_reason.as_str()
            ),
        }
    }
    assert!(streamed > 0, "the stream produced no tokens");

    // Structured output: the answer follows the schema, so it always parses.
    let city = json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"]
    });
    let request = GenerateRequest::chat(vec![ChatMessage::new(
        "user",
        "Which city is the capital of France?",
    )])
    .response_format(Grammar::JsonSchema(city))
    .max_tokens(64);
    let answer = pool.generate("smollm2", request).await?;
    let parsed: serde_json::Value =
        serde_json::from_str(answer.text.as_deref().unwrap_or_default())?;
    println!("json_schema: {parsed}");

    // A tool call: with a named tool_choice the call always parses.
    let request = GenerateRequest::chat(vec![ChatMessage::new(
        "user",
        "What is the weather in Paris?",
    )])
    .tool(
        Tool::new(
            "get_weather",
            json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        )
        .description("The current weather in a city"),
    )
    .tool_choice(ToolChoice::Function("get_weather".into()))
    .max_tokens(64);
    let result = pool.generate("smollm2", request).await?;
    for call in &result.tool_calls {
        println!(
            "tool call: {}({}) id {}",
            call.name, call.arguments, call.id
        );
    }
    assert!(!result.tool_calls.is_empty(), "no tool call");

    for model in pool.models() {
        println!(
            "{}: {} on {}, {} restarts",
            model.name,
            model.state.as_str(),
            model.device,
            model.restarts
        );
    }
    pool.shutdown().await;
    Ok(())
}
