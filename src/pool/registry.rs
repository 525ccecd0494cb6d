//! The registry: model name -> handle. A handle holds everything a request needs to reach a
//! model (its bounded queue) and everything an operator sees (state, restarts, queue depth).
//! The queue belongs to the handle, not to a worker, so requests survive worker restarts.

use super::{GenerationEvent, ModelState};
use crate::config::ModelConfig;
use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::request::CheckedRequest;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A request waiting for a worker.
pub(crate) struct Job {
    /// Checked before it was queued; the worker prepares it for its model.
    pub request: CheckedRequest,
    /// Send an event per token; otherwise only the final result (no per-token wake-ups of the
    /// caller's runtime while candle's threads are busy).
    pub stream: bool,
    pub events: mpsc::UnboundedSender<Result<GenerationEvent>>,
    pub enqueued: Instant,
}

/// One model of the catalog.
pub(crate) struct ModelHandle {
    pub config: ModelConfig,
    pub device: DeviceSpec,
    /// Estimated bytes of weights in memory once loaded, for the memory budget.
    pub estimated_bytes: u64,
    pub queue_tx: Sender<Job>,
    pub queue_rx: Receiver<Job>,
    pub state: watch::Sender<ModelState>,
    /// Workers exit when this moves past the generation they were started with.
    pub generation: AtomicU64,
    pub restarts: AtomicU64,
    pub consecutive_failures: AtomicU32,
    pub in_flight: AtomicUsize,
    pub ready_workers: AtomicUsize,
    /// Running, held and KV figures summed over the model's workers, for its gauges.
    pub load: crate::metrics::ModelLoad,
    pub last_used: Mutex<Instant>,
    /// The keep-alive the latest request asked for, replacing the configured one until the
    /// model is unloaded.
    pub keep_alive_override: Mutex<Option<crate::request::KeepAlive>>,
    pub architecture: Mutex<Option<&'static str>>,
    /// The context a request may use: the loaded model's, capped by the config's
    /// `max_context` (0 until first loaded).
    pub max_context: AtomicUsize,
    /// Set once the pool shuts down: nothing is queued any more.
    pub closed: AtomicBool,
    /// Replicas whose worker thread is running, and the generation they all share. Only the
    /// supervisor's thread changes these; they let a load that arrives while an unloaded
    /// model's workers are still finishing keep those workers instead of loading a second copy.
    pub alive: Mutex<AliveWorkers>,
}

/// The running worker threads of a model.
#[derive(Debug, Default)]
pub(crate) struct AliveWorkers {
    pub replicas: std::collections::BTreeSet<usize>,
    pub generation: u64,
}

impl ModelHandle {
    pub fn new(config: ModelConfig) -> Result<Self> {
        let device = config.device_spec()?;
        let (queue_tx, queue_rx) = crossbeam_channel::bounded(config.queue_size);
        let estimated_bytes = estimate_bytes(&config);
        Ok(ModelHandle {
            config,
            device,
            estimated_bytes,
            queue_tx,
            queue_rx,
            state: watch::Sender::new(ModelState::Unloaded),
            generation: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            ready_workers: AtomicUsize::new(0),
            load: crate::metrics::ModelLoad::default(),
            last_used: Mutex::new(Instant::now()),
            keep_alive_override: Mutex::new(None),
            architecture: Mutex::new(None),
            max_context: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            alive: Mutex::new(AliveWorkers::default()),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }

    pub fn set_state(&self, state: ModelState) {
        crate::metrics::model_state(self.name(), state.as_str());
        self.state.send_replace(state);
    }

    /// What a request for this model is checked against (the context once it is known).
    pub fn limits(&self) -> crate::request::Limits<'_> {
        let context = self.max_context.load(Ordering::SeqCst);
        crate::request::Limits {
            model: self.name(),
            context: (context > 0).then_some(context),
            defaults: &self.config.defaults,
        }
    }

    pub fn current_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Tells the current workers to exit after their request; returns the new generation.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// True when nothing is running or waiting: the model may be unloaded or evicted.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && self.queue_rx.is_empty()
    }

    pub fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    /// Records a request's `keep_alive` for the model.
    pub fn set_keep_alive(&self, keep_alive: crate::request::KeepAlive) {
        if let Ok(mut k) = self.keep_alive_override.lock() {
            *k = Some(keep_alive);
        }
    }

    /// How long the model may stay idle before it is unloaded: the latest request's
    /// `keep_alive`, else the configured one; `None` keeps it loaded.
    pub fn effective_keep_alive(&self) -> Option<Duration> {
        let requested = self.keep_alive_override.lock().ok().and_then(|k| *k);
        match requested {
            Some(crate::request::KeepAlive::Forever) => None,
            Some(crate::request::KeepAlive::For(d)) => Some(d),
            None => self.config.keep_alive().ok().flatten(),
        }
    }

    pub fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Enqueues a request, or fails at once when the queue is full or the pool is closed.
    pub fn enqueue(&self, job: Job) -> Result<()> {
        let shutting_down = || Error::Unavailable {
            model: self.name().to_string(),
            reason: "the pool is shutting down".into(),
        };
        if self.closed.load(Ordering::SeqCst) {
            return Err(shutting_down());
        }
        match self.queue_tx.try_send(job) {
            Ok(()) => {
                if self.closed.load(Ordering::SeqCst) {
                    // Shutdown drained the queue between our check and our send: whichever of
                    // the two comes last drains, so no job is left behind without an answer.
                    self.drain_queue(shutting_down);
                } else {
                    crate::metrics::queue_depth(self.name(), self.queue_rx.len());
                }
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Error::Overloaded {
                model: self.name().to_string(),
                queue_size: self.config.queue_size,
            }),
            Err(TrySendError::Disconnected(_)) => Err(shutting_down()),
        }
    }

    /// Closes the model for good (pool shutdown): tells its workers to exit after their
    /// request, and answers every queued request with `Unavailable`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.next_generation();
        self.set_state(ModelState::Unloaded);
        let name = self.name().to_string();
        self.drain_queue(|| Error::Unavailable {
            model: name.clone(),
            reason: "the pool is shutting down".into(),
        });
    }

    /// Fails every queued request with `error` (used when the model is unloaded, marked failed,
    /// cannot be loaded, or the pool shuts down: the requests would otherwise wait forever).
    pub fn drain_queue(&self, error: impl Fn() -> Error) -> usize {
        let mut n = 0;
        while let Ok(job) = self.queue_rx.try_recv() {
            let _ = job.events.send(Err(error()));
            crate::metrics::request(self.name(), "unavailable");
            n += 1;
        }
        crate::metrics::queue_depth(self.name(), 0);
        n
    }
}

/// Weights' size on disk, doubled for 16-bit safetensors that load as F32 on CPU.
fn estimate_bytes(config: &ModelConfig) -> u64 {
    let path = &config.path;
    if path.is_file() {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    let on_disk: u64 = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let widening = match (config.device.as_str(), config.dtype.as_str()) {
        ("cpu", "auto") | (_, "f32") => 2,
        _ => 1,
    };
    on_disk * widening
}

/// Model name -> handle.
#[derive(Default)]
pub(crate) struct Registry {
    models: DashMap<String, Arc<ModelHandle>>,
}

impl Registry {
    pub fn insert(&self, handle: ModelHandle) {
        crate::metrics::register_model(handle.name());
        crate::metrics::model_state(handle.name(), handle.state().as_str());
        self.models
            .insert(handle.name().to_string(), Arc::new(handle));
    }

    pub fn get(&self, name: &str) -> Result<Arc<ModelHandle>> {
        self.models
            .get(name)
            .map(|h| Arc::clone(h.value()))
            .ok_or_else(|| Error::UnknownModel {
                name: name.to_string(),
                available: self.names().join(", "),
            })
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.models.iter().map(|e| e.key().clone()).collect();
        names.sort();
        names
    }

    pub fn all(&self) -> Vec<Arc<ModelHandle>> {
        let mut all: Vec<Arc<ModelHandle>> =
            self.models.iter().map(|e| Arc::clone(e.value())).collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }
}

/// Helper for counters shared with workers.
pub(crate) fn inc(a: &AtomicUsize) {
    a.fetch_add(1, Ordering::SeqCst);
}

/// Helper for counters shared with workers.
pub(crate) fn dec(a: &AtomicUsize) {
    a.fetch_sub(1, Ordering::SeqCst);
}
