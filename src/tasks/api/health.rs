use axum::Json;
use serde_json::{Value, json};

/// `GET /health`, never behind the token.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "healthy"}))
}
