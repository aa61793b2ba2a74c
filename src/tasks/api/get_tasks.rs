use axum::Json;
use axum::extract::State;

use super::TaskApi;
use crate::tasks::wire::Task;

/// `GET /getTasks`: every task, in creation order (the Go client reads the first).
pub async fn get_tasks(State(api): State<TaskApi>) -> Json<Vec<Task>> {
    Json(api.tasks.list())
}
