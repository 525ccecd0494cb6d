//! The admin API, on its own key (`server.admin_key_sha256`): model status, load, unload.
//! Loading takes a model of the config catalog by name, or a path under `pool.models_dir`
//! (never an arbitrary filesystem path).

use super::body::read_json;
use super::errors::ApiError;
use super::tenants::{bearer, key_matches};
use super::AppState;
use crate::config::ModelConfig;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use std::path::{Component, Path};

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let Some(hash) = &state.admin_key_sha256 else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "the admin API is disabled: set server.admin_key_sha256 in the config",
        ));
    };
    match bearer(req) {
        Some(key) if key_matches(key, hash) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid admin key",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "no admin key: send `Authorization: Bearer ADMIN_KEY`",
        )),
    }
}

/// `GET /admin/models`.
pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let models: Vec<_> = state
        .pool
        .models()
        .into_iter()
        .map(|m| {
            json!({
                "name": m.name,
                "pinned": m.pinned,
                "state": m.state.as_str(),
                "error": match &m.state { crate::pool::ModelState::Failed(e) => Some(e.clone()), _ => None },
                "device": m.device,
                "architecture": m.architecture,
                "restarts": m.restarts,
                "queue_depth": m.queue_depth,
                "in_flight": m.in_flight,
                "ready_workers": m.ready_workers,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "models": models })))
}

#[derive(Deserialize, Default)]
struct LoadBody {
    /// A path relative to `pool.models_dir`, to register a model not in the catalog.
    path: Option<String>,
}

/// `POST /admin/models/{name}/load`.
pub async fn load(
    req: HttpRequest,
    name: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let name = name.into_inner();
    let body: LoadBody = if req
        .headers()
        .get("content-length")
        .is_some_and(|v| v != "0")
    {
        read_json(payload, state.max_body_bytes).await?
    } else {
        LoadBody::default()
    };
    if let Some(rel) = body.path {
        if state.pool.model_names().contains(&name) {
            return Err(ApiError::invalid(
                "name",
                format!("model {name:?} already exists in the catalog"),
            ));
        }
        let dir = state.models_dir.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "loading by path is disabled: set pool.models_dir in the config",
            )
        })?;
        let path = resolve_under(dir, &rel)?;
        let config = ModelConfig::new(name.clone(), path);
        state.pool.register(config)?;
    }
    state.pool.load(&name).await?;
    Ok(HttpResponse::Ok().json(json!({"name": name, "state": "ready"})))
}

/// A relative path inside `dir`, refusing absolute paths, `..` and symlinks out of it.
fn resolve_under(dir: &Path, rel: &str) -> Result<std::path::PathBuf, ApiError> {
    let bad = |m: &str| ApiError::invalid("path", format!("{rel:?}: {m}"));
    let rel_path = Path::new(rel);
    if rel_path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(bad(
            "must be a relative path inside models_dir, without `..`",
        ));
    }
    let base = dir
        .canonicalize()
        .map_err(|e| bad(&format!("models_dir {}: {e}", dir.display())))?;
    let full = base
        .join(rel_path)
        .canonicalize()
        .map_err(|_| bad("no such file under models_dir"))?;
    if !full.starts_with(&base) {
        return Err(bad("resolves outside models_dir"));
    }
    Ok(full)
}

/// `POST /admin/models/{name}/unload`.
pub async fn unload(
    req: HttpRequest,
    name: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let name = name.into_inner();
    state.pool.unload(&name).await?;
    Ok(HttpResponse::Ok().json(json!({"name": name, "state": "unloaded"})))
}

/// Body of `PUT /admin/failpoints/{name}`.
#[cfg(feature = "failpoints")]
#[derive(Deserialize)]
struct FailpointBody {
    /// The `fail` crate's action string, e.g. `1*panic`, `1*return`, `off`.
    actions: String,
}

/// `PUT /admin/failpoints/{name}`, only in builds with the `failpoints` feature: sets a
/// failpoint at run time, for fault-injection runs such as `scripts/soak`.
#[cfg(feature = "failpoints")]
pub async fn failpoint(
    req: HttpRequest,
    name: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let name = name.into_inner();
    let body: FailpointBody = read_json(payload, state.max_body_bytes).await?;
    fail::cfg(&name, &body.actions).map_err(|e| ApiError::invalid("actions", e))?;
    tracing::warn!(failpoint = %name, actions = %body.actions, "failpoint set");
    Ok(HttpResponse::Ok().json(json!({"name": name, "actions": body.actions})))
}
