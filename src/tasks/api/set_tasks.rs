use axum::Json;
use axum::extract::State;

use super::TaskApi;
use crate::http::error::ApiError;
use crate::http::extract::JsonBody;
use crate::tasks::wire::Task;

/// `POST /setTasks`: the desired list in, every task after the sync out (creation order).
pub async fn set_tasks(
    State(api): State<TaskApi>,
    JsonBody(desired): JsonBody<Vec<Task>>,
) -> Result<Json<Vec<Task>>, ApiError> {
    Ok(Json(api.tasks.sync(desired).await?))
}
