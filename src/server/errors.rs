//! OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, and the mapping from
//! library errors to HTTP statuses.

use crate::error::Error;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// An HTTP error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// Human-readable message: what was wrong and what is allowed.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, …).
    pub kind: &'static str,
    /// The offending parameter, when there is one.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (sets `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 naming the parameter.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    /// Any status with a message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// Sets the code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Sets `Retry-After`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            response.insert_header(("Retry-After", secs.to_string()));
        }
        response.json(json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }))
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::InvalidParameter { param, .. } => ApiError::invalid(param, message),
            Error::ContextLength { param, .. } => {
                ApiError::invalid(param, message).code("context_length_exceeded")
            }
            Error::UnknownModel { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                    .code("model_not_found")
            }
            Error::Overloaded { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .code("overloaded")
                    .retry_after(1)
            }
            Error::Unavailable { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .code("model_unavailable")
                    .retry_after(5)
            }
            Error::WorkerRestarted { .. } => {
                // The request was lost with its worker, which is back shortly; a retry is safe.
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .code("worker_restarted")
                    .retry_after(1)
            }
            // A prompt the tokenizer refuses arrives as an invalid parameter naming `prompt` or
            // `messages`; a tokenizer error here is the server's own (decoding its output).
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message),
        }
    }
}
