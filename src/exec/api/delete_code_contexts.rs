use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;

use super::{ExecApi, code_error};
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct DeleteQuery {
    language: Option<String>,
}

/// `DELETE /code/contexts?language=`: every context of the language, the default one too.
pub async fn delete_code_contexts(
    State(api): State<ExecApi>,
    Query(q): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    let Some(language) = q.language.filter(|l| !l.is_empty()) else {
        return Err(ApiError::bad_request(
            "MISSING_QUERY",
            "missing query parameter 'language'",
        ));
    };
    super::check_context_language(&language)?;
    api.code
        .delete_language(&language)
        .await
        .map_err(code_error)?;
    Ok(super::empty_ok())
}
