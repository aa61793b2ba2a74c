use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;

use super::{ExecApi, ExecJson, invalid, limit_error, millis};
use crate::exec::commands::{CommandError, Request};
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct RunCommand {
    #[serde(default)]
    command: String,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    background: bool,
    /// Milliseconds; 0 or absent: none.
    #[serde(default)]
    timeout: Option<i64>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
    #[serde(default)]
    envs: Option<BTreeMap<String, String>>,
}

/// `POST /command`: runs `command` with the shell; the response is its event stream.
pub async fn run_command(
    State(api): State<ExecApi>,
    ExecJson(body): ExecJson<RunCommand>,
) -> Result<Response, ApiError> {
    super::command_line(
        &body.command,
        "invalid request, validation error command is required",
    )?;
    let envs: Vec<(String, String)> = body.envs.unwrap_or_default().into_iter().collect();
    if let Some((k, _)) = envs
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(invalid(format!(
            "invalid request, validation error env {k:?} is not a valid variable"
        )));
    }
    let cwd = match body.cwd.filter(|c| !c.is_empty()) {
        Some(cwd) => Some(crate::exec::expand_path(&cwd, &envs).map_err(invalid)?),
        None => None,
    };
    let request = Request {
        command: body.command,
        cwd,
        envs,
        uid: body.uid,
        gid: body.gid,
        timeout: millis(body.timeout)?,
        background: body.background,
    };
    match api.commands.run(request).await {
        Ok(frames) => Ok(super::event_stream(frames)),
        Err(CommandError::Invalid(m)) => {
            Err(invalid(format!("invalid request, validation error {m}")))
        }
        Err(CommandError::Limit(m)) => Err(limit_error(m)),
        Err(CommandError::NotFound(m) | CommandError::NotRunning(m)) => {
            Err(super::runtime_error(m))
        }
    }
}
