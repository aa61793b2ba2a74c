use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ExecApi, invalid, limit_error, optional_json, runtime_error};
use crate::exec::pty::PtyError;
use crate::http::error::ApiError;

#[derive(Deserialize, Default)]
pub struct CreatePty {
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    command: Option<String>,
}

/// `POST /pty`: `201 {"session_id"}`; the shell starts on the first WebSocket connection. An
/// empty body means defaults.
pub async fn create_pty(
    State(api): State<ExecApi>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: CreatePty = optional_json(&body, "error parsing request: ")?;
    let cwd = match request.cwd.filter(|c| !c.is_empty()) {
        Some(cwd) => Some(crate::exec::expand_path(&cwd, &[]).map_err(invalid)?),
        None => None,
    };
    let command = request.command.filter(|c| !c.is_empty());
    match api.ptys.create(cwd, command) {
        Ok(id) => Ok((StatusCode::CREATED, Json(json!({"session_id": id})))),
        Err(PtyError::Invalid(m)) => Err(invalid(m)),
        Err(PtyError::Limit(m)) => Err(limit_error(m)),
        Err(e) => Err(runtime_error(format!("error creating pty session: {e}"))),
    }
}
