use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ExecApi, ExecJson, code_error, invalid};
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct CreateContext {
    #[serde(default)]
    language: String,
    #[serde(default)]
    cwd: Option<String>,
}

/// `POST /code/context`: `{"id","language","cwd"?}`, its kernel started.
pub async fn create_code_context(
    State(api): State<ExecApi>,
    ExecJson(body): ExecJson<CreateContext>,
) -> Result<Json<Value>, ApiError> {
    if body.language.is_empty() {
        return Err(invalid(
            "invalid request, validation error language is required",
        ));
    }
    super::check_context_language(&body.language)?;
    let cwd = match body.cwd.filter(|c| !c.is_empty()) {
        Some(cwd) => Some(crate::exec::expand_path(&cwd, &[]).map_err(invalid)?),
        None => None,
    };
    if let Some(cwd) = &cwd
        && !cwd.starts_with('/')
    {
        return Err(invalid(format!(
            "cwd must be an absolute path, got {cwd:?}"
        )));
    }
    let context = api
        .code
        .create_context(&body.language, cwd)
        .await
        .map_err(code_error)?;
    let mut answer = json!({"id": context.id, "language": context.language});
    if let Some(cwd) = &context.cwd {
        answer["cwd"] = json!(cwd);
    }
    Ok(Json(answer))
}
