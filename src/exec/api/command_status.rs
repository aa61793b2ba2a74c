use axum::Json;
use axum::extract::{Path, State};
use chrono::SecondsFormat;
use serde_json::{Value, json};

use super::ExecApi;
use crate::http::error::ApiError;

/// `GET /command/status/{id}`: `exit_code` and `finished_at` are left out while it runs.
pub async fn command_status(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (command, status) = api.commands.status(&id).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "INVALID_REQUEST_BODY",
            format!("command not found: {id}"),
        )
    })?;
    let mut body = json!({
        "id": command.id,
        "running": status.running,
        "started_at": command.started_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    });
    if !command.content.is_empty() {
        body["content"] = json!(command.content);
    }
    if let Some(f) = status.finished {
        body["exit_code"] = json!(f.exit_code);
        body["finished_at"] = json!(f.at.to_rfc3339_opts(SecondsFormat::AutoSi, true));
        if !f.error.is_empty() {
            body["error"] = json!(f.error);
        }
    }
    Ok(Json(body))
}
