//! Configuration: `config/default.toml`, an optional local file, and environment overrides
//! `LLM_POOL__SECTION__KEY` (for example `LLM_POOL__POOL__MAX_LOADED_MODELS=2`), merged by the
//! `config` crate and validated here. Unknown keys are rejected, so a misspelled key is an
//! error instead of a silently ignored setting.

use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Pool-wide settings.
    #[serde(default)]
    pub pool: PoolSettings,
    /// The HTTP host (used by `llm-pool serve`).
    #[serde(default)]
    pub server: ServerSettings,
    /// The model catalog.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Tenants of the HTTP host; none means the host runs open (with a loud warning).
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// What `/metrics` exports besides llm-pool's own series.
    #[serde(default)]
    pub metrics: MetricsSettings,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Also export the gauges an inference router scrapes under vLLM's names and meanings
    /// (`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
    /// `vllm:cache_config_info`, labelled `model_name`), so that the Kubernetes inference
    /// gateway's endpoint picker can use its built-in vLLM configuration unchanged.
    #[serde(default)]
    pub vllm_compatible_names: bool,
    /// Also record the request histograms under OpenTelemetry's GenAI semantic-convention
    /// names (`gen_ai_server_request_duration_seconds`,
    /// `gen_ai_server_time_to_first_token_seconds`, `gen_ai_server_time_per_output_token_seconds`,
    /// labelled `gen_ai_request_model` and `gen_ai_operation_name`), for dashboards built on
    /// those conventions. Off by default: each is a second copy of a histogram.
    #[serde(default)]
    pub otel_genai_names: bool,
}

/// A tenant of the HTTP host: its API keys, models and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's name (the `tenant` label of request metrics).
    pub name: String,
    /// SHA-256 hashes (hex) of the tenant's API keys: `printf %s KEY | sha256sum`.
    pub api_key_sha256: Vec<String>,
    /// Models the tenant may use; `["*"]` means all.
    pub models: Vec<String>,
    /// Concurrent requests allowed; 0 = no limit.
    #[serde(default)]
    pub max_concurrent_requests: usize,
    /// Prompt plus generated tokens allowed per minute; 0 = no limit.
    #[serde(default)]
    pub tokens_per_minute: u64,
}

/// Pool-wide settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// The most models loaded at once; 0 means no limit. Over it, the least recently used
    /// idle model is unloaded.
    pub max_loaded_models: usize,
    /// Memory budget for loaded weights in MiB (estimated from file sizes); 0 means no limit.
    pub memory_budget_mb: u64,
    /// Consecutive failures (crashes or failed loads) after which a model is marked failed.
    pub max_consecutive_failures: u32,
    /// First restart delay in milliseconds; doubles with each consecutive failure.
    pub restart_backoff_ms: u64,
    /// Cap on the restart delay in milliseconds.
    pub restart_backoff_max_ms: u64,
    /// Directory that admin loads by relative path may read from (issue-free default: none).
    pub models_dir: Option<PathBuf>,
    /// Nice value (0-19) of the threads that run models, below the HTTP host's: when compute
    /// holds every core, `/metrics`, health probes and token streaming are still scheduled
    /// promptly. 0 runs them at normal priority. Linux only.
    pub compute_nice: i32,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_loaded_models: 0,
            memory_budget_mb: 0,
            max_consecutive_failures: 3,
            restart_backoff_ms: 100,
            restart_backoff_max_ms: 10_000,
            models_dir: None,
            compute_nice: crate::resources::DEFAULT_COMPUTE_NICE,
        }
    }
}

/// The HTTP host's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address to listen on; port 0 picks a free port (the log says which).
    pub listen: String,
    /// Largest request body in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// On SIGTERM / Ctrl-C, how long in-flight requests may take to finish, in seconds.
    pub shutdown_timeout_secs: u64,
    /// SHA-256 (hex) of the admin API key; absent disables the admin API.
    pub admin_key_sha256: Option<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            shutdown_timeout_secs: 30,
            admin_key_sha256: None,
        }
    }
}

/// When a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoadPolicy {
    /// At start.
    #[default]
    Eager,
    /// On its first request.
    Lazy,
}

/// When a model's vocabulary is indexed for grammars (structured outputs and forced tool
/// calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GrammarIndex {
    /// With the model: the first constrained request does not wait for it.
    #[default]
    Load,
    /// On the first constrained request, which waits for it (up to a second for a 262k-token
    /// vocabulary); a model never asked for structured output does not hold the index
    /// (about 15 MiB for a 49k-token vocabulary, 105 MiB for 262k).
    FirstUse,
}

/// One model of the catalog.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name requests use.
    pub name: String,
    /// A model directory or a `.gguf` file; relative paths are relative to the working directory.
    pub path: PathBuf,
    /// `cpu`, `cuda:N` or `metal:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto` (F32 on CPU, the checkpoint's dtype on GPUs), `f32`, `f16` or `bf16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Worker threads, each with its own copy of the KV cache.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Requests that may wait for a worker; more get an `overloaded` error at once.
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    /// The most requests one worker runs at once, advanced together by one batched forward
    /// per step (continuous batching).
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// KV cache slots per worker (at least `max_batch_size`; absent = `max_batch_size`). Extra
    /// slots keep finished requests' tokens for prefix reuse.
    #[serde(default)]
    pub max_slots: Option<usize>,
    /// The most prompt tokens one step computes (chunked prefill), so that a long prompt does
    /// not stall the running requests' decoding for long.
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: usize,
    /// KV cache budget per worker in MiB. A request reserves its prompt plus `max_tokens` of it
    /// when it starts, and waits in the queue while that does not fit.
    #[serde(default = "default_kv_cache_mb")]
    pub kv_cache_mb: usize,
    /// `eager` or `lazy`.
    #[serde(default)]
    pub load: LoadPolicy,
    /// Unload after this long idle, e.g. "5m", "30s", "1h"; "0" or absent keeps it loaded.
    #[serde(default)]
    pub keep_alive: Option<String>,
    /// Cap on the context length (0 = the model's own).
    #[serde(default)]
    pub max_context: usize,
    /// A chat template (Jinja source) to use instead of the model's own.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// `load` or `first_use`: when the vocabulary is indexed for grammars.
    #[serde(default)]
    pub grammar_index: GrammarIndex,
    /// Keeps the model loaded: never evicted for `max_loaded_models` or the memory budget, never
    /// unloaded by `keep_alive`. Only an admin unload (or shutdown) unloads it.
    #[serde(default)]
    pub pin: bool,
    /// Default sampling for requests that do not set their own.
    #[serde(default)]
    pub defaults: SamplingDefaults,
}

/// Per-model default sampling parameters.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    /// Default `max_tokens`.
    pub max_tokens: Option<usize>,
    /// Default temperature.
    pub temperature: Option<f64>,
    /// Default top_p.
    pub top_p: Option<f64>,
    /// Default top_k.
    pub top_k: Option<usize>,
    /// Default min_p.
    pub min_p: Option<f64>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f64>,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "auto".into()
}
fn one() -> usize {
    1
}
fn default_queue() -> usize {
    64
}
/// Measured on 2 cores at 16 concurrent streams (docs/BENCHMARKS.md): 16 against 8 gave
/// SmolLM2 740 against 669 tok/s and TTFT p50 16 against 391 ms, Gemma-3 352 against 362
/// tok/s and TTFT p50 44 against 696 ms; a lone request is the same either way.
fn default_max_batch_size() -> usize {
    16
}
fn default_prefill_chunk() -> usize {
    256
}
fn default_kv_cache_mb() -> usize {
    1024
}

impl Config {
    /// Loads `path`, then `local` if given and present, then `LLM_POOL__…` environment
    /// variables, and validates the result.
    pub fn load(path: &Path, local: Option<&Path>) -> Result<Config> {
        if !path.is_file() {
            return Err(Error::config(
                path.display().to_string(),
                "config file not found".to_string(),
            ));
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml));
        if let Some(local) = local {
            builder = builder.add_source(
                config::File::from(local)
                    .format(config::FileFormat::Toml)
                    .required(false),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix("LLM_POOL")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let merged = builder
            .build()
            .map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
        let config: Config = merged
            .try_deserialize()
            .map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML string (no environment overrides) and validates it.
    pub fn from_toml(text: &str) -> Result<Config> {
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|e| Error::config("config", e.to_string()))?;
        let config: Config = merged
            .try_deserialize()
            .map_err(|e| Error::config("config", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; errors name the key, the bad value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = |field: &str| format!("models[{i}] ({}).{field}", m.name);
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
            {
                return Err(Error::config(
                    format!("models[{i}].name"),
                    format!(
                        "{:?} is not allowed; use letters, digits and . _ - :",
                        m.name
                    ),
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(Error::config(
                    key("name"),
                    format!("{:?} is used by two models; names must be unique", m.name),
                ));
            }
            m.device_spec()
                .map_err(|e| Error::config(key("device"), e.to_string()))?;
            m.dtype()
                .map_err(|e| Error::config(key("dtype"), e.to_string()))?;
            if !m.path.exists() {
                return Err(Error::config(
                    key("path"),
                    format!("{} does not exist", m.path.display()),
                ));
            }
            if m.replicas == 0 {
                return Err(Error::config(
                    key("replicas"),
                    "must be at least 1".to_string(),
                ));
            }
            if m.queue_size == 0 {
                return Err(Error::config(
                    key("queue_size"),
                    "must be at least 1".to_string(),
                ));
            }
            for (field, value) in [
                ("max_batch_size", m.max_batch_size),
                ("prefill_chunk", m.prefill_chunk),
                ("kv_cache_mb", m.kv_cache_mb),
            ] {
                if value == 0 {
                    return Err(Error::config(key(field), "must be at least 1".to_string()));
                }
            }
            if m.slots() < m.max_batch_size {
                return Err(Error::config(
                    key("max_slots"),
                    format!(
                        "{} is fewer than max_batch_size ({}); every running request needs a slot, so max_slots must be at least max_batch_size",
                        m.slots(),
                        m.max_batch_size
                    ),
                ));
            }
            m.keep_alive()
                .map_err(|e| Error::config(key("keep_alive"), e))?;
        }
        let is_sha256 = |h: &str| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit());
        if let Some(h) = &self.server.admin_key_sha256 {
            if !is_sha256(h) {
                return Err(Error::config(
                    "server.admin_key_sha256",
                    "must be 64 hex digits: the SHA-256 of the key (printf %s KEY | sha256sum)"
                        .to_string(),
                ));
            }
        }
        let mut tenant_names = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let key = |field: &str| format!("tenants[{i}] ({}).{field}", t.name);
            if !tenant_names.insert(t.name.as_str()) {
                return Err(Error::config(
                    key("name"),
                    "tenant names must be unique".to_string(),
                ));
            }
            if t.api_key_sha256.is_empty() {
                return Err(Error::config(
                    key("api_key_sha256"),
                    "at least one key hash is needed".to_string(),
                ));
            }
            if let Some(bad) = t.api_key_sha256.iter().find(|h| !is_sha256(h)) {
                return Err(Error::config(
                    key("api_key_sha256"),
                    format!("{bad:?} must be 64 hex digits: the SHA-256 of the key (printf %s KEY | sha256sum)"),
                ));
            }
            if let Some(bad) = t
                .models
                .iter()
                .find(|m| *m != "*" && !names.contains(m.as_str()))
            {
                return Err(Error::config(
                    key("models"),
                    format!(
                        "{bad:?} is not in the model catalog; allowed: {} or \"*\"",
                        self.models
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        if !(0..=19).contains(&self.pool.compute_nice) {
            return Err(Error::config(
                "pool.compute_nice",
                format!(
                    "{} is not allowed; allowed: 0 (normal priority) to 19 (lowest)",
                    self.pool.compute_nice
                ),
            ));
        }
        if self.pool.max_consecutive_failures == 0 {
            return Err(Error::config(
                "pool.max_consecutive_failures",
                "must be at least 1".to_string(),
            ));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// A config for `path` with every default, named `name`.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        ModelConfig {
            name: name.into(),
            path: path.into(),
            device: default_device(),
            dtype: default_dtype(),
            replicas: 1,
            queue_size: default_queue(),
            max_batch_size: default_max_batch_size(),
            max_slots: None,
            prefill_chunk: default_prefill_chunk(),
            kv_cache_mb: default_kv_cache_mb(),
            load: LoadPolicy::Eager,
            keep_alive: None,
            max_context: 0,
            chat_template: None,
            grammar_index: GrammarIndex::Load,
            pin: false,
            defaults: SamplingDefaults::default(),
        }
    }

    /// KV cache slots per worker: `max_slots`, or `max_batch_size` when unset.
    pub fn slots(&self) -> usize {
        self.max_slots.unwrap_or(self.max_batch_size)
    }

    /// The parsed device.
    pub fn device_spec(&self) -> Result<DeviceSpec> {
        self.device.parse()
    }

    /// The parsed dtype (`None` = auto).
    pub fn dtype(&self) -> Result<Option<candle_core::DType>> {
        use candle_core::DType;
        match self.dtype.to_ascii_lowercase().as_str() {
            "auto" => Ok(None),
            "f32" | "float32" => Ok(Some(DType::F32)),
            "f16" | "float16" => Ok(Some(DType::F16)),
            "bf16" | "bfloat16" => Ok(Some(DType::BF16)),
            other => Err(Error::InvalidParameter {
                param: "dtype".into(),
                message: format!("{other:?} is not allowed; allowed: auto, f32, f16, bf16"),
            }),
        }
    }

    /// The parsed keep-alive (`None` = never unload).
    pub fn keep_alive(&self) -> std::result::Result<Option<Duration>, String> {
        match self.keep_alive.as_deref() {
            None => Ok(None),
            Some(s) => parse_duration(s).map(|d| (!d.is_zero()).then_some(d)),
        }
    }
}

/// Parses "90", "90s", "5m", "1h", "250ms".
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| t.split_at(i))
        .unwrap_or((t, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 30s, 5m, 1h, 250ms or 0"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{s:?} has unit {unit:?}; allowed units: ms, s, m, h"
            ))
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_win_over_the_files() {
        let dir = std::env::temp_dir().join(format!("llm-pool-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.toml");
        let local = dir.join("local.toml");
        std::fs::write(
            &base,
            "[server]\nlisten = \"127.0.0.1:1\"\n[pool]\nmax_loaded_models = 1\n",
        )
        .unwrap();
        std::fs::write(&local, "[pool]\nmax_loaded_models = 2\n").unwrap();
        // Only this test in this binary reads these variables.
        std::env::set_var("LLM_POOL__SERVER__LISTEN", "0.0.0.0:9999");
        let config = Config::load(&base, Some(&local)).unwrap();
        std::env::remove_var("LLM_POOL__SERVER__LISTEN");
        assert_eq!(config.server.listen, "0.0.0.0:9999");
        assert_eq!(
            config.pool.max_loaded_models, 2,
            "the local file overrides the base"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn grammar_index_takes_load_or_first_use() {
        let dir = std::env::temp_dir().join(format!("llm-pool-grammar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let weights = dir.join("m.gguf");
        std::fs::write(&weights, b"").unwrap();
        let model = format!(
            "[[models]]\nname = \"m\"\npath = {:?}\nload = \"lazy\"\n",
            weights.display().to_string()
        );
        std::fs::write(&path, format!("{model}grammar_index = \"first_use\"\n")).unwrap();
        let config = Config::load(&path, None).unwrap();
        assert_eq!(config.models[0].grammar_index, GrammarIndex::FirstUse);
        std::fs::write(&path, &model).unwrap();
        let config = Config::load(&path, None).unwrap();
        assert_eq!(config.models[0].grammar_index, GrammarIndex::Load);
        std::fs::write(&path, format!("{model}grammar_index = \"never\"\n")).unwrap();
        let err = Config::load(&path, None).unwrap_err().to_string();
        assert!(
            err.contains("grammar_index") || err.contains("never"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compute_nice_takes_0_to_19() {
        let check = |nice: i32| {
            Config::from_toml(&format!("[pool]\ncompute_nice = {nice}\n"))
                .and_then(|c| c.validate())
        };
        assert!(check(0).is_ok() && check(19).is_ok());
        for bad in [-1, 20] {
            let err = check(bad).unwrap_err().to_string();
            assert!(
                err.contains("pool.compute_nice") && err.contains("0 (normal priority) to 19"),
                "{err}"
            );
        }
        assert_eq!(
            Config::from_toml("").unwrap().pool.compute_nice,
            crate::resources::DEFAULT_COMPUTE_NICE
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("1 fortnight")
            .unwrap_err()
            .contains("allowed units"));
    }
}
