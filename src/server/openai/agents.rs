//! The agent-facing fields of the OpenAI API: `response_format`, `tools`, `tool_choice`,
//! `parallel_tool_calls`, `logprobs` / `top_logprobs`, `chat_template_kwargs`, and their
//! answers (`tool_calls`, `reasoning_content`, `logprobs`) in OpenAI's shapes.
//!
//! Parsing here checks the shape of each field and names it in a 400; what the engine checks
//! (a schema llguidance cannot enforce, a tool name `tool_choice` does not know) comes back
//! from the pool with the field's name as well.

use super::super::body::parse;
use super::super::errors::ApiError;
use crate::pool::{GenerateRequest, TokenLogprobs, ToolCall};
use crate::request::{Grammar, Tool, ToolChoice};
use crate::text::chat::MessageToolCall;
use crate::text::logprobs::{Logprob, MAX_TOP_LOGPROBS};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The agent fields of a chat request body.
#[derive(Debug, Deserialize, Default)]
pub(super) struct ChatAgentFields {
    response_format: Option<Value>,
    tools: Option<Vec<ToolDefinition>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    chat_template_kwargs: Option<Map<String, Value>>,
}

/// The agent fields of a completion request body.
#[derive(Debug, Deserialize, Default)]
pub(super) struct CompletionAgentFields {
    response_format: Option<Value>,
    logprobs: Option<u64>,
    echo: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ToolDefinition {
    #[serde(rename = "type")]
    kind: String,
    function: Option<FunctionDefinition>,
}

#[derive(Debug, Deserialize)]
struct FunctionDefinition {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
}

/// A tool call in an assistant message of the conversation.
#[derive(Debug, Deserialize)]
pub(super) struct MessageCall {
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    function: MessageFunction,
}

#[derive(Debug, Deserialize)]
struct MessageFunction {
    name: String,
    arguments: Option<Value>,
}

/// Converts the tool calls of message `i`.
pub(super) fn message_calls(
    i: usize,
    calls: Vec<MessageCall>,
) -> Result<Vec<MessageToolCall>, ApiError> {
    calls
        .into_iter()
        .enumerate()
        .map(|(j, c)| {
            if let Some(kind) = c.kind.as_deref().filter(|k| *k != "function") {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls[{j}].type"),
                    format!("tool call type {kind:?} is not supported; only function is"),
                ));
            }
            // OpenAI sends the arguments as JSON text; some clients send the object itself.
            let arguments = match c.function.arguments {
                None | Some(Value::Null) => "{}".to_string(),
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
            };
            Ok(MessageToolCall {
                id: c.id.unwrap_or_else(crate::text::output::new_call_id),
                name: c.function.name,
                arguments,
            })
        })
        .collect()
}

/// `response_format`, in OpenAI's shapes plus two extensions: `{"type": "grammar",
/// "grammar": "<Lark>"}` and `{"type": "regex", "regex": "..."}`.
fn response_format(value: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.is_null() {
        return Ok(None);
    }
    const ALLOWED: &str = "text, json_object, json_schema, grammar (Lark), regex";
    let kind = value.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            "response_format.type",
            format!("response_format needs a type; allowed: {ALLOWED}"),
        )
    })?;
    let text_field = |field: &str| -> Result<String, ApiError> {
        value
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("response_format.{field}"),
                    format!("response_format of type {kind} needs a string field {field:?}"),
                )
            })
    };
    let grammar = match kind {
        "text" => return Ok(None),
        "json_object" => Grammar::JsonObject,
        "json_schema" => {
            let schema = value
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema.schema",
                        "response_format of type json_schema needs json_schema.schema, a JSON Schema",
                    )
                })?;
            Grammar::JsonSchema(schema.clone())
        }
        "grammar" | "lark" => Grammar::Lark(text_field("grammar")?),
        "regex" => Grammar::Regex(text_field("regex")?),
        other => {
            return Err(ApiError::invalid(
                "response_format.type",
                format!("unknown response_format type {other:?}; allowed: {ALLOWED}"),
            ))
        }
    };
    // Its form (a schema is an object, a grammar is not empty) is checked with the rest of
    // the request before it is queued; it is compiled when the request is prepared.
    Ok(Some(grammar))
}

fn tool_choice(value: Option<&Value>) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::invalid(
            "tool_choice",
            "tool_choice must be \"auto\", \"none\", \"required\", or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    match value {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            _ => Err(bad()),
        },
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| ToolChoice::Function(name.to_string()))
            .ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// Reads the agent fields of a chat request into `request`.
pub(super) fn apply_chat(
    mut request: GenerateRequest,
    body: &Value,
) -> Result<GenerateRequest, ApiError> {
    let fields: ChatAgentFields = parse(body)?;
    request.response_format = response_format(fields.response_format.as_ref())?;
    for (i, tool) in fields.tools.unwrap_or_default().into_iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                format!(
                    "tool type {:?} is not supported; only function is",
                    tool.kind
                ),
            ));
        }
        let function = tool.function.ok_or_else(|| {
            ApiError::invalid(
                format!("tools[{i}].function"),
                "a function tool needs its function",
            )
        })?;
        request.tools.push(Tool {
            name: function.name,
            description: function.description,
            parameters: function
                .parameters
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        });
    }
    request.tool_choice = tool_choice(fields.tool_choice.as_ref())?;
    request.parallel_tool_calls = fields.parallel_tool_calls;
    request.chat_template_kwargs = fields.chat_template_kwargs.unwrap_or_default();
    if let Some(n) = fields.top_logprobs {
        if n > MAX_TOP_LOGPROBS as u64 {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs = {n} is outside [0, {MAX_TOP_LOGPROBS}]"),
            ));
        }
        if fields.logprobs != Some(true) {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs set to true",
            ));
        }
    }
    if fields.logprobs == Some(true) {
        request.logprobs = Some(fields.top_logprobs.unwrap_or(0) as usize);
    }
    Ok(request)
}

/// Reads the agent fields of a completion request into `request`.
pub(super) fn apply_completion(
    mut request: GenerateRequest,
    body: &Value,
) -> Result<GenerateRequest, ApiError> {
    let fields: CompletionAgentFields = parse(body)?;
    if fields.echo == Some(true) {
        // Evaluation harnesses read the prompt's logprobs from an echo; answering without
        // them would skew their scores silently.
        return Err(ApiError::invalid(
            "echo",
            "echo is not supported: the engine computes logits for the last prompt position only",
        ));
    }
    request.response_format = response_format(fields.response_format.as_ref())?;
    if let Some(n) = fields.logprobs {
        if n > MAX_TOP_LOGPROBS as u64 {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs = {n} is outside [0, {MAX_TOP_LOGPROBS}]"),
            ));
        }
        request.logprobs = Some(n as usize);
    }
    Ok(request)
}

/// Tool calls as a chat message (or a delta) carries them.
pub(super) fn tool_calls_json(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| {
            json!({
                "index": c.index,
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })
        })
        .collect()
}

fn bytes_json(b: &[u8]) -> Value {
    b.iter().map(|&x| Value::from(x)).collect()
}

fn chat_entry(lp: &Logprob) -> Value {
    json!({"token": lp.token, "logprob": lp.logprob, "bytes": bytes_json(&lp.bytes)})
}

/// Chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub(super) fn chat_logprobs<'a>(tokens: impl IntoIterator<Item = &'a TokenLogprobs>) -> Value {
    let content: Vec<Value> = tokens
        .into_iter()
        .map(|t| {
            let mut entry = chat_entry(&t.chosen);
            entry["top_logprobs"] = t.top.iter().map(chat_entry).collect();
            entry
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completion `logprobs`: parallel lists of tokens, their logprobs, the alternatives and the
/// text offsets (from `offset`, the length of text before these tokens).
pub(super) fn completion_logprobs<'a>(
    tokens: impl IntoIterator<Item = &'a TokenLogprobs>,
    mut offset: usize,
) -> Value {
    let (mut names, mut logprobs, mut tops, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in tokens {
        names.push(Value::from(t.chosen.token.clone()));
        logprobs.push(Value::from(t.chosen.logprob));
        let top: Map<String, Value> = t
            .top
            .iter()
            .map(|a| (a.token.clone(), Value::from(a.logprob)))
            .collect();
        tops.push(Value::Object(top));
        offsets.push(Value::from(offset));
        offset += t.chosen.token.len();
    }
    json!({"tokens": names, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
}
