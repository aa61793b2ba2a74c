use axum::Json;
use axum::extract::State;

use super::{TaskApi, task_name};
use crate::http::error::ApiError;
use crate::http::extract::Segment;
use crate::tasks::TaskError;
use crate::tasks::wire::Task;

/// `GET /tasks/{name}`.
pub async fn get_task(
    State(api): State<TaskApi>,
    segment: Segment,
) -> Result<Json<Task>, ApiError> {
    let name = task_name(segment)?;
    api.tasks
        .get(&name)
        .map(Json)
        .ok_or_else(|| TaskError::NotFound(name).into())
}
