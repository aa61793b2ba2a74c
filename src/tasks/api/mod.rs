//! The task API on :5758, one file per request kind. Wire-compatible with the Go
//! task-executor's routes, plus `GET /tasks/{name}/logs` and the change feed `GET /watchTasks`.

mod create_task;
mod delete_task;
mod get_task;
mod get_tasks;
mod health;
mod set_tasks;
mod task_logs;
mod watch_tasks;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use std::sync::Arc;

use tokio::sync::watch;

use super::{TaskError, TaskManager};
use crate::container::TargetWatch;
use crate::http::auth::{Auth, require_token};
use crate::http::error::{self, ApiError};
use crate::http::{BodyLimit, refuse_oversized};

#[derive(Clone)]
pub struct TaskApi {
    pub tasks: TaskManager,
    /// The main container, in sidecar mode.
    pub target: Option<Arc<TargetWatch>>,
    /// Turns true when sandlet shuts down; long-lived responses end then.
    pub shutdown: watch::Receiver<bool>,
}

pub fn router(api: TaskApi, auth: Auth, max_body_bytes: u64) -> Router {
    let limit = BodyLimit {
        bytes: max_body_bytes,
        flag: "--max-body-bytes",
        code: "PayloadTooLarge",
    };
    // Everything but the probes is behind the token, unknown routes and wrong methods too: a
    // caller without the token learns nothing about the API, not even which routes exist.
    let protected = Router::new()
        .route("/setTasks", post(set_tasks::set_tasks))
        .route("/getTasks", get(get_tasks::get_tasks))
        .route("/tasks", post(create_task::create_task))
        .route(
            "/tasks/{name}",
            get(get_task::get_task).delete(delete_task::delete_task),
        )
        .route("/tasks/{name}/logs", get(task_logs::task_logs))
        .route("/watchTasks", get(watch_tasks::watch_tasks))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(limit, refuse_oversized))
        .layer(middleware::from_fn_with_state(auth, require_token));
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .merge(protected)
        // The probes' own wrong methods (the protected routes have theirs behind the token).
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(
            usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
        ))
        .with_state(api)
}

impl From<TaskError> for ApiError {
    fn from(e: TaskError) -> Self {
        let message = e.to_string();
        match e {
            TaskError::Invalid(_) => ApiError::bad_request("InvalidTask", message),
            TaskError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "TaskConflict", message),
            TaskError::Limit(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "TooManyTasks", message)
            }
            TaskError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "TaskNotFound", message),
            TaskError::Storage(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "StorageFailed", message)
            }
        }
    }
}

/// A task name from the path, checked like a name in a request body.
fn task_name(segment: crate::http::extract::Segment) -> Result<String, ApiError> {
    super::validate::check_name(&segment.0)
        .map_err(|m| ApiError::bad_request("InvalidTaskName", m))?;
    Ok(segment.0)
}
