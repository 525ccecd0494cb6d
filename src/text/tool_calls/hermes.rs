//! Hermes tool calls (Hermes 2 Pro, Qwen2.5, Qwen3): `<tool_call>{json}</tool_call>` blocks
//! inside plain content. A block ends at the first `</tool_call>` outside a JSON string, at the
//! next `<tool_call>`, or at the end of output; its JSON must be an object with a string
//! `name` to be a call.

use super::marked::UnitStep;
use super::{call_from_value, partial_suffix, ParsedToolCall};
use serde_json::Value;

/// Opens a Hermes tool-call block.
pub(super) const HERMES_OPEN: &str = "<tool_call>";
/// Closes a Hermes tool-call block.
pub(super) const HERMES_CLOSE: &str = "</tool_call>";

/// How the unit in `buf` (the text after `<tool_call>`) stands; `scan` keeps how far the
/// search for its end has got, across pushes.
pub(super) fn unit_step(buf: &str, scan: &mut BlockScan, eof: bool) -> UnitStep {
    if let Some((pos, tag_len)) = scan.scan(buf) {
        let inner = buf.get(..pos).unwrap_or_default();
        return match parse_hermes_call(inner) {
            Some(call) => UnitStep::Calls(vec![call], pos + tag_len),
            None => UnitStep::Invalid(pos + tag_len),
        };
    }
    if !eof {
        return UnitStep::NeedMore;
    }
    // Models often stop at end of sequence before writing the closing tag, or mid-tag.
    let body = buf.trim_end();
    let partial = partial_suffix(body, HERMES_CLOSE).max(partial_suffix(body, HERMES_OPEN));
    let body = body.get(..body.len() - partial).unwrap_or_default();
    match parse_hermes_call(body) {
        Some(call) => UnitStep::Calls(vec![call], buf.len()),
        None => UnitStep::Invalid(buf.len()),
    }
}

/// Parses the JSON inside a Hermes block into a call.
fn parse_hermes_call(inner: &str) -> Option<ParsedToolCall> {
    let value: Value = serde_json::from_str(inner).ok()?;
    call_from_value(&value)
}

/// Finds the end of a Hermes block incrementally.
///
/// Rule: the block ends at the first `</tool_call>` that is not inside a JSON string literal,
/// so arguments may mention the tag. A `<tool_call>` outside a string also ends it (without
/// being consumed), for models that open the next block without closing this one. String
/// literals are only tracked when the block starts with `{`: text that is not JSON has no
/// strings, and one stray quote in it must not hide the closing tag.
#[derive(Debug, Default)]
pub(super) struct BlockScan {
    /// Byte offset up to which the text has been scanned.
    pos: usize,
    /// Whether the block's first non-whitespace character is `{`; `None` until it arrives.
    json: Option<bool>,
    in_string: bool,
    escaped: bool,
}

impl BlockScan {
    /// Returns where the block ends and the length of the tag to consume there.
    fn scan(&mut self, text: &str) -> Option<(usize, usize)> {
        while let Some(rest) = text.get(self.pos..) {
            if !self.in_string {
                if rest.starts_with(HERMES_CLOSE) {
                    return Some((self.pos, HERMES_CLOSE.len()));
                }
                if rest.starts_with(HERMES_OPEN) {
                    return Some((self.pos, 0));
                }
                if HERMES_CLOSE.starts_with(rest) || HERMES_OPEN.starts_with(rest) {
                    // Empty, or maybe the start of a tag: wait for more text.
                    return None;
                }
            }
            let c = rest.chars().next()?;
            if self.json.is_none() && !c.is_whitespace() {
                self.json = Some(c == '{');
            }
            if self.json == Some(true) {
                if self.in_string {
                    if self.escaped {
                        self.escaped = false;
                    } else if c == '\\' {
                        self.escaped = true;
                    } else if c == '"' {
                        self.in_string = false;
                    }
                } else if c == '"' {
                    self.in_string = true;
                }
            }
            self.pos += c.len_utf8();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{call, check};
    use super::super::{ToolCallParser, ToolEvent, ToolFormat};

    #[test]
    fn hermes_parallel_calls() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"timezone\": \"Europe/Paris\"}}\n</tool_call>\n";
        check(
            ToolFormat::Hermes,
            text,
            "",
            &[
                call(
                    "get_weather",
                    r#"{"city": "Paris", "unit": "celsius"}"#,
                    None,
                ),
                call("get_time", r#"{"timezone": "Europe/Paris"}"#, None),
            ],
        );
    }

    #[test]
    fn hermes_content_then_call() {
        let text = "Let me check the weather for you.\n\n<tool_call>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\"}}\n</tool_call>";
        check(
            ToolFormat::Hermes,
            text,
            "Let me check the weather for you.\n\n",
            &[call("get_weather", r#"{"city": "Zürich"}"#, None)],
        );
    }

    #[test]
    fn hermes_nested_arguments_and_tags_in_strings() {
        // The closing tag inside a JSON string does not end the block.
        let text = "<tool_call>\n{\"name\": \"run\", \"arguments\": {\"code\": \"if (x) { return \\\"}\\\"; } // </tool_call> <tool_call>\", \"opts\": {\"deep\": [1, {\"a\": null}], \"s\": \"\\\\\"}}}\n</tool_call>";
        check(
            ToolFormat::Hermes,
            text,
            "",
            &[call(
                "run",
                r#"{"code": "if (x) { return \"}\"; } // </tool_call> <tool_call>", "opts": {"deep": [1, {"a": null}], "s": "\\"}}"#,
                None,
            )],
        );
    }

    #[test]
    fn hermes_unicode_and_escapes() {
        let text = "Übersetzung: 日本語 😀\n<tool_call>{\"name\":\"translate\",\"arguments\":{\"text\":\"日本語 😀 \\u00e9 \\ud83d\\ude00\\n\"}}</tool_call>";
        check(
            ToolFormat::Hermes,
            text,
            "Übersetzung: 日本語 😀\n",
            &[call("translate", "{\"text\":\"日本語 😀 é 😀\\n\"}", None)],
        );
    }

    #[test]
    fn hermes_missing_close_tag_at_end() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n";
        check(ToolFormat::Hermes, text, "", &[call("f", "{}", None)]);
        let text = "<tool_call>\n{\"name\": \"f\"}\n</tool_";
        check(ToolFormat::Hermes, text, "", &[call("f", "{}", None)]);
    }

    #[test]
    fn hermes_malformed_calls_are_content() {
        let text = "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\n</tool_call>\nDone";
        check(ToolFormat::Hermes, text, text, &[]);
        let text = "<tool_call>{\"arguments\": {}}</tool_call>";
        check(ToolFormat::Hermes, text, text, &[]);
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>";
        check(ToolFormat::Hermes, text, text, &[]);
        // An unterminated string hides the closing tag; at the end all of it is content.
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": {\"s\": \"open</tool_call> after";
        check(ToolFormat::Hermes, text, text, &[]);
        // Not JSON at all: quotes do not matter and the tag closes the block.
        let text = "<tool_call>I said \"hi</tool_call> ok";
        check(ToolFormat::Hermes, text, text, &[]);
    }

    #[test]
    fn hermes_malformed_next_to_a_call() {
        // The newline between the malformed block and the call sits next to a call: dropped.
        let text = "<tool_call>oops</tool_call>\n<tool_call>{\"name\": \"g\", \"arguments\": {\"x\": 1}}</tool_call>";
        check(
            ToolFormat::Hermes,
            text,
            "<tool_call>oops</tool_call>",
            &[call("g", r#"{"x": 1}"#, None)],
        );
        let text = "<tool_call>{\"name\": \"g\"}</tool_call>\n\n<tool_call>oops</tool_call>\n";
        check(
            ToolFormat::Hermes,
            text,
            "<tool_call>oops</tool_call>\n",
            &[call("g", "{}", None)],
        );
    }

    #[test]
    fn hermes_unclosed_block_followed_by_another() {
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {}}\n<tool_call>{\"name\": \"b\", \"arguments\": {\"k\": \"v\"}}</tool_call>";
        check(
            ToolFormat::Hermes,
            text,
            "",
            &[call("a", "{}", None), call("b", r#"{"k": "v"}"#, None)],
        );
    }

    #[test]
    fn hermes_content_around_calls() {
        let text = "<tool_call>{\"name\": \"a\"}</tool_call>\n\n<tool_call>{\"name\": \"b\"}</tool_call>\nAnything else?";
        check(
            ToolFormat::Hermes,
            text,
            "\nAnything else?",
            &[call("a", "{}", None), call("b", "{}", None)],
        );
    }

    #[test]
    fn hermes_marker_lookalikes_are_content() {
        for text in [
            "a < b and a <tool",
            "x <tool_call",
            "<",
            "  ",
            "",
            "if a<b {}",
            "<tool_calls>",
        ] {
            check(ToolFormat::Hermes, text, text, &[]);
        }
    }

    #[test]
    fn hermes_streams_content_early() {
        let mut parser = ToolCallParser::new(ToolFormat::Hermes);
        assert_eq!(
            parser.push("Hello <tool"),
            vec![ToolEvent::Content("Hello ".into())]
        );
        assert_eq!(
            parser.push("box> there"),
            vec![ToolEvent::Content("<toolbox> there".into())]
        );
        assert_eq!(
            parser.push("\n<tool_call>{\"name\": \"f\"}"),
            vec![ToolEvent::Content("\n".into())]
        );
        assert_eq!(
            parser.push("</tool_call>"),
            vec![ToolEvent::Call {
                index: 0,
                call: call("f", "{}", None)
            }]
        );
        assert_eq!(parser.finish(), vec![]);
    }
}
