use axum::extract::{Path, State};
use axum::response::Response;

use super::{ExecApi, pty_not_found};
use crate::http::error::ApiError;

/// `DELETE /pty/{id}`: kills the shell's whole tree; an attached client gets `exit -1`.
pub async fn delete_pty(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    api.ptys.delete(&id).map_err(pty_not_found)?;
    Ok(super::empty_ok())
}
