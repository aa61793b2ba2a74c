use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::ExecApi;
use crate::exec::commands::CommandError;
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct InterruptQuery {
    id: Option<String>,
}

/// `DELETE /command?id=` and `DELETE /code?id=` (one handler, as in execd): given a code
/// context's id, interrupts its kernel; a command's, interrupts it (SIGTERM to its tree, SIGKILL
/// after 3 s); a bash session's, deletes that session.
pub async fn interrupt(
    State(api): State<ExecApi>,
    Query(q): Query<InterruptQuery>,
) -> Result<Response, ApiError> {
    let Some(id) = q.id.filter(|i| !i.is_empty()) else {
        return Err(ApiError::bad_request(
            "MISSING_QUERY",
            "missing query parameter 'id'",
        ));
    };
    if let Some(interrupted) = api.code.interrupt(&id).await {
        interrupted.map_err(super::code_error)?;
        return Ok(super::empty_ok());
    }
    if api.sessions.exists(&id) {
        api.sessions.delete(&id).map_err(|_| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "CONTEXT_NOT_FOUND",
                format!("session {id} not found"),
            )
        })?;
        return Ok(super::empty_ok());
    }
    match api.commands.interrupt(&id) {
        Ok(()) => Ok(super::empty_ok()),
        Err(CommandError::NotFound(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "CONTEXT_NOT_FOUND",
            format!("no command or session {id}"),
        )),
        Err(CommandError::NotRunning(m)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "RUNTIME_ERROR", m))
        }
        Err(CommandError::Invalid(m) | CommandError::Limit(m)) => Err(super::runtime_error(m)),
    }
}
