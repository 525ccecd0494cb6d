//! The text side of a model: its tokenizer (from whichever source the model ships), special
//! tokens, chat template and end-of-sequence set.

use super::chat::ChatTemplate;
use super::constrain::ConstraintEnv;
use super::gguf_tokenizer;
use super::token_bytes::TokenBytes;
use crate::error::{Error, Result};
use crate::models::gguf::GgufFile;
use crate::models::ModelInfo;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};
pub use tokenizers::Tokenizer;

/// End-of-turn markers of common chat formats. Each one the vocabulary has joins the stop set,
/// whether or not the model ships a template: a chat model ends its turn with it, often not with
/// its `eos` (llama.cpp treats the same tokens as end-of-generation).
pub const END_OF_TURN_MARKERS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<｜end▁of▁sentence｜>",
];

/// A model's tokenizer, special tokens, chat template and stop set.
#[derive(Clone)]
pub struct ModelText {
    /// The tokenizer. Encoding with special tokens adds BOS when the model asks for it.
    pub tokenizer: Tokenizer,
    /// The chat template, when the model (or the configuration) has one.
    pub chat_template: Option<ChatTemplate>,
    /// The BOS token's text, for templates.
    pub bos_token: Option<String>,
    /// The EOS token's text, for templates.
    pub eos_token: Option<String>,
    /// Token ids that end a generation: the model's end-of-sequence ids, the tokenizer's EOS,
    /// and the end-of-turn tokens of the vocabulary.
    pub stop_token_ids: Vec<u32>,
    /// Built on first use: the bytes of every token and the grammar compiler.
    vocab: Arc<VocabTables>,
}

/// What structured outputs and logprobs need of the vocabulary, built once per model on the
/// first request that asks (hundreds of milliseconds for a large vocabulary).
#[derive(Default)]
struct VocabTables {
    width: usize,
    bytes: OnceLock<std::result::Result<Arc<TokenBytes>, String>>,
    constraint: OnceLock<std::result::Result<Arc<ConstraintEnv>, String>>,
}

impl std::fmt::Debug for ModelText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelText")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("stop_token_ids", &self.stop_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl ModelText {
    /// Loads the text side of the model at `model_path` (a directory or a GGUF file).
    ///
    /// `template_override` replaces (or supplies) the chat template. Returns `Ok(None)` when
    /// the model ships no tokenizer at all (it can still run on token ids).
    pub fn load(
        model_path: &Path,
        info: &ModelInfo,
        template_override: Option<&str>,
    ) -> Result<Option<ModelText>> {
        let (tokenizer, template_src, bos_token, eos_token) = if model_path.is_dir() {
            let path = model_path.join("tokenizer.json");
            if !path.is_file() {
                return Ok(None);
            }
            let tokenizer = Tokenizer::from_file(&path)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
            let cfg_path = model_path.join("tokenizer_config.json");
            let cfg = if cfg_path.is_file() {
                let text =
                    std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
                serde_json::from_str::<Value>(&text).map_err(|e| {
                    Error::Tokenizer(format!("{}: invalid JSON: {e}", cfg_path.display()))
                })?
            } else {
                Value::Null
            };
            let template = template_from_tokenizer_config(&cfg, &cfg_path)?;
            let template = match template {
                Some(t) => Some(t),
                // Newer checkpoints keep the template in its own file.
                None => {
                    let jinja = model_path.join("chat_template.jinja");
                    if jinja.is_file() {
                        Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
                    } else {
                        None
                    }
                }
            };
            (
                tokenizer,
                template,
                special_token_text(cfg.get("bos_token")),
                special_token_text(cfg.get("eos_token")),
            )
        } else {
            let file = GgufFile::open(model_path)?;
            let Some(tokenizer) = gguf_tokenizer::from_gguf(&file)? else {
                return Ok(None);
            };
            let template = match file.get("tokenizer.chat_template") {
                Some(v) => Some(
                    v.to_string()
                        .map_err(|_| {
                            Error::Tokenizer(format!(
                                "{}: tokenizer.chat_template must be a string",
                                model_path.display()
                            ))
                        })?
                        .clone(),
                ),
                None => None,
            };
            let text_of = |key: &str| -> Result<Option<String>> {
                Ok(file
                    .opt_u64(key)?
                    .and_then(|id| tokenizer.id_to_token(id as u32)))
            };
            let bos = text_of("tokenizer.ggml.bos_token_id")?;
            let eos = text_of("tokenizer.ggml.eos_token_id")?;
            (tokenizer, template, bos, eos)
        };

        let template_src = template_override.map(str::to_string).or(template_src);
        let chat_template = match template_src {
            Some(src) => Some(ChatTemplate::new(
                &src,
                bos_token.clone(),
                eos_token.clone(),
            )?),
            None => None,
        };

        let mut stop: BTreeSet<u32> = info.eos_token_ids.iter().copied().collect();
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            stop.insert(id);
        }
        for marker in END_OF_TURN_MARKERS {
            if let Some(id) = tokenizer.token_to_id(marker) {
                stop.insert(id);
            }
        }
        Ok(Some(ModelText {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            stop_token_ids: stop.into_iter().collect(),
            vocab: Arc::new(VocabTables {
                width: info.vocab_size,
                ..VocabTables::default()
            }),
        }))
    }

    /// The bytes of every token id, padded to the model's logits width.
    pub fn token_bytes(&self) -> Result<Arc<TokenBytes>> {
        self.vocab
            .bytes
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let width = self.vocab.width.max(self.tokenizer.get_vocab_size(true));
                let table = TokenBytes::new(&self.tokenizer, width).map(Arc::new);
                tracing::debug!(elapsed = ?started.elapsed(), "token byte table built");
                table.map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::Tokenizer)
    }

    /// The grammar compiler for this vocabulary (structured outputs, tool calls).
    pub fn constraint_env(&self) -> Result<Arc<ConstraintEnv>> {
        self.vocab
            .constraint
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let env = self.token_bytes().and_then(|bytes| {
                    ConstraintEnv::new(&self.tokenizer, &bytes, &self.stop_token_ids)
                });
                tracing::info!(elapsed = ?started.elapsed(), "grammar compiler built for this vocabulary");
                env.map(Arc::new).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::Constraint)
    }

    /// Builds a `ModelText` from its parts (tests and programs with their own tokenizer).
    /// `width` is the model's vocabulary size (its logits width).
    pub fn from_parts(
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        stop_token_ids: Vec<u32>,
        width: usize,
    ) -> Self {
        ModelText {
            tokenizer,
            chat_template,
            bos_token: None,
            eos_token: None,
            stop_token_ids,
            vocab: Arc::new(VocabTables {
                width,
                ..VocabTables::default()
            }),
        }
    }

    /// Encodes text. `add_special_tokens` adds BOS (and EOS) where the model asks for them;
    /// pass `false` for a rendered chat prompt, whose template writes them itself.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(format!("encoding: {e}")))
    }

    /// Decodes ids, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("decoding: {e}")))
    }
}

fn template_from_tokenizer_config(cfg: &Value, path: &Path) -> Result<Option<String>> {
    match cfg.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        // A list of named templates: use the one named "default".
        Some(Value::Array(items)) => Ok(items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string)),
        Some(other) => Err(Error::Tokenizer(format!(
            "{}: chat_template must be a string or a list of named templates, found {other}",
            path.display()
        ))),
    }
}

/// `"bos_token": "<s>"` or `"bos_token": {"content": "<s>", ...}`.
fn special_token_text(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
