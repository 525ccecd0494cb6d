//! The bytes each token id stands for: what constrained decoding matches grammars against and
//! what logprobs report as a token's `bytes`.
//!
//! A tokenizer's vocabulary stores tokens in its own encoding, not as bytes:
//! - byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) maps every byte to a printable character
//!   (GPT-2's byte-to-unicode table), so `Ġworld` is ` world`;
//! - SentencePiece (Llama 2, Gemma) writes a space as `▁` and keeps bytes it cannot spell as
//!   byte-fallback tokens `<0xE2>`.
//!
//! Decoding one token at a time does not give the bytes either: a byte-fallback token alone
//! decodes to U+FFFD, and SentencePiece decoders drop a leading space. So the table is built
//! from the vocabulary itself, once per model.
//!
//! Special (control) tokens get llguidance's marker byte `0xFF` in front: no text a grammar
//! matches can spell them, and a grammar names them explicitly when it wants one.

use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use tokenizers::Tokenizer;

/// llguidance's marker that starts the bytes of a special token (never valid UTF-8).
pub const SPECIAL_MARKER: u8 = 0xFF;

/// How a vocabulary spells bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabEncoding {
    /// GPT-2's byte-to-unicode table.
    ByteLevel,
    /// SentencePiece: `▁` for a space, `<0xHH>` byte-fallback tokens.
    SentencePiece,
}

/// The bytes of every token id, padded with empty entries to the model's logits width.
#[derive(Debug, Clone)]
pub struct TokenBytes {
    /// Bytes per id; empty for ids the tokenizer does not have (padding rows of the output
    /// layer), which a grammar can never choose.
    pub bytes: Vec<Vec<u8>>,
    /// The vocabulary's encoding.
    pub encoding: VocabEncoding,
}

impl TokenBytes {
    /// Builds the table for `tokenizer`, `width` ids long (the model's vocabulary size, which
    /// may exceed the tokenizer's).
    pub fn new(tokenizer: &Tokenizer, width: usize) -> Result<Self> {
        let decoder = serde_json::to_value(tokenizer.get_decoder())
            .map_err(|e| Error::Tokenizer(format!("reading the tokenizer's decoder: {e}")))?;
        let encoding = if mentions(&decoder, "ByteLevel") {
            VocabEncoding::ByteLevel
        } else if mentions(&decoder, "ByteFallback") || mentions(&decoder, "Metaspace") {
            VocabEncoding::SentencePiece
        } else {
            return Err(Error::Tokenizer(format!(
                "the tokenizer's decoder ({}) is neither byte-level BPE nor SentencePiece; token bytes (for response_format, tools and logprobs) are known only for those two",
                decoder.get("type").and_then(Value::as_str).unwrap_or("none")
            )));
        };
        let byte_of_char = gpt2_char_to_byte();
        let added = tokenizer.get_added_tokens_decoder();
        let size = tokenizer.get_vocab_size(true);
        let mut bytes = vec![Vec::new(); width.max(size)];
        for (id, entry) in bytes.iter_mut().enumerate().take(size) {
            let id = id as u32;
            if let Some(token) = added.get(&id) {
                let mut b = Vec::with_capacity(token.content.len() + 1);
                if token.special {
                    b.push(SPECIAL_MARKER);
                }
                b.extend_from_slice(token.content.as_bytes());
                *entry = b;
                continue;
            }
            let Some(piece) = tokenizer.id_to_token(id) else {
                continue;
            };
            *entry = match encoding {
                VocabEncoding::ByteLevel => {
                    // A piece outside the table (a malformed vocabulary) keeps its UTF-8: it
                    // can still be matched as text, and nothing panics.
                    let mapped: Option<Vec<u8>> = piece
                        .chars()
                        .map(|c| byte_of_char.get(&c).copied())
                        .collect();
                    mapped.unwrap_or_else(|| piece.as_bytes().to_vec())
                }
                VocabEncoding::SentencePiece => match byte_fallback(&piece) {
                    Some(b) => vec![b],
                    None => piece.replace('\u{2581}', " ").into_bytes(),
                },
            };
        }
        bytes.truncate(width);
        Ok(TokenBytes { bytes, encoding })
    }

    /// The bytes of `id` without the special-token marker (what logprobs report).
    pub fn visible(&self, id: u32) -> &[u8] {
        match self.bytes.get(id as usize) {
            Some(b) if b.first() == Some(&SPECIAL_MARKER) => &b[1..],
            Some(b) => b,
            None => &[],
        }
    }
}

/// Whether a decoder's JSON names `kind` anywhere (a `Sequence` nests its decoders).
fn mentions(decoder: &Value, kind: &str) -> bool {
    match decoder {
        Value::Object(map) => {
            map.get("type").and_then(Value::as_str) == Some(kind)
                || map.values().any(|v| mentions(v, kind))
        }
        Value::Array(items) => items.iter().any(|v| mentions(v, kind)),
        _ => false,
    }
}

/// `<0xHH>`, SentencePiece's byte-fallback tokens.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte-to-unicode table, inverted: printable bytes map to themselves, the others to
/// U+0100 onwards, in byte order.
fn gpt2_char_to_byte() -> HashMap<char, u8> {
    let printable =
        |b: u8| matches!(b, b'!'..=b'~') || matches!(b, 0xA1..=0xAC) || matches!(b, 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_table_is_a_bijection() {
        let map = gpt2_char_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'\u{120}'], b' ');
        assert_eq!(map[&'\u{10A}'], b'\n');
        assert_eq!(map[&'A'], b'A');
    }

    #[test]
    fn byte_fallback_pieces() {
        assert_eq!(byte_fallback("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_fallback("<0xE2>"), Some(0xE2));
        assert_eq!(byte_fallback("<0x>"), None);
        assert_eq!(byte_fallback("<0xZZ>"), None);
        assert_eq!(byte_fallback("hello"), None);
    }
}
