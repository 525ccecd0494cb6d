//! Hugging Face model directories: config.json (both the legacy layout and the one
//! transformers >= 5 writes), generation_config.json, RoPE settings, and safetensors weights
//! (single or sharded through `model.safetensors.index.json`).
//!
//! Adapters read config.json through [`HfConfig`], whose getters fail with an error naming the
//! key, the bad value and what is allowed, instead of relying on candle's `Deserialize` impls,
//! which reject many real configs (`sliding_window: null`, private fields, no impl at all).

use super::LoadOptions;
use crate::error::{Error, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// An opened Hugging Face model directory.
#[derive(Debug, Clone)]
pub struct HfModelDir {
    /// The directory.
    pub dir: PathBuf,
    /// config.json.
    pub config: HfConfig,
    /// generation_config.json, when present.
    pub generation_config: Option<Value>,
    /// The safetensors files that hold the weights, every one checked to exist.
    pub weight_files: Vec<PathBuf>,
}

impl HfModelDir {
    /// Opens `dir`: reads config.json and finds the weight files.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::model_file(
                dir,
                "no config.json: a model directory needs config.json plus *.safetensors (or pass a .gguf file)",
            ));
        }
        let config = HfConfig::from_file(&config_path)?;
        let generation_config = match dir.join("generation_config.json") {
            p if p.is_file() => Some(read_json(&p)?),
            _ => None,
        };
        let weight_files = find_weight_files(dir)?;
        Ok(HfModelDir {
            dir: dir.to_path_buf(),
            config,
            generation_config,
            weight_files,
        })
    }

    /// The dtype to compute in: the caller's choice, else F32 on CPU (BF16 matmul is about 18x
    /// slower there), else the checkpoint's `dtype` / `torch_dtype`.
    pub fn dtype(&self, options: &LoadOptions) -> Result<DType> {
        if let Some(dtype) = options.dtype {
            return Ok(dtype);
        }
        if options.device.is_cpu() {
            return Ok(DType::F32);
        }
        let declared = self
            .config
            .get("dtype")
            .or_else(|| self.config.get("torch_dtype"));
        Ok(match declared.and_then(Value::as_str) {
            Some("bfloat16") => DType::BF16,
            Some("float16") => DType::F16,
            _ => DType::F32,
        })
    }

    /// A var builder over the memory-mapped weight files.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        // SAFETY: the files are memory-mapped read-only; like every mmap-based loader we rely
        // on nobody truncating them while the model is loaded.
        unsafe { VarBuilder::from_mmaped_safetensors(&self.weight_files, dtype, device) }
            .map_err(|e| Error::model_file(&self.dir, format!("reading safetensors weights: {e}")))
    }

    /// End-of-sequence ids from config.json and generation_config.json (each an int or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = BTreeSet::new();
        collect_ids(self.config.get("eos_token_id"), &mut ids);
        if let Some(gen) = &self.generation_config {
            collect_ids(gen.get("eos_token_id"), &mut ids);
        }
        ids.into_iter().collect()
    }

    /// The beginning-of-sequence id, when declared.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.config
            .get("bos_token_id")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }
}

fn collect_ids(v: Option<&Value>, out: &mut BTreeSet<u32>) {
    match v {
        Some(Value::Number(n)) => {
            if let Some(id) = n.as_u64().and_then(|v| u32::try_from(v).ok()) {
                out.insert(id);
            }
        }
        Some(Value::Array(items)) => {
            for item in items {
                collect_ids(Some(item), out);
            }
        }
        _ => {}
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model_file(path, format!("invalid JSON: {e}")))
}

fn find_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::model_file(&index, "no `weight_map` object"))?;
        let names: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        if names.is_empty() {
            return Err(Error::model_file(&index, "`weight_map` lists no files"));
        }
        let mut files = Vec::new();
        for name in names {
            // Shard names come from a file; refuse anything that would leave the directory.
            if name.contains('/') || name.contains('\\') || name.contains("..") {
                return Err(Error::model_file(
                    &index,
                    format!("shard name {name:?} must be a plain file name in the model directory"),
                ));
            }
            let path = dir.join(name);
            if !path.is_file() {
                return Err(Error::model_file(
                    &index,
                    format!("missing shard {name} listed in weight_map"),
                ));
            }
            files.push(path);
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::model_file(
            dir,
            "no *.safetensors weights (and no model.safetensors.index.json)",
        ));
    }
    Ok(files)
}

/// config.json, with typed getters whose errors name the key and what is allowed.
#[derive(Debug, Clone)]
pub struct HfConfig {
    path: PathBuf,
    value: Value,
}

/// The largest integer a config.json size or count may have (2^24: above every real model's
/// layers, heads, widths, vocabulary and context, Llama 4's 10M context included).
pub const MAX_CONFIG_INTEGER: u64 = 1 << 24;

impl HfConfig {
    /// Reads and parses a config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        if !value.is_object() {
            return Err(Error::model_file(path, "config.json must be a JSON object"));
        }
        Ok(HfConfig {
            path: path.to_path_buf(),
            value,
        })
    }

    /// Wraps an in-memory config (used for nested configs such as Gemma 3's `text_config`).
    pub fn from_value(path: &Path, value: Value) -> Self {
        HfConfig {
            path: path.to_path_buf(),
            value,
        }
    }

    /// The raw JSON.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// A raw key, treating `null` as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, message: String) -> Error {
        Error::config(format!("{}: {key}", self.path.display()), message)
    }

    /// `model_type`, when present.
    pub fn model_type(&self) -> Option<&str> {
        self.get("model_type").and_then(Value::as_str)
    }

    /// A required positive integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "is required (a positive integer)".into()))
    }

    /// An optional non-negative integer, at most [`MAX_CONFIG_INTEGER`].
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                // Sizes and counts size allocations (layer lists, RoPE tables, caches): a
                // corrupt value must be an error here, not an allocation that aborts.
                Some(n) if n > MAX_CONFIG_INTEGER => Err(self.err(
                    key,
                    format!("is {n}, more than the largest supported value {MAX_CONFIG_INTEGER}"),
                )),
                Some(n) => Ok(Some(n as usize)),
                None => Err(self.err(key, format!("must be a non-negative integer, found {v}"))),
            },
        }
    }

    /// An integer with a default when absent.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    /// A required number.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| self.err(key, "is required (a number)".into()))
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be a number, found {v}"))),
        }
    }

    /// A number with a default when absent.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// A boolean with a default when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("must be true or false, found {v}"))),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be a string, found {v}"))),
        }
    }

    /// The activation function, read from `hidden_act` or `hidden_activation` (Gemma configs set
    /// either or both), checked against the ones the family supports.
    pub fn activation(&self, allowed: &[&str], default: &str) -> Result<String> {
        let act = match self.opt_str("hidden_activation")? {
            Some(a) => a,
            None => self.opt_str("hidden_act")?.unwrap_or(default),
        };
        if allowed.contains(&act) {
            Ok(act.to_string())
        } else {
            Err(self.err(
                "hidden_act",
                format!("{act:?} is not supported; allowed: {}", allowed.join(", ")),
            ))
        }
    }

    /// Fails unless the key is absent or has the given boolean value; for features of a
    /// checkpoint that the candle model cannot compute (a bias it has no weights for, say).
    pub fn require_bool(&self, key: &str, supported: bool, family: &str) -> Result<()> {
        let found = self.bool_or(key, supported)?;
        if found != supported {
            return Err(self.err(
                key,
                format!("{found} is not supported for {family}; only {supported} is"),
            ));
        }
        Ok(())
    }

    /// `head_dim`, checked to equal `hidden_size / num_attention_heads` for models whose candle
    /// implementation derives it.
    pub fn require_derived_head_dim(&self) -> Result<usize> {
        let hidden = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        if heads == 0 || hidden % heads != 0 {
            return Err(self.err(
                "num_attention_heads",
                format!("{heads} must divide hidden_size {hidden}"),
            ));
        }
        let derived = hidden / heads;
        if let Some(hd) = self.opt_usize("head_dim")? {
            if hd != derived {
                return Err(self.err(
                    "head_dim",
                    format!("{hd} is not supported; this architecture needs hidden_size / num_attention_heads = {derived}"),
                ));
            }
        }
        Ok(derived)
    }

    /// The RoPE settings, from either config layout.
    ///
    /// - legacy: top-level `rope_theta` (absent means `default_theta`, as in transformers),
    ///   `rope_scaling` and `partial_rotary_factor`;
    /// - transformers >= 5: `rope_parameters` holding `rope_type`, `rope_theta` and the scaling
    ///   fields, either flat or nested per layer type (`full_attention`, `sliding_attention`,
    ///   as Gemma 3 writes it), selected with `layer_type`.
    ///
    /// A setting present but unreadable is an error, never a silent default.
    pub fn rope(&self, layer_type: Option<&str>, default_theta: f64) -> Result<Rope> {
        if let Some(params) = self.get("rope_parameters") {
            let obj = params.as_object().ok_or_else(|| {
                self.err(
                    "rope_parameters",
                    format!("must be an object, found {params}"),
                )
            })?;
            let flat = obj.contains_key("rope_type") || obj.contains_key("rope_theta");
            let (key, params) = if flat {
                ("rope_parameters".to_string(), params)
            } else {
                let lt = layer_type.ok_or_else(|| {
                    self.err(
                        "rope_parameters",
                        "has neither rope_type nor rope_theta at its top level".into(),
                    )
                })?;
                let nested = obj.get(lt).ok_or_else(|| {
                    self.err(
                        "rope_parameters",
                        format!(
                            "has no entry for layer type {lt:?}; found: {}",
                            obj.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    )
                })?;
                (format!("rope_parameters.{lt}"), nested)
            };
            let theta = match params.get("rope_theta") {
                None | Some(Value::Null) => default_theta,
                Some(v) => v.as_f64().ok_or_else(|| {
                    self.err(
                        &format!("{key}.rope_theta"),
                        format!("must be a number, found {v}"),
                    )
                })?,
            };
            let scaling = self.parse_scaling(&key, params)?;
            let partial = match params.get("partial_rotary_factor") {
                None | Some(Value::Null) => self.opt_f64("partial_rotary_factor")?,
                Some(v) => Some(v.as_f64().ok_or_else(|| {
                    self.err(
                        &format!("{key}.partial_rotary_factor"),
                        format!("must be a number, found {v}"),
                    )
                })?),
            };
            return Ok(Rope {
                theta,
                scaling,
                partial_rotary_factor: partial,
            });
        }
        let theta = self.f64_or("rope_theta", default_theta)?;
        let scaling = match self.get("rope_scaling") {
            None => RopeScaling::None,
            Some(v) => self.parse_scaling("rope_scaling", v)?,
        };
        Ok(Rope {
            theta,
            scaling,
            partial_rotary_factor: self.opt_f64("partial_rotary_factor")?,
        })
    }

    fn parse_scaling(&self, key: &str, v: &Value) -> Result<RopeScaling> {
        let obj = v
            .as_object()
            .ok_or_else(|| self.err(key, format!("must be an object, found {v}")))?;
        let rope_type = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |field: &str| -> Result<f64> {
            obj.get(field).and_then(Value::as_f64).ok_or_else(|| {
                self.err(
                    &format!("{key}.{field}"),
                    format!("is required (a number) for rope_type {rope_type:?}"),
                )
            })
        };
        Ok(match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            },
            other => RopeScaling::Other {
                rope_type: other.to_string(),
                params: v.clone(),
            },
        })
    }

    /// An error for a RoPE setting this architecture cannot compute.
    pub fn unsupported_rope(&self, rope: &Rope, family: &str, allowed: &[&str]) -> Error {
        self.err(
            "rope_scaling",
            format!(
                "rope_type {:?} is not supported for {family}; allowed: {}",
                rope.scaling.name(),
                allowed.join(", ")
            ),
        )
    }
}

/// Mappings several architectures share, each refusing what no implementation here computes.
impl HfConfig {
    /// `num_attention_heads` and `num_key_value_heads`, with the family's defaults when absent
    /// (`None`: the query heads are required; the key/value heads default to as many), checked
    /// for grouped-query attention: whole groups only.
    pub fn heads(
        &self,
        default_heads: Option<usize>,
        default_kv_heads: Option<usize>,
    ) -> Result<(usize, usize)> {
        let heads = match default_heads {
            Some(d) => self.usize_or("num_attention_heads", d)?,
            None => self.usize("num_attention_heads")?,
        };
        let kv_heads = self.usize_or("num_key_value_heads", default_kv_heads.unwrap_or(heads))?;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(self.err(
                "num_key_value_heads",
                format!("{kv_heads} must be positive and divide num_attention_heads {heads}"),
            ));
        }
        Ok((heads, kv_heads))
    }

    /// transformers' `head_dim or hidden_size // num_attention_heads` (an explicit 0 counts as
    /// absent), checked even for RoPE.
    pub fn head_dim(&self, hidden_size: usize, heads: usize) -> Result<usize> {
        let head_dim = match self.opt_usize("head_dim")? {
            Some(hd) if hd > 0 => hd,
            _ => {
                if heads == 0 || !hidden_size.is_multiple_of(heads) {
                    return Err(self.err(
                        "num_attention_heads",
                        format!("{heads} must divide hidden_size {hidden_size} when head_dim is not given"),
                    ));
                }
                hidden_size / heads
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(self.err(
                "head_dim",
                format!("{head_dim} is not supported; RoPE needs an even head_dim"),
            ));
        }
        Ok(head_dim)
    }

    /// `head_dim` as the config states it, else `hidden_size / num_attention_heads`, which must
    /// then divide exactly (Phi-3, Gemma).
    pub fn stated_head_dim(&self) -> Result<usize> {
        match self.opt_usize("head_dim")? {
            Some(hd) => Ok(hd),
            None => self.require_derived_head_dim(),
        }
    }

    /// The RoPE base of a family that rotates whole heads with no scaling; anything else is
    /// refused, naming the family.
    pub fn plain_rope(
        &self,
        layer_type: Option<&str>,
        default_theta: f64,
        family: &str,
    ) -> Result<f64> {
        let rope = self.rope(layer_type, default_theta)?;
        if rope.scaling != RopeScaling::None || rope.partial_rotary_factor.is_some_and(|f| f != 1.0)
        {
            return Err(self.unsupported_rope(&rope, family, &["default"]));
        }
        Ok(rope.theta)
    }

    /// The rotated part of each head: `partial_rotary_factor` (from `rope`, else
    /// `default_factor`) of `head_dim`, which must be an even, non-zero number of dimensions.
    pub fn rotary_dim(&self, rope: &Rope, default_factor: f64, head_dim: usize) -> Result<usize> {
        let partial = rope.partial_rotary_factor.unwrap_or(default_factor);
        let rotary_dim = (partial * head_dim as f64) as usize;
        if !(partial > 0.0 && partial <= 1.0) || rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(self.err(
                "partial_rotary_factor",
                format!(
                    "{partial} is not supported: it must be in (0, 1] and rotate an even, non-zero \
                     number of the {head_dim} head dimensions (found {rotary_dim})"
                ),
            ));
        }
        Ok(rotary_dim)
    }

    /// The activation, read as [`HfConfig::activation`] does and mapped to candle's:
    /// transformers' `gelu` is the exact (erf) GELU, `gelu_new` and `gelu_pytorch_tanh` the
    /// tanh approximation.
    pub fn activation_fn(&self, allowed: &[&str], default: &str) -> Result<candle_nn::Activation> {
        use candle_nn::Activation;
        Ok(match self.activation(allowed, default)?.as_str() {
            "silu" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluPytorchTanh,
            other => {
                return Err(self.err(
                    "hidden_act",
                    format!("{other:?} has no implementation here"),
                ))
            }
        })
    }

    /// `sliding_window`: the keys a query sees, itself included, or `None` for full attention.
    /// `absent` is the family's default when the key is missing; an explicit `null` means none
    /// and 0 is an error.
    pub fn sliding_window(&self, absent: Option<usize>) -> Result<Option<usize>> {
        let window = match self.value.get("sliding_window") {
            None => absent,
            Some(Value::Null) => None,
            Some(_) => self.opt_usize("sliding_window")?,
        };
        if window == Some(0) {
            return Err(self.err(
                "sliding_window",
                "0 is not a valid window; use null for full attention".into(),
            ));
        }
        Ok(window)
    }

    /// `layer_types` (transformers >= 5 writes it for models with sliding layers): per layer,
    /// `true` for `sliding_attention`, `false` for `full_attention`. `None` when the config
    /// predates the key, and the family derives the pattern itself.
    pub fn layer_types(&self, num_layers: usize) -> Result<Option<Vec<bool>>> {
        let Some(v) = self.get("layer_types") else {
            return Ok(None);
        };
        let items = v.as_array().ok_or_else(|| {
            self.err(
                "layer_types",
                format!("must be a list of layer type names, found {v}"),
            )
        })?;
        if items.len() != num_layers {
            return Err(self.err(
                "layer_types",
                format!(
                    "lists {} layers but num_hidden_layers is {num_layers}",
                    items.len()
                ),
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(self.err(
                    "layer_types",
                    format!("entry {i} is {t}; allowed: \"full_attention\", \"sliding_attention\""),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// RoPE settings read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// The base frequency.
    pub theta: f64,
    /// The scaling rule.
    pub scaling: RopeScaling,
    /// The fraction of each head that is rotated, when the config states one.
    pub partial_rotary_factor: Option<f64>,
}

/// A RoPE scaling rule.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No scaling (`default`).
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Scaling factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context the model was trained with before scaling.
        original_max_position_embeddings: usize,
    },
    /// A rule the caller must accept or reject by name (`yarn`, `longrope`, `su`, ...).
    Other {
        /// The `rope_type` / `type` string.
        rope_type: String,
        /// The whole scaling object.
        params: Value,
    },
}

impl RopeScaling {
    /// A number among the parameters of a rule the caller interprets ([`RopeScaling::Other`]):
    /// `None` when absent or null (or for another rule), an error naming `rope_scaling.{key}`
    /// when it is not a number.
    pub fn param(&self, key: &str) -> Result<Option<f64>> {
        let RopeScaling::Other { params, .. } = self else {
            return Ok(None);
        };
        match params.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::config(
                    format!("rope_scaling.{key}"),
                    format!("must be a number, found {v}"),
                )
            }),
        }
    }

    /// The rule's `rope_type` name.
    pub fn name(&self) -> &str {
        match self {
            RopeScaling::None => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Other { rope_type, .. } => rope_type,
        }
    }
}

/// Test support: a config.json under `tests/fixtures/` (`hf/qwen2/config.json`, ...).
#[cfg(test)]
pub(crate) fn fixture_config(file: &str) -> HfConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    match HfConfig::from_file(&path) {
        Ok(c) => c,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// Test support: maps the fixture `hf/{name}` in both config.json layouts (`config.json`,
/// as transformers >= 5 writes it, and `config.legacy.json`), asserts they map alike, and
/// returns the mapping.
#[cfg(test)]
pub(crate) fn both_layouts<C: PartialEq + std::fmt::Debug>(
    name: &str,
    map: impl Fn(&HfConfig) -> Result<C>,
) -> C {
    let layout = |file: &str| map(&fixture_config(&format!("hf/{name}/{file}"))).unwrap();
    let new = layout("config.json");
    assert_eq!(new, layout("config.legacy.json"));
    new
}

/// Test support: the error message `map` gives for the config.json `value`.
#[cfg(test)]
pub(crate) fn mapping_error<C: std::fmt::Debug>(
    map: impl Fn(&HfConfig) -> Result<C>,
    value: Value,
) -> String {
    let config = HfConfig::from_value(Path::new("config.json"), value);
    map(&config).unwrap_err().to_string()
}

/// Test support: a real hub config.json from `tests/fixtures/real_configs/`.
#[cfg(test)]
pub(crate) fn real_config(name: &str) -> HfConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/real_configs")
        .join(name);
    match HfConfig::from_file(&path) {
        Ok(c) => c,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}
