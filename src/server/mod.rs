//! The multi-tenant HTTP host (actix-web): OpenAI-compatible routes, `/health`, `/ready`,
//! `/metrics`, and the admin API, over a [`Pool`].
//!
//! | route | auth |
//! | --- | --- |
//! | `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` | tenant key |
//! | `GET /admin/models`, `POST /admin/models/{name}/load`, `…/unload` | admin key |
//! | `PUT /admin/failpoints/{name}` (builds with the `failpoints` feature only) | admin key |
//! | `GET /health`, `GET /ready`, `GET /metrics` | none |

mod admin;
mod body;
pub mod errors;
mod openai;
pub mod tenants;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pool::{ModelState, Pool};
use actix_web::dev::Service;
use actix_web::{web, App, HttpResponse, HttpServer};
use errors::ApiError;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tenants::Tenants;

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// The pool.
    pub pool: Pool,
    /// Tenants and their limits.
    pub tenants: Tenants,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Admin key hash; `None` disables the admin API.
    pub admin_key_sha256: Option<String>,
    /// Where admin loads by path may read from.
    pub models_dir: Option<PathBuf>,
    /// Models that must be ready for `/ready`.
    pub eager_models: Vec<String>,
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let not_ready: Vec<serde_json::Value> = state
        .pool
        .models()
        .into_iter()
        .filter(|m| state.eager_models.contains(&m.name) && m.state != ModelState::Ready)
        .map(|m| serde_json::json!({"name": m.name, "state": m.state.as_str()}))
        .collect();
    if not_ready.is_empty() {
        HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "not ready", "models": not_ready}))
    }
}

async fn metrics() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics::render())
}

async fn not_found() -> std::result::Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such route; see /v1/models, /v1/chat/completions, /v1/completions, /health, /ready, /metrics",
    ))
}

/// Configures the routes (used by `serve` and by in-process tests).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/models", web::get().to(openai::list_models))
        .route(
            "/v1/chat/completions",
            web::post().to(openai::chat_completions),
        )
        .route("/v1/completions", web::post().to(openai::completions))
        .route("/admin/models", web::get().to(admin::list))
        .route("/admin/models/{name}/load", web::post().to(admin::load))
        .route("/admin/models/{name}/unload", web::post().to(admin::unload));
    #[cfg(feature = "failpoints")]
    cfg.route("/admin/failpoints/{name}", web::put().to(admin::failpoint));
}

/// Runs the HTTP host until SIGTERM or Ctrl-C, then drains in-flight requests (up to
/// `server.shutdown_timeout_secs`) and shuts the pool down.
pub async fn serve(config: Config) -> Result<()> {
    let listen = config.server.listen.clone();
    let tenants = Tenants::new(&config.tenants);
    if tenants.is_open() {
        tracing::warn!("NO TENANTS CONFIGURED: the API is open to anyone who can reach {listen}; add [[tenants]] with API key hashes to require keys");
    }
    let eager_models = config
        .models
        .iter()
        .filter(|m| m.load == crate::config::LoadPolicy::Eager)
        .map(|m| m.name.clone())
        .collect();
    let server_settings = config.server.clone();
    let models_dir = config.pool.models_dir.clone();
    let pool = Pool::new(config)?;
    let state = web::Data::new(AppState {
        pool: pool.clone(),
        tenants,
        max_body_bytes: server_settings.max_body_bytes,
        admin_key_sha256: server_settings.admin_key_sha256.clone(),
        models_dir,
        eager_models,
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap_fn(|req, srv| {
                let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
                let tenant = req
                    .app_data::<web::Data<AppState>>()
                    .and_then(|s| s.tenants.authenticate(req.request()).ok())
                    .map(|t| t.name.clone())
                    .unwrap_or_else(|| "unauthenticated".into());
                let started = Instant::now();
                let fut = srv.call(req);
                async move {
                    let res = fut.await?;
                    crate::metrics::http_request(
                        &route,
                        res.status().as_u16(),
                        &tenant,
                        started.elapsed(),
                    );
                    Ok(res)
                }
            })
            .configure(routes)
            .default_service(web::to(not_found))
    })
    .shutdown_timeout(server_settings.shutdown_timeout_secs)
    .bind(&listen)
    .map_err(|e| Error::config("server.listen", format!("cannot listen on {listen}: {e}")))?;
    for addr in server.addrs() {
        // Scripts and tests read this line to find the port when `listen` asks for port 0.
        println!("listening on http://{addr}");
        tracing::info!(%addr, "listening");
    }
    let running = server.run();
    let result = running.await;
    tracing::info!("HTTP server stopped; shutting the pool down");
    pool.shutdown().await;
    result.map_err(|e| Error::io("server", e))?;
    // Give detached worker threads a moment to log their exit.
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
