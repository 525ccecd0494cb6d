//! The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions`, with SSE streaming that ends in `data: [DONE]`. The agent fields
//! (structured outputs, tools, logprobs, reasoning) are read and written by `agents`.

use super::body::{parse, read_value};
use super::errors::ApiError;
use super::tenants::{Permit, Tenant};
use super::AppState;
use crate::engine::{CacheUse, FinishReason};
use crate::pool::{GenerateRequest, GenerationEvent, GenerationResult, Prompt};
use crate::text::ChatMessage;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
struct Sampling {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    n: Option<u64>,
    #[allow(dead_code)]
    user: Option<String>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Ollama's `keep_alive`: a duration string or seconds; 0 unloads when idle, negative
    /// keeps the model loaded.
    keep_alive: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<Message>>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<agents::MessageCall>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Option<CompletionPrompt>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Fills a pool request from the sampling fields. Only what is particular to the HTTP API is
/// checked here (`n`); every other check is the pool's, made by the one function that also
/// checks the request in the worker, so that a request gets the same answer whether or not its
/// model is loaded.
fn apply_sampling(mut request: GenerateRequest, s: &Sampling) -> Result<GenerateRequest, ApiError> {
    if let Some(n) = s.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("n = {n} is not supported; only n = 1 is"),
            ));
        }
    }
    request.max_tokens = s
        .max_completion_tokens
        .or(s.max_tokens)
        .map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    request.temperature = s.temperature;
    request.top_p = s.top_p;
    request.presence_penalty = s.presence_penalty;
    request.frequency_penalty = s.frequency_penalty;
    request.top_k = s.top_k;
    request.min_p = s.min_p;
    request.repetition_penalty = s.repetition_penalty;
    request.seed = s.seed.map(|v| v as u64);
    request.keep_alive = match &s.keep_alive {
        None | Some(Value::Null) => None,
        Some(v) => Some(crate::request::KeepAlive::parse(v).map_err(ApiError::from)?),
    };
    request.stop = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    Ok(request)
}

/// A library error as the client sees it: `max_tokens` errors name `max_completion_tokens`
/// when that is the field the client sent.
fn api_error(e: crate::Error, s: &Sampling) -> ApiError {
    let mut api = ApiError::from(e);
    if s.max_completion_tokens.is_some() && api.param.as_deref() == Some("max_tokens") {
        api.param = Some("max_completion_tokens".into());
    }
    api
}

fn chat_messages(messages: Option<Vec<Message>>) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = messages.ok_or_else(|| ApiError::invalid("messages", "messages is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unknown role {:?}; allowed: {}", m.role, ROLES.join(", ")),
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        if p.kind != "text" {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}].type"),
                                format!("content type {:?} is not supported; only text is", p.kind),
                            ));
                        }
                        text.push_str(&p.text.unwrap_or_default());
                    }
                    text
                }
            };
            // `developer` is OpenAI's newer name for the system role.
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role
            };
            let mut message = ChatMessage::new(role, content);
            message.tool_calls = agents::message_calls(i, m.tool_calls.unwrap_or_default())?;
            message.tool_call_id = m.tool_call_id;
            message.name = m.name;
            Ok(message)
        })
        .collect()
}

struct Admitted {
    model: String,
    permit: Permit,
}

fn admit(
    state: &AppState,
    tenant: &Arc<Tenant>,
    model: Option<String>,
) -> Result<Admitted, ApiError> {
    let model = model.ok_or_else(|| ApiError::invalid("model", "model is required"))?;
    let names = state.pool.model_names();
    if !names.contains(&model) {
        let visible: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|m| tenant.may_use(m))
            .collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "model {model:?} does not exist; available: {}",
                visible.join(", ")
            ),
        )
        .code("model_not_found"));
    }
    let permit = tenant.admit(&model, &names)?;
    Ok(Admitted { model, permit })
}

/// `GET /v1/models`.
pub async fn list_models(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let tenant = state.tenants.authenticate(&req)?;
    let data: Vec<Value> = state
        .pool
        .models()
        .into_iter()
        .filter(|m| tenant.may_use(&m.name))
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "llm-pool"}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// A completion request as parsed from its body, before the tenant is admitted.
struct Parsed {
    model: Option<String>,
    request: GenerateRequest,
    sampling: Sampling,
}

/// Parses and checks the body of `POST /v1/chat/completions`.
fn parse_chat(value: &Value) -> Result<Parsed, ApiError> {
    let body: ChatRequest = parse(value)?;
    let messages = chat_messages(body.messages)?;
    let request = agents::apply_chat(GenerateRequest::chat(messages), value)?;
    with_sampling(body.model, request, value)
}

/// Reads the sampling fields both routes share into the request.
fn with_sampling(
    model: Option<String>,
    request: GenerateRequest,
    value: &Value,
) -> Result<Parsed, ApiError> {
    let sampling: Sampling = parse(value)?;
    let request = apply_sampling(request, &sampling)?;
    Ok(Parsed {
        model,
        request,
        sampling,
    })
}

/// Parses and checks the body of `POST /v1/completions`.
fn parse_completion(value: &Value) -> Result<Parsed, ApiError> {
    let body: CompletionRequest = parse(value)?;
    let prompt = match body.prompt {
        None => return Err(ApiError::invalid("prompt", "prompt is required")),
        Some(CompletionPrompt::Text(t)) => Prompt::Text(t),
        Some(CompletionPrompt::Texts(mut v)) if v.len() == 1 => Prompt::Text(v.remove(0)),
        Some(CompletionPrompt::Texts(v)) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "{} prompts given; one prompt per request is supported",
                    v.len()
                ),
            ))
        }
        Some(CompletionPrompt::Ids(ids)) => Prompt::Ids(ids),
    };
    let mut request = GenerateRequest::text(String::new());
    request.prompt = prompt;
    let request = agents::apply_completion(request, value)?;
    with_sampling(body.model, request, value)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    complete(req, payload, state, Kind::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    complete(req, payload, state, Kind::Completion).await
}

/// Both routes: authenticate, parse, admit, then generate and respond.
async fn complete(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    kind: Kind,
) -> Result<HttpResponse, ApiError> {
    let tenant = state.tenants.authenticate(&req)?;
    let value = read_value(payload, state.max_body_bytes).await?;
    let parsed = match kind {
        Kind::Chat => parse_chat(&value)?,
        Kind::Completion => parse_completion(&value)?,
    };
    let admitted = admit(&state, &tenant, parsed.model)?;
    respond(state, admitted, parsed.request, &parsed.sampling, kind).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        _ => "stop",
    }
}

/// The `usage` object of a response. `prompt_tokens_details.cached_tokens` is OpenAI's field
/// for prompt tokens served from a cache (vLLM and llama.cpp report it too): here, the tokens
/// of the prompt whose keys and values a slot already held, which were not computed again.
/// Benchmarks read it to prove that a timed prefill computed its whole prompt.
fn usage(r: &GenerationResult) -> Value {
    let cached = match r.cache {
        CacheUse::PrefixHit(n) => n,
        CacheUse::Reset(_) => 0,
    };
    json!({
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens(),
        "total_tokens": r.prompt_tokens + r.completion_tokens(),
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

async fn respond(
    state: web::Data<AppState>,
    admitted: Admitted,
    request: GenerateRequest,
    sampling: &Sampling,
    kind: Kind,
) -> Result<HttpResponse, ApiError> {
    let Admitted { model, permit } = admitted;
    let wants_logprobs = request.logprobs.is_some();
    let mut stream = state
        .pool
        .submit(&model, request, sampling.stream)
        .map_err(|e| api_error(e, sampling))?;
    let created = now();
    let id = request_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    if !sampling.stream {
        let mut result = None;
        while let Some(event) = stream.next().await {
            if let GenerationEvent::Done(r) = event.map_err(|e| api_error(e, sampling))? {
                result = Some(r);
            }
        }
        let r = result.ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the generation ended without a result",
            )
        })?;
        permit
            .tenant
            .record_tokens((r.prompt_tokens + r.completion_tokens()) as u64);
        let text = r.text.clone().unwrap_or_default();
        let choice = match kind {
            Kind::Chat => {
                let mut message = serde_json::Map::new();
                message.insert("role".into(), json!("assistant"));
                // OpenAI: no content (null) when the answer is only tool calls.
                let content = if text.is_empty() && !r.tool_calls.is_empty() {
                    Value::Null
                } else {
                    json!(text)
                };
                message.insert("content".into(), content);
                if let Some(reasoning) = &r.reasoning {
                    message.insert("reasoning_content".into(), json!(reasoning));
                }
                if !r.tool_calls.is_empty() {
                    message.insert("tool_calls".into(), agents::tool_calls_json(&r.tool_calls));
                }
                json!({
                    "index": 0,
                    "message": message,
                    "finish_reason": finish_str(r.finish_reason),
                    "logprobs": wants_logprobs.then(|| agents::chat_logprobs(&r.logprobs)),
                })
            }
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "finish_reason": finish_str(r.finish_reason),
                "logprobs": wants_logprobs.then(|| agents::completion_logprobs(&r.logprobs, 0)),
            }),
        };
        return Ok(HttpResponse::Ok().json(json!({
            "id": id,
            "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(&r),
        })));
    }

    // The status is chosen once the first event is in: a request the worker refuses (a prompt
    // over the context, a template that rejects the messages) or cannot serve gets a proper
    // HTTP error, never a 200 followed by an error event. The first event is the first token
    // (or the end), so no client waits longer for its first byte of content than before.
    let first = match stream.next().await {
        Some(Ok(event)) => event,
        Some(Err(e)) => return Err(api_error(e, sampling)),
        None => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the generation ended without a result",
            ))
        }
    };
    let include_usage = sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let sse = SseStream {
        inner: Box::pin(stream),
        kind,
        id,
        model,
        created,
        include_usage,
        started: false,
        finished: false,
        first: Some(first),
        wants_logprobs,
        text_offset: 0,
        pending: std::collections::VecDeque::new(),
        permit: Some(permit),
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(sse))
}

/// Turns generation events into OpenAI SSE chunks. Dropped by actix when the client
/// disconnects, which drops the generation stream and so cancels the generation.
struct SseStream {
    inner: Pin<Box<crate::pool::GenerationStream>>,
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    started: bool,
    finished: bool,
    /// The event read before the response started, handled before polling for more.
    first: Option<GenerationEvent>,
    /// Whether each chunk carries its token's logprobs.
    wants_logprobs: bool,
    /// Text streamed so far, in bytes (completions' `text_offset`).
    text_offset: usize,
    pending: std::collections::VecDeque<web::Bytes>,
    permit: Option<Permit>,
}

/// What one chunk of a stream carries.
#[derive(Default)]
struct ChunkBody<'a> {
    content: Option<&'a str>,
    reasoning: &'a str,
    tool_calls: &'a [crate::pool::ToolCall],
    logprobs: Option<&'a crate::pool::TokenLogprobs>,
    finish: Option<&'a str>,
    role: bool,
}

impl SseStream {
    fn chunk(&self, body: ChunkBody<'_>) -> web::Bytes {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if body.role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = body.content {
                    delta.insert("content".into(), json!(t));
                }
                if !body.reasoning.is_empty() {
                    delta.insert("reasoning_content".into(), json!(body.reasoning));
                }
                if !body.tool_calls.is_empty() {
                    delta.insert(
                        "tool_calls".into(),
                        agents::tool_calls_json(body.tool_calls),
                    );
                }
                let logprobs = body.logprobs.map(|lp| agents::chat_logprobs([lp]));
                json!({"index": 0, "delta": delta, "finish_reason": body.finish, "logprobs": logprobs})
            }
            Kind::Completion => {
                let logprobs = body
                    .logprobs
                    .map(|lp| agents::completion_logprobs([lp], self.text_offset));
                json!({"index": 0, "text": body.content.unwrap_or(""), "finish_reason": body.finish, "logprobs": logprobs})
            }
        };
        self.event(json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }))
    }

    fn event(&self, v: Value) -> web::Bytes {
        web::Bytes::from(format!("data: {v}\n\n"))
    }
}

impl Stream for SseStream {
    type Item = Result<web::Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            if !self.started && self.kind == Kind::Chat {
                self.started = true;
                let first = self.chunk(ChunkBody {
                    content: Some(""),
                    role: true,
                    ..ChunkBody::default()
                });
                self.pending.push_back(first);
                continue;
            }
            self.started = true;
            let polled = match self.first.take() {
                Some(event) => Poll::Ready(Some(Ok(event))),
                None => self.inner.as_mut().poll_next(cx),
            };
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.finished = true;
                    self.pending
                        .push_back(web::Bytes::from_static(b"data: [DONE]\n\n"));
                }
                Poll::Ready(Some(Ok(GenerationEvent::Token {
                    text,
                    reasoning,
                    tool_calls,
                    logprobs,
                    ..
                }))) => {
                    let logprobs = logprobs.filter(|_| self.wants_logprobs);
                    if !text.is_empty()
                        || !reasoning.is_empty()
                        || !tool_calls.is_empty()
                        || logprobs.is_some()
                    {
                        let c = self.chunk(ChunkBody {
                            content: (!text.is_empty()).then_some(text.as_str()),
                            reasoning: &reasoning,
                            tool_calls: &tool_calls,
                            logprobs: logprobs.as_ref(),
                            ..ChunkBody::default()
                        });
                        self.pending.push_back(c);
                        if let Some(lp) = &logprobs {
                            self.text_offset += lp.chosen.token.len();
                        }
                    }
                }
                Poll::Ready(Some(Ok(GenerationEvent::Done(r)))) => {
                    let last = self.chunk(ChunkBody {
                        finish: Some(finish_str(r.finish_reason)),
                        ..ChunkBody::default()
                    });
                    self.pending.push_back(last);
                    if self.include_usage {
                        let u = self.event(json!({
                            "id": self.id,
                            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                            "created": self.created,
                            "model": self.model,
                            "choices": [],
                            "usage": usage(&r),
                        }));
                        self.pending.push_back(u);
                    }
                    if let Some(p) = self.permit.take() {
                        p.tenant
                            .record_tokens((r.prompt_tokens + r.completion_tokens()) as u64);
                    }
                    self.finished = true;
                    self.pending
                        .push_back(web::Bytes::from_static(b"data: [DONE]\n\n"));
                }
                Poll::Ready(Some(Err(e))) => {
                    let api: ApiError = e.into();
                    let err = self.event(json!({"error": {
                        "message": api.message, "type": api.kind, "param": api.param, "code": api.code,
                    }}));
                    self.pending.push_back(err);
                    self.finished = true;
                    self.pending
                        .push_back(web::Bytes::from_static(b"data: [DONE]\n\n"));
                }
            }
        }
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        if !self.finished {
            crate::metrics::client_disconnect(&self.model);
            tracing::info!(model = %self.model, id = %self.id, "client disconnected mid-stream; generation cancelled");
        }
    }
}

mod agents;
#[cfg(test)]
mod fuzz;
