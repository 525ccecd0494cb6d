//! A worker: one dedicated OS thread that owns one loaded model, its KV cache slots and its
//! text side, and serves requests from its model's queue with continuous batching
//! ([`Batcher`]): requests join the running batch as slots and KV budget allow, every step
//! advances all of them by one batched forward, and each leaves the moment it ends. Model
//! compute never runs on an async runtime.
//!
//! A panic ends the thread: every request of the batch gets `WorkerRestarted` (a request is
//! answered however its [`JobClient`] goes away), the supervisor is told at once and starts a
//! replacement, and the queue (owned by the model's handle, not the worker) keeps every
//! waiting request for it.

use super::registry::{dec, inc, Job, ModelHandle};
use super::supervisor::{ExitCause, Supervisor, WorkerExited};
use super::{GenerationEvent, GenerationResult};
use crate::config::{GrammarIndex, ModelConfig};
use crate::engine::batch::{Admission, BatchSettings, Batcher, Client, Pending};
use crate::engine::{CacheUse, FinishReason, GenerateOutput, Prepared, TokenEvent};
use crate::error::{Error, Result};
use crate::models::{LoadOptions, Model};
use crate::text::ModelText;
use actix::Addr;
use crossbeam_channel::{RecvTimeoutError, TryRecvError};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often an idle worker checks whether it has been told to stop.
const POLL: Duration = Duration::from_millis(50);

/// Starts a worker thread for `replica` of the model.
pub(crate) fn spawn(
    handle: Arc<ModelHandle>,
    replica: usize,
    generation: u64,
    supervisor: Addr<Supervisor>,
) -> std::io::Result<()> {
    let name = format!("llm-pool-{}-{replica}", handle.name());
    std::thread::Builder::new().name(name).spawn(move || {
        crate::resources::lower_compute_thread_priority();
        crate::resources::lower_barrier_pool_priority();
        // `run` catches the panics it expects; this one catches the rest, so that the
        // supervisor always hears of the exit (every request still held was answered by its
        // client's drop).
        let cause = catch_unwind(AssertUnwindSafe(|| run(&handle, generation)))
            .unwrap_or_else(|p| ExitCause::Crashed(Error::from_panic("worker", p).to_string()));
        // The model, its cache and its tokenizer are dropped by now.
        crate::resources::release_freed_memory();
        supervisor.do_send(WorkerExited {
            name: handle.name().to_string(),
            replica,
            generation,
            cause,
        });
    })?;
    Ok(())
}

fn load(handle: &ModelHandle) -> Result<(Model, Option<ModelText>)> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(&format!("llm_pool_worker_load_{}", handle.name()), |_| {
        Err(Error::Unavailable {
            model: handle.name().to_string(),
            reason: "failpoint: load failed".into(),
        })
    });
    let mut options = LoadOptions::for_device(handle.device)?;
    options.dtype = handle.config.dtype()?;
    let model = Model::load(&handle.config.path, &options)?;
    let text = ModelText::load(
        &handle.config.path,
        model.info(),
        handle.config.chat_template.as_deref(),
    )?;
    match &text {
        Some(text) if handle.config.grammar_index == GrammarIndex::Load => {
            index_vocabulary(handle.name(), text)
        }
        _ => {}
    }
    Ok((model, text))
}

/// Builds the grammar compiler's index of the vocabulary with the model, so that the first
/// structured-output request does not stall the batch it joins (up to a second for Gemma's
/// 262k tokens). A model whose vocabulary cannot be indexed still serves everything else.
// Built here, on the worker's thread: a version that spawned a thread for it sent rustc's
// release build of this crate past 18 GB (LLVM), and this one builds in under 1 GB.
#[inline(never)]
fn index_vocabulary(model: &str, text: &ModelText) {
    if let Err(e) = text.constraint_env() {
        tracing::warn!(model, error = %e, "structured outputs and tools are unavailable for this model");
    }
}

fn run(handle: &ModelHandle, generation: u64) -> ExitCause {
    let started = Instant::now();
    let loaded = catch_unwind(AssertUnwindSafe(|| load(handle)))
        .unwrap_or_else(|p| Err(Error::from_panic(format!("loading {}", handle.name()), p)));
    let (mut model, text) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => return ExitCause::LoadFailed(e.to_string()),
    };
    crate::metrics::model_load(handle.name(), started.elapsed());
    if let Ok(mut arch) = handle.architecture.lock() {
        *arch = Some(model.info().architecture);
    }
    let context = match handle.config.max_context {
        0 => model.info().max_context,
        cap => cap.min(model.info().max_context),
    };
    handle.max_context.store(context, Ordering::SeqCst);
    let settings = batch_settings(&handle.config, model.info().kv_bytes_per_token);
    let architecture = model.info().architecture;
    let mut batcher = match Batcher::new(&mut model, text.as_ref(), settings) {
        Ok(b) => b,
        Err(e) => return ExitCause::LoadFailed(format!("batching settings: {e}")),
    };
    tracing::info!(
        model = handle.name(),
        device = %handle.device,
        architecture,
        max_batch_size = settings.max_batch_size,
        slots = settings.max_slots,
        kv_budget_tokens = settings.kv_budget_tokens,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "worker ready"
    );
    // Before the model shows ready: a router that sees it ready finds its cache shape too.
    let step_metrics =
        crate::metrics::BatchMetrics::new(handle.name(), &handle.load, settings.kv_budget_tokens);
    step_metrics.cache_config(handle.name(), settings.kv_budget_tokens);
    inc(&handle.ready_workers);
    let _ready_guard = ReadyGuard(handle);
    if handle.current_generation() == generation {
        handle.set_state(super::ModelState::Ready);
    }

    // A request taken from the queue that waits for room in the batch.
    let mut pending: Option<Pending<JobClient<'_>>> = None;
    loop {
        if handle.current_generation() != generation {
            // Told to stop: the running requests finish; nothing new is taken.
            if batcher.is_empty() {
                if let Some(p) = pending.take() {
                    p.client.requeue();
                }
                return ExitCause::Stopped;
            }
        } else if let Err(cause) = admit(handle, text.as_ref(), &mut batcher, &mut pending) {
            return cause;
        }
        if batcher.is_empty() {
            continue;
        }
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(feature = "failpoints")]
            fail::fail_point!(&format!("llm_pool_worker_step_{}", handle.name()));
            batcher.step()
        }));
        match stepped {
            Ok(stats) => {
                step_metrics.step(
                    stats.sequences,
                    batcher.running(),
                    pending.is_some(),
                    batcher.kv_used_tokens(),
                    handle.queue_rx.len(),
                );
            }
            Err(panic) => {
                let cause = Error::from_panic("worker", panic).to_string();
                tracing::error!(
                    model = handle.name(),
                    %cause,
                    running = batcher.running(),
                    "batched step panicked; restarting the worker"
                );
                let name = handle.name().to_string();
                batcher.fail_all(|| Error::WorkerRestarted {
                    model: name.clone(),
                    cause: cause.clone(),
                });
                if let Some(p) = pending.take() {
                    p.client.requeue();
                }
                return ExitCause::Crashed(cause);
            }
        }
    }
}

/// Takes requests from the queue into the batch while it has room: waits up to [`POLL`] for
/// one when the batch is empty, else only takes what is already there. A request that does
/// not fit yet stays in `pending`. Returns the exit cause when the worker must end.
fn admit<'h>(
    handle: &'h ModelHandle,
    text: Option<&ModelText>,
    batcher: &mut Batcher<'_, JobClient<'h>>,
    pending: &mut Option<Pending<JobClient<'h>>>,
) -> std::result::Result<(), ExitCause> {
    while batcher.has_room() {
        let ready = match pending.take() {
            Some(p) => p,
            None => {
                let job = if batcher.is_empty() {
                    match handle.queue_rx.recv_timeout(POLL) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => return Ok(()),
                        Err(RecvTimeoutError::Disconnected) => return Err(ExitCause::Stopped),
                    }
                } else {
                    match handle.queue_rx.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Empty) => return Ok(()),
                        Err(TryRecvError::Disconnected) => return Err(ExitCause::Stopped),
                    }
                };
                crate::metrics::queue_depth(handle.name(), handle.queue_rx.len());
                if job.events.is_closed() {
                    // The caller went away while the request waited.
                    crate::metrics::request(handle.name(), "cancelled");
                    continue;
                }
                crate::metrics::queue_wait(handle.name(), job.enqueued.elapsed());
                let client = JobClient::new(handle, job);
                let prepared =
                    catch_unwind(AssertUnwindSafe(|| prepare(handle, text, &client.job)));
                match prepared {
                    Ok(Ok(prepared)) => Pending { prepared, client },
                    Ok(Err(e)) => {
                        client.on_done(Err(e));
                        continue;
                    }
                    Err(panic) => {
                        let cause = Error::from_panic("worker", panic).to_string();
                        tracing::error!(model = handle.name(), %cause, "worker panicked; restarting");
                        let error = || Error::WorkerRestarted {
                            model: handle.name().to_string(),
                            cause: cause.clone(),
                        };
                        client.on_done(Err(error()));
                        batcher.fail_all(error);
                        return Err(ExitCause::Crashed(cause));
                    }
                }
            }
        };
        match batcher.admit(ready) {
            Admission::Running => {}
            Admission::Full(p) => {
                *pending = Some(*p);
                return Ok(());
            }
            Admission::Refused(client, e) => client.on_done(Err(e)),
        }
    }
    Ok(())
}

/// The batching settings of a worker of this model, whose KV cache takes `kv_bytes_per_token`
/// per token: the config's limits, and its `kv_cache_mb` in tokens.
fn batch_settings(config: &ModelConfig, kv_bytes_per_token: usize) -> BatchSettings {
    let budget = config.kv_cache_mb.saturating_mul(1 << 20);
    BatchSettings {
        max_batch_size: config.max_batch_size,
        max_slots: config.slots(),
        prefill_chunk: config.prefill_chunk,
        kv_budget_tokens: budget / kv_bytes_per_token.max(1),
    }
}

/// Prepares a queued request for the model: the one preparation every entry point shares.
fn prepare(handle: &ModelHandle, text: Option<&ModelText>, job: &Job) -> Result<Prepared> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(&format!("llm_pool_worker_generate_{}", handle.name()));
    job.request.prepare(&handle.limits(), text)
}

/// Decrements the ready-worker count however the thread ends.
struct ReadyGuard<'a>(&'a ModelHandle);

impl Drop for ReadyGuard<'_> {
    fn drop(&mut self) {
        dec(&self.0.ready_workers);
    }
}

/// One request in a worker: it streams tokens to the caller's channel, and answers exactly
/// once, when its sequence ends, or, dropped unanswered (a panic unwinding the worker), with
/// `WorkerRestarted`. It counts in the model's `in_flight` for as long as it lives.
struct JobClient<'h> {
    handle: &'h ModelHandle,
    job: Job,
    first_token: Option<Instant>,
    answered: bool,
}

impl<'h> JobClient<'h> {
    fn new(handle: &'h ModelHandle, job: Job) -> Self {
        inc(&handle.in_flight);
        JobClient {
            handle,
            job,
            first_token: None,
            answered: false,
        }
    }

    /// Puts the request back in the queue unanswered (a worker leaving before it started);
    /// answers it with `WorkerRestarted` when the queue has no room left.
    fn requeue(mut self) {
        self.answered = true;
        let handle = self.handle;
        let job = Job {
            request: self.job.request.clone(),
            stream: self.job.stream,
            events: self.job.events.clone(),
            enqueued: self.job.enqueued,
        };
        if let Err(e) = handle.queue_tx.try_send(job) {
            crate::metrics::request(handle.name(), "restarted");
            let _ = e.into_inner().events.send(Err(Error::WorkerRestarted {
                model: handle.name().to_string(),
                cause: "the worker stopped and the queue had no room to keep this request".into(),
            }));
        }
    }

    fn finished(&self, output: GenerateOutput, cache: CacheUse) {
        let handle = self.handle;
        match cache {
            CacheUse::Reset(reason) => crate::metrics::cache_reset(handle.name(), reason),
            CacheUse::PrefixHit(n) => crate::metrics::prefix_hit(handle.name(), n),
        }
        let total = self.job.enqueued.elapsed();
        let ttft = self
            .first_token
            .map(|t| t.duration_since(self.job.enqueued))
            .unwrap_or(total);
        let operation = match self.job.request.prompt {
            crate::text::Prompt::Chat(_) => "chat",
            _ => "text_completion",
        };
        crate::metrics::generation(
            handle.name(),
            crate::metrics::GenerationTimes {
                prompt_tokens: output.prompt_tokens,
                generated_tokens: output.completion_tokens(),
                total,
                first_token: ttft,
                decode: output.decode,
                operation,
            },
        );
        let outcome = match output.finish_reason {
            FinishReason::Cancelled => "cancelled",
            _ => "ok",
        };
        if outcome == "ok" {
            handle.consecutive_failures.store(0, Ordering::SeqCst);
        }
        // Counted before the final event, so that a client that has its answer finds it
        // counted.
        crate::metrics::request(handle.name(), outcome);
        let _ = self
            .job
            .events
            .send(Ok(GenerationEvent::Done(GenerationResult {
                output,
                time_to_first_token: ttft,
                duration: total,
                cache,
            })));
    }

    fn failed(&self, e: Error) {
        let outcome = match e {
            Error::InvalidParameter { .. } | Error::ContextLength { .. } => "invalid",
            Error::WorkerRestarted { .. } => "restarted",
            _ => "error",
        };
        crate::metrics::request(self.handle.name(), outcome);
        let _ = self.job.events.send(Err(e));
    }
}

impl Client for JobClient<'_> {
    fn is_cancelled(&self) -> bool {
        self.job.events.is_closed()
    }

    fn on_token(&mut self, event: TokenEvent<'_>) -> bool {
        self.first_token.get_or_insert_with(Instant::now);
        if self.job.stream {
            self.job
                .events
                .send(Ok(GenerationEvent::Token {
                    id: event.id,
                    text: event.text.to_string(),
                    reasoning: event.reasoning.to_string(),
                    tool_calls: event.tool_calls.to_vec(),
                    logprobs: event.logprobs.cloned(),
                }))
                .is_ok()
        } else {
            // Nobody reads tokens one by one; only stop if the caller went away.
            !self.job.events.is_closed()
        }
    }

    fn on_done(mut self, result: Result<(GenerateOutput, CacheUse)>) {
        self.answered = true;
        match result {
            Ok((output, cache)) => self.finished(output, cache),
            Err(e) => self.failed(e),
        }
    }
}

impl Drop for JobClient<'_> {
    fn drop(&mut self) {
        dec(&self.handle.in_flight);
        self.handle.touch();
        if !self.answered {
            self.failed(Error::WorkerRestarted {
                model: self.handle.name().to_string(),
                cause: "the worker panicked".into(),
            });
        }
    }
}
