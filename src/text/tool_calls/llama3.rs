//! Llama 3.1 and 3.2 tool calls: the whole output is calls (JSON objects, each optionally
//! after `<|python_tag|>`, separated by whitespace or `;`) or it is content. Output that
//! starts (after whitespace) with `{` or `<|python_tag|>` is held and parsed at the end;
//! anything else streams through as content.

use super::{calls_from_value, json_prefix, Emitter, JsonPrefix, ParsedToolCall};

/// Llama 3.1's marker for "the rest is a tool call".
pub(super) const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug, Default, PartialEq, Eq)]
enum Llama3Mode {
    /// Only whitespace (or part of `<|python_tag|>`) so far.
    #[default]
    Undecided,
    /// Plain content: streams through.
    Content,
    /// Looks like tool calls: buffered and parsed at the end.
    Calls,
}

/// Llama 3 writes tool calls as the whole output, so the first non-whitespace text decides.
#[derive(Debug, Default)]
pub(super) struct Llama3 {
    mode: Llama3Mode,
    buf: String,
}

impl Llama3 {
    pub(super) fn push(&mut self, delta: &str, out: &mut Emitter) {
        if self.mode == Llama3Mode::Content {
            out.content(delta);
            return;
        }
        self.buf.push_str(delta);
        if self.mode == Llama3Mode::Undecided {
            let start = self.buf.trim_start();
            if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
                self.mode = Llama3Mode::Calls;
            } else if !start.is_empty() && !PYTHON_TAG.starts_with(start) {
                self.mode = Llama3Mode::Content;
                out.content(&self.buf);
                self.buf.clear();
            }
        }
    }

    pub(super) fn finish(&mut self, out: &mut Emitter) {
        let calls = match self.mode {
            Llama3Mode::Calls => parse_llama3_calls(&self.buf),
            _ => None,
        };
        match calls {
            Some(calls) => calls.into_iter().for_each(|call| out.call(call)),
            None => out.content(&self.buf),
        }
        self.buf.clear();
    }
}

/// Parses a whole Llama 3 output as calls: JSON objects (or arrays of them), each optionally
/// after `<|python_tag|>`, separated by whitespace or `;`. `None` unless all of it is calls.
fn parse_llama3_calls(text: &str) -> Option<Vec<ParsedToolCall>> {
    let mut calls = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if let Some(after) = rest.strip_prefix(PYTHON_TAG) {
            rest = after;
            continue;
        }
        if rest.is_empty() {
            break;
        }
        match json_prefix(rest) {
            JsonPrefix::Complete(value, len) => {
                calls.extend(calls_from_value(&value)?);
                rest = rest.get(len..)?;
            }
            _ => return None,
        }
    }
    (!calls.is_empty()).then_some(calls)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{call, check};
    use super::super::{ToolCallParser, ToolEvent, ToolFormat};

    #[test]
    fn llama3_python_tag() {
        let text =
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        check(
            ToolFormat::Llama3,
            text,
            "",
            &[call("get_weather", r#"{"city": "Paris"}"#, None)],
        );
    }

    #[test]
    fn llama3_separated_calls() {
        let text = "{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {\"y\": \"z;w }\"}}";
        let calls = [
            call("a", r#"{"x": 1}"#, None),
            call("b", r#"{"y": "z;w }"}"#, None),
        ];
        check(ToolFormat::Llama3, text, "", &calls);
        let text = "\n\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n{\"name\": \"b\", \"parameters\": {\"y\": \"z;w }\"}}\n";
        check(ToolFormat::Llama3, text, "", &calls);
    }

    #[test]
    fn llama3_content() {
        for text in [
            "The weather in Paris is sunny, {probably}.",
            "<|python_tag|>print(\"hi\")",
            "{\"not\": \"a call\"}",
            "{\"name\": \"a\"} and more",
            "  \n",
            "<|python",
            "",
            "[{\"name\": \"a\"}]",
        ] {
            check(ToolFormat::Llama3, text, text, &[]);
        }
        let mut parser = ToolCallParser::new(ToolFormat::Llama3);
        assert_eq!(parser.push("\n"), vec![]);
        assert_eq!(parser.push("Hi"), vec![ToolEvent::Content("\nHi".into())]);
        assert_eq!(parser.push(" {x}"), vec![ToolEvent::Content(" {x}".into())]);
        assert_eq!(parser.finish(), vec![]);
    }
}
