//! The prompt side of tool calling and reasoning: a chat request's tools, messages and
//! template switches become the prompt the model sees, the grammar its output must follow, and
//! the way its output is read back.
//!
//! A template that knows tools (it mentions `<tool_call>`, `[TOOL_CALLS]` or Llama 3's
//! `<|python_tag|>`) gets them as transformers passes them, the `tools` variable, and the
//! model answers in its family's own syntax, parsed by [`crate::text::tool_calls`]. With
//! `tool_choice` `required` or a named function, the output is constrained to that syntax, so
//! that it always parses.
//!
//! A template that does not know tools gets the generic treatment llama.cpp uses: a system
//! message lists the tools and asks for JSON, and the output is constrained to one JSON object,
//! either `{"tool_calls": [...]}` or `{"response": "..."}`. Earlier tool calls and tool results
//! in the conversation are written in the same JSON, as ordinary assistant and user turns.

use super::chat::ChatMessage;
use super::constrain::{Constrained, Grammar};
use super::output::{OutputFormat, ReasoningTags};
use super::reasoning::{detect_reasoning_tags, prompt_opens_block};
use super::tool_calls::ToolFormat;
use super::ModelText;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// The function's name: letters, digits, `_` and `-`, at most 64.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema of its arguments (an object schema).
    #[serde(default = "empty_object_schema")]
    pub parameters: Value,
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

impl Tool {
    /// A tool with a name and an argument schema.
    pub fn new(name: impl Into<String>, parameters: Value) -> Self {
        Tool {
            name: name.into(),
            description: None,
            parameters,
        }
    }

    /// Adds a description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// The tool as Hugging Face templates (and OpenAI's API) write it.
    pub fn template_value(&self) -> Value {
        let mut function = Map::new();
        function.insert("name".into(), self.name.clone().into());
        if let Some(d) = &self.description {
            function.insert("description".into(), d.clone().into());
        }
        function.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": function})
    }
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (the default).
    #[default]
    Auto,
    /// No tool calls: the tools are not shown to the model.
    None,
    /// At least one call, to any of the tools.
    Required,
    /// A call to this function.
    Function(String),
}

/// The tool-calling and template fields of a chat request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatOptions {
    /// Functions the model may call.
    pub tools: Vec<Tool>,
    /// Whether and which one it must call.
    pub tool_choice: ToolChoice,
    /// Whether it may call several at once (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Extra variables for the chat template (`enable_thinking`, ...).
    pub chat_template_kwargs: Map<String, Value>,
}

impl ChatOptions {
    /// Checks the tools and the choice: names, schemas, a named choice among the tools.
    pub fn check(&self) -> Result<()> {
        let bad = |param: String, message: String| Err(Error::InvalidParameter { param, message });
        for (i, tool) in self.tools.iter().enumerate() {
            let valid_name = !tool.name.is_empty()
                && tool.name.len() <= 64
                && tool
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid_name {
                return bad(
                    format!("tools[{i}].function.name"),
                    format!(
                        "{:?} is not a valid function name: use 1 to 64 letters, digits, _ or -",
                        tool.name
                    ),
                );
            }
            if self.tools[..i].iter().any(|t| t.name == tool.name) {
                return bad(
                    format!("tools[{i}].function.name"),
                    format!("two tools are named {:?}", tool.name),
                );
            }
            if !tool.parameters.is_object() {
                return bad(
                    format!("tools[{i}].function.parameters"),
                    "the parameters must be a JSON Schema object".into(),
                );
            }
        }
        match &self.tool_choice {
            ToolChoice::Required if self.tools.is_empty() => bad(
                "tool_choice".into(),
                "tool_choice is \"required\" but no tools are given".into(),
            ),
            ToolChoice::Function(name) if !self.tools.iter().any(|t| &t.name == name) => bad(
                "tool_choice".into(),
                format!(
                    "no tool is named {name:?}; the tools are: {}",
                    self.tools
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            _ => Ok(()),
        }
    }

    fn parallel(&self) -> bool {
        self.parallel_tool_calls.unwrap_or(true)
    }

    /// The tools the model is offered and may call under the choice.
    fn callable(&self) -> Vec<&Tool> {
        match &self.tool_choice {
            ToolChoice::None => Vec::new(),
            ToolChoice::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            _ => self.tools.iter().collect(),
        }
    }
}

/// A chat request made ready for the model.
#[derive(Debug, Clone)]
pub struct ChatPlan {
    /// The rendered prompt.
    pub prompt: String,
    /// The grammar the tools call for (tools in the generic format, a forced call), which
    /// takes the place of the request's own `response_format`; `None` when the tools call
    /// for none.
    pub tool_grammar: Option<Constrained>,
    /// How the output is read back.
    pub output: OutputFormat,
}

/// The most calls a forced call in a native format may make at once (`required` with
/// parallel calls).
pub const MAX_FORCED_CALLS: usize = 4;

/// The most calls one answer in the generic format may make.
pub const MAX_GENERIC_CALLS: usize = 8;

/// The instruction of the generic format (llama.cpp's wording, which models follow well).
const GENERIC_INSTRUCTION: &str = "Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` reply to the user's request";

/// Renders a chat request: tools into the template (natively or in the generic format), the
/// template switches, and the grammar and output format that go with them. `response_format`
/// is the request's own grammar, if any.
pub fn plan_chat(
    text: &ModelText,
    template_param: &str,
    messages: &[ChatMessage],
    options: &ChatOptions,
    response_format: Option<&Grammar>,
) -> Result<ChatPlan> {
    let template = text
        .chat_template
        .as_ref()
        .ok_or_else(|| Error::InvalidParameter {
            param: template_param.into(),
            message: "this model has no chat template (a base model?); send a plain prompt, or set chat_template in its config".into(),
        })?;
    let source = template.source();
    let native = ToolFormat::detect(source);
    let callable = options.callable();
    let offering = !callable.is_empty();
    let mut tool_grammar = None;
    let mut tools_format = None;
    let rendered = if native != ToolFormat::Generic {
        let tools: Option<Value> =
            offering.then(|| callable.iter().map(|t| t.template_value()).collect());
        if offering {
            tools_format = Some(native);
            tool_grammar = forced_native_grammar(text, native, &callable, options)?;
        }
        template.render_with(
            messages,
            tools.as_ref(),
            &options.chat_template_kwargs,
            true,
        )?
    } else {
        let mut messages = generic_history(messages);
        if offering {
            tools_format = Some(ToolFormat::Generic);
            tool_grammar = Some(Constrained {
                grammar: Grammar::JsonSchema(generic_schema(&callable, options, response_format)),
                param: "tools".into(),
            });
            add_system(&mut messages, &generic_system_text(&callable));
        }
        template.render_with(&messages, None, &options.chat_template_kwargs, true)?
    };
    // A thinking block is split off when the template writes one and the output is free text
    // (a constrained output has no room for one).
    let reasoning = detect_reasoning_tags(source)
        .filter(|_| tool_grammar.is_none() && response_format.is_none())
        .map(|(open, close)| ReasoningTags {
            open: open.into(),
            close: close.into(),
            started: prompt_opens_block(&rendered, open, close),
        });
    Ok(ChatPlan {
        prompt: rendered,
        tool_grammar,
        output: OutputFormat {
            reasoning,
            tools: tools_format,
        },
    })
}

/// A schema for one call in the generic format.
fn generic_call_schema(tool: &Tool, with_id: bool) -> Value {
    let mut properties = Map::new();
    properties.insert("name".into(), json!({"type": "string", "const": tool.name}));
    properties.insert("arguments".into(), tool.parameters.clone());
    let mut required = vec![json!("name"), json!("arguments")];
    if with_id {
        properties.insert(
            "id".into(),
            json!({"type": "string", "minLength": 4, "maxLength": 40}),
        );
        required.push(json!("id"));
    }
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

fn one_of(schemas: Vec<Value>) -> Value {
    match <[Value; 1]>::try_from(schemas) {
        Ok([one]) => one,
        Err(many) => json!({"anyOf": many}),
    }
}

/// The generic format's schema: a call (or several) or, under `auto`, a response.
fn generic_schema(
    callable: &[&Tool],
    options: &ChatOptions,
    response_format: Option<&Grammar>,
) -> Value {
    let calls: Vec<Value> = callable
        .iter()
        .map(|t| generic_call_schema(t, false))
        .collect();
    let call = if options.parallel() {
        json!({
            "type": "object",
            "properties": {"tool_calls": {"type": "array", "items": one_of(calls), "minItems": 1,
                                          "maxItems": MAX_GENERIC_CALLS}},
            "required": ["tool_calls"],
            "additionalProperties": false,
        })
    } else {
        json!({
            "type": "object",
            "properties": {"tool_call": one_of(calls)},
            "required": ["tool_call"],
            "additionalProperties": false,
        })
    };
    if options.tool_choice != ToolChoice::Auto {
        return call;
    }
    let response = match response_format {
        Some(Grammar::JsonSchema(schema)) => schema.clone(),
        Some(Grammar::JsonObject) => json!({"type": "object"}),
        _ => json!({"type": "string"}),
    };
    json!({"anyOf": [call, {
        "type": "object",
        "properties": {"response": response},
        "required": ["response"],
        "additionalProperties": false,
    }]})
}

fn generic_system_text(callable: &[&Tool]) -> String {
    let tools: Vec<Value> = callable.iter().map(|t| t.template_value()).collect();
    format!(
        "You can call any of the following tools to satisfy the user's requests: {}\n\n{GENERIC_INSTRUCTION}",
        serde_json::to_string_pretty(&tools).unwrap_or_default()
    )
}

/// Adds `text` to the system message, or puts a system message first.
fn add_system(messages: &mut Vec<ChatMessage>, text: &str) {
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{text}", first.content);
        }
        _ => messages.insert(0, ChatMessage::new("system", text)),
    }
}

/// The conversation in the generic format: earlier calls as the JSON the model would have
/// written, tool results as user turns (templates without tools often refuse a `tool` role).
fn generic_history(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| {
            if m.role == "assistant" && !m.tool_calls.is_empty() {
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        let arguments = serde_json::from_str::<Value>(&c.arguments)
                            .unwrap_or_else(|_| c.arguments.clone().into());
                        json!({"name": c.name, "arguments": arguments, "id": c.id})
                    })
                    .collect();
                let body = json!({"tool_calls": calls});
                ChatMessage::new("assistant", body.to_string())
            } else if m.role == "tool" {
                let mut response = Map::new();
                if let Some(name) = &m.name {
                    response.insert("tool".into(), name.clone().into());
                }
                if let Some(id) = &m.tool_call_id {
                    response.insert("tool_call_id".into(), id.clone().into());
                }
                response.insert("content".into(), m.content.clone().into());
                ChatMessage::new("user", json!({"tool_response": response}).to_string())
            } else {
                ChatMessage::new(m.role.clone(), m.content.clone())
            }
        })
        .collect()
}

/// The grammar that forces a call in a family's own syntax (`required` or a named function).
fn forced_native_grammar(
    text: &ModelText,
    format: ToolFormat,
    callable: &[&Tool],
    options: &ChatOptions,
) -> Result<Option<Constrained>> {
    if matches!(options.tool_choice, ToolChoice::Auto | ToolChoice::None) {
        return Ok(None);
    }
    let arguments_key = if format == ToolFormat::Llama3 {
        "parameters"
    } else {
        "arguments"
    };
    let calls: Vec<Value> = callable
        .iter()
        .map(|t| {
            let mut properties = Map::new();
            properties.insert("name".into(), json!({"type": "string", "const": t.name}));
            properties.insert(arguments_key.into(), t.parameters.clone());
            json!({"type": "object", "properties": properties,
                   "required": ["name", arguments_key], "additionalProperties": false})
        })
        .collect();
    let call = Grammar::with_json_options(&one_of(calls));
    let call = serde_json::to_string(&call).unwrap_or_default();
    // How many calls the grammar allows: one for a named function; a few under `required`
    // with parallel calls. The grammar is complete after the last one, which ends the
    // generation: a small model left to decide whether to go on can repeat calls until
    // `max_tokens` cuts one in half.
    let most = match (&options.tool_choice, options.parallel()) {
        (ToolChoice::Required, true) => MAX_FORCED_CALLS,
        _ => 1,
    };
    let lark = match format {
        ToolFormat::Hermes => {
            let alternatives: Vec<String> = (1..=most)
                .map(|n| vec!["call"; n].join(" \"\\n\" "))
                .collect();
            format!(
                "start: {}\ncall: \"<tool_call>\\n\" json_call \"\\n</tool_call>\"\njson_call: %json {call}\n",
                alternatives.join(" | ")
            )
        }
        ToolFormat::Llama3 => format!("start: %json {call}\n"),
        ToolFormat::Mistral => {
            // `[TOOL_CALLS]` is a control token: the grammar names it by id.
            let marker = text
                .tokenizer
                .token_to_id("[TOOL_CALLS]")
                .map(|id| format!("<[{id}]>"))
                .unwrap_or_else(|| "\"[TOOL_CALLS]\"".into());
            let items = format!(
                "{{\"type\": \"array\", \"minItems\": 1, \"maxItems\": {most}, \"items\": {call}}}"
            );
            format!("start: {marker} %json {items}\n")
        }
        ToolFormat::Generic => return Ok(None),
    };
    Ok(Some(Constrained {
        grammar: Grammar::Lark(lark),
        param: "tool_choice".into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool::new(
            "get_weather",
            json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        )
    }

    #[test]
    fn a_named_choice_must_be_a_tool() {
        let options = ChatOptions {
            tools: vec![weather()],
            tool_choice: ToolChoice::Function("get_time".into()),
            ..ChatOptions::default()
        };
        let err = options.check().unwrap_err().to_string();
        assert!(
            err.contains("tool_choice") && err.contains("get_weather"),
            "{err}"
        );
    }

    #[test]
    fn required_needs_tools_and_names_are_checked() {
        let options = ChatOptions {
            tool_choice: ToolChoice::Required,
            ..ChatOptions::default()
        };
        assert!(options.check().is_err());
        let options = ChatOptions {
            tools: vec![Tool::new("get weather", json!({"type": "object"}))],
            ..ChatOptions::default()
        };
        let err = options.check().unwrap_err().to_string();
        assert!(err.contains("tools[0].function.name"), "{err}");
    }

    #[test]
    fn generic_history_writes_calls_and_results_as_json_turns() {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls.push(crate::text::chat::MessageToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: "{\"city\": \"Paris\"}".into(),
        });
        let mut result = ChatMessage::new("tool", "18C");
        result.tool_call_id = Some("call_1".into());
        let history = generic_history(&[ChatMessage::new("user", "hi"), call, result]);
        assert_eq!(history[1].role, "assistant");
        let v: Value = serde_json::from_str(&history[1].content).unwrap();
        assert_eq!(v["tool_calls"][0]["arguments"]["city"], "Paris");
        assert_eq!(history[2].role, "user");
        let v: Value = serde_json::from_str(&history[2].content).unwrap();
        assert_eq!(v["tool_response"]["content"], "18C");
    }

    #[test]
    fn generic_schema_under_auto_allows_an_answer() {
        let tools = [weather()];
        let callable: Vec<&Tool> = tools.iter().collect();
        let options = ChatOptions::default();
        let schema = generic_schema(&callable, &options, None);
        assert!(schema["anyOf"].as_array().is_some_and(|a| a.len() == 2));
        let options = ChatOptions {
            tool_choice: ToolChoice::Required,
            parallel_tool_calls: Some(false),
            ..ChatOptions::default()
        };
        let schema = generic_schema(&callable, &options, None);
        assert_eq!(schema["required"][0], "tool_call");
    }
}
