//! The parser of the formats whose calls start at a marker inside otherwise plain content:
//! Hermes (`<tool_call>`) and Mistral (`[TOOL_CALLS]`). It separates content from units (the
//! text after a marker), drops the whitespace that sits next to a call, and asks the family's
//! module where a unit ends and whether it is a call ([`hermes::unit_step`],
//! [`mistral::unit_step`]).

use super::{hermes, is_blank, mistral, partial_suffix, take_front, Emitter, ParsedToolCall};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MarkedKind {
    Hermes,
    Mistral,
}

impl MarkedKind {
    fn marker(self) -> &'static str {
        match self {
            MarkedKind::Hermes => hermes::HERMES_OPEN,
            MarkedKind::Mistral => mistral::MISTRAL_MARKER,
        }
    }
}

/// How a unit (the text after a marker) stands.
pub(super) enum UnitStep {
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
pub(super) struct Marked {
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
    scan: hermes::BlockScan,
    /// Mistral: length of the unit text at the last unsuccessful parse.
    checked_len: usize,
}

impl Marked {
    pub(super) fn new(kind: MarkedKind) -> Self {
        Self {
            kind,
            buf: String::new(),
            in_unit: false,
            passthrough: false,
            seg_released: false,
            after_call: false,
            ws_before: String::new(),
            scan: hermes::BlockScan::default(),
            checked_len: 0,
        }
    }

    pub(super) fn push(&mut self, delta: &str, out: &mut Emitter) {
        if self.passthrough {
            out.content(delta);
            return;
        }
        self.buf.push_str(delta);
        self.step(false, out);
    }

    /// Releases whatever the text so far decides; with `eof`, releases everything.
    pub(super) fn step(&mut self, eof: bool, out: &mut Emitter) {
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
                    self.scan = hermes::BlockScan::default();
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

    /// Where the current unit stands, by its family's rule.
    fn unit_step(&mut self, eof: bool) -> UnitStep {
        match self.kind {
            MarkedKind::Hermes => hermes::unit_step(&self.buf, &mut self.scan, eof),
            MarkedKind::Mistral => mistral::unit_step(&self.buf, &mut self.checked_len, eof),
        }
    }
}
