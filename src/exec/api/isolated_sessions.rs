//! `/v1/isolated/capabilities` and `/v1/isolated/session[s]`: what isolation can do here, and
//! isolated sessions made, listed, looked at and deleted (see `crate::isolation`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use super::{ExecApi, ExecJson, empty_ok};
use crate::http::error::ApiError;
use crate::isolation::{CreateRequest, IsolationError};

impl From<IsolationError> for ApiError {
    fn from(e: IsolationError) -> ApiError {
        let (status, code) = match &e {
            IsolationError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST_BODY"),
            IsolationError::NotFound(_) => (StatusCode::NOT_FOUND, "CONTEXT_NOT_FOUND"),
            IsolationError::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT"),
            IsolationError::Limit(_) => (StatusCode::TOO_MANY_REQUESTS, "LIMIT_EXCEEDED"),
            IsolationError::Unsupported(_) => (StatusCode::SERVICE_UNAVAILABLE, "NOT_SUPPORTED"),
            IsolationError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            IsolationError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "RUNTIME_ERROR"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// `GET /v1/isolated/capabilities`: always 200; `available` says whether sessions can be made.
pub async fn capabilities(State(api): State<ExecApi>) -> Json<Value> {
    Json(api.isolation.capabilities().await)
}

/// `POST /v1/isolated/session`: `201` with the session's id, time and settings.
pub async fn create(
    State(api): State<ExecApi>,
    ExecJson(request): ExecJson<CreateRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let info = api.isolation.create(request).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// `GET /v1/isolated/sessions`.
pub async fn list(State(api): State<ExecApi>) -> Json<Value> {
    Json(api.isolation.list())
}

/// `GET /v1/isolated/session/{id}`: its status (`active`, `dead`, `destroyed`), times and
/// settings.
pub async fn get(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let session = api.isolation.get(&id)?;
    Ok(Json(session.status_with(&api.commands)))
}

/// `DELETE /v1/isolated/session/{id}`: `200` once every process of the session is gone.
pub async fn delete(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    api.isolation.delete(&id).await?;
    Ok(empty_ok())
}
