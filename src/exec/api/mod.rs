//! The exec API's routes, one file per request kind, wire-compatible with execd
//! (`../shared/reference/execd-contract.md`): the same paths, fields, events and status codes,
//! except where execd's were bugs (see the README's list of differences).

mod command_logs;
mod command_status;
mod create_code_context;
mod create_pty;
mod create_session;
mod delete_code_context;
mod delete_code_contexts;
mod delete_pty;
mod delete_session;
mod directories_create;
mod directories_delete;
mod directories_list;
mod files;
mod files_delete;
mod files_download;
mod files_info;
mod files_lines;
mod files_move;
mod files_permissions;
mod files_replace;
mod files_search;
mod files_upload;
mod get_code_context;
mod interrupt;
mod isolated_artifacts;
mod isolated_runs;
mod isolated_sessions;
mod list_code_contexts;
mod metrics;
mod ping;
pub mod proxy;
mod pty_status;
mod pty_ws;
mod run_code;
mod run_command;
mod run_in_session;
mod scoped;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::code::{Code, CodeError};
use super::pty::{PtyError, Ptys};
use super::{Commands, Metrics, Sessions};
use crate::files::Files;
use crate::http::auth::Auth;
use crate::http::error::{self, ApiError};
use crate::http::{BodyLimit, refuse_oversized};

/// The header execd reads its access token from.
pub const TOKEN_HEADER: &str = "X-EXECD-ACCESS-TOKEN";

#[derive(Clone)]
pub struct ExecApi {
    pub commands: Arc<Commands>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    pub files: Arc<Files>,
    pub ptys: Arc<Ptys>,
    pub code: Arc<Code>,
    /// A PTY WebSocket message's size limit (execd has none).
    pub pty_max_message: usize,
    /// Turns true when sandlet shuts down; `/metrics/watch` ends then.
    pub shutdown: watch::Receiver<bool>,
    /// `/proxy/{port}/...` to the pod's loopback.
    pub proxy: proxy::Proxy,
    /// `/v1/isolated/...`: isolated sessions.
    pub isolation: Arc<crate::isolation::Isolation>,
}

pub fn router(api: ExecApi, auth: Auth, max_body_bytes: u64, max_upload_bytes: u64) -> Router {
    let body_limit = BodyLimit {
        bytes: max_body_bytes,
        flag: "--max-body-bytes",
        code: "LIMIT_EXCEEDED",
    };
    let upload_limit = BodyLimit {
        bytes: max_upload_bytes,
        flag: "--exec-max-upload-bytes",
        ..body_limit
    };
    Router::new()
        .route("/ping", get(ping::ping))
        .route(
            "/command",
            post(run_command::run_command).delete(interrupt::interrupt),
        )
        .route("/command/status/{id}", get(command_status::command_status))
        .route("/command/{id}/logs", get(command_logs::command_logs))
        .route(
            "/code",
            post(run_code::run_code).delete(interrupt::interrupt),
        )
        .route(
            "/code/context",
            post(create_code_context::create_code_context),
        )
        .route(
            "/code/contexts",
            get(list_code_contexts::list_code_contexts)
                .delete(delete_code_contexts::delete_code_contexts),
        )
        .route(
            "/code/contexts/{id}",
            get(get_code_context::get_code_context)
                .delete(delete_code_context::delete_code_context),
        )
        .route("/session", post(create_session::create_session))
        .route("/session/{id}/run", post(run_in_session::run_in_session))
        .route("/session/{id}", delete(delete_session::delete_session))
        .route("/pty", post(create_pty::create_pty))
        .route(
            "/pty/{id}",
            get(pty_status::pty_status).delete(delete_pty::delete_pty),
        )
        .route("/pty/{id}/ws", get(pty_ws::pty_ws))
        .route("/metrics", get(metrics::metrics))
        .route("/metrics/watch", get(metrics::watch))
        .route(
            "/v1/isolated/capabilities",
            get(isolated_sessions::capabilities),
        )
        .route("/v1/isolated/session", post(isolated_sessions::create))
        .route("/v1/isolated/sessions", get(isolated_sessions::list))
        .route(
            "/v1/isolated/session/{id}",
            get(isolated_sessions::get).delete(isolated_sessions::delete),
        )
        .route("/v1/isolated/session/{id}/run", post(isolated_runs::run))
        .route(
            "/v1/isolated/session/{id}/runs/{run}",
            get(isolated_runs::status),
        )
        .route(
            "/v1/isolated/session/{id}/runs/{run}/logs",
            get(isolated_runs::logs),
        )
        .route(
            "/v1/isolated/session/{id}/diff",
            get(isolated_artifacts::diff),
        )
        .route(
            "/v1/isolated/session/{id}/commit",
            post(isolated_artifacts::commit),
        )
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        // The routes above, not the file routes merged after them (which have their own).
        .layer(middleware::from_fn_with_state(body_limit, refuse_oversized))
        .merge(file_routes(body_limit, upload_limit))
        .nest(
            "/v1/filesystem/{uid}/{gid}",
            file_routes(body_limit, upload_limit).layer(middleware::from_fn_with_state(
                api.clone(),
                scoped::identity,
            )),
        )
        .nest(
            "/v1/isolated/session/{id}",
            file_routes(body_limit, upload_limit)
                .layer(middleware::from_fn_with_state(api.clone(), scoped::session)),
        )
        // Around every route and the fallback, so any method on any path under /proxy/ is
        // forwarded (no route matches there) before a 404 or 405 could be answered.
        .layer(middleware::from_fn_with_state(
            api.proxy.clone(),
            proxy::intercept,
        ))
        // Every route, /ping and /proxy/ included, as with execd; the 404s too.
        .layer(middleware::from_fn_with_state(auth, require_execd_token))
        .layer(DefaultBodyLimit::max(
            usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
        ))
        .with_state(api)
}

/// The file and directory routes, acting on the files of the request's scope (see `scoped.rs`).
fn file_routes(body_limit: BodyLimit, upload_limit: BodyLimit) -> Router<ExecApi> {
    Router::new()
        .route("/files", delete(files_delete::delete_files))
        .route("/files/info", get(files_info::file_info))
        .route("/files/mv", post(files_move::move_files))
        .route(
            "/files/permissions",
            post(files_permissions::set_file_permissions),
        )
        .route("/files/search", get(files_search::search_files))
        .route("/files/replace", post(files_replace::replace_contents))
        .route("/files/download", get(files_download::download))
        .route("/directories/list", get(directories_list::list_directory))
        .route(
            "/directories",
            post(directories_create::create_directories)
                .delete(directories_delete::delete_directories),
        )
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(body_limit, refuse_oversized))
        // Uploads stream to disk; their own limit (--exec-max-upload-bytes) applies instead.
        .route(
            "/files/upload",
            post(files_upload::upload)
                .route_layer(middleware::from_fn_with_state(
                    upload_limit,
                    refuse_oversized,
                ))
                .layer(DefaultBodyLimit::disable()),
        )
}

async fn require_execd_token(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let presented = request.headers().get(TOKEN_HEADER).map(|v| v.as_bytes());
    if !auth.admits(presented) {
        let message = format!("Unauthorized: invalid or missing header {TOKEN_HEADER}");
        // execd's body is {"error"}; code and message are added for clients that read those.
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": message, "code": "UNAUTHORIZED", "message": message})),
        )
            .into_response();
    }
    next.run(request).await
}

/// A JSON body; every problem is `400 INVALID_REQUEST_BODY` (413 past the body limit).
pub struct ExecJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ExecJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let status = r.status();
            let code = match status {
                StatusCode::PAYLOAD_TOO_LARGE => "LIMIT_EXCEEDED",
                _ => "INVALID_REQUEST_BODY",
            };
            ApiError::new(status, code, r.body_text())
        })?;
        serde_json::from_slice(&bytes).map(ExecJson).map_err(|e| {
            invalid(format!(
                "error parsing request, MAYBE invalid body format. {e}"
            ))
        })
    }
}

/// A JSON body that may be empty, meaning `T::default()` (execd allows that for `/session` and
/// `/pty` only); `prefix` opens the 400's message, worded per route as execd words it.
fn optional_json<T: DeserializeOwned + Default>(body: &[u8], prefix: &str) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| invalid(format!("{prefix}{e}")))
}

/// A command line for the shell: the kernel takes it as a C string, so a NUL in it is the
/// client's error (400), as it is in a directory or a path.
fn command_line(command: &str, required: &str) -> Result<(), ApiError> {
    if command.is_empty() {
        return Err(invalid(required.to_string()));
    }
    if command.contains('\0') {
        return Err(invalid(format!(
            "invalid request, validation error the command {command:?} contains NUL"
        )));
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("INVALID_REQUEST_BODY", message)
}

fn runtime_error(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "RUNTIME_ERROR", message)
}

/// `404 CONTEXT_NOT_FOUND`, execd's answer for an unknown PTY session.
fn pty_not_found(e: PtyError) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "CONTEXT_NOT_FOUND", e.to_string())
}

/// A code interpreting error as an answer. execd answers 500 to an unknown language and to an
/// unknown context in `POST /code`; sandlet answers 400 and 404 (bad input is the client's).
fn code_error(e: CodeError) -> ApiError {
    let message = e.to_string();
    match e {
        CodeError::UnknownLanguage(_) | CodeError::NoKernel(_) => invalid(message),
        CodeError::ContextNotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "CONTEXT_NOT_FOUND", message)
        }
        CodeError::Limit(_) => limit_error(message),
        CodeError::NotInstalled(_) | CodeError::Unavailable(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
        }
        CodeError::Jupyter(_) => runtime_error(message),
    }
}

/// The context routes take no shell languages (execd: "unsupported language context
/// operation").
fn check_context_language(language: &str) -> Result<(), ApiError> {
    if matches!(language, "command" | "background-command" | "sql") {
        return Err(invalid(format!(
            "unsupported language context operation: {language}"
        )));
    }
    Ok(())
}

fn limit_error(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "LIMIT_EXCEEDED", message)
}

/// `200` with an empty body, as execd answers success without data.
fn empty_ok() -> Response {
    StatusCode::OK.into_response()
}

/// A stream of SSE frames as a response, with execd's headers.
fn event_stream(frames: mpsc::Receiver<Bytes>) -> Response {
    let body = Body::from_stream(futures_util::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(frames),
        Ok::<_, std::convert::Infallible>,
    ));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("X-Accel-Buffering", HeaderValue::from_static("no"));
    response
}

/// Milliseconds as a duration; execd's `timeout` fields. 0 means none.
fn millis(timeout: Option<i64>) -> Result<Option<std::time::Duration>, ApiError> {
    match timeout {
        None | Some(0) => Ok(None),
        Some(ms) if ms < 0 => Err(invalid(format!(
            "invalid request, validation error timeout must be >= 0 milliseconds, got {ms}"
        ))),
        Some(ms) => Ok(Some(std::time::Duration::from_millis(ms as u64))),
    }
}
