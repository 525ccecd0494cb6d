//! The pool: several models at once, each served by its own workers.
//!
//! - [`Pool`] is the handle programs use (`Clone + Send + Sync`, works from any tokio program);
//! - `registry` maps model names to handles, each with a bounded queue (crossbeam);
//! - `supervisor` is the actix actor that starts, restarts, loads, unloads and evicts;
//! - `worker` is one OS thread per replica that owns a model and its KV cache.
//!
//! ```no_run
//! # async fn demo() -> llm_pool::Result<()> {
//! use llm_pool::config::{Config, ModelConfig};
//! use llm_pool::pool::{GenerateRequest, Pool};
//!
//! let mut config = Config::default();
//! config.models.push(ModelConfig::new("smollm2", "models/SmolLM2-135M-Instruct.Q4_1.gguf"));
//! let pool = Pool::start(config).await?;
//! let result = pool.generate("smollm2", GenerateRequest::text("Once upon a time").max_tokens(16)).await?;
//! println!("{}", result.text.as_deref().unwrap_or_default());
//! pool.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod registry;
mod supervisor;
mod worker;

pub use crate::request::{GenerateRequest, KeepAlive, Prompt, DEFAULT_MAX_TOKENS};

use crate::config::Config;
use crate::engine::{CacheUse, GenerateOutput};
use crate::error::{Error, Result};
pub use crate::text::logprobs::TokenLogprobs;
pub use crate::text::output::ToolCall;
use registry::{Job, ModelHandle, Registry};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use supervisor::{Load, Shutdown, Supervisor, Unload};
use tokio::sync::mpsc;

/// One event of a streamed generation.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// A generated token and the text it completes (possibly empty).
    Token {
        /// The token id.
        id: u32,
        /// The answer's text delta.
        text: String,
        /// The thinking block's text delta (when the model writes one).
        reasoning: String,
        /// Tool calls this token completed.
        tool_calls: Vec<ToolCall>,
        /// The token's log-probabilities, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
    },
    /// The generation ended.
    Done(GenerationResult),
}

/// A finished generation: the engine's output (read through this result: `result.text`,
/// `result.token_ids`, ...), and what the pool adds, its times from enqueue and its use of the
/// KV cache.
#[derive(Debug, Clone)]
pub struct GenerationResult {
    /// What the engine generated.
    pub output: GenerateOutput,
    /// From enqueue to the first token.
    pub time_to_first_token: Duration,
    /// From enqueue to the end.
    pub duration: Duration,
    /// Whether the KV cache was reused or reset.
    pub cache: CacheUse,
}

impl std::ops::Deref for GenerationResult {
    type Target = GenerateOutput;

    fn deref(&self) -> &GenerateOutput {
        &self.output
    }
}

/// A model's lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// Not in memory; a request loads it.
    Unloaded,
    /// Being loaded (or restarted).
    Loading,
    /// Serving.
    Ready,
    /// Failed too often; the reason of the last failure.
    Failed(String),
}

impl ModelState {
    /// The state's name: `unloaded`, `loading`, `ready` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelState::Unloaded => "unloaded",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Failed(_) => "failed",
        }
    }
}

/// What an operator sees of a model.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// The configured name.
    pub name: String,
    /// Whether it is pinned (`pin = true`): kept loaded through eviction and keep-alive.
    pub pinned: bool,
    /// Its state.
    pub state: ModelState,
    /// Its device.
    pub device: String,
    /// The detected architecture, once loaded.
    pub architecture: Option<&'static str>,
    /// Worker restarts so far.
    pub restarts: u64,
    /// Requests waiting.
    pub queue_depth: usize,
    /// Requests being served.
    pub in_flight: usize,
    /// Workers with the model loaded.
    pub ready_workers: usize,
}

/// A stream of generation events. Dropping it cancels the generation within one token.
pub struct GenerationStream {
    receiver: mpsc::UnboundedReceiver<Result<GenerationEvent>>,
}

impl futures::Stream for GenerationStream {
    type Item = Result<GenerationEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

struct PoolInner {
    registry: Arc<Registry>,
    supervisor: actix::Addr<Supervisor>,
    system: Mutex<Option<(actix::System, std::thread::JoinHandle<()>)>>,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        if let Ok(mut system) = self.system.lock() {
            if let Some((system, thread)) = system.take() {
                self.supervisor.do_send(Shutdown);
                // The actor may stop before it handles Shutdown: close every model here too,
                // so no queued request is left without an answer and every worker exits.
                for handle in self.registry.all() {
                    handle.close();
                }
                system.stop();
                let _ = thread.join();
            }
        }
    }
}

/// The embedding handle: a pool of models served by supervised workers.
///
/// It is `Clone + Send + Sync` and works from any tokio runtime: the actix system runs on a
/// thread of its own, and model compute on the workers' threads.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    /// Starts the pool and loads eager models in the background.
    pub fn new(config: Config) -> Result<Pool> {
        config.validate()?;
        crate::metrics::install();
        crate::metrics::configure(&config.metrics);
        crate::resources::set_compute_nice(config.pool.compute_nice);
        let registry = Arc::new(Registry::default());
        for model in config.models {
            registry.insert(ModelHandle::new(model)?);
        }
        let settings = config.pool.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let reg = Arc::clone(&registry);
        let thread = std::thread::Builder::new()
            .name("llm-pool-supervisor".into())
            .spawn(move || {
                let system = actix::System::new();
                let addr = system
                    .block_on(async move { actix::Actor::start(Supervisor::new(reg, settings)) });
                let _ = tx.send((addr, actix::System::current()));
                let _ = system.run();
            })
            .map_err(|e| Error::Unavailable {
                model: "*".into(),
                reason: format!("cannot start the supervisor thread: {e}"),
            })?;
        let (supervisor, system) = rx.recv().map_err(|_| Error::Unavailable {
            model: "*".into(),
            reason: "the supervisor thread died at start".into(),
        })?;
        Ok(Pool {
            inner: Arc::new(PoolInner {
                registry,
                supervisor,
                system: Mutex::new(Some((system, thread))),
            }),
        })
    }

    /// Starts the pool and waits until every eager model is ready (or one failed).
    pub async fn start(config: Config) -> Result<Pool> {
        let eager: Vec<String> = config
            .models
            .iter()
            .filter(|m| m.load == crate::config::LoadPolicy::Eager)
            .map(|m| m.name.clone())
            .collect();
        let pool = Pool::new(config)?;
        for name in eager {
            pool.wait_for(&name).await?;
        }
        Ok(pool)
    }

    /// Loads a configuration file and starts the pool.
    pub async fn from_config_file(path: &std::path::Path) -> Result<Pool> {
        Pool::start(Config::load(path, None)?).await
    }

    /// Waits until the model is ready; fails when it fails or is unloaded meanwhile.
    pub async fn wait_for(&self, name: &str) -> Result<()> {
        let handle = self.inner.registry.get(name)?;
        let mut states = handle.state.subscribe();
        loop {
            let state = states.borrow_and_update().clone();
            match state {
                ModelState::Ready => return Ok(()),
                ModelState::Failed(reason) => {
                    return Err(Error::Unavailable {
                        model: name.to_string(),
                        reason,
                    })
                }
                ModelState::Unloaded | ModelState::Loading => {}
            }
            if states.changed().await.is_err() {
                return Err(Error::Unavailable {
                    model: name.to_string(),
                    reason: "the pool shut down".into(),
                });
            }
        }
    }

    /// Enqueues a request and returns its event stream. Fails at once for an unknown model, a
    /// failed one, or a full queue (`Overloaded`). An unloaded model is loaded on demand.
    pub fn generate_stream(
        &self,
        model: &str,
        request: GenerateRequest,
    ) -> Result<GenerationStream> {
        self.submit(model, request, true)
    }

    /// Enqueues a request; with `stream` false the stream yields only the final event, so no
    /// per-token wake-ups reach the caller's runtime while candle's threads are busy.
    pub(crate) fn submit(
        &self,
        model: &str,
        request: GenerateRequest,
        stream: bool,
    ) -> Result<GenerationStream> {
        let handle = self.inner.registry.get(model)?;
        // Every check that does not need the prompt's tokens, before anything is queued or
        // loaded; the worker prepares the checked request once the model is there.
        let request = request.check(&handle.limits()).inspect_err(|_| {
            crate::metrics::request(model, "invalid");
        })?;
        if let ModelState::Failed(reason) = handle.state() {
            crate::metrics::request(model, "unavailable");
            return Err(Error::Unavailable {
                model: model.to_string(),
                reason: format!("it failed: {reason}"),
            });
        }
        if let Some(keep_alive) = request.keep_alive {
            handle.set_keep_alive(keep_alive);
        }
        let (events, receiver) = mpsc::unbounded_channel();
        handle
            .enqueue(Job {
                request,
                stream,
                events,
                enqueued: Instant::now(),
            })
            .inspect_err(|e| {
                let outcome = match e {
                    Error::Overloaded { .. } => "overloaded",
                    _ => "unavailable",
                };
                crate::metrics::request(model, outcome);
            })?;
        // Read the state after the job is in the queue: an unload, eviction or failure that
        // raced with us has either seen the job (and answers or serves it) or is seen here.
        match handle.state() {
            ModelState::Unloaded => self.inner.supervisor.do_send(Load {
                name: model.to_string(),
            }),
            ModelState::Failed(reason) => {
                handle.drain_queue(|| Error::Unavailable {
                    model: model.to_string(),
                    reason: format!("it failed: {reason}"),
                });
            }
            ModelState::Loading | ModelState::Ready => {}
        }
        Ok(GenerationStream { receiver })
    }

    /// Generates and waits for the whole result.
    pub async fn generate(
        &self,
        model: &str,
        request: GenerateRequest,
    ) -> Result<GenerationResult> {
        use futures::StreamExt;
        let mut stream = self.submit(model, request, false)?;
        while let Some(event) = stream.next().await {
            if let GenerationEvent::Done(result) = event? {
                return Ok(result);
            }
        }
        Err(Error::Unavailable {
            model: model.to_string(),
            reason: "the worker stopped without finishing the request".into(),
        })
    }

    /// Loads a model and waits until it is ready.
    pub async fn load(&self, model: &str) -> Result<()> {
        self.send(Load {
            name: model.to_string(),
        })
        .await?;
        self.wait_for(model).await
    }

    /// Unloads a model. Requests in flight finish first; requests still waiting in its queue
    /// are answered at once with [`Error::Unavailable`] naming the model. A request sent after
    /// the unload loads the model again.
    pub async fn unload(&self, model: &str) -> Result<()> {
        self.send(Unload {
            name: model.to_string(),
            reason: "unload requested",
        })
        .await
    }

    async fn send<M>(&self, msg: M) -> Result<()>
    where
        M: actix::Message<Result = Result<()>> + Send + 'static,
        Supervisor: actix::Handler<M>,
    {
        self.inner
            .supervisor
            .send(msg)
            .await
            .map_err(|e| Error::Unavailable {
                model: "*".into(),
                reason: format!("the supervisor is not running: {e}"),
            })?
    }

    /// Every configured model with its status.
    pub fn models(&self) -> Vec<ModelStatus> {
        self.inner
            .registry
            .all()
            .into_iter()
            .map(|h| ModelStatus {
                name: h.name().to_string(),
                pinned: h.config.pin,
                state: h.state(),
                device: h.device.to_string(),
                architecture: h.architecture.lock().ok().and_then(|a| *a),
                restarts: h.restarts.load(Ordering::SeqCst),
                queue_depth: h.queue_rx.len(),
                in_flight: h.in_flight.load(Ordering::SeqCst),
                ready_workers: h.ready_workers.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// The names of every configured model, sorted.
    pub fn model_names(&self) -> Vec<String> {
        self.inner.registry.names()
    }

    /// The context length of a model, once it has been loaded.
    pub fn context_of(&self, name: &str) -> Option<usize> {
        let handle = self.inner.registry.get(name).ok()?;
        let ctx = handle.max_context.load(Ordering::SeqCst);
        (ctx > 0).then_some(ctx)
    }

    /// Adds a model to the catalog at run time (it loads on its first request or `load`).
    pub fn register(&self, config: crate::config::ModelConfig) -> Result<()> {
        if self.inner.registry.get(&config.name).is_ok() {
            return Err(Error::InvalidParameter {
                param: "name".into(),
                message: format!("model {:?} already exists", config.name),
            });
        }
        let mut check = Config::default();
        check.models.push(config.clone());
        check.validate()?;
        self.inner.registry.insert(ModelHandle::new(config)?);
        Ok(())
    }

    /// The status of one model.
    pub fn model(&self, name: &str) -> Result<ModelStatus> {
        self.inner.registry.get(name)?;
        self.models()
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| Error::UnknownModel {
                name: name.to_string(),
                available: self.inner.registry.names().join(", "),
            })
    }

    /// Stops every worker (after its current request), fails queued requests, and stops the
    /// supervisor.
    pub async fn shutdown(&self) {
        let _ = self.inner.supervisor.send(Shutdown).await;
        for handle in self.inner.registry.all() {
            handle.close();
        }
        let taken = self.inner.system.lock().ok().and_then(|mut s| s.take());
        if let Some((system, thread)) = taken {
            system.stop();
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}
