use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::Value;

use super::TaskApi;
use crate::http::error::ApiError;
use crate::http::extract::JsonBody;
use crate::tasks::wire::{Task, task_from_json};

/// `POST /tasks`: 201 with the new task; 200 when an identical task already exists.
pub async fn create_task(
    State(api): State<TaskApi>,
    JsonBody(body): JsonBody<Value>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let task = task_from_json(body).map_err(|m| ApiError::bad_request("InvalidJSON", m))?;
    let (created, task) = api.tasks.create(task).await?;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(task),
    ))
}
