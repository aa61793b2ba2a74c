use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::{ExecApi, ExecJson, invalid, limit_error, millis, runtime_error};
use crate::exec::sessions::SessionError;
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct RunInSession {
    #[serde(default)]
    command: String,
    #[serde(default)]
    cwd: Option<String>,
    /// Milliseconds; 0 or absent: 24 h.
    #[serde(default)]
    timeout: Option<i64>,
}

/// `POST /session/{id}/run`: runs `command` with the session's environment and directory; the
/// response is its event stream (`init` carries the session id).
pub async fn run_in_session(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
    ExecJson(body): ExecJson<RunInSession>,
) -> Result<Response, ApiError> {
    super::command_line(&body.command, "invalid request. command is required")?;
    let cwd = match body.cwd.filter(|c| !c.is_empty()) {
        Some(cwd) => Some(crate::exec::expand_path(&cwd, &[]).map_err(invalid)?),
        None => None,
    };
    let timeout = millis(body.timeout)?;
    match api.sessions.run(&id, body.command, cwd, timeout).await {
        Ok(frames) => Ok(super::event_stream(frames)),
        Err(SessionError::NotFound(m)) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "CONTEXT_NOT_FOUND", m))
        }
        Err(SessionError::Invalid(m)) => Err(invalid(m)),
        Err(SessionError::Limit(m)) => Err(limit_error(m)),
        Err(SessionError::Failed(m)) => {
            Err(runtime_error(format!("error running in session. {m}")))
        }
    }
}
