use axum::extract::{Path, State};
use axum::response::Response;

use super::{ExecApi, code_error};
use crate::http::error::ApiError;

/// `DELETE /code/contexts/{id}`: forgets the context and shuts its kernel down (a run in
/// progress is interrupted first).
pub async fn delete_code_context(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    api.code.delete(&id).await.map_err(code_error)?;
    Ok(super::empty_ok())
}
