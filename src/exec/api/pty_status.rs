use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::{ExecApi, pty_not_found};
use crate::http::error::ApiError;

/// `GET /pty/{id}`: `{"session_id","running","output_offset"}`.
pub async fn pty_status(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let session = api.ptys.get(&id).map_err(pty_not_found)?;
    let (running, offset) = session.status();
    Ok(Json(
        json!({"session_id": id, "running": running, "output_offset": offset}),
    ))
}
