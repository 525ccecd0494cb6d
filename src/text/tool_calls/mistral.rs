//! Mistral tool calls: after `[TOOL_CALLS]`, a JSON array of calls (v3) or
//! `name[ARGS]{json}` (v11+, optionally `name[CALL_ID]id[ARGS]{json}`); each unit ends where
//! its JSON ends.

use super::marked::UnitStep;
use super::{calls_from_value, json_prefix, JsonPrefix, ParsedToolCall};

/// Starts Mistral tool calls (a special token, present literally in the detokenized text).
pub(super) const MISTRAL_MARKER: &str = "[TOOL_CALLS]";
/// Separates a Mistral v11+ call's name from its JSON arguments.
const MISTRAL_ARGS: &str = "[ARGS]";
/// Separates a Mistral call's name from its id, in the formats that carry one.
const MISTRAL_CALL_ID: &str = "[CALL_ID]";

/// How the unit in `buf` (the text after `[TOOL_CALLS]`) stands; `checked_len` is the length
/// of `buf` at the last parse that needed more.
pub(super) fn unit_step(buf: &str, checked_len: &mut usize, eof: bool) -> UnitStep {
    // A unit can only complete at a closing bracket, so skip reparsing the growing buffer
    // until one arrives: long arguments would otherwise be parsed once per token.
    let fresh = buf.get(*checked_len..).unwrap_or(buf);
    if !eof && !fresh.contains(['}', ']']) {
        return UnitStep::NeedMore;
    }
    let step = parse_mistral_unit(buf);
    match step {
        UnitStep::NeedMore if eof => UnitStep::Broken,
        UnitStep::NeedMore => {
            *checked_len = buf.len();
            UnitStep::NeedMore
        }
        other => other,
    }
}

/// Parses a Mistral unit: the text after `[TOOL_CALLS]`.
fn parse_mistral_unit(unit: &str) -> UnitStep {
    let start = unit.len() - unit.trim_start().len();
    let body = unit.get(start..).unwrap_or_default();
    if body.starts_with(['[', '{']) {
        // v3: a JSON array of call objects (or a single object).
        return match json_prefix(body) {
            JsonPrefix::Complete(value, len) => match calls_from_value(&value) {
                Some(calls) => UnitStep::Calls(calls, start + len),
                None => UnitStep::Invalid(start + len),
            },
            JsonPrefix::Incomplete => UnitStep::NeedMore,
            JsonPrefix::Invalid => UnitStep::Broken,
        };
    }
    // v11+: name[ARGS]{json}, or name[CALL_ID]id[ARGS]{json}.
    let Some(args_at) = body.find(MISTRAL_ARGS) else {
        return UnitStep::NeedMore;
    };
    let header = body.get(..args_at).unwrap_or_default();
    let args_start = args_at + MISTRAL_ARGS.len();
    let args = body.get(args_start..).unwrap_or_default();
    let (value, len) = match json_prefix(args) {
        JsonPrefix::Complete(value, len) => (value, len),
        JsonPrefix::Incomplete => return UnitStep::NeedMore,
        JsonPrefix::Invalid => return UnitStep::Broken,
    };
    let end = start + args_start + len;
    let (name, id) = match header.split_once(MISTRAL_CALL_ID) {
        Some((name, id)) => (name.trim(), Some(id.trim().to_string())),
        None => (header.trim(), None),
    };
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !name_ok || !value.is_object() {
        return UnitStep::Invalid(end);
    }
    match serde_json::to_string(&value) {
        Ok(arguments) => UnitStep::Calls(
            vec![ParsedToolCall {
                name: name.to_string(),
                arguments,
                id: id.filter(|id| !id.is_empty()),
            }],
            end,
        ),
        Err(_) => UnitStep::Invalid(end),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{call, check};
    use super::super::ToolFormat;

    #[test]
    fn mistral_v3_array() {
        let text = "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"a1b2c3d4e\"}, {\"name\": \"get_time\", \"arguments\": {}, \"id\": \"f5g6h7i8j\"}]";
        check(
            ToolFormat::Mistral,
            text,
            "",
            &[
                call("get_weather", r#"{"city": "Paris"}"#, Some("a1b2c3d4e")),
                call("get_time", "{}", Some("f5g6h7i8j")),
            ],
        );
        // Arguments as a JSON string, and content before the marker.
        let text = "I'll look that up. [TOOL_CALLS] [{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": [1, \\\"]\\\"]}\"}]\n";
        check(
            ToolFormat::Mistral,
            text,
            "I'll look that up. ",
            &[call("f", r#"{"a": [1, "]"]}"#, None)],
        );
    }

    #[test]
    fn mistral_v11_calls() {
        let text = "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\", \"note\": \"[TOOL_CALLS]}\"}[TOOL_CALLS]get_time[ARGS]{\"tz\": \"CET\"}";
        check(
            ToolFormat::Mistral,
            text,
            "",
            &[
                call(
                    "get_weather",
                    r#"{"city": "Paris", "note": "[TOOL_CALLS]}"}"#,
                    None,
                ),
                call("get_time", r#"{"tz": "CET"}"#, None),
            ],
        );
        let text = "[TOOL_CALLS]search_docs[CALL_ID]abc123xyz[ARGS]{\"q\": \"日本 😀\"}";
        check(
            ToolFormat::Mistral,
            text,
            "",
            &[call(
                "search_docs",
                r#"{"q": "日本 😀"}"#,
                Some("abc123xyz"),
            )],
        );
    }

    #[test]
    fn mistral_malformed_is_content() {
        for text in [
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {]",
            "[TOOL_CALLS][{\"name\": \"f\"",
            "[TOOL_CALLS]f[ARGS]{\"a\": ",
            "[TOOL_CALLS]no args here",
            "[TOOL_CALLS]f[ARGS]nope {}",
            "[TOOL_CALLS][{\"nam\": \"f\"}] then text",
            "[TOOL_CALLS]bad name[ARGS]{}",
            "[TOOL_CALLS]",
            "Use the [TOOL",
            "[[TOOL_CALLS",
            "",
        ] {
            check(ToolFormat::Mistral, text, text, &[]);
        }
    }

    #[test]
    fn mistral_call_then_content() {
        let text = "[TOOL_CALLS]f[ARGS]{}\n\nDone. [TOOL_CALLS]oops";
        check(
            ToolFormat::Mistral,
            text,
            "\n\nDone. [TOOL_CALLS]oops",
            &[call("f", "{}", None)],
        );
        let text = "  [TOOL_CALLS]f[ARGS]{}  ";
        check(ToolFormat::Mistral, text, "", &[call("f", "{}", None)]);
    }
}
