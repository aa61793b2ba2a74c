use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::TaskApi;
use crate::http::error::ApiError;
use crate::http::extract::JsonBody;
use crate::tasks::wire::Task;

/// `POST /tasks`: 201 with the new task; 200 when an identical task already exists.
pub async fn create_task(
    State(api): State<TaskApi>,
    JsonBody(task): JsonBody<Task>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
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
