//! A generation request, and the one place it is checked and prepared for a model.
//!
//! Two stages, each rule in one of them:
//! - [`GenerateRequest::check`], before the prompt is tokenized (the pool runs it before
//!   anything is queued or loaded): the model's configured defaults under the request's own
//!   values, every range, the stop strings, the tools and the grammar's form, `max_tokens`
//!   against the context when it is known;
//! - [`CheckedRequest::prepare`], once the model is loaded (its worker, or the CLI): the prompt
//!   becomes token ids, is checked against the context (the model's own, capped by the
//!   config's `max_context`), `max_tokens` is defaulted to as much as fits (up to
//!   [`DEFAULT_MAX_TOKENS`]), the seed is drawn, and the grammar is compiled. The result is the
//!   engine's [`Prepared`], which the engine runs without checking again.
//!
//! So the same bad request gets the same error, naming the same parameter, whether or not its
//! model is loaded yet.
//!
//! ```
//! use llm_pool::config::SamplingDefaults;
//! use llm_pool::request::{GenerateRequest, Limits};
//!
//! let defaults = SamplingDefaults::default();
//! let limits = Limits { model: "smollm2", context: Some(2048), defaults: &defaults };
//! let request = GenerateRequest::text("Once upon a time").max_tokens(4096);
//! let err = request.check(&limits).unwrap_err();
//! assert!(err.to_string().contains("max_tokens"));
//! let prepared = GenerateRequest::ids(vec![1, 2]).check(&limits)?.prepare(&limits, None)?;
//! assert_eq!(prepared.params().max_tokens, 256);
//! # Ok::<(), llm_pool::Error>(())
//! ```
//!
//! The agent fields are checked the same way: a `tool_choice` must name one of the tools, a
//! schema must be a JSON Schema object, `logprobs` asks for at most 20 alternatives.
//!
//! ```
//! use llm_pool::config::SamplingDefaults;
//! use llm_pool::request::{GenerateRequest, Grammar, Limits, Tool, ToolChoice};
//! use llm_pool::text::ChatMessage;
//! use serde_json::json;
//!
//! let defaults = SamplingDefaults::default();
//! let limits = Limits { model: "smollm2", context: Some(2048), defaults: &defaults };
//! let ask = || GenerateRequest::chat(vec![ChatMessage::new("user", "Weather in Paris?")]);
//! let weather = Tool::new("get_weather", json!({"type": "object", "properties": {"city": {"type": "string"}}}));
//! let wrong = ask().tool(weather.clone()).tool_choice(ToolChoice::Function("get_time".into()));
//! assert!(wrong.check(&limits).unwrap_err().to_string().contains("tool_choice"));
//! let not_a_schema = ask().response_format(Grammar::JsonSchema(json!("object")));
//! assert!(not_a_schema.check(&limits).unwrap_err().to_string().contains("response_format"));
//! assert!(ask().tool(weather).logprobs(5).check(&limits).is_ok());
//! ```

use crate::config::SamplingDefaults;
use crate::engine::{check_context, GenerateParams, Prepared};
use crate::error::{Error, Result};
pub use crate::text::constrain::Grammar;
use crate::text::output::OutputFormat;
use crate::text::sampling::SamplingParams;
pub use crate::text::tools::{ChatOptions, Tool, ToolChoice};
use crate::text::{prepare_prompt, ChatMessage, ModelText};

pub use crate::text::Prompt;

/// `max_tokens` when neither the request nor the model's config sets one (capped to what fits).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// A generation request. Unset fields take the model's configured defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// The most tokens to generate (default: as many as fit, up to [`DEFAULT_MAX_TOKENS`]).
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy, the default).
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k sampling.
    pub top_k: Option<usize>,
    /// Min-p sampling.
    pub min_p: Option<f64>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f64>,
    /// Presence penalty.
    pub presence_penalty: Option<f64>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f64>,
    /// Seed (random when unset).
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Structured output: a grammar the whole output must follow (`None`: free text).
    pub response_format: Option<Grammar>,
    /// Functions the model may call (chat only).
    pub tools: Vec<Tool>,
    /// Whether and which tool the model must call.
    pub tool_choice: ToolChoice,
    /// Whether several calls may come at once (default: yes).
    pub parallel_tool_calls: Option<bool>,
    /// `Some(n)`: report each token's log-probability and its `n` most likely alternatives
    /// (0 to 20).
    pub logprobs: Option<usize>,
    /// Extra chat template variables, such as `enable_thinking` (chat only).
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// How long the model stays loaded once idle after this request, replacing its
    /// configured `keep_alive` until another request sets one (as Ollama's `keep_alive`).
    pub keep_alive: Option<KeepAlive>,
}

/// A request's `keep_alive`, with Ollama's meanings: how long the model stays loaded once it
/// is idle, counted from its last request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Unload once idle after this long; zero unloads it as soon as it is idle.
    For(std::time::Duration),
    /// Keep it loaded (until a later request or an admin unload says otherwise).
    Forever,
}

impl KeepAlive {
    /// Parses Ollama's forms: a duration (`"5m"`, `"30s"`, `"1h"`, `"250ms"`, `"0"`), a
    /// number of seconds, or any negative value for [`KeepAlive::Forever`].
    pub fn parse(value: &serde_json::Value) -> Result<KeepAlive> {
        let invalid = |what: String| Error::InvalidParameter {
            param: "keep_alive".into(),
            message: format!(
                "{what}; allowed: a duration such as \"5m\", \"30s\" or \"1h\", a number of \
                 seconds, 0 (unload when idle) or a negative value (keep loaded)"
            ),
        };
        match value {
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(s) if s < 0.0 => Ok(KeepAlive::Forever),
                Some(s) if s.is_finite() && s <= MAX_KEEP_ALIVE_SECS => {
                    Ok(KeepAlive::For(std::time::Duration::from_secs_f64(s)))
                }
                _ => Err(invalid(format!("{n} seconds is out of range"))),
            },
            serde_json::Value::String(s) => {
                if let Some(rest) = s.trim().strip_prefix('-') {
                    crate::config::parse_duration(rest).map_err(invalid)?;
                    return Ok(KeepAlive::Forever);
                }
                let d = crate::config::parse_duration(s).map_err(invalid)?;
                if d.as_secs_f64() > MAX_KEEP_ALIVE_SECS {
                    return Err(invalid(format!("{s:?} is out of range")));
                }
                Ok(KeepAlive::For(d))
            }
            other => Err(invalid(format!("{other} is neither a string nor a number"))),
        }
    }
}

/// The longest finite `keep_alive` a request may ask for (a year); negative is for ever.
const MAX_KEEP_ALIVE_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// What a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    /// The model's name, for errors.
    pub model: &'a str,
    /// The context a request may use: the model's own, capped by the config's `max_context`.
    /// `None` before the model's first load, when the context checks wait for the worker.
    pub context: Option<usize>,
    /// The model's configured defaults.
    pub defaults: &'a SamplingDefaults,
}

impl GenerateRequest {
    fn new(prompt: Prompt) -> Self {
        GenerateRequest {
            prompt,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            presence_penalty: None,
            frequency_penalty: None,
            seed: None,
            stop: Vec::new(),
            response_format: None,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: None,
            logprobs: None,
            chat_template_kwargs: serde_json::Map::new(),
            keep_alive: None,
        }
    }

    /// The chat options of this request (tools, tool choice, template variables).
    pub fn chat_options(&self) -> ChatOptions {
        ChatOptions {
            tools: self.tools.clone(),
            tool_choice: self.tool_choice.clone(),
            parallel_tool_calls: self.parallel_tool_calls,
            chat_template_kwargs: self.chat_template_kwargs.clone(),
        }
    }

    /// Constrains the output to a grammar (JSON, a JSON schema, Lark, a regex).
    pub fn response_format(mut self, grammar: Grammar) -> Self {
        self.response_format = Some(grammar);
        self
    }

    /// Offers a tool to the model.
    pub fn tool(mut self, tool: Tool) -> Self {
        self.tools.push(tool);
        self
    }

    /// Sets whether and which tool the model must call.
    pub fn tool_choice(mut self, choice: ToolChoice) -> Self {
        self.tool_choice = choice;
        self
    }

    /// Asks for log-probabilities with `top` alternatives per token.
    pub fn logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top);
        self
    }

    /// Sets how long the model stays loaded once idle after this request (Ollama's
    /// `keep_alive`): it replaces the model's configured `keep_alive` until another request
    /// sets one. Pinned models stay loaded whatever it says.
    pub fn keep_alive(mut self, keep_alive: KeepAlive) -> Self {
        self.keep_alive = Some(keep_alive);
        self
    }

    /// Sets a chat template variable (e.g. `enable_thinking` to `false`).
    pub fn template_kwarg(mut self, name: impl Into<String>, value: serde_json::Value) -> Self {
        self.chat_template_kwargs.insert(name.into(), value);
        self
    }

    /// A request for raw text.
    pub fn text(prompt: impl Into<String>) -> Self {
        Self::new(Prompt::Text(prompt.into()))
    }

    /// A request for token ids.
    pub fn ids(ids: Vec<u32>) -> Self {
        Self::new(Prompt::Ids(ids))
    }

    /// A chat request.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::new(Prompt::Chat(messages))
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Sets the temperature.
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = Some(t);
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Adds a stop string.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }

    /// Checks everything that can be checked before the prompt is tokenized: every range, the
    /// stop strings, the tools and the grammar's form, and `max_tokens` against the context
    /// when the context is known. The pool runs it before anything is queued or loaded; the
    /// checked request is what [`CheckedRequest::prepare`] takes.
    pub fn check(self, limits: &Limits<'_>) -> Result<CheckedRequest> {
        let defaults = limits.defaults;
        let empty = match &self.prompt {
            Prompt::Text(t) => t.is_empty().then_some("the prompt must not be empty"),
            Prompt::Ids(ids) => ids.is_empty().then_some("the prompt must not be empty"),
            Prompt::Chat(m) => m.is_empty().then_some("at least one message is needed"),
        };
        if let Some(message) = empty {
            return Err(Error::InvalidParameter {
                param: self.prompt.param().into(),
                message: message.into(),
            });
        }
        let is_chat = matches!(self.prompt, Prompt::Chat(_));
        if !is_chat {
            let chat_only = if !self.tools.is_empty() {
                Some("tools")
            } else if self.tool_choice != ToolChoice::Auto {
                Some("tool_choice")
            } else if !self.chat_template_kwargs.is_empty() {
                Some("chat_template_kwargs")
            } else {
                None
            };
            if let Some(param) = chat_only {
                return Err(Error::InvalidParameter {
                    param: param.into(),
                    message: "only chat requests (messages) take tools and template variables"
                        .into(),
                });
            }
        }
        self.chat_options().check()?;
        let max_tokens = self.max_tokens.or(defaults.max_tokens);
        let params = GenerateParams {
            // Unset: as much as fits, worked out once the prompt's length is known.
            max_tokens: max_tokens.unwrap_or(1),
            sampling: SamplingParams {
                temperature: self.temperature.or(defaults.temperature).unwrap_or(0.0),
                top_k: self.top_k.or(defaults.top_k).unwrap_or(0),
                top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
                min_p: self.min_p.or(defaults.min_p).unwrap_or(0.0),
                repetition_penalty: self
                    .repetition_penalty
                    .or(defaults.repetition_penalty)
                    .unwrap_or(1.0),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                // Drawn at preparation when the request sets none (see `prepare`).
                seed: self.seed.unwrap_or(0),
            },
            stop: self.stop.clone(),
            extra_stop_ids: Vec::new(),
            // Which grammar applies (the request's, or the one a chat's tools call for) is
            // decided when the prompt is prepared; its form is checked below.
            grammar: None,
            logprobs: self.logprobs,
            output: OutputFormat::default(),
        };
        // Ranges, stop strings and a zero max_tokens: the engine's rules.
        params.validate()?;
        if let Some(grammar) = &self.response_format {
            grammar.check("response_format")?;
        }
        if let (Some(context), Some(m)) = (limits.context, max_tokens) {
            check_context(limits.model, self.prompt.param(), None, Some(m), context)?;
        }
        Ok(CheckedRequest {
            request: self,
            params,
            max_tokens,
        })
    }
}

/// A request that passed [`GenerateRequest::check`], with its settings resolved against the
/// model's defaults. Reading it reads the request (it dereferences to [`GenerateRequest`]).
#[derive(Debug, Clone)]
pub struct CheckedRequest {
    request: GenerateRequest,
    /// The settings; the grammar and output format are decided by [`prepare`](Self::prepare).
    params: GenerateParams,
    /// `max_tokens` as the request or the model's config set it (`None`: as much as fits).
    max_tokens: Option<usize>,
}

impl std::ops::Deref for CheckedRequest {
    type Target = GenerateRequest;

    fn deref(&self) -> &GenerateRequest {
        &self.request
    }
}

impl CheckedRequest {
    /// The one preparation of a request for a loaded model, used by the pool's workers and
    /// the CLI: the prompt becomes token ids (through the chat template with the request's
    /// tools), the prompt is checked against the context, an unset `max_tokens` becomes as
    /// much as fits (up to [`DEFAULT_MAX_TOKENS`]), an unset seed is drawn, and the grammar
    /// (the request's, or the one its tools call for) is compiled. What [`check`]
    /// (GenerateRequest::check) checked is not checked again.
    ///
    /// `text` is the model's text side (`None` for a model without a tokenizer, which takes
    /// only token ids); `limits.context` is the context the request may use.
    ///
    /// ```no_run
    /// use llm_pool::config::SamplingDefaults;
    /// use llm_pool::models::{LoadOptions, Model};
    /// use llm_pool::request::{GenerateRequest, Limits};
    /// use llm_pool::text::{ChatMessage, ModelText};
    ///
    /// let path = std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    /// let mut model = Model::load(path, &LoadOptions::cpu())?;
    /// let text = ModelText::load(path, model.info(), None)?;
    /// let defaults = SamplingDefaults::default();
    /// let limits = Limits { model: "smollm2", context: Some(2048), defaults: &defaults };
    /// let request = GenerateRequest::chat(vec![ChatMessage::new("user", "Hi!")]).max_tokens(8);
    /// let prepared = request.check(&limits)?.prepare(&limits, text.as_ref())?;
    /// let output = llm_pool::engine::run(&mut model, text.as_ref(), prepared, |_| true)?;
    /// println!("{:?}", output.text);
    /// # Ok::<(), llm_pool::Error>(())
    /// ```
    pub fn prepare(&self, limits: &Limits<'_>, text: Option<&ModelText>) -> Result<Prepared> {
        let request = &self.request;
        let prompt = prepare_prompt(
            limits.model,
            text,
            &request.prompt,
            &request.chat_options(),
            request.response_format.as_ref(),
        )?;
        let mut params = self
            .settings_for(limits, prompt.ids.len())
            .map_err(|e| self.tools_context_error(limits, text, prompt.ids.len(), e))?;
        params.grammar = prompt.grammar;
        params.output = prompt.output;
        Prepared::checked(text, prompt.ids, params)
    }

    /// The settings for a prompt of `prompt_tokens` tokens: the prompt checked against the
    /// context, `max_tokens` defaulted to what fits, the seed drawn when none is set.
    fn settings_for(&self, limits: &Limits<'_>, prompt_tokens: usize) -> Result<GenerateParams> {
        let mut params = self.params.clone();
        params.max_tokens = match limits.context {
            Some(context) => {
                check_context(
                    limits.model,
                    self.request.prompt.param(),
                    Some(prompt_tokens),
                    self.max_tokens,
                    context,
                )?;
                // Unset: as much as fits, up to a default.
                self.max_tokens
                    .unwrap_or(DEFAULT_MAX_TOKENS.min(context - prompt_tokens))
            }
            None => self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        };
        // Drawn once here, so a prepared request is reproducible from its settings.
        params.sampling.seed = self.request.seed.unwrap_or_else(rand::random);
        Ok(params)
    }

    /// A prompt over the context with tools names `tools` when the conversation alone would
    /// fit, so the client knows what to cut; any other error is returned as it is.
    fn tools_context_error(
        &self,
        limits: &Limits<'_>,
        text: Option<&ModelText>,
        with_tools: usize,
        original: Error,
    ) -> Error {
        let request = &self.request;
        let Some(context) = limits.context else {
            return original;
        };
        if request.tools.is_empty() || !matches!(original, Error::ContextLength { .. }) {
            return original;
        }
        let mut bare = request.chat_options();
        bare.tools.clear();
        bare.tool_choice = ToolChoice::Auto;
        let without =
            prepare_prompt(limits.model, text, &request.prompt, &bare, None).map(|p| p.ids.len());
        match without {
            Ok(n)
                if check_context(
                    limits.model,
                    request.prompt.param(),
                    Some(n),
                    self.max_tokens,
                    context,
                )
                .is_ok() =>
            {
                Error::InvalidParameter {
                    param: "tools".into(),
                    message: format!(
                        "the tools take {} of the prompt's {with_tools} tokens, and with them the request does not fit: {original}",
                        with_tools.saturating_sub(n)
                    ),
                }
            }
            _ => original,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_takes_ollamas_forms() {
        use serde_json::json;
        use std::time::Duration;
        let parse = |v| KeepAlive::parse(&v);
        assert_eq!(
            parse(json!("5m")).unwrap(),
            KeepAlive::For(Duration::from_secs(300))
        );
        assert_eq!(
            parse(json!(30)).unwrap(),
            KeepAlive::For(Duration::from_secs(30))
        );
        assert_eq!(parse(json!(0)).unwrap(), KeepAlive::For(Duration::ZERO));
        assert_eq!(parse(json!("0")).unwrap(), KeepAlive::For(Duration::ZERO));
        assert_eq!(parse(json!(-1)).unwrap(), KeepAlive::Forever);
        assert_eq!(parse(json!("-1m")).unwrap(), KeepAlive::Forever);
        for bad in [
            json!("soon"),
            json!("-x"),
            json!("5 parsecs"),
            json!(true),
            json!(1e300),
        ] {
            let e = parse(bad.clone()).unwrap_err().to_string();
            assert!(
                e.contains("keep_alive") && e.contains("allowed"),
                "{bad}: {e}"
            );
        }
    }

    fn limits(defaults: &SamplingDefaults, context: Option<usize>) -> Limits<'_> {
        Limits {
            model: "m",
            context,
            defaults,
        }
    }

    /// The settings a request gets for a prompt of `prompt_tokens` tokens.
    fn resolve(
        request: &GenerateRequest,
        limits: &Limits<'_>,
        prompt_tokens: usize,
    ) -> Result<GenerateParams> {
        request
            .clone()
            .check(limits)?
            .settings_for(limits, prompt_tokens)
    }

    fn param_of(e: Error) -> String {
        match e {
            Error::ContextLength { param, .. } => param.to_string(),
            Error::InvalidParameter { param, .. } => param,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn oversized_max_tokens_names_max_tokens_before_and_after_tokenization() {
        let d = SamplingDefaults::default();
        let request = GenerateRequest::chat(vec![ChatMessage::new("user", "hi")]).max_tokens(100);
        // Checked with the context known, and with it unknown until the model has loaded.
        let early = request.clone().check(&limits(&d, Some(100))).unwrap_err();
        let late = request
            .check(&limits(&d, None))
            .unwrap()
            .settings_for(&limits(&d, Some(100)), 5)
            .unwrap_err();
        assert_eq!(param_of(early), "max_tokens");
        assert_eq!(param_of(late), "max_tokens");
    }

    #[test]
    fn long_prompt_names_the_prompt_parameter() {
        let d = SamplingDefaults::default();
        let chat = GenerateRequest::chat(vec![ChatMessage::new("user", "hi")]).max_tokens(10);
        assert_eq!(
            param_of(resolve(&chat, &limits(&d, Some(100)), 95).unwrap_err()),
            "messages"
        );
        let text = GenerateRequest::text("hi");
        assert_eq!(
            param_of(resolve(&text, &limits(&d, Some(100)), 100).unwrap_err()),
            "prompt"
        );
    }

    #[test]
    fn unset_max_tokens_takes_what_fits() {
        let d = SamplingDefaults::default();
        let r = GenerateRequest::text("hi");
        assert_eq!(
            resolve(&r, &limits(&d, Some(100)), 90).unwrap().max_tokens,
            10
        );
        assert_eq!(
            resolve(&r, &limits(&d, Some(4096)), 90).unwrap().max_tokens,
            256
        );
        let d = SamplingDefaults {
            max_tokens: Some(7),
            temperature: Some(0.5),
            ..SamplingDefaults::default()
        };
        let p = resolve(&r, &limits(&d, Some(4096)), 90).unwrap();
        assert_eq!((p.max_tokens, p.sampling.temperature), (7, 0.5));
        let p = resolve(&r.clone().temperature(0.0), &limits(&d, Some(4096)), 90).unwrap();
        assert_eq!(p.sampling.temperature, 0.0);
    }

    #[test]
    fn ranges_are_checked_before_the_model_is_loaded() {
        let d = SamplingDefaults::default();
        let mut r = GenerateRequest::text("hi");
        r.min_p = Some(3.0);
        assert_eq!(param_of(r.check(&limits(&d, None)).unwrap_err()), "min_p");
        // A request without a seed gets one drawn at preparation, not at its check.
        let checked = GenerateRequest::text("hi")
            .check(&limits(&d, None))
            .unwrap();
        assert_eq!(checked.params.sampling.seed, 0);
        let r = GenerateRequest::text("hi").max_tokens(0);
        assert_eq!(
            param_of(r.check(&limits(&d, None)).unwrap_err()),
            "max_tokens"
        );
        let r = GenerateRequest::text("hi").stop("");
        assert_eq!(param_of(r.check(&limits(&d, None)).unwrap_err()), "stop");
        let r = GenerateRequest::ids(vec![]);
        assert_eq!(param_of(r.check(&limits(&d, None)).unwrap_err()), "prompt");
    }
}
