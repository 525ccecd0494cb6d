//! Tool calls in generated text: recognises each model family's native tool-call syntax in the
//! output and turns it into OpenAI tool calls, while the rest streams out as plain content.
//!
//! The parser is fed the detokenized output piece by piece, exactly as the stream decoder
//! produces it, so markers and JSON arrive split at arbitrary points. Content that cannot be part
//! of a tool call is released at once; text that might still become one is held back. Model
//! output is arbitrary text, so nothing here fails: whatever does not parse as a tool call comes
//! out as content, so no generated text is lost.
//!
//! Rules per format:
//! - Hermes: a block runs from `<tool_call>` to the first `</tool_call>` outside a JSON string
//!   literal (tracked when the block starts with `{`, so arguments may mention the tag), or to
//!   the next `<tool_call>` outside a string, or to the end of output (models often stop before
//!   the closing tag). A block whose JSON is an object with a string `name` is a call; any other
//!   block is content, tags included.
//! - Mistral: after `[TOOL_CALLS]` comes a JSON array of calls (v3) or `name[ARGS]{json}`
//!   (v11+, optionally `name[CALL_ID]id[ARGS]{json}`); each is emitted as soon as its JSON is
//!   complete. A complete JSON value that is not calls is content (marker included) and parsing
//!   goes on after it; text that is not JSON, or JSON still unfinished at the end, makes the
//!   marker and all the rest of the output content.
//! - Hermes and Mistral: a stretch of output that is whitespace only and sits right before or
//!   after a recognised call (models put newlines between and after calls) is dropped; every
//!   other byte outside recognised calls is content, verbatim.
//! - Llama 3: if the output starts (after whitespace) with `{` or `<|python_tag|>`, it is held
//!   and parsed at the end as calls separated by whitespace or `;`; if any part is not a call,
//!   all of it is content. Otherwise it is content and streams through.
//! - Generic: see [`ToolFormat::Generic`].
//!
//! The parsers live one family to a file: `hermes.rs` and `mistral.rs` (calls that start at a
//! marker inside plain content, both run by the parser in `marked.rs`), `llama3.rs` (the whole
//! output is calls or content) and `generic.rs` (one JSON object, whose `response` string
//! `json_string.rs` decodes as it streams). This module holds what they share: the public
//! types, the dispatch, the event collector and the JSON helpers that turn values into calls.

mod generic;
mod hermes;
mod json_string;
mod llama3;
mod marked;
mod mistral;

use generic::Generic;
use hermes::HERMES_OPEN;
use llama3::{Llama3, PYTHON_TAG};
use marked::{Marked, MarkedKind};
use mistral::MISTRAL_MARKER;
use serde_json::Value;

/// The native tool-call syntax of a model family, chosen from its chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{json}</tool_call>` blocks: Hermes 2 Pro, Qwen2.5, Qwen3.
    Hermes,
    /// A bare JSON object, optionally after `<|python_tag|>`: Llama 3.1 and 3.2.
    Llama3,
    /// `[TOOL_CALLS]` followed by a JSON array (v3) or `name[ARGS]{json}` (v11+).
    Mistral,
    /// No native syntax: the server constrains the output to one JSON object, `{"tool_calls":
    /// [call, …]}`, `{"tool_call": call}` or `{"response": "text"}` (a call being `{"name",
    /// "arguments", "id"?}`).
    ///
    /// Output that does not start with `{` is plain content and streams through. When it starts
    /// with `{ "response" : "`, the string's decoded text streams as content. At the end the
    /// whole output must parse as such an object (unknown keys are ignored); then `response` is
    /// the content and the calls follow it. Otherwise the output is content: all of the raw
    /// text if nothing was streamed, or, if part of a `response` string was streamed, the raw
    /// text after the part streamed (`{"response": "Hi` gives "Hi"; `{"response": "Hi"} junk`
    /// gives "Hi} junk"), so nothing is sent twice.
    Generic,
}

impl ToolFormat {
    /// Detects the format from the chat template's source text: `<tool_call>` means Hermes,
    /// `[TOOL_CALLS]` Mistral, `<|python_tag|>` (or both `ipython` and `parameters`) Llama 3,
    /// and anything else Generic.
    pub fn detect(template_source: &str) -> ToolFormat {
        if template_source.contains(HERMES_OPEN) {
            ToolFormat::Hermes
        } else if template_source.contains(MISTRAL_MARKER) {
            ToolFormat::Mistral
        } else if template_source.contains(PYTHON_TAG)
            || (template_source.contains("ipython") && template_source.contains("parameters"))
        {
            ToolFormat::Llama3
        } else {
            ToolFormat::Generic
        }
    }

    /// The format's name, for logs and configuration: "hermes", "llama3", "mistral", "generic".
    pub fn as_str(&self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3 => "llama3",
            ToolFormat::Mistral => "mistral",
            ToolFormat::Generic => "generic",
        }
    }
}

/// A complete tool call parsed from the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// The function's name.
    pub name: String,
    /// The arguments as compact JSON text of an object (re-serialized with
    /// `serde_json::to_string`; `"{}"` when the model gave none).
    pub arguments: String,
    /// An id the model wrote itself (Mistral v3, the generic format), if any.
    pub id: Option<String>,
}

/// What one pushed piece of output turns into, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Plain text for `content`.
    Content(String),
    /// A whole tool call, with its 0-based index among this generation's calls.
    Call {
        /// Position of the call among this generation's calls: 0, 1, 2, …
        index: usize,
        /// The call itself.
        call: ParsedToolCall,
    },
}

/// Streaming parser of one generation's output into content and tool calls.
#[derive(Debug)]
pub struct ToolCallParser {
    inner: Inner,
    out: Emitter,
}

#[derive(Debug)]
enum Inner {
    Marked(Marked),
    Llama3(Llama3),
    Generic(Generic),
}

impl ToolCallParser {
    /// A parser for one generation in the given format.
    pub fn new(format: ToolFormat) -> Self {
        let inner = match format {
            ToolFormat::Hermes => Inner::Marked(Marked::new(MarkedKind::Hermes)),
            ToolFormat::Mistral => Inner::Marked(Marked::new(MarkedKind::Mistral)),
            ToolFormat::Llama3 => Inner::Llama3(Llama3::default()),
            ToolFormat::Generic => Inner::Generic(Generic::default()),
        };
        Self {
            inner,
            out: Emitter::default(),
        }
    }

    /// Feeds the next piece of generated text, split anywhere (mid-marker and mid-JSON splits
    /// are normal). Returns what can be released now: content that cannot be the start of a
    /// tool call is released as soon as possible; text that might begin one is held back.
    pub fn push(&mut self, delta: &str) -> Vec<ToolEvent> {
        match &mut self.inner {
            Inner::Marked(p) => p.push(delta, &mut self.out),
            Inner::Llama3(p) => p.push(delta, &mut self.out),
            Inner::Generic(p) => p.push(delta, &mut self.out),
        }
        std::mem::take(&mut self.out.events)
    }

    /// End of output: releases everything held. An unfinished or unparseable tool call is
    /// released as content (its raw text): never lost, never an error.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        match &mut self.inner {
            Inner::Marked(p) => p.step(true, &mut self.out),
            Inner::Llama3(p) => p.finish(&mut self.out),
            Inner::Generic(p) => p.finish(&mut self.out),
        }
        std::mem::take(&mut self.out.events)
    }
}

/// Parses a whole output at once (everything pushed, then finish), merging adjacent content:
/// returns the content text and the calls.
pub fn parse_complete(format: ToolFormat, text: &str) -> (String, Vec<ParsedToolCall>) {
    let mut parser = ToolCallParser::new(format);
    let mut events = parser.push(text);
    events.extend(parser.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for event in events {
        match event {
            ToolEvent::Content(text) => content.push_str(&text),
            ToolEvent::Call { call, .. } => calls.push(call),
        }
    }
    (content, calls)
}

/// Collects events, numbering calls and merging adjacent content so callers get few events.
#[derive(Debug, Default)]
struct Emitter {
    events: Vec<ToolEvent>,
    next_index: usize,
}

impl Emitter {
    fn content(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(ToolEvent::Content(last)) = self.events.last_mut() {
            last.push_str(text);
        } else {
            self.events.push(ToolEvent::Content(text.to_string()));
        }
    }

    fn call(&mut self, call: ParsedToolCall) {
        self.events.push(ToolEvent::Call {
            index: self.next_index,
            call,
        });
        self.next_index += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// Length of the longest proper prefix of `marker` that `text` ends with: the part of `text`
/// that must be held back because the next piece might complete the marker. (The reasoning
/// parser holds back its tags the same way.)
pub(crate) fn partial_suffix(text: &str, marker: &str) -> usize {
    let max = marker.len().saturating_sub(1).min(text.len());
    // `get` rather than indexing: a cut inside a multi-byte character is simply no match.
    (1..=max)
        .rev()
        .find(|&k| {
            text.get(text.len() - k..)
                .is_some_and(|tail| marker.starts_with(tail))
        })
        .unwrap_or(0)
}

fn is_blank(text: &str) -> bool {
    text.chars().all(char::is_whitespace)
}

/// Removes the first `n` bytes of `buf` and returns them. `n` always comes from a search or a
/// character walk over `buf`, so it is a character boundary; were it ever not, nothing is
/// removed rather than panicking.
fn take_front(buf: &mut String, n: usize) -> String {
    if !buf.is_char_boundary(n) {
        return String::new();
    }
    let rest = buf.split_off(n);
    std::mem::replace(buf, rest)
}

/// Builds a call from a JSON object with a string `name` and an optional object of arguments
/// under `arguments` or `parameters`. Arguments given as a string holding a JSON object (as
/// OpenAI itself sends them) are accepted too. Anything else is not a call.
fn call_from_value(value: &Value) -> Option<ParsedToolCall> {
    let obj = value.as_object()?;
    let name = obj.get("name")?.as_str()?;
    if name.is_empty() {
        return None;
    }
    let args = match obj.get("arguments") {
        None | Some(Value::Null) => obj.get("parameters"),
        some => some,
    };
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_string(),
        Some(a @ Value::Object(_)) => serde_json::to_string(a).ok()?,
        Some(Value::String(s)) if is_blank(s) => "{}".to_string(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s).ok()? {
            inner @ Value::Object(_) => serde_json::to_string(&inner).ok()?,
            _ => return None,
        },
        Some(_) => return None,
    };
    let id = obj.get("id").and_then(Value::as_str).map(str::to_string);
    Some(ParsedToolCall {
        name: name.to_string(),
        arguments,
        id,
    })
}

/// Calls from a value that is one call object or an array of them; `None` if any is not a call.
fn calls_from_value(value: &Value) -> Option<Vec<ParsedToolCall>> {
    match value {
        Value::Array(items) if !items.is_empty() => items.iter().map(call_from_value).collect(),
        Value::Object(_) => Some(vec![call_from_value(value)?]),
        _ => None,
    }
}

/// How far a JSON object or array at the start of a text has arrived.
enum JsonPrefix {
    /// A complete value and the byte length it (and the whitespace before it) took.
    Complete(Value, usize),
    /// Only a prefix of a value so far (or only whitespace).
    Incomplete,
    /// Not JSON, whatever follows.
    Invalid,
}

/// Parses the JSON object or array that `text` starts with, ignoring what follows it. Scalars
/// are refused: a number's end cannot be known while more text may still arrive, and every
/// completeness decision here must not depend on where the output was split.
fn json_prefix(text: &str) -> JsonPrefix {
    match text.trim_start().chars().next() {
        None => return JsonPrefix::Incomplete,
        Some('{' | '[') => {}
        Some(_) => return JsonPrefix::Invalid,
    }
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    match values.next() {
        Some(Ok(value)) => JsonPrefix::Complete(value, values.byte_offset()),
        Some(Err(e)) if e.is_eof() => JsonPrefix::Incomplete,
        Some(Err(_)) => JsonPrefix::Invalid,
        None => JsonPrefix::Incomplete,
    }
}

// The reasoning parser's tests split their texts the same way, by this path.
#[cfg(test)]
pub(crate) use testing::every_split;

/// What the tests of every family share: building expected calls, running a parser over
/// pieces, and checking a text whole and split every way.
#[cfg(test)]
pub(crate) mod testing {
    use super::{parse_complete, ParsedToolCall, ToolCallParser, ToolEvent, ToolFormat};
    use serde_json::Value;

    /// Every way the streaming tests feed a text: split once at each character boundary, one
    /// character at a time, and (for texts short enough to keep this quick) split at every
    /// pair of boundaries.
    pub(crate) fn every_split(text: &str) -> Vec<Vec<&str>> {
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        let mut splits: Vec<Vec<&str>> =
            cuts.iter().map(|&i| vec![&text[..i], &text[i..]]).collect();
        splits.push(
            text.char_indices()
                .map(|(i, c)| &text[i..i + c.len_utf8()])
                .collect(),
        );
        if cuts.len() <= 160 {
            for &i in &cuts {
                for &j in cuts.iter().filter(|&&j| j >= i) {
                    splits.push(vec![&text[..i], &text[i..j], &text[j..]]);
                }
            }
        }
        splits
    }

    /// A call, its arguments normalized the way the parser re-serializes them (so the tests do
    /// not depend on whether serde_json preserves key order).
    pub(crate) fn call(name: &str, args: &str, id: Option<&str>) -> ParsedToolCall {
        let value: Value = serde_json::from_str(args).expect("test arguments are JSON");
        ParsedToolCall {
            name: name.to_string(),
            arguments: serde_json::to_string(&value).expect("serializable"),
            id: id.map(str::to_string),
        }
    }

    /// Runs the pushes and returns (content, calls), checking the events on the way.
    pub(crate) fn run(format: ToolFormat, pieces: &[&str]) -> (String, Vec<ParsedToolCall>) {
        let mut parser = ToolCallParser::new(format);
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(parser.push(piece));
        }
        events.extend(parser.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for event in events {
            match event {
                ToolEvent::Content(text) => {
                    assert!(!text.is_empty(), "empty content event");
                    content.push_str(&text);
                }
                ToolEvent::Call { index, call } => {
                    assert_eq!(index, calls.len(), "call indices run 0, 1, 2, …");
                    calls.push(call);
                }
            }
        }
        (content, calls)
    }

    /// Checks the whole-output result and that every way of splitting the text gives it too.
    pub(crate) fn check(format: ToolFormat, text: &str, content: &str, calls: &[ParsedToolCall]) {
        let expected = (content.to_string(), calls.to_vec());
        assert_eq!(parse_complete(format, text), expected, "whole: {text:?}");
        check_splits(format, text, &expected);
    }

    fn check_splits(format: ToolFormat, text: &str, expected: &(String, Vec<ParsedToolCall>)) {
        for pieces in every_split(text) {
            assert_eq!(&run(format, &pieces), expected, "pieces {pieces:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::run;
    use super::*;

    #[test]
    fn detects_formats() {
        let cases = [
            (
                "{% for tool in tools %}<tool_call>\n{{ tool }}",
                ToolFormat::Hermes,
            ),
            (
                "{{ '[TOOL_CALLS]' + tool_calls|tojson }}",
                ToolFormat::Mistral,
            ),
            (
                "{{- '<|python_tag|>' + tool_call.arguments }}",
                ToolFormat::Llama3,
            ),
            (
                "{%- if message.role == 'ipython' %}{{ parameters }}",
                ToolFormat::Llama3,
            ),
            ("{{ message.content }}", ToolFormat::Generic),
        ];
        for (source, format) in cases {
            assert_eq!(ToolFormat::detect(source), format);
        }
        assert_eq!(ToolFormat::Hermes.as_str(), "hermes");
        assert_eq!(ToolFormat::Llama3.as_str(), "llama3");
        assert_eq!(ToolFormat::Mistral.as_str(), "mistral");
        assert_eq!(ToolFormat::Generic.as_str(), "generic");
    }

    /// A tiny deterministic generator, so the randomized test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn arbitrary_text_never_panics_and_ignores_splits() {
        const PARTS: &[&str] = &[
            "<tool_call>",
            "</tool_call>",
            "<tool_",
            "</tool",
            "[TOOL_CALLS]",
            "[TOOL",
            "[ARGS]",
            "[CALL_ID]",
            "<|python_tag|>",
            "{",
            "}",
            "[",
            "]",
            "\"",
            "\\",
            "\\u",
            "d83d",
            "\\n",
            ":",
            ",",
            ";",
            " ",
            "\n",
            "name",
            "\"name\": \"f\"",
            "\"arguments\": {}",
            "\"response\"",
            "<tool_call>{\"name\": \"f\"}</tool_call>",
            "[TOOL_CALLS]f[ARGS]{}",
            "[{\"name\": \"g\"}]",
            "{\"response\": \"",
            "{\"tool_call\": {\"name\": \"f\"}}",
            "\"tool_calls\"",
            "é",
            "😀",
            "日本",
            "a",
            "1",
            "<",
            "\u{0}",
        ];
        let formats = [
            ToolFormat::Hermes,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
            ToolFormat::Generic,
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..300 {
            let len = rng.below(14);
            let text: String = (0..len).map(|_| PARTS[rng.below(PARTS.len())]).collect();
            for format in formats {
                let whole = parse_complete(format, &text);
                if whole.1.is_empty() && format != ToolFormat::Generic {
                    assert_eq!(whole.0, text, "{format:?} lost text of {text:?}");
                }
                let cuts: Vec<usize> = (0..=text.len())
                    .filter(|&i| text.is_char_boundary(i))
                    .collect();
                for _ in 0..8 {
                    let mut points: Vec<usize> =
                        (0..3).map(|_| cuts[rng.below(cuts.len())]).collect();
                    points.sort_unstable();
                    let pieces = [
                        &text[..points[0]],
                        &text[points[0]..points[1]],
                        &text[points[1]..points[2]],
                        &text[points[2]..],
                    ];
                    assert_eq!(
                        run(format, &pieces),
                        whole,
                        "{format:?} {text:?} {points:?}"
                    );
                }
            }
        }
    }
}
