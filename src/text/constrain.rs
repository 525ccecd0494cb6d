//! Constrained decoding: structured outputs (JSON, a JSON schema, a Lark grammar, a regex)
//! enforced token by token with llguidance.
//!
//! Per model, a [`ConstraintEnv`] holds llguidance's view of the vocabulary (the bytes of every
//! token, from [`TokenBytes`]) and is built once, on the first constrained request. Per
//! generation, a [`Constraint`] follows the output and answers two questions at each step:
//! does the grammar allow this token, and if not, which tokens does it allow.
//!
//! Sampling checks the token it picked first and computes the full mask only when the pick is
//! not allowed (as mistral.rs and llama.cpp do): most steps of a JSON answer are ones the
//! model gets right by itself, and checking one token costs far less than a mask over the
//! whole vocabulary. Resampling from the masked logits gives exactly the masked distribution.
//!
//! JSON is generated compactly, with `", "` and `": "` as separators and no other whitespace:
//! a small model allowed free whitespace can loop on newlines forever.

use super::token_bytes::{TokenBytes, VocabEncoding};
use crate::error::{Error, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// What output a request is constrained to.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against a JSON schema.
    JsonSchema(Value),
    /// A Lark grammar in llguidance's dialect (which can embed JSON schemas with `%json`).
    Lark(String),
    /// A regular expression the whole output must match.
    Regex(String),
}

/// A grammar, and the request field it came from (named when it cannot be enforced).
#[derive(Debug, Clone, PartialEq)]
pub struct Constrained {
    /// The grammar.
    pub grammar: Grammar,
    /// The request field: `response_format`, `tool_choice`, `tools`.
    pub param: String,
}

impl Constrained {
    /// A request's own `response_format`.
    pub fn response_format(grammar: &Grammar) -> Self {
        Constrained {
            grammar: grammar.clone(),
            param: "response_format".into(),
        }
    }
}

impl Grammar {
    /// The JSON options every JSON grammar is compiled with: compact separators, no free
    /// whitespace.
    pub fn json_options() -> Value {
        json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
    }

    /// A schema with the compact JSON options attached (a schema that sets its own
    /// `x-guidance` keeps them).
    pub fn with_json_options(schema: &Value) -> Value {
        let mut schema = schema.clone();
        if let Value::Object(map) = &mut schema {
            map.entry("x-guidance").or_insert_with(Self::json_options);
        }
        schema
    }

    fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(Self::with_json_options(
                &json!({"type": "object"}),
            )),
            Grammar::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(Self::with_json_options(schema))
            }
            Grammar::Lark(source) => TopLevelGrammar::from_lark(source.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
        }
    }

    /// Checks what can be checked without a model: a JSON schema must be an object (or a
    /// boolean), and a grammar must not be empty. `param` names the request field in errors.
    pub fn check(&self, param: &str) -> Result<()> {
        let bad = |message: String| {
            Err(Error::InvalidParameter {
                param: param.into(),
                message,
            })
        };
        match self {
            Grammar::JsonSchema(Value::Object(_) | Value::Bool(true)) => Ok(()),
            Grammar::JsonSchema(Value::Bool(false)) => {
                bad("the schema `false` accepts no value at all".into())
            }
            Grammar::JsonSchema(other) => bad(format!(
                "a JSON Schema is an object (or `true`); got {}",
                kind_of(other)
            )),
            Grammar::Lark(s) | Grammar::Regex(s) if s.trim().is_empty() => {
                bad("the grammar is empty".into())
            }
            _ => Ok(()),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// llguidance's view of one model's vocabulary.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
    canonical: bool,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // llguidance asks for this only to tokenize literal text of a grammar; text that does
        // not tokenize falls back to the trie's greedy tokenization.
        let text = String::from_utf8_lossy(s);
        match self.tokenizer.encode(text.as_ref(), false) {
            Ok(enc) => enc.get_ids().to_vec(),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        self.canonical
    }
}

/// A model's grammar compiler: built once per model, shared by its generations.
pub struct ConstraintEnv {
    factory: ParserFactory,
}

impl std::fmt::Debug for ConstraintEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintEnv").finish_non_exhaustive()
    }
}

impl ConstraintEnv {
    /// Builds the environment for a vocabulary. `stop_ids` are the tokens that end a
    /// generation: a grammar that is complete allows them.
    pub fn new(tokenizer: &Tokenizer, bytes: &TokenBytes, stop_ids: &[u32]) -> Result<Self> {
        let width = bytes.bytes.len();
        let Some(&first_stop) = stop_ids.iter().find(|&&id| (id as usize) < width) else {
            return Err(Error::Tokenizer(
                "constrained decoding needs an end-of-sequence token, and this model has none"
                    .into(),
            ));
        };
        let stops: Vec<u32> = stop_ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < width)
            .collect();
        let info = TokRxInfo::new(width as u32, first_stop);
        // toktrie asserts on malformed tables; a model file must not bring the worker down.
        let trie = std::panic::catch_unwind(|| TokTrie::from(&info, &bytes.bytes))
            .map_err(|_| {
                Error::Tokenizer("the vocabulary cannot be indexed for constrained decoding".into())
            })?
            .with_eos_tokens(&stops);
        let env = VocabEnv {
            trie,
            tokenizer: tokenizer.clone(),
            canonical: bytes.encoding == VocabEncoding::ByteLevel,
        };
        let env: llguidance::toktrie::TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| Error::Tokenizer(format!("constrained decoding: {e}")))?;
        factory.quiet();
        Ok(ConstraintEnv { factory })
    }

    /// Compiles `grammar` for one generation. A grammar llguidance cannot compile (an
    /// unsupported schema keyword, a Lark syntax error) names `param`.
    pub fn compile(&self, grammar: &Grammar, param: &str) -> Result<Constraint> {
        grammar.check(param)?;
        let parser = self.factory.create_parser(grammar.to_llguidance());
        let matcher = Matcher::new(parser);
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidParameter {
                param: param.into(),
                message: format!("cannot be enforced: {}", first_line(&e)),
            });
        }
        Ok(Constraint { matcher })
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// Whether the grammar allows `token` next.
    pub fn allows(&mut self, token: u32) -> bool {
        matches!(self.matcher.validate_tokens(&[token]), Ok(1))
    }

    /// Sets the logits of every token the grammar does not allow next to −∞. Returns how many
    /// tokens stay allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<usize> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| Error::Constraint(first_line(&e.to_string()).to_string()))?;
        let mut allowed = 0;
        for (i, l) in logits.iter_mut().enumerate() {
            if i < vob.len() && vob.is_allowed(i as u32) {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(allowed)
    }

    /// Advances the grammar past `token`.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::Constraint(first_line(&e.to_string()).to_string()))
    }

    /// True once the grammar is complete and allows nothing but the end.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
