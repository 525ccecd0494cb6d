//! Reasoning in generated text: splits a thinking block (`<think>…</think>`, as DeepSeek-R1,
//! QwQ and Qwen3 write it) from the answer, streamed, so the server can return it as
//! `reasoning_content` apart from `content`.
//!
//! Rules, the same whether the output arrives whole or in pieces:
//! - A block counts only at the very start of the output (after optional whitespace), or when
//!   the prompt already opened it (`started`). Anywhere else the tags are ordinary content.
//! - The reasoning excludes the tags, one newline right after the open tag (`\n` or `\r\n`),
//!   and the whitespace right before the close tag.
//! - Whitespace right after the close tag is dropped (models write `</think>\n\n`).
//! - A block still open at the end of the output is all reasoning, and the content is empty
//!   (as vLLM does): the model ran out of tokens while thinking.
//! - Without a block, everything is content, leading whitespace included.

use super::tool_calls::partial_suffix;

/// One piece of the split output, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningEvent {
    /// Text of the thinking block, for `reasoning_content`.
    Reasoning(String),
    /// Text of the answer, for `content`.
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace, or part of the open tag, so far.
    Start,
    /// Inside the block.
    Reasoning,
    /// Just after the close tag: dropping whitespace.
    AfterClose,
    /// In the answer: everything streams through.
    Content,
}

/// Splits output into reasoning (a thinking block) and content, streamed.
#[derive(Debug)]
pub struct ReasoningParser {
    open: String,
    close: String,
    state: State,
    /// Text not yet released: a possible open tag at the start, or the end of the reasoning
    /// that might be whitespace before the close tag or part of the tag.
    buf: String,
    /// One newline right after the open tag is still to be dropped.
    strip_newline: bool,
    /// A block was opened (in the output, or by the prompt).
    block_seen: bool,
}

impl ReasoningParser {
    /// A parser for tags `open`/`close` (e.g. `"<think>"`, `"</think>"`). `started` is true when
    /// the prompt already ended inside the block (DeepSeek-R1 and Qwen3 templates whose
    /// generation prompt ends with `"<think>\n"`): the output is reasoning until `close`.
    pub fn new(open: &str, close: &str, started: bool) -> Self {
        Self {
            open: open.to_string(),
            close: close.to_string(),
            state: if started {
                State::Reasoning
            } else {
                State::Start
            },
            buf: String::new(),
            strip_newline: started,
            block_seen: started,
        }
    }

    /// Feeds the next piece of generated text and returns what can be released now. Partial
    /// tags and whitespace whose role is not known yet are held back.
    pub fn push(&mut self, delta: &str) -> Vec<ReasoningEvent> {
        let mut out = Vec::new();
        if self.state == State::Content {
            emit(&mut out, ReasoningEvent::Content(delta.to_string()));
            return out;
        }
        self.buf.push_str(delta);
        self.step(false, &mut out);
        out
    }

    /// End of output: releases everything still held.
    pub fn finish(&mut self) -> Vec<ReasoningEvent> {
        let mut out = Vec::new();
        self.step(true, &mut out);
        out
    }

    /// Whether a thinking block appeared (opened in the output, or by the prompt), even an
    /// empty one: tells "no reasoning" apart from "empty reasoning".
    pub fn block_seen(&self) -> bool {
        self.block_seen
    }

    fn step(&mut self, eof: bool, out: &mut Vec<ReasoningEvent>) {
        loop {
            match self.state {
                State::Start => {
                    let start = self.buf.trim_start();
                    if !self.open.is_empty() {
                        if let Some(rest) = start.strip_prefix(self.open.as_str()) {
                            self.buf = rest.to_string();
                            self.state = State::Reasoning;
                            self.strip_newline = true;
                            self.block_seen = true;
                            continue;
                        }
                        if !eof && self.open.starts_with(start) {
                            // Only whitespace or the beginning of the open tag: wait.
                            return;
                        }
                    }
                    self.state = State::Content;
                }
                State::Reasoning => {
                    if self.strip_newline {
                        if let Some(rest) = self
                            .buf
                            .strip_prefix('\n')
                            .or_else(|| self.buf.strip_prefix("\r\n"))
                        {
                            self.buf = rest.to_string();
                        } else if !eof && (self.buf.is_empty() || self.buf == "\r") {
                            return;
                        }
                        self.strip_newline = false;
                    }
                    let found = if self.close.is_empty() {
                        None
                    } else {
                        self.buf.find(self.close.as_str())
                    };
                    if let Some(pos) = found {
                        let reasoning = self.buf.get(..pos).unwrap_or_default().trim_end();
                        emit(out, ReasoningEvent::Reasoning(reasoning.to_string()));
                        let rest = self.buf.get(pos + self.close.len()..).unwrap_or_default();
                        self.buf = rest.to_string();
                        self.state = State::AfterClose;
                        continue;
                    }
                    if eof {
                        let reasoning = self.buf.trim_end().to_string();
                        emit(out, ReasoningEvent::Reasoning(reasoning));
                        self.buf.clear();
                        return;
                    }
                    let end = self.buf.len() - partial_suffix(&self.buf, &self.close);
                    let ready = self.buf.get(..end).unwrap_or_default().trim_end();
                    let ready_len = ready.len();
                    emit(out, ReasoningEvent::Reasoning(ready.to_string()));
                    self.buf = self.buf.get(ready_len..).unwrap_or_default().to_string();
                    return;
                }
                State::AfterClose => {
                    let rest = self.buf.trim_start();
                    if rest.is_empty() {
                        self.buf.clear();
                        return;
                    }
                    self.buf = rest.to_string();
                    self.state = State::Content;
                }
                State::Content => {
                    let text = std::mem::take(&mut self.buf);
                    emit(out, ReasoningEvent::Content(text));
                    return;
                }
            }
        }
    }
}

/// Adds an event, skipping empty text and merging with the previous event of the same kind.
fn emit(out: &mut Vec<ReasoningEvent>, event: ReasoningEvent) {
    match (out.last_mut(), event) {
        (_, ReasoningEvent::Reasoning(t) | ReasoningEvent::Content(t)) if t.is_empty() => {}
        (Some(ReasoningEvent::Reasoning(last)), ReasoningEvent::Reasoning(t)) => last.push_str(&t),
        (Some(ReasoningEvent::Content(last)), ReasoningEvent::Content(t)) => last.push_str(&t),
        (_, event) => out.push(event),
    }
}

/// Detects from a chat template's source whether the model writes thinking blocks: the tags if
/// the source mentions both `<think>` and `</think>`.
pub fn detect_reasoning_tags(template_source: &str) -> Option<(&'static str, &'static str)> {
    (template_source.contains("<think>") && template_source.contains("</think>"))
        .then_some(("<think>", "</think>"))
}

/// Whether the rendered prompt ends inside an open block: it ends with `open` followed by
/// optional whitespace (and that `open` is not the tail of a `close` tag).
pub fn prompt_opens_block(rendered_prompt: &str, open: &str, close: &str) -> bool {
    let end = rendered_prompt.trim_end();
    !open.is_empty()
        && end.ends_with(open)
        && !(close.ends_with(open) && !close.is_empty() && end.ends_with(close))
}

/// Splits a whole output: the reasoning (`None` when no block appeared, `Some("")` for an empty
/// one) and the content.
pub fn split_complete(
    open: &str,
    close: &str,
    started: bool,
    text: &str,
) -> (Option<String>, String) {
    let mut parser = ReasoningParser::new(open, close, started);
    let mut events = parser.push(text);
    events.extend(parser.finish());
    let mut reasoning = String::new();
    let mut content = String::new();
    for event in events {
        match event {
            ReasoningEvent::Reasoning(t) => reasoning.push_str(&t),
            ReasoningEvent::Content(t) => content.push_str(&t),
        }
    }
    (parser.block_seen().then_some(reasoning), content)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";

    fn run(open: &str, close: &str, started: bool, pieces: &[&str]) -> (Option<String>, String) {
        let mut parser = ReasoningParser::new(open, close, started);
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(parser.push(piece));
        }
        events.extend(parser.finish());
        let mut reasoning = String::new();
        let mut content = String::new();
        for event in events {
            match event {
                ReasoningEvent::Reasoning(t) => {
                    assert!(!t.is_empty(), "empty reasoning event");
                    reasoning.push_str(&t);
                }
                ReasoningEvent::Content(t) => {
                    assert!(!t.is_empty(), "empty content event");
                    content.push_str(&t);
                }
            }
        }
        (parser.block_seen().then_some(reasoning), content)
    }

    fn check_tags(
        open: &str,
        close: &str,
        started: bool,
        text: &str,
        reasoning: Option<&str>,
        content: &str,
    ) {
        let expected = (reasoning.map(str::to_string), content.to_string());
        assert_eq!(
            split_complete(open, close, started, text),
            expected,
            "{text:?}"
        );
        for pieces in crate::text::tool_calls::every_split(text) {
            assert_eq!(
                run(open, close, started, &pieces),
                expected,
                "pieces {pieces:?}"
            );
        }
    }

    fn check(started: bool, text: &str, reasoning: Option<&str>, content: &str) {
        check_tags(OPEN, CLOSE, started, text, reasoning, content);
    }

    #[test]
    fn block_then_answer() {
        check(
            false,
            "<think>\nLet me think about 2+2.\nIt is 4.\n</think>\n\nThe answer is 4.",
            Some("Let me think about 2+2.\nIt is 4."),
            "The answer is 4.",
        );
        check(
            false,
            "\n\n<think>\r\nx  \n y\t</think>y <think>z</think>\n",
            Some("x  \n y"),
            "y <think>z</think>\n",
        );
    }

    #[test]
    fn started_in_prompt() {
        check(
            true,
            "Okay, so the user wants...\n</think>\n\nHello!",
            Some("Okay, so the user wants..."),
            "Hello!",
        );
        check(true, "\nfoo</think>bar", Some("foo"), "bar");
        check(
            true,
            "Thinking forever and",
            Some("Thinking forever and"),
            "",
        );
        check(true, "", Some(""), "");
        check(true, "</think>", Some(""), "");
    }

    #[test]
    fn empty_blocks() {
        check(false, "<think></think>Answer", Some(""), "Answer");
        check(
            false,
            "<think>\n\n</think>\n\nHi there",
            Some(""),
            "Hi there",
        );
        check(false, "<think>\n\n</think>\n\n", Some(""), "");
    }

    #[test]
    fn no_block() {
        check(false, "Hello <think> world", None, "Hello <think> world");
        check(false, "  Hi", None, "  Hi");
        check(false, "<thi", None, "<thi");
        check(false, "<thinking>", None, "<thinking>");
        check(false, "  ", None, "  ");
        check(false, "", None, "");
        check(false, "</think>after", None, "</think>after");
    }

    #[test]
    fn unclosed_block_is_all_reasoning() {
        check(false, "<think>\nhmm, maybe  \n", Some("hmm, maybe"), "");
        check(false, "<think>abc</thi", Some("abc</thi"), "");
        check(false, "<think>", Some(""), "");
    }

    #[test]
    fn unicode_and_other_tags() {
        check(
            false,
            "<think>\n思考中 😀\n</think>答案 é",
            Some("思考中 😀"),
            "答案 é",
        );
        // Multi-byte tags (Kimi's style) exercise partial tags cut inside characters.
        check_tags(
            "◁think▷",
            "◁/think▷",
            false,
            "◁think▷推理◁/think▷\n回答◁",
            Some("推理"),
            "回答◁",
        );
    }

    #[test]
    fn streams_promptly() {
        let mut parser = ReasoningParser::new(OPEN, CLOSE, false);
        assert_eq!(parser.push("\n<th"), vec![]);
        assert_eq!(
            parser.push("ink>\nabc def"),
            vec![ReasoningEvent::Reasoning("abc def".into())]
        );
        assert_eq!(
            parser.push(" ghi \n</"),
            vec![ReasoningEvent::Reasoning(" ghi".into())]
        );
        assert_eq!(
            parser.push("think>\n\nThe"),
            vec![ReasoningEvent::Content("The".into())]
        );
        assert_eq!(
            parser.push(" end"),
            vec![ReasoningEvent::Content(" end".into())]
        );
        assert_eq!(parser.finish(), vec![]);
        assert!(parser.block_seen());
    }

    #[test]
    fn detection() {
        let qwen3 = "{%- if enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}";
        assert_eq!(detect_reasoning_tags(qwen3), Some((OPEN, CLOSE)));
        assert_eq!(detect_reasoning_tags("{{ message.content }}"), None);
        assert_eq!(detect_reasoning_tags("<think> only"), None);
        assert!(prompt_opens_block("<|Assistant|><think>\n", OPEN, CLOSE));
        assert!(prompt_opens_block(
            "<|im_start|>assistant\n<think>",
            OPEN,
            CLOSE
        ));
        assert!(!prompt_opens_block(
            "assistant\n<think>\n\n</think>\n\n",
            OPEN,
            CLOSE
        ));
        assert!(!prompt_opens_block("<|im_start|>assistant\n", OPEN, CLOSE));
        assert!(!prompt_opens_block("x", "", CLOSE));
    }

    #[test]
    fn arbitrary_text_never_panics_and_ignores_splits() {
        const PARTS: &[&str] = &[
            "<think>",
            "</think>",
            "<thi",
            "</th",
            "<",
            "/",
            ">",
            " ",
            "\n",
            "\r",
            "\r\n",
            "a",
            "é",
            "😀",
            "◁think▷",
            "◁/think▷",
            "◁",
        ];
        // A tiny xorshift generator, so the test needs no crate.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut below = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for round in 0..600 {
            let (open, close) = if round % 2 == 0 {
                (OPEN, CLOSE)
            } else {
                ("◁think▷", "◁/think▷")
            };
            let started = round % 3 == 0;
            let len = below(12);
            let text: String = (0..len).map(|_| PARTS[below(PARTS.len())]).collect();
            let whole = split_complete(open, close, started, &text);
            let cuts: Vec<usize> = (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            for _ in 0..8 {
                let mut points: Vec<usize> = (0..3).map(|_| cuts[below(cuts.len())]).collect();
                points.sort_unstable();
                let pieces = [
                    &text[..points[0]],
                    &text[points[0]..points[1]],
                    &text[points[1]..points[2]],
                    &text[points[2]..],
                ];
                assert_eq!(
                    run(open, close, started, &pieces),
                    whole,
                    "{text:?} {points:?}"
                );
            }
        }
    }
}
