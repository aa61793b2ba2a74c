use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use tokio::sync::mpsc;

use super::{ExecApi, runtime_error};
use crate::exec::metrics::Sample;
use crate::http::error::ApiError;

/// Between samples on `/metrics/watch`.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// `GET /metrics`: the sandbox's CPU and memory, at once (no sampling wait).
pub async fn metrics(State(api): State<ExecApi>) -> Result<Json<Sample>, ApiError> {
    api.metrics
        .sample()
        .map(Json)
        .map_err(|e| runtime_error(format!("error reading runtime metrics. {e}")))
}

/// `GET /metrics/watch`: a sample every second as SSE `data:` frames, until the client leaves.
pub async fn watch(State(api): State<ExecApi>) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let mut shutdown = api.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            let line = match api.metrics.sample() {
                Ok(s) => serde_json::to_string(&s).unwrap_or_default(),
                Err(e) => serde_json::json!({"error": e}).to_string(),
            };
            if tx
                .send(Bytes::from(format!("data: {line}\n\n")))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    super::event_stream(rx)
}
