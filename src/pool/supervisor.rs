//! The supervisor: an actix actor that owns the registry's lifecycle. It starts each model's
//! workers, restarts a crashed worker at once (with exponential backoff and a cap), marks a
//! model failed after too many consecutive failures, loads and unloads models on request,
//! unloads idle models after their keep-alive, and evicts the least recently used idle model
//! when `max_loaded_models` or the memory budget would be exceeded. Pinned models (`pin = true`)
//! are never evicted or unloaded by keep-alive; they still count toward both limits.
//!
//! actix's own `Supervisor` restarts an actor on `ctx.stop()` but not on a panic (a panic
//! closes the mailbox), and model compute must not run on the actor's thread anyway: workers
//! are plain threads that report their exit here with [`WorkerExited`].

use super::registry::{ModelHandle, Registry};
use super::worker;
use super::ModelState;
use crate::config::PoolSettings;
use crate::error::{Error, Result};
use actix::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often idle models are checked against their keep-alive.
const TICK: Duration = Duration::from_millis(200);

/// Why a worker thread ended.
#[derive(Debug, Clone)]
pub(crate) enum ExitCause {
    /// Told to stop (unload, eviction, shutdown).
    Stopped,
    /// Loading the model failed.
    LoadFailed(String),
    /// A panic or an unrecoverable error while serving.
    Crashed(String),
}

/// A worker thread ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct WorkerExited {
    pub name: String,
    pub replica: usize,
    pub generation: u64,
    pub cause: ExitCause,
}

/// Load a model (no-op when it is loaded or loading).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct Load {
    pub name: String,
}

/// Unload a model once its requests in flight finish.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct Unload {
    pub name: String,
    pub reason: &'static str,
}

/// Stop every worker and fail queued requests.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Shutdown;

pub(crate) struct Supervisor {
    registry: Arc<Registry>,
    settings: PoolSettings,
}

impl Supervisor {
    pub fn new(registry: Arc<Registry>, settings: PoolSettings) -> Self {
        Supervisor { registry, settings }
    }

    fn spawn_workers(&self, handle: &Arc<ModelHandle>, generation: u64, ctx: &mut Context<Self>) {
        for replica in 0..handle.config.replicas {
            self.spawn_worker(handle, replica, generation, ctx);
        }
    }

    fn spawn_worker(
        &self,
        handle: &Arc<ModelHandle>,
        replica: usize,
        generation: u64,
        ctx: &mut Context<Self>,
    ) {
        if let Ok(mut alive) = handle.alive.lock() {
            alive.replicas.insert(replica);
            alive.generation = generation;
        }
        if let Err(e) = worker::spawn(Arc::clone(handle), replica, generation, ctx.address()) {
            tracing::error!(model = handle.name(), error = %e, "cannot start a worker thread");
            ctx.address().do_send(WorkerExited {
                name: handle.name().to_string(),
                replica,
                generation,
                cause: ExitCause::Crashed(format!("cannot start a worker thread: {e}")),
            });
        }
    }

    /// Models that hold (or are about to hold) memory.
    fn loaded(&self) -> Vec<Arc<ModelHandle>> {
        self.registry
            .all()
            .into_iter()
            .filter(|h| matches!(h.state(), ModelState::Ready | ModelState::Loading))
            .collect()
    }

    /// Makes room for `incoming` under max_loaded_models and the memory budget by unloading
    /// least recently used idle models; fails when only busy models could make room.
    fn make_room(&mut self, incoming: &ModelHandle) -> Result<()> {
        let max_models = self.settings.max_loaded_models;
        let budget = self.settings.memory_budget_mb * 1024 * 1024;
        loop {
            let loaded = self.loaded();
            let used: u64 = loaded.iter().map(|h| h.estimated_bytes).sum();
            let over_count = max_models > 0 && loaded.len() >= max_models;
            let over_memory = budget > 0 && used + incoming.estimated_bytes > budget;
            if !over_count && !over_memory {
                return Ok(());
            }
            let victim = loaded
                .iter()
                .filter(|h| h.state() == ModelState::Ready && h.is_idle() && !h.config.pin)
                .max_by_key(|h| h.idle_for());
            let Some(victim) = victim else {
                let limit = if over_count {
                    format!("max_loaded_models ({max_models}) is reached")
                } else {
                    format!(
                        "the memory budget ({} MiB) would be exceeded",
                        self.settings.memory_budget_mb
                    )
                };
                let pinned: Vec<&str> = loaded
                    .iter()
                    .filter(|h| h.config.pin)
                    .map(|h| h.name())
                    .collect();
                let reason = if pinned.is_empty() {
                    format!("{limit} and every loaded model is busy; retry later")
                } else {
                    format!(
                        "{limit}; every loaded model is busy or pinned (pinned: {}); retry later, or unpin one",
                        pinned.join(", ")
                    )
                };
                return Err(Error::Unavailable {
                    model: incoming.name().to_string(),
                    reason,
                });
            };
            tracing::info!(
                evicted = victim.name(),
                for_model = incoming.name(),
                "evicting the least recently used idle model"
            );
            self.stop_model(victim, ModelState::Unloaded, "evicted");
        }
    }

    fn start_model(&mut self, handle: &Arc<ModelHandle>, ctx: &mut Context<Self>) -> Result<()> {
        if matches!(handle.state(), ModelState::Ready | ModelState::Loading) {
            return Ok(());
        }
        if handle.closed.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                model: handle.name().to_string(),
                reason: "the pool is shutting down".into(),
            });
        }
        if self.keep_finishing_workers(handle, ctx) {
            return Ok(());
        }
        self.make_room(handle)?;
        tracing::info!(model = handle.name(), device = %handle.device, path = %handle.config.path.display(), "loading model");
        handle.consecutive_failures.store(0, Ordering::SeqCst);
        handle.set_state(ModelState::Loading);
        crate::metrics::model_loaded(&handle.device.to_string(), 1.0);
        let generation = handle.next_generation();
        handle.touch();
        self.spawn_workers(handle, generation, ctx);
        Ok(())
    }

    /// A model that was unloaded while it served requests still has workers finishing them,
    /// each holding a copy of the model. A load now takes those workers back (the unload is
    /// cancelled) rather than loading another copy beside them: under unload/load churn with
    /// long requests, copies would otherwise pile up (seen in the soak as RSS in gigabytes).
    /// Replicas that already left are started again. Returns false when no worker is left.
    fn keep_finishing_workers(&self, handle: &Arc<ModelHandle>, ctx: &mut Context<Self>) -> bool {
        let (generation, running) = match handle.alive.lock() {
            Ok(alive) if !alive.replicas.is_empty() => (alive.generation, alive.replicas.clone()),
            _ => return false,
        };
        handle.generation.store(generation, Ordering::SeqCst);
        handle.set_state(if handle.ready_workers.load(Ordering::SeqCst) > 0 {
            ModelState::Ready
        } else {
            ModelState::Loading
        });
        crate::metrics::model_loaded(&handle.device.to_string(), 1.0);
        handle.touch();
        tracing::info!(
            model = handle.name(),
            "load while the unloaded model was finishing its requests: keeping it loaded"
        );
        for replica in (0..handle.config.replicas).filter(|r| !running.contains(r)) {
            self.spawn_worker(handle, replica, generation, ctx);
        }
        true
    }

    /// Starts the model; when it cannot start, the requests queued for it get the reason
    /// instead of waiting for a load that never comes.
    fn start_or_answer_queue(
        &mut self,
        handle: &Arc<ModelHandle>,
        ctx: &mut Context<Self>,
    ) -> Result<()> {
        let started = self.start_model(handle, ctx);
        if let Err(e) = &started {
            let reason = e.to_string();
            let name = handle.name().to_string();
            handle.drain_queue(|| Error::Unavailable {
                model: name.clone(),
                reason: format!("it cannot be loaded: {reason}"),
            });
        }
        started
    }

    fn stop_model(&self, handle: &ModelHandle, state: ModelState, reason: &str) {
        let was_loaded = matches!(handle.state(), ModelState::Ready | ModelState::Loading);
        // A request's keep_alive lasts while the model stays loaded; the next load starts
        // from the configured one again.
        if let Ok(mut k) = handle.keep_alive_override.lock() {
            *k = None;
        }
        handle.next_generation();
        handle.set_state(state);
        if was_loaded {
            crate::metrics::model_loaded(&handle.device.to_string(), -1.0);
            tracing::info!(model = handle.name(), reason, "model unloaded");
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for handle in self.registry.all() {
            if handle.config.load == crate::config::LoadPolicy::Eager {
                if let Err(e) = self.start_model(&handle, ctx) {
                    tracing::error!(model = handle.name(), error = %e, "cannot load model");
                    handle.set_state(ModelState::Failed(e.to_string()));
                }
            }
        }
        ctx.run_interval(TICK, |act, _ctx| {
            for handle in act.registry.all() {
                crate::metrics::queue_depth(handle.name(), handle.queue_rx.len());
                let Some(keep_alive) = handle.effective_keep_alive() else {
                    continue;
                };
                if handle.config.pin {
                    continue;
                }
                if handle.state() == ModelState::Ready
                    && handle.is_idle()
                    && handle.idle_for() >= keep_alive
                {
                    act.stop_model(&handle, ModelState::Unloaded, "keep_alive expired");
                }
            }
        });
    }
}

impl Handler<Load> for Supervisor {
    type Result = Result<()>;

    fn handle(&mut self, msg: Load, ctx: &mut Self::Context) -> Self::Result {
        let handle = self.registry.get(&msg.name)?;
        self.start_or_answer_queue(&handle, ctx)
    }
}

impl Handler<Unload> for Supervisor {
    type Result = Result<()>;

    fn handle(&mut self, msg: Unload, _ctx: &mut Self::Context) -> Self::Result {
        let handle = self.registry.get(&msg.name)?;
        self.stop_model(&handle, ModelState::Unloaded, msg.reason);
        // Requests in flight finish; those still waiting are answered now rather than left
        // for workers that are on their way out.
        let waiting = handle.drain_queue(|| Error::Unavailable {
            model: msg.name.clone(),
            reason: format!(
                "it was unloaded ({}) while this request waited in its queue; send it again to load the model again",
                msg.reason
            ),
        });
        if waiting > 0 {
            tracing::info!(model = %msg.name, waiting, "answered queued requests of an unloaded model");
        }
        Ok(())
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Self::Context) {
        for handle in self.registry.all() {
            self.stop_model(&handle, ModelState::Unloaded, "shutdown");
            handle.close();
        }
    }
}

impl Handler<WorkerExited> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: WorkerExited, ctx: &mut Self::Context) {
        let Ok(handle) = self.registry.get(&msg.name) else {
            return;
        };
        if let Ok(mut alive) = handle.alive.lock() {
            if alive.generation == msg.generation {
                alive.replicas.remove(&msg.replica);
            }
        }
        let cause = match msg.cause {
            ExitCause::Stopped if msg.generation == handle.current_generation() => {
                // It saw an unload and left, and the unload was then cancelled by a load
                // (`keep_finishing_workers`): its replica starts again.
                if !handle.closed.load(Ordering::SeqCst) {
                    self.spawn_worker(&handle, msg.replica, msg.generation, ctx);
                }
                return;
            }
            ExitCause::Stopped => {
                // A request that slipped into the queue while this model was being unloaded
                // or evicted (after the idle check, before the workers left) arrived after the
                // unload: it loads the model again, as any later request would.
                if handle.state() == ModelState::Unloaded
                    && !handle.queue_rx.is_empty()
                    && !handle.closed.load(Ordering::SeqCst)
                {
                    tracing::info!(
                        model = handle.name(),
                        "requests arrived during an unload; loading the model again"
                    );
                    let _ = self.start_or_answer_queue(&handle, ctx);
                }
                return;
            }
            ExitCause::LoadFailed(c) | ExitCause::Crashed(c) => c,
        };
        if msg.generation != handle.current_generation() {
            // The model was unloaded or restarted meanwhile; this worker is history.
            return;
        }
        crate::metrics::worker_restart(handle.name());
        handle.restarts.fetch_add(1, Ordering::SeqCst);
        let failures = handle.consecutive_failures.fetch_add(1, Ordering::SeqCst) + 1;
        if failures >= self.settings.max_consecutive_failures {
            tracing::error!(model = handle.name(), failures, %cause, "model marked failed");
            self.stop_model(&handle, ModelState::Failed(cause.clone()), "failed");
            let name = handle.name().to_string();
            handle.drain_queue(|| Error::Unavailable {
                model: name.clone(),
                reason: format!("it failed {failures} times in a row; last error: {cause}"),
            });
            return;
        }
        if handle.ready_workers.load(Ordering::SeqCst) == 0 {
            handle.set_state(ModelState::Loading);
        }
        let backoff = Duration::from_millis(
            self.settings
                .restart_backoff_ms
                .saturating_mul(1 << (failures - 1).min(20))
                .min(self.settings.restart_backoff_max_ms),
        );
        tracing::warn!(
            model = handle.name(),
            replica = msg.replica,
            failures,
            backoff_ms = backoff.as_millis() as u64,
            %cause,
            "worker failed; restarting"
        );
        let generation = msg.generation;
        let replica = msg.replica;
        ctx.run_later(backoff, move |act, ctx| {
            if handle.current_generation() == generation {
                act.spawn_worker(&handle, replica, generation, ctx);
            }
        });
    }
}
