use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::TaskApi;

/// `GET /health`, never behind the token: sandlet is up. In sidecar mode it also says where
/// tasks run (the main container's process, the cgroups joined and why others are not), but
/// stays 200 while the main container is away: restarting sandlet would not bring it back.
pub async fn health(State(api): State<TaskApi>) -> Json<Value> {
    let mut body = json!({"status": "healthy"});
    if let Some(target) = &api.target {
        body["sidecar"] = target.detail().1;
    }
    Json(body)
}

/// `GET /ready`, never behind the token (kubelet probes carry none): 200 when tasks can start,
/// which in sidecar mode means the main container is found and can be entered; 503 with the
/// reason otherwise.
pub async fn ready(State(api): State<TaskApi>) -> (StatusCode, Json<Value>) {
    let Some(target) = &api.target else {
        return (
            StatusCode::OK,
            Json(json!({"ready": true, "mode": "local"})),
        );
    };
    let (ready, mut detail) = target.detail();
    detail["ready"] = json!(ready);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(detail))
}
