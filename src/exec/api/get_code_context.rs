use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::{ExecApi, code_error};
use crate::exec::code::CodeError;
use crate::http::error::ApiError;

/// `GET /code/contexts/{id}`: `{"id","language"}`.
pub async fn get_code_context(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let context = api
        .code
        .get(&id)
        .ok_or_else(|| code_error(CodeError::ContextNotFound(id)))?;
    Ok(Json(
        json!({"id": context.id, "language": context.language}),
    ))
}
