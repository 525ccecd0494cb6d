//! Streaming output: incremental detokenization that never splits a multi-byte character, and
//! stop strings matched across token boundaries and never included in the output.

use crate::error::{Error, Result};
use tokenizers::Tokenizer;

/// Turns a growing list of token ids into text deltas.
///
/// Decoding one token at a time breaks characters whose bytes span tokens (emoji, CJK with
/// byte-fallback vocabularies) and loses the spaces some decoders add between tokens. Instead,
/// a window starting a few tokens back is decoded and only the text past the previous window
/// is emitted, once it no longer ends in an incomplete character (U+FFFD).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// A decoder with no tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token and returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(tokenizer, &self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// The text still held back at the end of the generation, without an incomplete trailing
    /// character.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(tokenizer, &self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        let rest = full.get(prefix.len()..).unwrap_or("");
        Ok(rest.trim_end_matches('\u{FFFD}').to_string())
    }
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .decode(ids, true)
        .map_err(|e| Error::Tokenizer(format!("decoding: {e}")))
}

/// Holds back text that could be the start of a stop string, and cuts the output at the first
/// stop string found.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What the matcher lets through for one delta.
#[derive(Debug, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is safe to emit.
    pub text: String,
    /// A stop string was found: the generation ends, and `text` stops just before it.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for the given stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feeds a text delta. Without stop strings the delta passes through as it is (no copy: this
    /// runs once per generated token).
    pub fn push(&mut self, delta: String) -> StopStep {
        if self.stops.is_empty() {
            return StopStep {
                text: delta,
                stopped: false,
            };
        }
        self.pending.push_str(&delta);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return StopStep {
                text,
                stopped: true,
            };
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let mut keep_from = self.pending.len();
        for (i, _) in self.pending.char_indices() {
            let tail = &self.pending[i..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = i;
                break;
            }
        }
        let text = self.pending[..keep_from].to_string();
        self.pending.drain(..keep_from);
        StopStep {
            text,
            stopped: false,
        }
    }

    /// The held-back text when the generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for d in deltas {
            let step = m.push(d.to_string());
            out.push_str(&step.text);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_across_deltas_is_cut_and_not_emitted() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        assert_eq!(run(&["END"], &["x EN", "Y z"]), ("x ENY z".into(), false));
        assert_eq!(run(&["END"], &["x EN"]), ("x EN".into(), false));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn multibyte_text_is_never_split() {
        assert_eq!(run(&["é!"], &["caf", "é", "s"]), ("cafés".into(), false));
    }
}
