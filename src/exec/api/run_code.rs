use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;

use super::{ExecApi, ExecJson, code_error, invalid, limit_error, millis};
use crate::exec::code::RunRequest;
use crate::exec::commands::{CommandError, Request};
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct RunCode {
    #[serde(default)]
    code: String,
    #[serde(default)]
    context: CodeContext,
    /// Milliseconds (a sandlet addition); 0 or absent: `--code-run-timeout-seconds`.
    #[serde(default)]
    timeout: Option<i64>,
}

#[derive(Deserialize, Default)]
struct CodeContext {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    language: Option<String>,
}

/// `POST /code`: runs code in a context (the language's default one when no id is given); the
/// response is its event stream. An empty language means a shell command, as in execd.
pub async fn run_code(
    State(api): State<ExecApi>,
    ExecJson(body): ExecJson<RunCode>,
) -> Result<Response, ApiError> {
    if body.code.is_empty() {
        return Err(invalid(
            "invalid request, validation error code is required",
        ));
    }
    let language = body.context.language.unwrap_or_default();
    let timeout = millis(body.timeout)?;
    if matches!(language.as_str(), "" | "command" | "background-command") {
        super::command_line(
            &body.code,
            "invalid request, validation error code is required",
        )?;
        let request = Request {
            id: None,
            place: None,
            stop_when_client_leaves: false,
            command: body.code,
            argv: None,
            cwd: None,
            envs: Vec::new(),
            uid: None,
            gid: None,
            timeout,
            background: language == "background-command",
        };
        return match api.commands.run(request).await {
            Ok(frames) => Ok(super::event_stream(frames)),
            Err(CommandError::Limit(m)) => Err(limit_error(m)),
            Err(
                CommandError::Invalid(m) | CommandError::NotFound(m) | CommandError::NotRunning(m),
            ) => Err(invalid(m)),
        };
    }
    let request = RunRequest {
        code: body.code,
        context_id: body.context.id.filter(|id| !id.is_empty()),
        language,
        timeout,
    };
    let frames = api.code.run(request).await.map_err(code_error)?;
    Ok(super::event_stream(frames))
}
