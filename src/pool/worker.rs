//! A worker: one dedicated OS thread that owns one loaded model, its KV cache and its text side,
//! and serves requests from its model's queue. Model compute never runs on an async runtime.
//!
//! Every model call runs inside `catch_unwind`. A panic, or a failure that leaves the model in
//! an unknown state, ends the thread: the request in flight gets `WorkerRestarted`, the
//! supervisor is told at once and starts a replacement, and the queue (owned by the model's
//! handle, not the worker) keeps every waiting request for it.

use super::registry::{dec, inc, Job, ModelHandle};
use super::supervisor::{ExitCause, Supervisor, WorkerExited};
use super::{GenerationEvent, GenerationResult};
use crate::engine::{CacheUse, FinishReason, Session};
use crate::error::{Error, Result};
use crate::models::{LoadOptions, Model};
use crate::text::{encode_prompt, ModelText};
use actix::Addr;
use crossbeam_channel::RecvTimeoutError;
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
        let cause = run(&handle, generation);
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
    Ok((model, text))
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
    tracing::info!(
        model = handle.name(),
        device = %handle.device,
        architecture = model.info().architecture,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "worker ready"
    );
    inc(&handle.ready_workers);
    let _ready_guard = ReadyGuard(handle);
    if handle.current_generation() == generation {
        handle.set_state(super::ModelState::Ready);
    }

    let mut session = Session::new(&mut model);
    loop {
        if handle.current_generation() != generation {
            return ExitCause::Stopped;
        }
        let job = match handle.queue_rx.recv_timeout(POLL) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return ExitCause::Stopped,
        };
        crate::metrics::queue_depth(handle.name(), handle.queue_rx.len());
        if job.events.is_closed() {
            // The caller went away while the request waited.
            crate::metrics::request(handle.name(), "cancelled");
            continue;
        }
        crate::metrics::queue_wait(handle.name(), job.enqueued.elapsed());
        inc(&handle.in_flight);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            serve(handle, &mut session, text.as_ref(), &job)
        }));
        dec(&handle.in_flight);
        handle.touch();
        match outcome {
            Ok(Ok(_)) => {
                // `serve` counted the outcome before its final event, so that a client that
                // has its answer finds it counted.
                handle.consecutive_failures.store(0, Ordering::SeqCst);
            }
            Ok(Err(e)) if session.is_poisoned() => {
                let cause = e.to_string();
                fail_in_flight(handle, &job, &cause);
                return ExitCause::Crashed(cause);
            }
            Ok(Err(e)) => {
                let outcome = match e {
                    Error::InvalidParameter { .. } | Error::ContextLength { .. } => "invalid",
                    _ => "error",
                };
                crate::metrics::request(handle.name(), outcome);
                let _ = job.events.send(Err(e));
            }
            Err(panic) => {
                let cause = Error::from_panic("worker", panic).to_string();
                tracing::error!(model = handle.name(), %cause, "worker panicked; restarting");
                fail_in_flight(handle, &job, &cause);
                return ExitCause::Crashed(cause);
            }
        }
    }
}

fn fail_in_flight(handle: &ModelHandle, job: &Job, cause: &str) {
    crate::metrics::request(handle.name(), "restarted");
    let _ = job.events.send(Err(Error::WorkerRestarted {
        model: handle.name().to_string(),
        cause: cause.to_string(),
    }));
}

/// Decrements the ready-worker count however the thread ends.
struct ReadyGuard<'a>(&'a ModelHandle);

impl Drop for ReadyGuard<'_> {
    fn drop(&mut self) {
        dec(&self.0.ready_workers);
    }
}

fn serve(
    handle: &ModelHandle,
    session: &mut Session<'_>,
    text: Option<&ModelText>,
    job: &Job,
) -> Result<FinishReason> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(&format!("llm_pool_worker_generate_{}", handle.name()));

    let request = &job.request;
    let prompt = encode_prompt(handle.name(), text, &request.prompt)?;
    let params = request.resolve(&handle.limits(), prompt.len())?;
    let mut first_token: Option<Instant> = None;
    let output = session.generate(text, &prompt, &params, |event| {
        first_token.get_or_insert_with(Instant::now);
        if job.stream {
            job.events
                .send(Ok(GenerationEvent::Token {
                    id: event.id,
                    text: event.text.to_string(),
                }))
                .is_ok()
        } else {
            // Nobody reads tokens one by one; only stop if the caller went away.
            !job.events.is_closed()
        }
    })?;
    let cache = session
        .last_cache_use
        .unwrap_or(CacheUse::Reset("new_prompt"));
    match cache {
        CacheUse::Reset(reason) => crate::metrics::cache_reset(handle.name(), reason),
        CacheUse::PrefixHit(n) => crate::metrics::prefix_hit(handle.name(), n),
    }
    let total = job.enqueued.elapsed();
    let ttft = first_token
        .map(|t| t.duration_since(job.enqueued))
        .unwrap_or(total);
    crate::metrics::generation(
        handle.name(),
        output.prompt_tokens,
        output.completion_tokens(),
        total,
        ttft,
        output.decode,
    );
    let finish = output.finish_reason;
    let outcome = if finish == FinishReason::Cancelled {
        "cancelled"
    } else {
        "ok"
    };
    crate::metrics::request(handle.name(), outcome);
    let _ = job.events.send(Ok(GenerationEvent::Done(GenerationResult {
        completion_tokens: output.completion_tokens(),
        text: output.text,
        token_ids: output.token_ids,
        finish_reason: output.finish_reason,
        prompt_tokens: output.prompt_tokens,
        time_to_first_token: ttft,
        duration: total,
        cache,
    })));
    Ok(finish)
}
