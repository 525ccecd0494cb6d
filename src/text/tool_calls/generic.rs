//! The generic format, for models without native tool calls: the server constrains the output
//! to one JSON object, and this parser streams its `response` string as content and reads the
//! calls at the end. The rules are on [`ToolFormat::Generic`](super::ToolFormat::Generic).

use super::json_string::{decode_string_prefix, StringEnd};
use super::{call_from_value, Emitter, ParsedToolCall};
use serde_json::Value;

#[derive(Debug, Default, PartialEq, Eq)]
enum GenericMode {
    /// Only JSON whitespace so far.
    #[default]
    Undecided,
    /// Does not start with `{`: plain content, streamed through.
    Content,
    /// Starts with `{`; may still turn out to be `{"response": "`.
    Object,
    /// Inside the `response` string: its decoded text streams out.
    Response,
    /// The `response` string ended (or held something the decoder refuses): the rest is only
    /// parsed at the end.
    ResponseDone,
    /// Some other object: parsed at the end.
    Buffered,
}

/// Parser for the schema-constrained JSON output of models without native tool calls; the
/// rules are on [`ToolFormat::Generic`](super::ToolFormat::Generic).
#[derive(Debug, Default)]
pub(super) struct Generic {
    mode: GenericMode,
    raw: String,
    /// Byte offset in `raw` up to which the `response` string has been decoded and sent.
    resp_pos: usize,
    /// The decoded `response` text sent so far, once streaming started.
    streamed: Option<String>,
}

impl Generic {
    pub(super) fn push(&mut self, delta: &str, out: &mut Emitter) {
        if self.mode == GenericMode::Content {
            out.content(delta);
            return;
        }
        self.raw.push_str(delta);
        if self.mode == GenericMode::Undecided {
            match self.raw.trim_start_matches(is_json_ws).chars().next() {
                None => return,
                Some('{') => self.mode = GenericMode::Object,
                Some(_) => {
                    self.mode = GenericMode::Content;
                    out.content(&self.raw);
                    self.raw.clear();
                    return;
                }
            }
        }
        if self.mode == GenericMode::Object {
            match response_prefix(&self.raw) {
                Prefix::Full(pos) => {
                    self.mode = GenericMode::Response;
                    self.resp_pos = pos;
                    self.streamed = Some(String::new());
                }
                Prefix::Partial => {}
                Prefix::No => self.mode = GenericMode::Buffered,
            }
        }
        if self.mode == GenericMode::Response {
            let rest = self.raw.get(self.resp_pos..).unwrap_or_default();
            let (text, used, end) = decode_string_prefix(rest);
            self.resp_pos += used;
            if end != StringEnd::Open {
                self.mode = GenericMode::ResponseDone;
            }
            out.content(&text);
            if let Some(streamed) = &mut self.streamed {
                streamed.push_str(&text);
            }
        }
    }

    pub(super) fn finish(&mut self, out: &mut Emitter) {
        match self.mode {
            GenericMode::Content => {}
            GenericMode::Undecided => out.content(&self.raw),
            _ => match parse_generic(&self.raw) {
                Some((response, calls)) => {
                    if let Some(response) = response {
                        match &self.streamed {
                            None => out.content(&response),
                            // Normally all of it was streamed already.
                            Some(sent) => out
                                .content(response.strip_prefix(sent.as_str()).unwrap_or_default()),
                        }
                    }
                    calls.into_iter().for_each(|call| out.call(call));
                }
                None => match self.streamed {
                    None => out.content(&self.raw),
                    Some(_) => out.content(self.raw.get(self.resp_pos..).unwrap_or_default()),
                },
            },
        }
        self.raw.clear();
        self.resp_pos = 0;
    }
}

fn is_json_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Parses a whole generic output into the `response` text and the calls.
fn parse_generic(raw: &str) -> Option<(Option<String>, Vec<ParsedToolCall>)> {
    let value: Value = serde_json::from_str(raw).ok()?;
    let obj = value.as_object()?;
    let mut calls = Vec::new();
    let mut recognised = false;
    match obj.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            recognised = true;
            for item in items {
                calls.push(call_from_value(item)?);
            }
        }
        Some(_) => return None,
    }
    match obj.get("tool_call") {
        None | Some(Value::Null) => {}
        Some(item) => {
            recognised = true;
            calls.push(call_from_value(item)?);
        }
    }
    let response = match obj.get("response") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            recognised = true;
            Some(s.clone())
        }
        Some(_) => return None,
    };
    recognised.then_some((response, calls))
}

/// How far the output matches `{ "response" : "` (with JSON whitespace anywhere between).
enum Prefix {
    /// Matches; the string's content starts at this byte offset.
    Full(usize),
    /// Matches so far, but has not reached the opening quote yet.
    Partial,
    /// Cannot match.
    No,
}

fn response_prefix(raw: &str) -> Prefix {
    let bytes = raw.as_bytes();
    let mut i = 0;
    for expected in ["{", "\"response\"", ":", "\""] {
        while bytes.get(i).is_some_and(|&b| is_json_ws(b as char)) {
            i += 1;
        }
        for &e in expected.as_bytes() {
            match bytes.get(i) {
                None => return Prefix::Partial,
                Some(&b) if b == e => i += 1,
                Some(_) => return Prefix::No,
            }
        }
    }
    Prefix::Full(i)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{call, check};
    use super::super::{ToolCallParser, ToolEvent, ToolFormat};

    #[test]
    fn generic_shapes() {
        let text = "{\"tool_calls\": [{\"name\": \"a\", \"arguments\": {\"x\": 1}, \"id\": \"call_1\"}, {\"name\": \"b\", \"arguments\": {}}]}";
        check(
            ToolFormat::Generic,
            text,
            "",
            &[
                call("a", r#"{"x": 1}"#, Some("call_1")),
                call("b", "{}", None),
            ],
        );
        let text = " {\"tool_call\": {\"name\": \"f\", \"arguments\": {\"q\": \"s}\"}}}\n";
        check(
            ToolFormat::Generic,
            text,
            "",
            &[call("f", r#"{"q": "s}"}"#, None)],
        );
        let text = "{\"response\": \"Hello, \\\"world\\\"!\\nLine 2 \\\\ done \\u00e9 \\ud83d\\ude00 日本 \\/\"}";
        check(
            ToolFormat::Generic,
            text,
            "Hello, \"world\"!\nLine 2 \\ done é 😀 日本 /",
            &[],
        );
        let text = "\n{ \"response\" :\t\"Hi\" , \"extra\": 1}";
        check(ToolFormat::Generic, text, "Hi", &[]);
        let text = "{\"id\": 1, \"response\": \"late\"}";
        check(ToolFormat::Generic, text, "late", &[]);
    }

    #[test]
    fn generic_fallbacks() {
        for text in [
            "Sorry, I can't do that.",
            "{\"tool_calls\": [",
            "{\"response\": 5}",
            "{\"tool_calls\": [{\"arguments\": {}}]}",
            "{\"other\": \"x\"}",
            "{\"resp",
            "  ",
            "",
        ] {
            check(ToolFormat::Generic, text, text, &[]);
        }
        // Streamed response text stands; what follows it raw is added.
        check(
            ToolFormat::Generic,
            "{\"response\": \"Hello wor",
            "Hello wor",
            &[],
        );
        check(
            ToolFormat::Generic,
            "{\"response\": \"Hi\"} trailing",
            "Hi} trailing",
            &[],
        );
        check(
            ToolFormat::Generic,
            "{\"response\": \"a\\qb\"}",
            "a\\qb\"}",
            &[],
        );
        check(
            ToolFormat::Generic,
            "{\"response\": \"x\\ud800y\"}",
            "x\\ud800y\"}",
            &[],
        );
        check(
            ToolFormat::Generic,
            "{\"response\": \"x\\u00",
            "x\\u00",
            &[],
        );
        check(
            ToolFormat::Generic,
            "{\"response\": \"tab\there\"}",
            "tab\there\"}",
            &[],
        );
    }

    #[test]
    fn generic_streams_response() {
        let mut parser = ToolCallParser::new(ToolFormat::Generic);
        assert_eq!(parser.push("{\"resp"), vec![]);
        assert_eq!(
            parser.push("onse\": \"Hel"),
            vec![ToolEvent::Content("Hel".into())]
        );
        assert_eq!(parser.push("lo\\"), vec![ToolEvent::Content("lo".into())]);
        assert_eq!(
            parser.push("n\\ud83d"),
            vec![ToolEvent::Content("\n".into())]
        );
        assert_eq!(
            parser.push("\\ude00!\"}"),
            vec![ToolEvent::Content("😀!".into())]
        );
        assert_eq!(parser.finish(), vec![]);
    }
}
