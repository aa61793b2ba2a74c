use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ExecApi, invalid};
use crate::exec::commands::CommandError;
use crate::http::error::ApiError;

/// Bytes per answer at most; a client continues from the cursor it is given.
pub const MAX_READ: usize = 4 << 20;

#[derive(Deserialize)]
pub struct LogsQuery {
    cursor: Option<String>,
}

/// `GET /command/{id}/logs?cursor=<byte offset>`: a background command's output (stdout and
/// stderr in write order) from the cursor, and `EXECD-COMMANDS-TAIL-CURSOR` to continue from.
pub async fn command_logs(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    // Missing or unparsable: 0, as execd; negative: refused.
    let cursor = match q.cursor.as_deref().map(str::parse::<i64>) {
        Some(Ok(c)) if c < 0 => return Err(invalid(format!("cursor must not be negative: {c}"))),
        Some(Ok(c)) => c as u64,
        _ => 0,
    };
    let (data, next) = api
        .commands
        .logs(&id, cursor, MAX_READ)
        .map_err(|e| match e {
            CommandError::NotFound(m) => {
                ApiError::new(StatusCode::NOT_FOUND, "INVALID_REQUEST_BODY", m)
            }
            CommandError::Invalid(m) | CommandError::Limit(m) | CommandError::NotRunning(m) => {
                invalid(m)
            }
        })?;
    let mut response = data.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        "EXECD-COMMANDS-TAIL-CURSOR",
        HeaderValue::from_str(&next.to_string()).expect("digits"),
    );
    Ok(response)
}
