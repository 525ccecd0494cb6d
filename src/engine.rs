//! One generation over a loaded model: prefill, then the decode loop with sampling and stop
//! conditions. This and `models/` are the only places that touch tensors.

use crate::error::{Error, Result};
use crate::models::{LanguageModel, Model};
use crate::text::sampling::{Sampler, SamplingParams};
use std::time::{Duration, Instant};

/// What a generation is asked to do.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Extra token ids that end the generation, on top of the model's end-of-sequence set.
    pub extra_stop_ids: Vec<u32>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            extra_stop_ids: Vec::new(),
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (or a stop sequence) was produced.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Generated ids; an end-of-sequence token that stopped the generation is included.
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Time spent on the prompt (including the first token's logits).
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

/// Generates from `prompt` after resetting the model's cache. `on_token` sees each new token id
/// and returns `false` to stop (cancellation).
pub fn generate(
    model: &mut Model,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<GenerateOutput> {
    params.sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidParameter {
            param: "prompt".into(),
            message: "the prompt has no tokens".into(),
        });
    }
    if params.max_tokens == 0 {
        return Err(Error::InvalidParameter {
            param: "max_tokens".into(),
            message: "must be at least 1".into(),
        });
    }
    let context = model.info().max_context;
    if prompt.len() + params.max_tokens > context {
        return Err(Error::ContextLength {
            model: model.info().architecture.to_string(),
            needed: prompt.len() + params.max_tokens,
            context,
        });
    }
    let mut stop_ids = model.info().eos_token_ids.clone();
    stop_ids.extend_from_slice(&params.extra_stop_ids);

    model.reset_cache()?;
    let mut sampler = Sampler::new(params.sampling.clone(), prompt);
    let started = Instant::now();
    let mut logits = model.forward_ids(prompt, 0)?;
    let mut position = prompt.len();
    let mut prefill = Duration::ZERO;
    let mut token_ids = Vec::with_capacity(params.max_tokens);
    let finish_reason = loop {
        let next = sampler.sample(&mut logits);
        sampler.accept(next);
        token_ids.push(next);
        if token_ids.len() == 1 {
            prefill = started.elapsed();
        }
        if !on_token(next) {
            break FinishReason::Cancelled;
        }
        if stop_ids.contains(&next) {
            break FinishReason::Stop;
        }
        if token_ids.len() >= params.max_tokens {
            break FinishReason::Length;
        }
        logits = model.forward_ids(&[next], position)?;
        position += 1;
    };
    Ok(GenerateOutput {
        token_ids,
        finish_reason,
        prompt_tokens: prompt.len(),
        prefill,
        decode: started.elapsed().saturating_sub(prefill),
    })
}
