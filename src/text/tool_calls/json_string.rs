//! Decoding a JSON string's content as it streams in: as strict as serde_json, so that what the
//! generic format streams is what parsing the whole output gives.

#[derive(Debug, PartialEq, Eq)]
pub(super) enum StringEnd {
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
pub(super) fn decode_string_prefix(s: &str) -> (String, usize, StringEnd) {
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
