//! The library's error type: every failure is a value that says what was wrong,
//! where, and (where it applies) what is allowed.

use std::path::PathBuf;

/// Errors returned by the llm-pool library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file or directory could not be read or is malformed.
    #[error("model at {path}: {message}")]
    ModelFile { path: PathBuf, message: String },

    /// The architecture found in a model's metadata is not one llm-pool supports.
    #[error("model at {path}: unsupported architecture {found:?}; supported: {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: String,
    },

    /// A model configuration value (config.json or GGUF metadata) is invalid.
    #[error("model config {key}: {message}")]
    ModelConfig { key: String, message: String },

    /// A device string could not be parsed or the device is not available in this build.
    #[error("device {device:?}: {message}")]
    Device { device: String, message: String },

    /// A request parameter is invalid.
    #[error("invalid parameter {param}: {message}")]
    InvalidParameter { param: String, message: String },

    /// The model was asked for a position that does not follow its cache.
    #[error("position {got} does not follow the {cached} tokens in the KV cache; reset the cache or continue at position {cached}")]
    Position { got: usize, cached: usize },

    /// The request does not fit in the model's context window. `param` is the parameter to
    /// change: `max_tokens` when it alone leaves no room for a prompt, else the prompt's
    /// (`prompt` or `messages`). `prompt_tokens` is `None` when the prompt was not yet
    /// tokenized; `max_tokens` is `None` when it was left to default to what fits.
    #[error("{}", context_message(model, param, *prompt_tokens, *max_tokens, *context))]
    ContextLength {
        model: String,
        param: &'static str,
        prompt_tokens: Option<usize>,
        max_tokens: Option<usize>,
        context: usize,
    },

    /// The tokenizer failed or is missing.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A tensor operation failed inside candle.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),

    /// A panic was caught at a model boundary.
    #[error("panic in {context}: {message}")]
    Panic { context: String, message: String },

    /// No model of that name is configured.
    #[error("unknown model {name:?}; available models: {available}")]
    UnknownModel { name: String, available: String },

    /// The model's queue is full.
    #[error(
        "model {model} is overloaded: its queue of {queue_size} requests is full; retry later"
    )]
    Overloaded { model: String, queue_size: usize },

    /// The model cannot serve requests (failed, unloaded, or the pool is shutting down).
    #[error("model {model} is unavailable: {reason}")]
    Unavailable { model: String, reason: String },

    /// The worker serving the request crashed; the request was not completed. The worker is
    /// being restarted and queued requests are kept.
    #[error("the worker for model {model} crashed while serving this request and is restarting: {cause}")]
    WorkerRestarted { model: String, cause: String },

    /// The grammar of a constrained generation failed mid-way (the output can no longer
    /// satisfy it, or llguidance hit one of its limits).
    #[error("constrained decoding: {0}")]
    Constraint(String),

    /// A quantized kernel was given data that does not fit its weight (shape, size).
    #[error("quantized kernel: {0}")]
    Kernel(String),

    /// Filesystem I/O failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn context_message(
    model: &str,
    param: &str,
    prompt_tokens: Option<usize>,
    max_tokens: Option<usize>,
    context: usize,
) -> String {
    match (param, prompt_tokens, max_tokens) {
        ("max_tokens", Some(p), Some(m)) => format!(
            "context length exceeded: the prompt has {p} tokens and max_tokens is {m}, {} in all, but model {model} has a context of {context} tokens; max_tokens alone must be below {context}",
            p.saturating_add(m)
        ),
        ("max_tokens", None, Some(m)) => format!(
            "context length exceeded: max_tokens is {m}, but model {model} has a context of {context} tokens; max_tokens must be below {context} to leave room for a prompt"
        ),
        (_, Some(p), Some(m)) => format!(
            "context length exceeded: the prompt has {p} tokens and max_tokens is {m}, {} in all, but model {model} has a context of {context} tokens; shorten the {param} or lower max_tokens",
            p.saturating_add(m)
        ),
        (_, Some(p), None) => format!(
            "context length exceeded: the prompt has {p} tokens, but model {model} has a context of {context} tokens and at least one must be left to generate; shorten the {param}"
        ),
        _ => format!("context length exceeded: model {model} has a context of {context} tokens"),
    }
}

impl Error {
    pub(crate) fn model_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::ModelFile {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::ModelConfig {
            key: key.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The same error again, for each of several requests one failure ended (a batched step):
    /// the variants that carry only text are copied as they are, the others keep their
    /// message as a candle error.
    pub(crate) fn shared(&self) -> Self {
        match self {
            Error::Panic { context, message } => Error::Panic {
                context: context.clone(),
                message: message.clone(),
            },
            Error::Kernel(m) => Error::Kernel(m.clone()),
            Error::InvalidParameter { param, message } => Error::InvalidParameter {
                param: param.clone(),
                message: message.clone(),
            },
            other => Error::Candle(candle_core::Error::Msg(other.to_string())),
        }
    }

    /// Turns a caught panic payload into an error.
    pub(crate) fn from_panic(
        context: impl Into<String>,
        payload: Box<dyn std::any::Any + Send>,
    ) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "unknown panic payload".to_string()
        };
        Error::Panic {
            context: context.into(),
            message,
        }
    }
}
