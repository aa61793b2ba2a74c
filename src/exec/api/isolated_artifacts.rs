//! What a session kept in its persistent overlays: `GET .../diff` (a tar.gz, streamed) and
//! `POST .../commit` (written onto the sandbox's directories below the overlays); see
//! `crate::isolation` and its `artifacts.rs`.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::ExecApi;
use crate::http::error::ApiError;
use crate::isolation::{self, IsolationError};

/// Bytes gathered before they go to the client.
const CHUNK: usize = 256 << 10;
/// Chunks made ahead of the client.
const AHEAD: usize = 4;

/// `GET /v1/isolated/session/{id}/diff`.
pub async fn diff(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (files, layers) = api.isolation.layers(&id)?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(AHEAD);
    let out = Sender {
        tx: tx.clone(),
        buffer: Vec::with_capacity(CHUNK),
    };
    tokio::spawn(async move {
        let written = files
            .run(move |place| isolation::diff(place, &layers, out))
            .await;
        if let Err(e) = written {
            // Ends the body short: the client sees it broken, not complete.
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
    });
    let mut response = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("attachment; filename=\"{id}.tar.gz\""))
            .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
    );
    Ok(response)
}

/// `POST /v1/isolated/session/{id}/commit`: `{session_id, entries}` once written; refused
/// while a run of the session is in progress (it would race the copy).
pub async fn commit(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (files, layers) = api.isolation.layers(&id)?;
    if api.isolation.has_active_runs(&id) {
        return Err(IsolationError::Conflict(format!(
            "a run of session {id} is in progress; commit when it has ended"
        ))
        .into());
    }
    let entries = files
        .run(move |place| isolation::commit(place, &layers))
        .await?;
    Ok(Json(json!({"session_id": id, "entries": entries})))
}

/// A writer into the response body, in chunks, a few ahead of the client.
struct Sender {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buffer: Vec<u8>,
}

impl std::io::Write for Sender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = std::io::Write::flush(self);
    }
}
