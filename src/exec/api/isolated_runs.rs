//! `POST /v1/isolated/session/{id}/run` and a background run's status and logs. A run is a
//! command started inside the session (see `crate::isolation`): a foreground run streams the
//! events of `/command` and is stopped if its client goes away; a background run answers
//! `202 {session_id, run_id, started_at}` and is followed through `runs/{run}` and its logs.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::command_logs::{LogsQuery, MAX_READ, cursor, log_answer};
use super::{ExecApi, ExecJson, event_stream, invalid};
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct RunRequest {
    #[serde(default)]
    code: String,
    #[serde(default)]
    envs: Option<BTreeMap<String, String>>,
    /// Foreground only; 0 or absent: none.
    #[serde(default)]
    timeout_seconds: Option<i64>,
    #[serde(default)]
    background: bool,
}

pub async fn run(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
    ExecJson(body): ExecJson<RunRequest>,
) -> Result<Response, ApiError> {
    super::command_line(
        &body.code,
        "invalid request, validation error code is required",
    )?;
    let envs: Vec<(String, String)> = body.envs.unwrap_or_default().into_iter().collect();
    if let Some((k, _)) = envs
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(invalid(format!("env {k:?} is not a valid variable")));
    }
    let timeout = match body.timeout_seconds {
        None | Some(0) => None,
        Some(s) if s < 0 => {
            return Err(invalid(format!(
                "timeout_seconds must not be negative: {s}"
            )));
        }
        Some(s) => Some(Duration::from_secs(s as u64)),
    };
    match api
        .isolation
        .run(&id, body.code, envs, timeout, body.background)
        .await?
    {
        Ok(frames) => Ok(event_stream(frames)),
        Err(started) => Ok((StatusCode::ACCEPTED, Json(started)).into_response()),
    }
}

/// `GET /v1/isolated/session/{id}/runs/{run}`.
pub async fn status(
    State(api): State<ExecApi>,
    Path((id, run)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(api.isolation.run_status(&id, &run)?))
}

/// `GET /v1/isolated/session/{id}/runs/{run}/logs?cursor=`: the run's output from the byte
/// `cursor` (at most 4 MiB), and `EXECD-ISOLATED-TAIL-CURSOR` to continue from.
pub async fn logs(
    State(api): State<ExecApi>,
    Path((id, run)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let (data, next) = api.isolation.run_logs(&id, &run, cursor(&q)?, MAX_READ)?;
    Ok(log_answer(data, next, "EXECD-ISOLATED-TAIL-CURSOR"))
}
