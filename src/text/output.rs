//! Splitting generated text into what the API returns: the answer (`content`), a thinking
//! block (`reasoning_content`), and tool calls, as the text streams.
//!
//! The raw text first passes the stop strings; then a thinking block is taken off the front
//! ([`ReasoningParser`]), and what follows goes through the model family's tool-call parser
//! ([`ToolCallParser`]). Either stage is off unless the request and the model's template call
//! for it, and then text passes through untouched.

use super::reasoning::{ReasoningEvent, ReasoningParser};
use super::tool_calls::{ToolCallParser, ToolEvent, ToolFormat};

/// Control tokens that start tool calls in some families. Decoding skips special tokens, so
/// a generation with tools keeps the text of these, for the parser to see.
pub const KEPT_SPECIAL_TOKENS: &[&str] = &["[TOOL_CALLS]", "[ARGS]", "<|python_tag|>"];

/// The tags of a thinking block, and whether the prompt already opened one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasoningTags {
    /// The opening tag, e.g. `<think>`.
    pub open: String,
    /// The closing tag, e.g. `</think>`.
    pub close: String,
    /// True when the rendered prompt ends inside an open block (DeepSeek-R1 and some Qwen3
    /// templates write `<think>` themselves): the output starts as reasoning.
    pub started: bool,
}

/// How to read a generation's text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputFormat {
    /// Take a thinking block off the front.
    pub reasoning: Option<ReasoningTags>,
    /// Parse tool calls in this family's syntax.
    pub tools: Option<ToolFormat>,
}

impl OutputFormat {
    /// True when text passes through untouched.
    pub fn is_plain(&self) -> bool {
        self.reasoning.is_none() && self.tools.is_none()
    }
}

/// A tool call, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// Its position among the generation's calls, from 0.
    pub index: usize,
    /// The call's id (the model's own when it wrote one, else generated: `call_` and 24
    /// alphanumerics).
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The arguments, as a JSON object's text.
    pub arguments: String,
}

/// What one piece of generated text adds to each part of the answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputDelta {
    /// Text of the answer.
    pub content: String,
    /// Text of the thinking block.
    pub reasoning: String,
    /// Tool calls completed by this piece.
    pub tool_calls: Vec<ToolCall>,
}

impl OutputDelta {
    /// True when the piece adds nothing.
    pub fn is_empty(&self) -> bool {
        self.content.is_empty() && self.reasoning.is_empty() && self.tool_calls.is_empty()
    }
}

/// Splits one generation's text as it streams.
pub struct OutputParser {
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallParser>,
    calls: usize,
}

impl OutputParser {
    /// A parser for `format`.
    pub fn new(format: &OutputFormat) -> Self {
        OutputParser {
            reasoning: format
                .reasoning
                .as_ref()
                .map(|t| ReasoningParser::new(&t.open, &t.close, t.started)),
            tools: format.tools.map(ToolCallParser::new),
            calls: 0,
        }
    }

    /// The number of tool calls so far.
    pub fn tool_calls(&self) -> usize {
        self.calls
    }

    /// Feeds the next piece of text; `last` releases everything held back.
    pub fn push(&mut self, text: &str, last: bool) -> OutputDelta {
        let mut delta = OutputDelta::default();
        let mut answer = String::new();
        match &mut self.reasoning {
            None => answer.push_str(text),
            Some(parser) => {
                let mut events = parser.push(text);
                if last {
                    events.extend(parser.finish());
                }
                for event in events {
                    match event {
                        ReasoningEvent::Reasoning(r) => delta.reasoning.push_str(&r),
                        ReasoningEvent::Content(c) => answer.push_str(&c),
                    }
                }
            }
        }
        match &mut self.tools {
            None => delta.content = answer,
            Some(parser) => {
                let mut events = parser.push(&answer);
                if last {
                    events.extend(parser.finish());
                }
                for event in events {
                    match event {
                        ToolEvent::Content(c) => delta.content.push_str(&c),
                        ToolEvent::Call { call, .. } => {
                            delta.tool_calls.push(ToolCall {
                                index: self.calls,
                                id: call.id.unwrap_or_else(new_call_id),
                                name: call.name,
                                arguments: call.arguments,
                            });
                            self.calls += 1;
                        }
                    }
                }
            }
        }
        delta
    }
}

/// A fresh tool-call id, as OpenAI writes them: `call_` and 24 letters and digits.
pub fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}
