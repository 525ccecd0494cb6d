//! Tenants: API keys (stored as SHA-256 hashes, compared in constant time), the models each
//! tenant may use, and per-tenant limits on concurrent requests and tokens per minute.

use super::errors::ApiError;
use crate::config::TenantConfig;
use actix_web::http::StatusCode;
use actix_web::HttpRequest;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

const WINDOW: Duration = Duration::from_secs(60);

/// A tenant and its live usage.
pub struct Tenant {
    /// The configured name; `anonymous` when the host runs open.
    pub name: String,
    key_hashes: Vec<[u8; 32]>,
    models: Vec<String>,
    max_concurrent: usize,
    tokens_per_minute: u64,
    in_flight: AtomicUsize,
    /// (when, tokens) of requests in the last minute.
    usage: Mutex<VecDeque<(Instant, u64)>>,
}

impl Tenant {
    fn from_config(c: &TenantConfig) -> Self {
        let key_hashes = c
            .api_key_sha256
            .iter()
            .filter_map(|h| hex::decode(h).ok())
            .filter_map(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .collect();
        Tenant {
            name: c.name.clone(),
            key_hashes,
            models: c.models.clone(),
            max_concurrent: c.max_concurrent_requests,
            tokens_per_minute: c.tokens_per_minute,
            in_flight: AtomicUsize::new(0),
            usage: Mutex::new(VecDeque::new()),
        }
    }

    fn anonymous() -> Self {
        Tenant {
            name: "anonymous".into(),
            key_hashes: Vec::new(),
            models: vec!["*".into()],
            max_concurrent: 0,
            tokens_per_minute: 0,
            in_flight: AtomicUsize::new(0),
            usage: Mutex::new(VecDeque::new()),
        }
    }

    /// Whether the tenant may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }

    /// Checks the model and the limits, and counts the request as in flight until the permit
    /// is dropped.
    pub fn admit(self: &Arc<Self>, model: &str, available: &[String]) -> Result<Permit, ApiError> {
        if !self.may_use(model) {
            let allowed: Vec<&str> = available
                .iter()
                .map(String::as_str)
                .filter(|m| self.may_use(m))
                .collect();
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "tenant {} may not use model {model:?}; allowed: {}",
                    self.name,
                    allowed.join(", ")
                ),
            )
            .code("model_not_allowed"));
        }
        if self.tokens_per_minute > 0 {
            let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            while usage
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
            {
                usage.pop_front();
            }
            let used: u64 = usage.iter().map(|(_, n)| n).sum();
            if used >= self.tokens_per_minute {
                let retry = usage
                    .front()
                    .map(|(t, _)| WINDOW.saturating_sub(now.duration_since(*t)).as_secs() + 1)
                    .unwrap_or(1);
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    format!(
                        "tenant {} used {used} of its {} tokens per minute; retry in {retry} s",
                        self.name, self.tokens_per_minute
                    ),
                )
                .code("rate_limit_exceeded")
                .retry_after(retry));
            }
        }
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if self.max_concurrent > 0 && now_in_flight > self.max_concurrent {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "tenant {} has {} requests in flight, its limit; retry when one finishes",
                    self.name, self.max_concurrent
                ),
            )
            .code("concurrency_limit_exceeded")
            .retry_after(1));
        }
        Ok(Permit {
            tenant: Arc::clone(self),
        })
    }

    /// Records tokens used by a finished request.
    pub fn record_tokens(&self, tokens: u64) {
        if self.tokens_per_minute > 0 {
            let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            usage.push_back((Instant::now(), tokens));
        }
    }
}

/// A request's slot in its tenant's concurrency limit; released on drop.
pub struct Permit {
    /// The tenant.
    pub tenant: Arc<Tenant>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.tenant.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every tenant, or open mode.
pub struct Tenants {
    tenants: Vec<Arc<Tenant>>,
    open: Option<Arc<Tenant>>,
}

impl Tenants {
    /// From the configuration; no tenants means open mode.
    pub fn new(configs: &[TenantConfig]) -> Self {
        if configs.is_empty() {
            Tenants {
                tenants: Vec::new(),
                open: Some(Arc::new(Tenant::anonymous())),
            }
        } else {
            Tenants {
                tenants: configs
                    .iter()
                    .map(|c| Arc::new(Tenant::from_config(c)))
                    .collect(),
                open: None,
            }
        }
    }

    /// True when no tenants are configured.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// The tenant whose key the request carries (`Authorization: Bearer KEY`).
    pub fn authenticate(&self, req: &HttpRequest) -> Result<Arc<Tenant>, ApiError> {
        if let Some(open) = &self.open {
            return Ok(Arc::clone(open));
        }
        let unauthorized = |message: &str| {
            ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
                .code("invalid_api_key")
        };
        let key = bearer(req)
            .ok_or_else(|| unauthorized("no API key: send `Authorization: Bearer YOUR_KEY`"))?;
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Compare against every key, without stopping early, in constant time.
        let mut found = None;
        for tenant in &self.tenants {
            for stored in &tenant.key_hashes {
                if bool::from(stored.ct_eq(&hash)) {
                    found = Some(Arc::clone(tenant));
                }
            }
        }
        found.ok_or_else(|| unauthorized("invalid API key"))
    }
}

/// The bearer token of a request.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Checks a key against a stored SHA-256 in constant time.
pub fn key_matches(key: &str, sha256_hex: &str) -> bool {
    let Ok(stored) = hex::decode(sha256_hex) else {
        return false;
    };
    let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    stored.len() == 32 && bool::from(stored.as_slice().ct_eq(&hash))
}
