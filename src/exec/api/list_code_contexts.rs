use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ExecApi;
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct ListQuery {
    language: Option<String>,
}

/// `GET /code/contexts?language=`: `[{"id","language"}]`, every context or one language's.
pub async fn list_code_contexts(
    State(api): State<ExecApi>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let language = q.language.filter(|l| !l.is_empty());
    if let Some(language) = &language {
        super::check_context_language(language)?;
    }
    let contexts: Vec<Value> = api
        .code
        .list(language.as_deref())
        .iter()
        .map(|c| json!({"id": c.id, "language": c.language}))
        .collect();
    Ok(Json(Value::Array(contexts)))
}
