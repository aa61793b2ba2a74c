use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::ExecApi;
use crate::http::error::ApiError;

/// `DELETE /session/{id}`: stops a run in progress (its whole tree) and forgets the session.
pub async fn delete_session(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    api.sessions.delete(&id).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "CONTEXT_NOT_FOUND",
            format!("session {id} not found"),
        )
    })?;
    Ok(super::empty_ok())
}
