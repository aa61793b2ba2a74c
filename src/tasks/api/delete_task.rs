use axum::extract::State;
use axum::http::StatusCode;

use super::{TaskApi, task_name};
use crate::http::error::ApiError;
use crate::http::extract::Segment;

/// `DELETE /tasks/{name}`: 204 at once; the task's tree is stopped, then the task is forgotten.
/// Unknown names also get 204, as with the Go executor (deleting is idempotent).
pub async fn delete_task(
    State(api): State<TaskApi>,
    segment: Segment,
) -> Result<StatusCode, ApiError> {
    api.tasks.remove(&task_name(segment)?);
    Ok(StatusCode::NO_CONTENT)
}
