//! Log-probabilities of generated tokens, as OpenAI's `logprobs` report them: the chosen
//! token's and the most likely alternatives', from the model's own distribution (the raw
//! logits, before penalties, temperature and any grammar mask, as vLLM reports by default).

use super::token_bytes::TokenBytes;

/// The most alternatives a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One token with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    /// The token id.
    pub id: u32,
    /// The token's text (invalid UTF-8, part of a character, shows as U+FFFD).
    pub token: String,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// Natural log of its probability.
    pub logprob: f32,
}

/// The log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token that was generated.
    pub chosen: Logprob,
    /// The most likely tokens at that step, most likely first (as many as asked).
    pub top: Vec<Logprob>,
}

/// Computes the log-probabilities of `chosen` and the `top` most likely tokens from raw
/// `logits`.
pub fn token_logprobs(
    logits: &[f32],
    chosen: u32,
    top: usize,
    bytes: &TokenBytes,
) -> TokenLogprobs {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| (l - max).exp())
        .sum();
    let log_z = max + sum.ln();
    let entry = |id: u32| {
        let b = bytes.visible(id).to_vec();
        Logprob {
            id,
            token: String::from_utf8_lossy(&b).into_owned(),
            bytes: b,
            logprob: logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |&l| l - log_z),
        }
    };
    // The top alternatives in one pass: a small sorted list, most likely first (the first id
    // wins ties, as argmax does).
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == top && best.last().is_some_and(|&(_, worst)| l <= worst) {
                continue;
            }
            let at = best.partition_point(|&(_, v)| v >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        chosen: entry(chosen),
        top: best.into_iter().map(|(id, _)| entry(id)).collect(),
    }
}
