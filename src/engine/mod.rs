//! Generation over a loaded model: prefill, then decode steps with sampling, stop conditions
//! and streaming text. This and `models/` are the only places that touch tensors.
//!
//! - [`generate`] and [`Session`]: one sequence at a time over a model's first slot (the CLI,
//!   tests, and programs that drive a [`Model`] themselves);
//! - [`batch::Batcher`]: continuous batching, every running sequence advanced by one batched
//!   forward per step (the pool's workers);
//! - [`sequence::Generation`]: what both share, the state of one generation between steps.

pub mod batch;
pub mod sequence;

use crate::error::{Error, Result};
use crate::models::{LanguageModel, Model};
pub use crate::text::constrain::Constrained;
use crate::text::logprobs::{TokenLogprobs, MAX_TOP_LOGPROBS};
use crate::text::output::{OutputFormat, ToolCall};
use crate::text::sampling::SamplingParams;
use crate::text::ModelText;
use sequence::Generation;
pub use sequence::Prepared;
use std::time::Duration;

/// The most stop strings one request may give (OpenAI allows 4; llama.cpp more).
pub const MAX_STOP_STRINGS: usize = 16;

/// What a generation is asked to do.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Strings that end the generation; they are never part of the output.
    pub stop: Vec<String>,
    /// Extra token ids that end the generation, on top of the model's stop set.
    pub extra_stop_ids: Vec<u32>,
    /// A grammar the output must follow (structured outputs, forced tool calls).
    pub grammar: Option<Constrained>,
    /// `Some(n)`: report each generated token's log-probability and the `n` most likely
    /// alternatives (0 to [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// How to split the text into answer, reasoning and tool calls.
    pub output: OutputFormat,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            extra_stop_ids: Vec::new(),
            grammar: None,
            logprobs: None,
            output: OutputFormat::default(),
        }
    }
}

impl GenerateParams {
    /// Checks the parameters that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_tokens == 0 {
            return Err(Error::InvalidParameter {
                param: "max_tokens".into(),
                message: "max_tokens must be at least 1".into(),
            });
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::InvalidParameter {
                param: "stop".into(),
                message: format!(
                    "{} stop sequences given; at most {MAX_STOP_STRINGS} are allowed",
                    self.stop.len()
                ),
            });
        }
        if let Some(n) = self.logprobs {
            if n > MAX_TOP_LOGPROBS {
                return Err(Error::InvalidParameter {
                    param: "top_logprobs".into(),
                    message: format!("{n} is outside [0, {MAX_TOP_LOGPROBS}]"),
                });
            }
        }
        if let Some(c) = &self.grammar {
            c.grammar.check(&c.param)?;
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidParameter {
                param: "stop".into(),
                message: "a stop sequence must not be empty".into(),
            });
        }
        Ok(())
    }
}

/// The one context rule. A request fits when at least one prompt token and `max_tokens` new
/// ones fit in `context`:
/// - `max_tokens` alone that leaves no room for a prompt names `max_tokens` (the same error
///   whether or not the prompt is known yet);
/// - a prompt that leaves no room for one new token, or for `max_tokens` of them, names the
///   prompt's parameter (`prompt` or `messages`).
///
/// `prompt_tokens` is `None` before tokenization; `max_tokens` is `None` when it will be
/// defaulted to what fits.
pub fn check_context(
    model: &str,
    prompt_param: &'static str,
    prompt_tokens: Option<usize>,
    max_tokens: Option<usize>,
    context: usize,
) -> Result<()> {
    let error = |param: &'static str| Error::ContextLength {
        model: model.to_string(),
        param,
        prompt_tokens,
        max_tokens,
        context,
    };
    if let Some(m) = max_tokens {
        if m >= context {
            return Err(error("max_tokens"));
        }
    }
    if let Some(p) = prompt_tokens {
        if p.saturating_add(max_tokens.unwrap_or(1)) > context {
            return Err(error(prompt_param));
        }
    }
    Ok(())
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string was produced.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The model called tools (and ended its turn).
    ToolCalls,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// One generated token, as streamed.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent<'a> {
    /// The token id.
    pub id: u32,
    /// The answer text this token completes (may be empty: part of a character, a held-back
    /// prefix of a stop string, a special token, or text that went to `reasoning` or a tool
    /// call).
    pub text: &'a str,
    /// Thinking-block text this token completes (when the request splits reasoning off).
    pub reasoning: &'a str,
    /// Tool calls this token completes.
    pub tool_calls: &'a [ToolCall],
    /// The token's log-probabilities, when the request asked for them.
    pub logprobs: Option<&'a TokenLogprobs>,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Generated ids, including an end-of-sequence token that stopped the generation.
    pub token_ids: Vec<u32>,
    /// The generated text (when there is a tokenizer): exactly the streamed deltas joined,
    /// without special tokens and cut before any stop string.
    pub text: Option<String>,
    /// The thinking block's text, when the request split reasoning off and the model wrote
    /// one.
    pub reasoning: Option<String>,
    /// The tool calls the model made.
    pub tool_calls: Vec<ToolCall>,
    /// Per generated token (an end-of-sequence token excepted), when asked for.
    pub logprobs: Vec<TokenLogprobs>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Time to the first token (the prompt's prefill plus one sampling step).
    pub prefill: Duration,
    /// Time spent on the decode steps after the first token.
    pub decode: Duration,
}

impl GenerateOutput {
    /// Number of generated tokens.
    pub fn completion_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// Generates from `prompt` after resetting the model's cache.
///
/// `text` (the model's tokenizer and stop set) is needed for text output and stop strings.
/// `on_token` sees each token with its text delta and returns `false` to cancel.
/// The settings are checked against the model ([`Prepared::new`]); [`run`] takes input checked
/// already.
pub fn generate(
    model: &mut Model,
    text: Option<&ModelText>,
    prompt: &[u32],
    params: &GenerateParams,
    on_token: impl FnMut(TokenEvent<'_>) -> bool,
) -> Result<GenerateOutput> {
    let prepared = Prepared::new(model.info(), text, prompt.to_vec(), params.clone())?;
    run(model, text, prepared, on_token)
}

/// Generates from a checked input (from `request::prepare`, say) after resetting the model's
/// cache.
pub fn run(
    model: &mut Model,
    text: Option<&ModelText>,
    prepared: Prepared,
    on_token: impl FnMut(TokenEvent<'_>) -> bool,
) -> Result<GenerateOutput> {
    let mut session = Session::new(model);
    session.policy = CachePolicy::AlwaysReset;
    session.generate(text, prepared, on_token)
}

/// Whether a session may keep its KV cache between generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// Reset before every generation.
    AlwaysReset,
    /// Reuse the cache when the new prompt starts with exactly the tokens it holds (multi-turn
    /// chat); reset otherwise.
    ReusePrefix,
}

/// How a generation used the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// The cache was reset first, for this reason (`policy`, `new_prompt`).
    Reset(&'static str),
    /// This many prompt tokens were already in the cache and were not computed again.
    PrefixHit(usize),
}

/// A model plus the token sequence its KV cache holds: the unit a worker owns.
pub struct Session<'m> {
    model: &'m mut Model,
    /// Exactly the tokens whose keys and values are in the model's cache.
    cached: Vec<u32>,
    /// Whether the cache may be reused between generations.
    pub policy: CachePolicy,
    /// What the last generation did with the cache.
    pub last_cache_use: Option<CacheUse>,
    /// Set when a failed generation could not reset the cache: the model must be reloaded.
    poisoned: bool,
}

impl<'m> Session<'m> {
    /// A session over a model whose cache is treated as unknown (it is reset before first use).
    pub fn new(model: &'m mut Model) -> Self {
        Session {
            model,
            cached: Vec::new(),
            policy: CachePolicy::ReusePrefix,
            last_cache_use: None,
            poisoned: false,
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        self.model
    }

    /// True when the model's state is unknown after a failure and it must be reloaded.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Tokens currently in the cache.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// Resets the model's cache.
    pub fn reset(&mut self) -> Result<()> {
        self.cached.clear();
        self.model.reset_cache()
    }

    /// Generates from a checked input, reusing the cache where the policy and the prompt
    /// allow.
    pub fn generate(
        &mut self,
        text: Option<&ModelText>,
        prepared: Prepared,
        on_token: impl FnMut(TokenEvent<'_>) -> bool,
    ) -> Result<GenerateOutput> {
        // Whatever happens below, the cache contents are only known again on success.
        let previous = std::mem::take(&mut self.cached);
        let result = self.generate_inner(&previous, text, prepared, on_token);
        if result.is_err() {
            // A failed forward can leave partial state; the next request starts clean, or, if
            // even the reset fails, the session is poisoned and its owner must reload.
            self.poisoned = self.model.reset_cache().is_err();
        }
        result
    }

    fn generate_inner(
        &mut self,
        previous: &[u32],
        text: Option<&ModelText>,
        prepared: Prepared,
        mut on_token: impl FnMut(TokenEvent<'_>) -> bool,
    ) -> Result<GenerateOutput> {
        let model = &mut *self.model;
        let (mut generation, prompt) = Generation::new(model.info(), text, prepared);
        let prompt = prompt.as_slice();
        // Reuse the cache only when it holds a proper prefix of the prompt and the model's own
        // count agrees: at least one new token is needed to get logits.
        let reuse = match self.policy {
            CachePolicy::ReusePrefix
                if !previous.is_empty()
                    && previous.len() < prompt.len()
                    && prompt.starts_with(previous)
                    && model.cached_tokens() == previous.len() =>
            {
                previous.len()
            }
            _ => 0,
        };
        if reuse == 0 {
            model.reset_cache()?;
        }
        self.last_cache_use = Some(if reuse > 0 {
            CacheUse::PrefixHit(reuse)
        } else if self.policy == CachePolicy::AlwaysReset {
            CacheUse::Reset("policy")
        } else {
            CacheUse::Reset("new_prompt")
        });
        let mut logits = Vec::with_capacity(model.info().vocab_size);
        model.forward_ids_into(&prompt[reuse..], reuse, &mut logits)?;
        let mut position = prompt.len();
        let finish_reason = loop {
            let next = generation.next_token(&mut logits, text)?;
            if !on_token(next.event()) {
                break FinishReason::Cancelled;
            }
            if let Some(reason) = next.end {
                break reason;
            }
            model.forward_ids_into(&[next.id], position, &mut logits)?;
            position += 1;
        };
        // The cache now holds the prompt and every generated token but the last (never fed).
        if finish_reason != FinishReason::Cancelled {
            let generated = generation.token_ids();
            self.cached.reserve(position);
            self.cached.extend_from_slice(prompt);
            self.cached
                .extend_from_slice(&generated[..generated.len() - 1]);
            debug_assert_eq!(self.cached.len(), model.cached_tokens());
        }
        Ok(generation.finish(finish_reason))
    }
}
