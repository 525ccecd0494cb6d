//! Turning logits into the next token: temperature, top-k, top-p, min-p, repetition /
//! presence / frequency penalties, with a seeded generator for reproducible output.

use crate::error::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Sampling parameters. The defaults are greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax). Allowed: 0 to 2.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set whose probability reaches top_p. Allowed: (0, 1].
    pub top_p: f64,
    /// Drop tokens whose probability is below min_p times the most likely one's. Allowed: [0, 1].
    pub min_p: f64,
    /// Divides positive logits (multiplies negative ones) of tokens already seen; 1 = off.
    pub repetition_penalty: f64,
    /// Subtracted once from the logit of every token already generated. Allowed: -2 to 2.
    pub presence_penalty: f64,
    /// Subtracted per occurrence from the logit of tokens already generated. Allowed: -2 to 2.
    pub frequency_penalty: f64,
    /// Seed of the random generator; the same seed gives the same output.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every parameter against its allowed range.
    pub fn validate(&self) -> Result<()> {
        let bad = |param: &str, message: String| {
            Err(Error::InvalidParameter {
                param: param.into(),
                message,
            })
        };
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad(
                "temperature",
                format!("{} is outside [0, 2]", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is outside (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("{} is outside [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!("{} must be a positive number", self.repetition_penalty),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("{v} is outside [-2, 2]"));
            }
        }
        Ok(())
    }
}

/// A sampler for one generation. It keeps the counts of generated tokens for the penalties.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the prompt and output, for the repetition penalty.
    seen: HashMap<u32, u32>,
    /// Tokens generated so far, for presence and frequency penalties.
    generated: HashMap<u32, u32>,
    /// Scratch buffer of (token, logit) candidates, reused across steps.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler with the prompt's tokens already counted as seen.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let mut seen = HashMap::new();
        if params.repetition_penalty != 1.0 {
            for &t in prompt {
                *seen.entry(t).or_insert(0) += 1;
            }
        }
        Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            seen,
            generated: HashMap::new(),
            candidates: Vec::new(),
        }
    }

    /// Records a token as generated (for the penalties).
    pub fn accept(&mut self, token: u32) {
        if self.params.repetition_penalty != 1.0 {
            *self.seen.entry(token).or_insert(0) += 1;
        }
        // Counts only matter to the penalties; skip the map work when they are off.
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.generated.entry(token).or_insert(0) += 1;
        }
    }

    /// Picks the next token from last-position logits (modified in place by the penalties).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        self.pick(logits)
    }

    /// Picks a token from logits the penalties were already applied to (constrained decoding
    /// applies them once, then may pick twice: before and after masking).
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature as f32;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        // Sort by logit, descending; top-k, top-p and min-p all act on this order.
        let k = if p.top_k > 0 {
            p.top_k.min(self.candidates.len())
        } else {
            self.candidates.len()
        };
        if k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let max = self.candidates[0].1;
        let mut total = 0.0f32;
        for c in self.candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1;
        }
        // min-p: relative to the most likely token, whose weight is exp(0) = 1.
        if p.min_p > 0.0 {
            let floor = p.min_p as f32;
            let keep = self
                .candidates
                .iter()
                .take_while(|c| c.1 >= floor)
                .count()
                .max(1);
            self.candidates.truncate(keep);
            total = self.candidates.iter().map(|c| c.1).sum();
        }
        if p.top_p < 1.0 {
            let target = p.top_p as f32 * total;
            let mut acc = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                acc += c.1;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
            total = self.candidates.iter().map(|c| c.1).sum();
        }
        let mut r = self.rng.random::<f32>() * total;
        for c in &self.candidates {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        self.candidates[self.candidates.len() - 1].0
    }

    /// Applies the repetition, presence and frequency penalties to `logits` in place.
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty as f32;
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l >= 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty as f32 + p.frequency_penalty as f32 * n as f32;
                }
            }
        }
    }
}

/// The index of the largest logit (the first one on ties, as llama.cpp and transformers do).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}
