//! One generation's own state, whatever runs its forwards: the sampler with its penalties and
//! seed, the stop conditions (end-of-sequence ids, stop strings, `max_tokens`), and the
//! streamed text. [`Session`](super::Session) drives one alone; the
//! [`Batcher`](super::batch::Batcher) drives many, each on its row of a batched step's logits.

use super::{FinishReason, GenerateOutput, GenerateParams};
use crate::error::{Error, Result};
use crate::models::ModelInfo;
use crate::text::sampling::Sampler;
use crate::text::stream::{StopMatcher, StreamDecoder};
use crate::text::ModelText;
use std::time::{Duration, Instant};

/// A token a generation picked, the text it completes, and whether the generation ends here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextToken {
    /// The token id.
    pub id: u32,
    /// The text it completes (may be empty: part of a character, a held-back prefix of a stop
    /// string, a special token).
    pub text: String,
    /// `Some` when this is the generation's last token: an end-of-sequence id or a stop
    /// string ([`FinishReason::Stop`]), or `max_tokens` ([`FinishReason::Length`]).
    pub end: Option<FinishReason>,
}

/// The state of one generation between its steps.
pub struct Generation {
    sampler: Sampler,
    detokenizer: StreamDecoder,
    stops: StopMatcher,
    stop_ids: Vec<u32>,
    max_tokens: usize,
    with_text: bool,
    text: String,
    token_ids: Vec<u32>,
    prompt_tokens: usize,
    started: Instant,
    first_token: Option<Duration>,
}

impl Generation {
    /// Checks the request against the model (parameters, context, stop strings without a
    /// tokenizer) and sets up its sampler and stop conditions. The clock for the time to the
    /// first token starts here.
    pub fn new(
        info: &ModelInfo,
        text: Option<&ModelText>,
        prompt: &[u32],
        params: &GenerateParams,
    ) -> Result<Self> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::InvalidParameter {
                param: "prompt".into(),
                message: "the prompt has no tokens".into(),
            });
        }
        // The same rule the pool applies with the configured cap; here against the model's
        // own context, for callers that drive the engine directly.
        crate::request::check_context(
            info.architecture,
            "prompt",
            Some(prompt.len()),
            Some(params.max_tokens),
            info.max_context,
        )?;
        if !params.stop.is_empty() && text.is_none() {
            return Err(Error::InvalidParameter {
                param: "stop".into(),
                message: "stop strings need a tokenizer, and this model has none".into(),
            });
        }
        let mut stop_ids = info.eos_token_ids.clone();
        if let Some(t) = text {
            stop_ids.extend_from_slice(&t.stop_token_ids);
        }
        stop_ids.extend_from_slice(&params.extra_stop_ids);
        Ok(Generation {
            sampler: Sampler::new(params.sampling.clone(), prompt),
            detokenizer: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            stop_ids,
            max_tokens: params.max_tokens,
            with_text: text.is_some(),
            text: String::new(),
            token_ids: Vec::with_capacity(params.max_tokens.min(4096)),
            prompt_tokens: prompt.len(),
            started: Instant::now(),
            first_token: None,
        })
    }

    /// Picks the next token from the last position's `logits` (changed in place by the
    /// penalties), and works out its text and whether it ends the generation.
    pub fn next_token(
        &mut self,
        logits: &mut [f32],
        text: Option<&ModelText>,
    ) -> Result<NextToken> {
        let next = self.sampler.sample(logits);
        self.sampler.accept(next);
        self.token_ids.push(next);
        self.first_token
            .get_or_insert_with(|| self.started.elapsed());
        let is_stop_id = self.stop_ids.contains(&next);
        let is_last = is_stop_id || self.token_ids.len() >= self.max_tokens;
        let mut delta = String::new();
        let mut stopped_by_string = false;
        if let Some(t) = text {
            // An end-of-sequence token adds no text. On the last token, release what was held
            // back (an incomplete character, text that might have begun a stop string).
            let mut piece = if is_stop_id {
                String::new()
            } else {
                self.detokenizer.push(&t.tokenizer, next)?
            };
            if is_last {
                piece.push_str(&self.detokenizer.finish(&t.tokenizer)?);
            }
            let step = self.stops.push(piece);
            delta = step.text;
            stopped_by_string = step.stopped;
            if is_last && !stopped_by_string {
                delta.push_str(&self.stops.finish());
            }
        }
        self.text.push_str(&delta);
        let end = if is_stop_id || stopped_by_string {
            Some(FinishReason::Stop)
        } else if is_last {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(NextToken {
            id: next,
            text: delta,
            end,
        })
    }

    /// The tokens generated so far.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// The result, ended for `reason`.
    pub fn finish(self, reason: FinishReason) -> GenerateOutput {
        let elapsed = self.started.elapsed();
        let prefill = self.first_token.unwrap_or(elapsed);
        GenerateOutput {
            token_ids: self.token_ids,
            text: self.with_text.then_some(self.text),
            finish_reason: reason,
            prompt_tokens: self.prompt_tokens,
            prefill,
            decode: elapsed.saturating_sub(prefill),
        }
    }
}
