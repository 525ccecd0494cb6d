//! One generation's own state, whatever runs its forwards: the sampler with its penalties and
//! seed, the grammar of a constrained output, the stop conditions (end-of-sequence ids, stop
//! strings, `max_tokens`), log-probabilities, and the streamed text split into answer,
//! reasoning and tool calls. [`Session`](super::Session) drives one alone; the
//! [`Batcher`](super::batch::Batcher) drives many, each on its row of a batched step's logits.

use super::{check_context, FinishReason, GenerateOutput, GenerateParams, TokenEvent};
use crate::error::{Error, Result};
use crate::models::ModelInfo;
use crate::text::constrain::Constraint;
use crate::text::logprobs::{token_logprobs, TokenLogprobs};
use crate::text::output::{OutputParser, ToolCall};
use crate::text::sampling::Sampler;
use crate::text::stream::{StopMatcher, StreamDecoder};
use crate::text::token_bytes::TokenBytes;
use crate::text::ModelText;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A token a generation picked, the text it completes, and whether the generation ends here.
#[derive(Debug, Clone, PartialEq)]
pub struct NextToken {
    /// The token id.
    pub id: u32,
    /// The answer text it completes (may be empty: part of a character, a held-back prefix of
    /// a stop string, a special token, text that went to reasoning or a tool call).
    pub text: String,
    /// The thinking-block text it completes.
    pub reasoning: String,
    /// The tool calls it completes.
    pub tool_calls: Vec<ToolCall>,
    /// Its log-probabilities, when asked for.
    pub logprobs: Option<TokenLogprobs>,
    /// `Some` when this is the generation's last token: an end-of-sequence id, a stop string
    /// or a complete grammar ([`FinishReason::Stop`], or [`FinishReason::ToolCalls`] after a
    /// tool call), or `max_tokens` ([`FinishReason::Length`]).
    pub end: Option<FinishReason>,
}

impl NextToken {
    /// The token as its client sees it.
    pub fn event(&self) -> TokenEvent<'_> {
        TokenEvent {
            id: self.id,
            text: &self.text,
            reasoning: &self.reasoning,
            tool_calls: &self.tool_calls,
            logprobs: self.logprobs.as_ref(),
        }
    }
}

/// A feature this model's vocabulary cannot serve (a tokenizer whose token bytes are not
/// known), as an error naming the request field that asked for it.
fn unsupported(param: &str, e: Error) -> Error {
    Error::InvalidParameter {
        param: param.into(),
        message: format!("not available for this model: {e}"),
    }
}

/// The state of one generation between its steps.
pub struct Generation {
    sampler: Sampler,
    detokenizer: StreamDecoder,
    stops: StopMatcher,
    stop_ids: Vec<u32>,
    /// Special tokens whose text the output parser needs (tool-call markers such as
    /// `[TOOL_CALLS]`), which decoding would otherwise skip.
    kept_specials: Vec<(u32, String)>,
    max_tokens: usize,
    with_text: bool,
    text: String,
    reasoning: Option<String>,
    tool_calls: Vec<ToolCall>,
    output: Option<OutputParser>,
    constraint: Option<Constraint>,
    /// `Some(n)` when logprobs are asked for, with the n most likely alternatives.
    top_logprobs: Option<usize>,
    token_bytes: Option<Arc<TokenBytes>>,
    logprobs: Vec<TokenLogprobs>,
    /// The raw logits of the current step, kept for logprobs (penalties and the mask change
    /// them in place).
    raw_logits: Vec<f32>,
    token_ids: Vec<u32>,
    prompt_tokens: usize,
    started: Instant,
    first_token: Option<Duration>,
}

/// A generation's whole input, checked against its model: the prompt's ids, its settings, its
/// grammar compiled, and the vocabulary's bytes when logprobs are asked for. The engine runs
/// only this, so what was checked once is not checked again: [`Prepared::new`] checks raw
/// settings for programs that drive a model themselves; `request::prepare` builds one from a
/// request it has checked (the pool's workers and the CLI).
pub struct Prepared {
    prompt: Vec<u32>,
    params: GenerateParams,
    constraint: Option<Constraint>,
    token_bytes: Option<Arc<TokenBytes>>,
}

impl Prepared {
    /// Checks `params` (every range, stop strings, the grammar's form) and the prompt against
    /// the model's own context, then compiles what the generation needs.
    pub fn new(
        info: &ModelInfo,
        text: Option<&ModelText>,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Self> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::InvalidParameter {
                param: "prompt".into(),
                message: "the prompt has no tokens".into(),
            });
        }
        check_context(
            info.architecture,
            "prompt",
            Some(prompt.len()),
            Some(params.max_tokens),
            info.max_context,
        )?;
        Self::checked(text, prompt, params)
    }

    /// Builds the input of settings already checked (by `request::prepare`): what only the
    /// model's text side can tell (a tokenizer for stop strings, grammars and logprobs) is
    /// checked here, and the grammar is compiled.
    pub(crate) fn checked(
        text: Option<&ModelText>,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Self> {
        let needs_tokenizer = |param: &str, what: &str| Error::InvalidParameter {
            param: param.into(),
            message: format!("{what} need a tokenizer, and this model has none"),
        };
        if !params.stop.is_empty() && text.is_none() {
            return Err(needs_tokenizer("stop", "stop strings"));
        }
        let constraint = match &params.grammar {
            None => None,
            Some(c) => {
                let t = text.ok_or_else(|| needs_tokenizer(&c.param, "constrained outputs"))?;
                let env = t.constraint_env().map_err(|e| unsupported(&c.param, e))?;
                Some(env.compile(&c.grammar, &c.param)?)
            }
        };
        let token_bytes = match params.logprobs {
            None => None,
            Some(_) => Some(
                text.ok_or_else(|| needs_tokenizer("logprobs", "logprobs"))?
                    .token_bytes()
                    .map_err(|e| unsupported("logprobs", e))?,
            ),
        };
        Ok(Prepared {
            prompt,
            params,
            constraint,
            token_bytes,
        })
    }

    /// The prompt's token ids.
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// The settings.
    pub fn params(&self) -> &GenerateParams {
        &self.params
    }
}

impl Generation {
    /// Sets up a generation's sampler and stop conditions from its checked input, and hands
    /// back the prompt's ids. The clock for the time to the first token starts here.
    pub fn new(info: &ModelInfo, text: Option<&ModelText>, prepared: Prepared) -> (Self, Vec<u32>) {
        let Prepared {
            prompt,
            params,
            constraint,
            token_bytes,
        } = prepared;
        let mut stop_ids = info.eos_token_ids.clone();
        let mut kept_specials = Vec::new();
        if let Some(t) = text {
            stop_ids.extend_from_slice(&t.stop_token_ids);
            if params.output.tools.is_some() {
                for marker in crate::text::output::KEPT_SPECIAL_TOKENS {
                    if let Some(id) = t.tokenizer.token_to_id(marker) {
                        kept_specials.push((id, marker.to_string()));
                    }
                }
            }
        }
        stop_ids.extend_from_slice(&params.extra_stop_ids);
        let output = (!params.output.is_plain() && text.is_some())
            .then(|| OutputParser::new(&params.output));
        let generation = Generation {
            sampler: Sampler::new(params.sampling, &prompt),
            detokenizer: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            stop_ids,
            kept_specials,
            max_tokens: params.max_tokens,
            with_text: text.is_some(),
            text: String::new(),
            reasoning: None,
            tool_calls: Vec::new(),
            output,
            constraint,
            top_logprobs: params.logprobs,
            token_bytes,
            logprobs: Vec::new(),
            raw_logits: Vec::new(),
            token_ids: Vec::with_capacity(params.max_tokens.min(4096)),
            prompt_tokens: prompt.len(),
            started: Instant::now(),
            first_token: None,
        };
        (generation, prompt)
    }

    /// Picks the next token from the last position's `logits` (changed in place by the
    /// penalties and the grammar's mask), and works out its text and whether it ends the
    /// generation.
    pub fn next_token(
        &mut self,
        logits: &mut [f32],
        text: Option<&ModelText>,
    ) -> Result<NextToken> {
        if self.top_logprobs.is_some() {
            self.raw_logits.clear();
            self.raw_logits.extend_from_slice(logits);
        }
        self.sampler.apply_penalties(logits);
        let mut next = self.sampler.pick(logits);
        let mut grammar_complete = false;
        if let Some(constraint) = &mut self.constraint {
            // Check the model's own pick first; mask and pick again only when the grammar
            // refuses it (see `text::constrain`).
            if !constraint.allows(next) {
                if constraint.mask(logits)? == 0 {
                    return Err(Error::Constraint(
                        "the grammar allows no token at this point".into(),
                    ));
                }
                next = self.sampler.pick(logits);
            }
        }
        let is_stop_id = self.stop_ids.contains(&next);
        if let (Some(constraint), false) = (&mut self.constraint, is_stop_id) {
            constraint.accept(next)?;
            // A complete grammar allows only the end: stop now rather than spend a forward on
            // the end-of-sequence token.
            grammar_complete = constraint.is_finished();
        }
        self.sampler.accept(next);
        self.token_ids.push(next);
        self.first_token
            .get_or_insert_with(|| self.started.elapsed());
        let logprobs = match (self.top_logprobs, &self.token_bytes) {
            (Some(top), Some(bytes)) if !is_stop_id => {
                let lp = token_logprobs(&self.raw_logits, next, top, bytes);
                self.logprobs.push(lp.clone());
                Some(lp)
            }
            _ => None,
        };
        let is_last = is_stop_id || grammar_complete || self.token_ids.len() >= self.max_tokens;
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
            if let Some((_, marker)) = self.kept_specials.iter().find(|(id, _)| *id == next) {
                piece.push_str(marker);
            }
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
        let ends = is_last || stopped_by_string;
        let mut reasoning = String::new();
        let mut tool_calls = Vec::new();
        if let Some(parser) = &mut self.output {
            let split = parser.push(&delta, ends);
            delta = split.content;
            reasoning = split.reasoning;
            tool_calls = split.tool_calls;
            if !reasoning.is_empty() {
                self.reasoning
                    .get_or_insert_with(String::new)
                    .push_str(&reasoning);
            }
            self.tool_calls.extend(tool_calls.iter().cloned());
        }
        self.text.push_str(&delta);
        let end = if is_stop_id || stopped_by_string || grammar_complete {
            Some(if self.tool_calls.is_empty() {
                FinishReason::Stop
            } else {
                FinishReason::ToolCalls
            })
        } else if is_last {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(NextToken {
            id: next,
            text: delta,
            reasoning,
            tool_calls,
            logprobs,
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
            reasoning: self.reasoning,
            tool_calls: self.tool_calls,
            logprobs: self.logprobs,
            finish_reason: reason,
            prompt_tokens: self.prompt_tokens,
            prefill,
            decode: elapsed.saturating_sub(prefill),
        }
    }
}
