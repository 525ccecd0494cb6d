//! Continuous batching: every running sequence of a model advances in one batched forward per
//! step.
//!
//! Each step, every running sequence contributes either its next token (decode) or the next
//! chunk of its prompt (chunked prefill: the prompt tokens of one step are capped at
//! `prefill_chunk`, so a long prompt never stalls the others' decoding for long). The model
//! runs them as one batch ([`Model::forward_batch_into`]): every linear layer is one matmul
//! over all the step's tokens, so a weight is read once for the whole batch, while each
//! sequence attends to its own KV cache at its own position. Each sequence then samples from
//! its own row of logits with its own parameters, streams its text and checks its stops.
//!
//! Sequences live in slots, one KV cache each. A slot keeps its tokens after its sequence
//! ends, and a new request takes the free slot whose tokens share the longest prefix with its
//! prompt (as llama-server's slots do), so a multi-turn chat recomputes only its new turn.
//!
//! Memory: a request reserves room for its whole prompt plus `max_tokens` in the model's KV
//! budget when it is admitted, so a running sequence never runs out of cache and nothing is
//! ever preempted. Idle slots' kept tokens count too, and are dropped (least recently used
//! first) when a new request needs the room. A request that does not fit waits in the queue.
//!
//! ```no_run
//! use llm_pool::engine::batch::{Admission, BatchSettings, Batcher, Client, Pending};
//! use llm_pool::engine::{CacheUse, GenerateOutput, GenerateParams, Prepared, TokenEvent};
//! use llm_pool::models::{LoadOptions, Model};
//!
//! /// Prints each sequence's tokens as they come.
//! struct Printer(usize);
//! impl Client for Printer {
//!     fn is_cancelled(&self) -> bool { false }
//!     fn on_token(&mut self, event: TokenEvent<'_>) -> bool {
//!         println!("sequence {}: token {}", self.0, event.id);
//!         true
//!     }
//!     fn on_done(self, result: llm_pool::Result<(GenerateOutput, CacheUse)>) {
//!         println!("sequence {} done: {:?}", self.0, result.map(|(o, _)| o.finish_reason));
//!     }
//! }
//!
//! let mut model = Model::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &LoadOptions::cpu())?;
//! let settings = BatchSettings { max_batch_size: 4, max_slots: 4, prefill_chunk: 256, kv_budget_tokens: 8192 };
//! let info = model.info().clone();
//! let mut batcher = Batcher::new(&mut model, None, settings)?;
//! for (i, prompt) in [vec![1, 4093, 198], vec![1, 22, 7]].into_iter().enumerate() {
//!     let params = GenerateParams { max_tokens: 8, ..GenerateParams::default() };
//!     let prepared = Prepared::new(&info, None, prompt, params)?;
//!     assert!(matches!(batcher.admit(Pending { prepared, client: Printer(i) }), Admission::Running));
//! }
//! while !batcher.is_empty() {
//!     batcher.step(); // both sequences advance in one batched forward
//! }
//! # Ok::<(), llm_pool::Error>(())
//! ```

use super::sequence::Generation;
use super::{CacheUse, FinishReason, GenerateOutput, Prepared, TokenEvent};
use crate::error::{Error, Result};
use crate::models::{Model, SequenceChunk};
use crate::text::ModelText;

/// How a model's worker batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// The most sequences running at once (one row each in a decode step).
    pub max_batch_size: usize,
    /// KV caches kept: at least `max_batch_size`; the extra ones keep the tokens of finished
    /// sequences for prefix reuse.
    pub max_slots: usize,
    /// The most prompt tokens one step computes, over all sequences in prefill.
    pub prefill_chunk: usize,
    /// The KV cache budget, in tokens over all slots.
    pub kv_budget_tokens: usize,
}

impl BatchSettings {
    /// Checks the settings: every value positive, and slots for the whole batch.
    pub fn validate(&self) -> Result<()> {
        if self.kv_budget_tokens == 0 {
            return Err(Error::InvalidParameter {
                param: "kv_cache_mb".into(),
                message:
                    "the KV budget holds not one token of this model's cache; raise kv_cache_mb"
                        .into(),
            });
        }
        let positive = [
            ("max_batch_size", self.max_batch_size),
            ("max_slots", self.max_slots),
            ("prefill_chunk", self.prefill_chunk),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::InvalidParameter {
                    param: name.into(),
                    message: format!("{name} must be at least 1"),
                });
            }
        }
        if self.max_slots < self.max_batch_size {
            return Err(Error::InvalidParameter {
                param: "max_slots".into(),
                message: format!(
                    "max_slots ({}) must be at least max_batch_size ({}): every running sequence needs a slot",
                    self.max_slots, self.max_batch_size
                ),
            });
        }
        Ok(())
    }
}

/// What a batched sequence reports to whoever asked for it (the pool's worker answers a
/// request through it).
pub trait Client {
    /// True when the caller went away: the sequence is cancelled before the next step.
    fn is_cancelled(&self) -> bool;

    /// A generated token and its text. Returns false to cancel the sequence.
    fn on_token(&mut self, event: TokenEvent<'_>) -> bool;

    /// The sequence ended: its output and how it used the cache, or the error that ended it.
    fn on_done(self, result: Result<(GenerateOutput, CacheUse)>);
}

/// A request ready to run: its checked input, and its client.
pub struct Pending<C> {
    /// The prompt's tokens and settings, checked against the model.
    pub prepared: Prepared,
    /// Who the sequence reports to.
    pub client: C,
}

/// The outcome of [`Batcher::admit`].
pub enum Admission<C> {
    /// The sequence runs from the next step.
    Running,
    /// No slot or not enough KV budget right now: the request is handed back to wait.
    Full(Box<Pending<C>>),
    /// The request can never run here (it alone exceeds the KV budget, or its parameters
    /// are invalid for this model): its client with the reason.
    Refused(C, Error),
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Sequences in the step's batch.
    pub sequences: usize,
    /// Tokens the step computed (prompt chunks and decoded tokens).
    pub tokens: usize,
    /// Sequences that ended in this step (finished, cancelled or failed).
    pub ended: usize,
}

/// A KV cache slot as the batcher tracks it.
#[derive(Debug, Default)]
struct Slot {
    /// Exactly the tokens in the slot's cache, in order.
    tokens: Vec<u32>,
    /// Whether a running sequence holds it.
    busy: bool,
    /// The step at which it was last used, for least-recently-used eviction.
    last_used: u64,
}

/// A sequence that is running.
struct Running<C> {
    slot: usize,
    prompt: Vec<u32>,
    /// Prompt tokens in the slot's cache so far.
    fed: usize,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
    generation: Generation,
    /// Tokens of KV budget reserved: prompt plus `max_tokens`.
    reserved: usize,
    cache: CacheUse,
    client: C,
}

/// The continuous-batching scheduler of one model: its slots, its running sequences, and the
/// step that advances them all.
pub struct Batcher<'m, C: Client> {
    model: &'m mut Model,
    text: Option<&'m ModelText>,
    settings: BatchSettings,
    slots: Vec<Slot>,
    running: Vec<Running<C>>,
    steps: u64,
    logits: Vec<f32>,
}

impl<'m, C: Client> Batcher<'m, C> {
    /// A batcher over `model`, which gets `settings.max_slots` slots.
    pub fn new(
        model: &'m mut Model,
        text: Option<&'m ModelText>,
        settings: BatchSettings,
    ) -> Result<Self> {
        settings.validate()?;
        model.set_slots(settings.max_slots)?;
        let slots = (0..settings.max_slots).map(|_| Slot::default()).collect();
        Ok(Batcher {
            model,
            text,
            settings,
            slots,
            running: Vec::with_capacity(settings.max_batch_size),
            steps: 0,
            logits: Vec::new(),
        })
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &BatchSettings {
        &self.settings
    }

    /// Sequences running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// True when nothing runs.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// True when another sequence could start now, budget permitting.
    pub fn has_room(&self) -> bool {
        self.running.len() < self.settings.max_batch_size
    }

    /// The KV budget in use, as a fraction: tokens in every slot's cache over the budget.
    pub fn kv_usage(&self) -> f64 {
        self.kv_used_tokens() as f64 / self.settings.kv_budget_tokens as f64
    }

    /// Tokens the slots hold in the KV cache (of `kv_budget_tokens`).
    pub fn kv_used_tokens(&self) -> usize {
        self.slots.iter().map(|s| s.tokens.len()).sum()
    }

    /// Starts a sequence in the free slot whose cached tokens share the longest prefix with
    /// its prompt, if a slot is free and its prompt plus `max_tokens` fit in the KV budget
    /// (dropping idle slots' kept tokens, least recently used first, to make room).
    pub fn admit(&mut self, pending: Pending<C>) -> Admission<C> {
        let prompt = pending.prepared.prompt();
        let need = prompt.len() + pending.prepared.params().max_tokens;
        let budget = self.settings.kv_budget_tokens;
        if need > budget {
            let error = Error::InvalidParameter {
                param: "max_tokens".into(),
                message: format!(
                    "the prompt ({} tokens) plus max_tokens ({}) need {need} tokens of KV cache, more than this model's whole KV budget of {budget} tokens (kv_cache_mb); lower max_tokens or shorten the prompt",
                    prompt.len(),
                    pending.prepared.params().max_tokens
                ),
            };
            return Admission::Refused(pending.client, error);
        }
        if !self.has_room() {
            return Admission::Full(Box::new(pending));
        }
        let Some(slot) = self.pick_slot(prompt) else {
            return Admission::Full(Box::new(pending));
        };
        if !self.make_room(slot, need) {
            return Admission::Full(Box::new(pending));
        }
        // A prompt must leave at least one token to compute, for the logits of its last.
        let shared = common_prefix(&self.slots[slot].tokens, prompt).min(prompt.len() - 1);
        let reuse = match shared {
            0 => 0,
            n => match self.model.truncate_slot(slot, n) {
                Ok(true) => n,
                // A cache that cannot be cut there (a sliding window moved past it, a stock
                // model) starts over; so does one whose cut failed.
                Ok(false) | Err(_) => 0,
            },
        };
        if reuse == 0 {
            // Whatever the slot held (even partial state after a failed step) goes.
            if let Err(e) = self.model.reset_slot(slot) {
                return Admission::Refused(pending.client, e);
            }
        }
        // Only once it can run: a request waiting for room is offered again after every step.
        let (generation, prompt) = Generation::new(self.model.info(), self.text, pending.prepared);
        let s = &mut self.slots[slot];
        s.tokens.truncate(reuse);
        s.busy = true;
        s.last_used = self.steps;
        let cache = match reuse {
            0 => CacheUse::Reset("new_prompt"),
            n => CacheUse::PrefixHit(n),
        };
        self.running.push(Running {
            slot,
            prompt,
            fed: reuse,
            next: None,
            generation,
            reserved: need,
            cache,
            client: pending.client,
        });
        Admission::Running
    }

    /// The free slot sharing the longest prefix with `prompt`; among equals, the least
    /// recently used.
    fn pick_slot(&self, prompt: &[u32]) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .max_by_key(|(_, s)| {
                (
                    common_prefix(&s.tokens, prompt),
                    std::cmp::Reverse(s.last_used),
                )
            })
            .map(|(i, _)| i)
    }

    /// Makes room for `need` tokens in `slot` under the KV budget by dropping other idle
    /// slots' kept tokens, least recently used first. False when even that is not enough.
    fn make_room(&mut self, slot: usize, need: usize) -> bool {
        let budget = self.settings.kv_budget_tokens;
        loop {
            let reserved: usize = self.running.iter().map(|r| r.reserved).sum();
            let kept: usize = self
                .slots
                .iter()
                .enumerate()
                .filter(|(i, s)| !s.busy && *i != slot)
                .map(|(_, s)| s.tokens.len())
                .sum();
            if reserved + kept + need <= budget {
                return true;
            }
            let victim = self
                .slots
                .iter()
                .enumerate()
                .filter(|(i, s)| !s.busy && *i != slot && !s.tokens.is_empty())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i);
            let Some(victim) = victim else {
                return false;
            };
            self.slots[victim].tokens = Vec::new();
            if self.model.reset_slot(victim).is_err() {
                // Its memory may still be held; the model resets the slot on its next use.
                tracing::warn!(slot = victim, "could not reset an evicted KV slot");
            }
        }
    }

    /// Runs one step: drops cancelled sequences, then advances every running sequence by
    /// one batched forward, sampling and streaming for those past their prompt. A model
    /// error ends the sequences of the batch with it (their slots start over); the others
    /// go on.
    pub fn step(&mut self) -> StepStats {
        self.steps += 1;
        let mut stats = StepStats::default();
        // Cancelled while waiting for this step.
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].client.is_cancelled() {
                self.end(i, Ok(FinishReason::Cancelled));
                stats.ended += 1;
            } else {
                i += 1;
            }
        }
        if self.running.is_empty() {
            return stats;
        }
        // Every decode, and prompt chunks in arrival order within the step's prefill budget.
        let mut prefill_left = self.settings.prefill_chunk;
        let mut members: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        for (i, r) in self.running.iter().enumerate() {
            let len = match r.next {
                Some(_) => 1,
                None => {
                    let n = (r.prompt.len() - r.fed).min(prefill_left);
                    prefill_left -= n;
                    n
                }
            };
            if len > 0 {
                members.push((i, len));
            }
        }
        let chunks: Vec<SequenceChunk<'_>> = members
            .iter()
            .map(|&(i, len)| {
                let r = &self.running[i];
                let tokens = match &r.next {
                    Some(next) => std::slice::from_ref(next),
                    None => &r.prompt[r.fed..r.fed + len],
                };
                SequenceChunk {
                    slot: r.slot,
                    tokens,
                    position: self.slots[r.slot].tokens.len(),
                }
            })
            .collect();
        stats.sequences = chunks.len();
        stats.tokens = members.iter().map(|&(_, len)| len).sum();
        let mut logits = std::mem::take(&mut self.logits);
        let result = self.model.forward_batch_into(&chunks, &mut logits);
        drop(chunks);
        if let Err(e) = result {
            // Every sequence of the batch ends with the error; their slots start over.
            for &(i, _) in members.iter().rev() {
                let slot = self.running[i].slot;
                self.slots[slot].tokens.clear();
                let _ = self.model.reset_slot(slot);
                self.end(i, Err(e.shared()));
                stats.ended += 1;
            }
            self.logits = logits;
            return stats;
        }
        let vocab = self.model.info().vocab_size;
        let mut ended = Vec::new();
        for (row, &(i, len)) in members.iter().enumerate() {
            let r = &mut self.running[i];
            let slot = &mut self.slots[r.slot];
            match r.next.take() {
                Some(token) => slot.tokens.push(token),
                None => {
                    slot.tokens.extend_from_slice(&r.prompt[r.fed..r.fed + len]);
                    r.fed += len;
                    if r.fed < r.prompt.len() {
                        continue;
                    }
                }
            }
            slot.last_used = self.steps;
            let row_logits = &mut logits[row * vocab..(row + 1) * vocab];
            let outcome = match r.generation.next_token(row_logits, self.text) {
                Err(e) => Some(Err(e)),
                Ok(next) => {
                    let go_on = r.client.on_token(next.event());
                    match (go_on, next.end) {
                        (false, _) => Some(Ok(FinishReason::Cancelled)),
                        (true, Some(reason)) => Some(Ok(reason)),
                        (true, None) => {
                            r.next = Some(next.id);
                            None
                        }
                    }
                }
            };
            if let Some(outcome) = outcome {
                ended.push((i, outcome));
            }
        }
        // Back to front, so that ending one does not shift the others' indices.
        for (i, outcome) in ended.into_iter().rev() {
            self.end(i, outcome);
            stats.ended += 1;
        }
        self.logits = logits;
        stats
    }

    /// Ends running sequence `i`: frees its slot (keeping its tokens for prefix reuse) and
    /// reports to its client.
    fn end(&mut self, i: usize, outcome: Result<FinishReason>) {
        let r = self.running.remove(i);
        let slot = &mut self.slots[r.slot];
        slot.busy = false;
        slot.last_used = self.steps;
        let result = outcome.map(|reason| (r.generation.finish(reason), r.cache));
        r.client.on_done(result);
    }

    /// Ends every running sequence with `error` (the worker is going down).
    pub fn fail_all(&mut self, error: impl Fn() -> Error) {
        while !self.running.is_empty() {
            let r = self.running.remove(0);
            self.slots[r.slot].busy = false;
            r.client.on_done(Err(error()));
        }
    }
}

/// The number of leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
