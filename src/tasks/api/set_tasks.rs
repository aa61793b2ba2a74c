use axum::Json;
use axum::extract::State;
use serde_json::Value;

use super::TaskApi;
use crate::http::error::ApiError;
use crate::http::extract::JsonBody;
use crate::tasks::wire::{Task, tasks_from_json};

/// `POST /setTasks`: the desired list in, every task after the sync out (creation order).
pub async fn set_tasks(
    State(api): State<TaskApi>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Vec<Task>>, ApiError> {
    let desired = tasks_from_json(body).map_err(|m| ApiError::bad_request("InvalidJSON", m))?;
    Ok(Json(api.tasks.sync(desired).await?))
}
