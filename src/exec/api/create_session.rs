use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ExecApi, invalid, limit_error, optional_json, runtime_error};
use crate::exec::sessions::SessionError;
use crate::http::error::ApiError;

#[derive(Deserialize, Default)]
pub struct CreateSession {
    #[serde(default)]
    cwd: Option<String>,
}

/// `POST /session`: `{"session_id"}`. An empty body means defaults (the SDK sends none).
pub async fn create_session(
    State(api): State<ExecApi>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: CreateSession = optional_json(&body, "error parsing request. ")?;
    let cwd = match request.cwd.filter(|c| !c.is_empty()) {
        Some(cwd) => Some(crate::exec::expand_path(&cwd, &[]).map_err(invalid)?),
        None => None,
    };
    match api.sessions.create(cwd) {
        Ok(id) => Ok(Json(json!({"session_id": id}))),
        Err(SessionError::Invalid(m)) => Err(invalid(m)),
        Err(SessionError::Limit(m)) => Err(limit_error(m)),
        Err(SessionError::NotFound(m) | SessionError::Failed(m)) => {
            Err(runtime_error(format!("error creating session. {m}")))
        }
    }
}
