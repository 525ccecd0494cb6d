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

use serde_json::Value;

/// Opens a Hermes tool-call block.
const HERMES_OPEN: &str = "<tool_call>";
/// Closes a Hermes tool-call block.
const HERMES_CLOSE: &str = "</tool_call>";
/// Starts Mistral tool calls (a special token, present literally in the detokenized text).
const MISTRAL_MARKER: &str = "[TOOL_CALLS]";
/// Separates a Mistral v11+ call's name from its JSON arguments.
const MISTRAL_ARGS: &str = "[ARGS]";
/// Separates a Mistral call's name from its id, in the formats that carry one.
const MISTRAL_CALL_ID: &str = "[CALL_ID]";
/// Llama 3.1's marker for "the rest is a tool call".
const PYTHON_TAG: &str = "<|python_tag|>";

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

// ---------------------------------------------------------------------------------------------
// Hermes and Mistral: content, then units that each start with a marker
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkedKind {
    Hermes,
    Mistral,
}

impl MarkedKind {
    fn marker(self) -> &'static str {
        match self {
            MarkedKind::Hermes => HERMES_OPEN,
            MarkedKind::Mistral => MISTRAL_MARKER,
        }
    }
}

/// How a unit (the text after a marker) stands.
enum UnitStep {
    /// Cannot tell yet.
    NeedMore,
    /// Recognised calls, and how many bytes of the unit text they took.
    Calls(Vec<ParsedToolCall>, usize),
    /// The unit ends after this many bytes but is not a call: it is content, marker included.
    Invalid(usize),
    /// Not a call and its end cannot be found: the marker and everything after it is content.
    Broken,
}

/// Parser for the formats where calls start at a marker inside otherwise plain content.
///
/// Hermes units end at `</tool_call>` (or at the next `<tool_call>`, or at the end of output);
/// Mistral units end where their JSON ends.
#[derive(Debug)]
struct Marked {
    kind: MarkedKind,
    /// Unreleased text: content of the current segment, or the current unit after its marker.
    buf: String,
    /// Whether `buf` is a unit (after a marker) rather than content.
    in_unit: bool,
    /// After a Mistral unit that had no discoverable end: all the rest is content.
    passthrough: bool,
    /// The current content segment has already released non-whitespace text.
    seg_released: bool,
    /// The previous unit was a call, so a whitespace-only segment now is dropped.
    after_call: bool,
    /// A whitespace-only segment that sat before the current unit's marker; dropped if the unit
    /// is a call.
    ws_before: String,
    /// Hermes: where the search for the end of the block stands.
    scan: BlockScan,
    /// Mistral: length of the unit text at the last unsuccessful parse.
    checked_len: usize,
}

impl Marked {
    fn new(kind: MarkedKind) -> Self {
        Self {
            kind,
            buf: String::new(),
            in_unit: false,
            passthrough: false,
            seg_released: false,
            after_call: false,
            ws_before: String::new(),
            scan: BlockScan::default(),
            checked_len: 0,
        }
    }

    fn push(&mut self, delta: &str, out: &mut Emitter) {
        if self.passthrough {
            out.content(delta);
            return;
        }
        self.buf.push_str(delta);
        self.step(false, out);
    }

    /// Releases whatever the text so far decides; with `eof`, releases everything.
    fn step(&mut self, eof: bool, out: &mut Emitter) {
        let marker = self.kind.marker();
        loop {
            if self.passthrough {
                out.content(&self.buf);
                self.buf.clear();
                return;
            }
            if !self.in_unit {
                if let Some(pos) = self.buf.find(marker) {
                    let before = take_front(&mut self.buf, pos);
                    take_front(&mut self.buf, marker.len());
                    self.ws_before.clear();
                    if self.seg_released || !is_blank(&before) {
                        out.content(&before);
                    } else {
                        self.ws_before = before;
                    }
                    self.in_unit = true;
                    self.scan = BlockScan::default();
                    self.checked_len = 0;
                    continue;
                }
                self.release_content(eof, out);
                return;
            }
            match self.unit_step(eof) {
                UnitStep::NeedMore => return,
                UnitStep::Calls(calls, len) => {
                    take_front(&mut self.buf, len);
                    for call in calls {
                        out.call(call);
                    }
                    self.after_call = true;
                }
                UnitStep::Invalid(len) => {
                    let raw = take_front(&mut self.buf, len);
                    if !self.after_call {
                        out.content(&self.ws_before);
                    }
                    out.content(marker);
                    out.content(&raw);
                    self.after_call = false;
                }
                UnitStep::Broken => {
                    if !self.after_call {
                        out.content(&self.ws_before);
                    }
                    out.content(marker);
                    self.passthrough = true;
                    self.after_call = false;
                }
            }
            self.ws_before.clear();
            self.in_unit = false;
            self.seg_released = false;
        }
    }

    /// Releases content of a segment that holds no complete marker.
    fn release_content(&mut self, eof: bool, out: &mut Emitter) {
        if eof {
            // A whitespace-only segment after a call is the newline models write after it.
            if self.seg_released || !self.after_call || !is_blank(&self.buf) {
                out.content(&self.buf);
            }
            self.buf.clear();
            return;
        }
        let end = self.buf.len() - partial_suffix(&self.buf, self.kind.marker());
        let ready = self.buf.get(..end).unwrap_or_default();
        // While the segment is only whitespace it may still turn out to sit next to a call.
        if ready.is_empty() || (!self.seg_released && is_blank(ready)) {
            return;
        }
        out.content(ready);
        self.seg_released = true;
        take_front(&mut self.buf, end);
    }

    fn unit_step(&mut self, eof: bool) -> UnitStep {
        match self.kind {
            MarkedKind::Hermes => self.hermes_step(eof),
            MarkedKind::Mistral => self.mistral_step(eof),
        }
    }

    fn hermes_step(&mut self, eof: bool) -> UnitStep {
        if let Some((pos, tag_len)) = self.scan.scan(&self.buf) {
            let inner = self.buf.get(..pos).unwrap_or_default();
            return match parse_hermes_call(inner) {
                Some(call) => UnitStep::Calls(vec![call], pos + tag_len),
                None => UnitStep::Invalid(pos + tag_len),
            };
        }
        if !eof {
            return UnitStep::NeedMore;
        }
        // Models often stop at end of sequence before writing the closing tag, or mid-tag.
        let body = self.buf.trim_end();
        let partial = partial_suffix(body, HERMES_CLOSE).max(partial_suffix(body, HERMES_OPEN));
        let body = body.get(..body.len() - partial).unwrap_or_default();
        match parse_hermes_call(body) {
            Some(call) => UnitStep::Calls(vec![call], self.buf.len()),
            None => UnitStep::Invalid(self.buf.len()),
        }
    }

    fn mistral_step(&mut self, eof: bool) -> UnitStep {
        // A unit can only complete at a closing bracket, so skip reparsing the growing buffer
        // until one arrives: long arguments would otherwise be parsed once per token.
        let fresh = self.buf.get(self.checked_len..).unwrap_or(&self.buf);
        if !eof && !fresh.contains(['}', ']']) {
            return UnitStep::NeedMore;
        }
        let step = parse_mistral_unit(&self.buf);
        match step {
            UnitStep::NeedMore if eof => UnitStep::Broken,
            UnitStep::NeedMore => {
                self.checked_len = self.buf.len();
                UnitStep::NeedMore
            }
            other => other,
        }
    }
}

/// Parses the JSON inside a Hermes block into a call.
fn parse_hermes_call(inner: &str) -> Option<ParsedToolCall> {
    let value: Value = serde_json::from_str(inner).ok()?;
    call_from_value(&value)
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

/// Finds the end of a Hermes block incrementally.
///
/// Rule: the block ends at the first `</tool_call>` that is not inside a JSON string literal,
/// so arguments may mention the tag. A `<tool_call>` outside a string also ends it (without
/// being consumed), for models that open the next block without closing this one. String
/// literals are only tracked when the block starts with `{`: text that is not JSON has no
/// strings, and one stray quote in it must not hide the closing tag.
#[derive(Debug, Default)]
struct BlockScan {
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

// ---------------------------------------------------------------------------------------------
// Llama 3
// ---------------------------------------------------------------------------------------------

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
struct Llama3 {
    mode: Llama3Mode,
    buf: String,
}

impl Llama3 {
    fn push(&mut self, delta: &str, out: &mut Emitter) {
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

    fn finish(&mut self, out: &mut Emitter) {
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

// ---------------------------------------------------------------------------------------------
// Generic: the whole output is one JSON object
// ---------------------------------------------------------------------------------------------

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
/// rules are on [`ToolFormat::Generic`].
#[derive(Debug, Default)]
struct Generic {
    mode: GenericMode,
    raw: String,
    /// Byte offset in `raw` up to which the `response` string has been decoded and sent.
    resp_pos: usize,
    /// The decoded `response` text sent so far, once streaming started.
    streamed: Option<String>,
}

impl Generic {
    fn push(&mut self, delta: &str, out: &mut Emitter) {
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

    fn finish(&mut self, out: &mut Emitter) {
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

#[derive(Debug, PartialEq, Eq)]
enum StringEnd {
    /// The string goes on (or an escape is incomplete): more text is needed.
    Open,
    /// The closing quote was reached (and consumed).
    Closed,
    /// Something JSON does not allow in a string: decoding stops there.
    Invalid,
}

/// Decodes the start of a JSON string's content (after its opening quote): returns the decoded
/// text, how many bytes that took, and why it stopped. An incomplete escape at the end is not
/// consumed. As strict as serde_json (control characters, bad escapes and unpaired surrogates
/// are invalid), so whatever streams here is what parsing the whole output would give.
fn decode_string_prefix(s: &str) -> (String, usize, StringEnd) {
    let mut text = String::new();
    let mut i = 0;
    while let Some(c) = s.get(i..).and_then(|rest| rest.chars().next()) {
        match c {
            '"' => return (text, i + 1, StringEnd::Closed),
            '\\' => match decode_escape(s.get(i..).unwrap_or_default()) {
                Escape::Char(ch, len) => {
                    text.push(ch);
                    i += len;
                }
                Escape::Incomplete => return (text, i, StringEnd::Open),
                Escape::Invalid => return (text, i, StringEnd::Invalid),
            },
            c if (c as u32) < 0x20 => return (text, i, StringEnd::Invalid),
            c => {
                text.push(c);
                i += c.len_utf8();
            }
        }
    }
    (text, i, StringEnd::Open)
}

enum Escape {
    /// The character and the escape's length in bytes.
    Char(char, usize),
    Incomplete,
    Invalid,
}

/// Decodes the escape sequence `s` starts with (`s` starts with a backslash).
fn decode_escape(s: &str) -> Escape {
    let bytes = s.as_bytes();
    let simple = match bytes.get(1) {
        None => return Escape::Incomplete,
        Some(b'"') => '"',
        Some(b'\\') => '\\',
        Some(b'/') => '/',
        Some(b'b') => '\u{8}',
        Some(b'f') => '\u{c}',
        Some(b'n') => '\n',
        Some(b'r') => '\r',
        Some(b't') => '\t',
        Some(b'u') => return decode_unicode_escape(bytes),
        Some(_) => return Escape::Invalid,
    };
    Escape::Char(simple, 2)
}

/// Decodes `\uXXXX`, or a surrogate pair `\uD83D\uDE00`, at the start of `bytes`.
fn decode_unicode_escape(bytes: &[u8]) -> Escape {
    let high = match hex4(bytes, 2) {
        Hex::Value(n) => n,
        Hex::Incomplete => return Escape::Incomplete,
        Hex::Invalid => return Escape::Invalid,
    };
    if !(0xD800..=0xDFFF).contains(&high) {
        return match char::from_u32(high) {
            Some(c) => Escape::Char(c, 6),
            None => Escape::Invalid,
        };
    }
    if high >= 0xDC00 {
        return Escape::Invalid;
    }
    // A high surrogate must be followed by an escaped low one.
    for (at, expected) in [(6, b'\\'), (7, b'u')] {
        match bytes.get(at) {
            None => return Escape::Incomplete,
            Some(&b) if b == expected => {}
            Some(_) => return Escape::Invalid,
        }
    }
    let low = match hex4(bytes, 8) {
        Hex::Value(n) => n,
        Hex::Incomplete => return Escape::Incomplete,
        Hex::Invalid => return Escape::Invalid,
    };
    if !(0xDC00..=0xDFFF).contains(&low) {
        return Escape::Invalid;
    }
    match char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)) {
        Some(c) => Escape::Char(c, 12),
        None => Escape::Invalid,
    }
}

enum Hex {
    Value(u32),
    Incomplete,
    Invalid,
}

/// Reads four hex digits at `at`.
fn hex4(bytes: &[u8], at: usize) -> Hex {
    let mut n = 0;
    for k in at..at + 4 {
        let Some(&b) = bytes.get(k) else {
            return Hex::Incomplete;
        };
        let Some(digit) = (b as char).to_digit(16) else {
            return Hex::Invalid;
        };
        n = n * 16 + digit;
    }
    Hex::Value(n)
}

/// Every way the streaming tests feed a text: split once at each character boundary, one
/// character at a time, and (for texts short enough to keep this quick) split at every pair
/// of boundaries.
#[cfg(test)]
pub(crate) fn every_split(text: &str) -> Vec<Vec<&str>> {
    let cuts: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    let mut splits: Vec<Vec<&str>> = cuts.iter().map(|&i| vec![&text[..i], &text[i..]]).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A call, its arguments normalized the way the parser re-serializes them (so the tests do
    /// not depend on whether serde_json preserves key order).
    fn call(name: &str, args: &str, id: Option<&str>) -> ParsedToolCall {
        let value: Value = serde_json::from_str(args).expect("test arguments are JSON");
        ParsedToolCall {
            name: name.to_string(),
            arguments: serde_json::to_string(&value).expect("serializable"),
            id: id.map(str::to_string),
        }
    }

    /// Runs the pushes and returns (content, calls), checking the events on the way.
    fn run(format: ToolFormat, pieces: &[&str]) -> (String, Vec<ParsedToolCall>) {
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
    fn check(format: ToolFormat, text: &str, content: &str, calls: &[ParsedToolCall]) {
        let expected = (content.to_string(), calls.to_vec());
        assert_eq!(parse_complete(format, text), expected, "whole: {text:?}");
        check_splits(format, text, &expected);
    }

    fn check_splits(format: ToolFormat, text: &str, expected: &(String, Vec<ParsedToolCall>)) {
        for pieces in every_split(text) {
            assert_eq!(&run(format, &pieces), expected, "pieces {pieces:?}");
        }
    }

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
