use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ExecApi, invalid};
use crate::exec::CommandError;
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
    let cursor = cursor(&q)?;
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
    Ok(log_answer(data, next, "EXECD-COMMANDS-TAIL-CURSOR"))
}

/// A cursor query: missing or unparsable is 0, as execd; negative is refused.
pub fn cursor(q: &LogsQuery) -> Result<u64, ApiError> {
    match q.cursor.as_deref().map(str::parse::<i64>) {
        Some(Ok(c)) if c < 0 => Err(invalid(format!("cursor must not be negative: {c}"))),
        Some(Ok(c)) => Ok(c as u64),
        _ => Ok(0),
    }
}

/// Output as text, with the cursor to continue from in `cursor_header`.
pub fn log_answer(data: Vec<u8>, next: u64, cursor_header: &'static str) -> Response {
    let mut response = data.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        cursor_header,
        HeaderValue::from_str(&next.to_string()).expect("digits"),
    );
    response
}
