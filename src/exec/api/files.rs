//! What the file and directory routes share: the error mapping, repeated query parameters and
//! execd's permission objects.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::files::{FileError, FileInfo, Files, Place, octal_mode};
use crate::http::error::ApiError;

impl From<FileError> for ApiError {
    fn from(e: FileError) -> ApiError {
        let (status, code) = match &e {
            FileError::NotFound(_) => (StatusCode::NOT_FOUND, "FILE_NOT_FOUND"),
            FileError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST_BODY"),
            FileError::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT"),
            FileError::Denied(_) => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
            FileError::NoSpace(_) => (StatusCode::INSUFFICIENT_STORAGE, "NO_SPACE"),
            FileError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "LIMIT_EXCEEDED"),
            FileError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            FileError::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, "LIMIT_EXCEEDED"),
            FileError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "RUNTIME_ERROR"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Every value of a query parameter that may repeat (`?path=a&path=b`).
pub fn query_values(query: Option<&str>, key: &str) -> Vec<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// A required query parameter (the first, if repeated).
pub fn required_query(query: Option<&str>, key: &str) -> Result<String, ApiError> {
    query_values(query, key)
        .into_iter()
        .next()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("MISSING_QUERY", format!("missing query parameter '{key}'"))
        })
}

/// execd's `Permission`: an owner and group (names or numbers) and a mode in octal digits.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Permission {
    pub owner: Option<String>,
    pub group: Option<String>,
    pub mode: Option<u32>,
}

/// A permission checked against the sandbox: the mode as bits, the owner and group as ids.
pub struct Resolved {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Permission {
    pub fn resolve(&self, place: &Place) -> Result<Resolved, FileError> {
        let (uid, gid) = place.ids(self.owner.as_deref(), self.group.as_deref())?;
        Ok(Resolved {
            mode: octal_mode(self.mode.unwrap_or(0))?,
            uid,
            gid,
        })
    }
}

/// Bytes of JSON gathered before they go to the client as one chunk.
const CHUNK_BYTES: usize = 64 << 10;
/// Chunks ready ahead of the client.
const CHUNKS_AHEAD: usize = 2;

/// Answers with what a walk (a listing or a search) hands out, as a JSON array: whole, with its
/// length, when it fits in one chunk (most answers), else streamed as the walk goes on, so no
/// answer is held in memory. The walk has a turn ([`Files::walk_turn`]) while it runs. An error
/// before anything was sent is the answer; one after the first chunk ends the response early
/// (the connection closes and the client sees an incomplete body), which only a tree changed
/// between the walk's count and its listing, or a disk error, can cause.
pub async fn walk_response(
    files: &Arc<Files>,
    walk: impl FnOnce(
        &Place,
        &mut dyn FnMut(FileInfo) -> Result<(), FileError>,
    ) -> Result<(), FileError>
    + Send
    + 'static,
) -> Result<Response, ApiError> {
    let turn = files.walk_turn().await?;
    let (chunks, stream) = mpsc::channel(CHUNKS_AHEAD);
    let (started, streaming) = oneshot::channel();
    let job = files.spawn(move |place| {
        let _turn = turn;
        let mut array = JsonArray {
            chunks,
            started: Some(started),
            buffer: Vec::new(),
            items: 0,
        };
        match walk(place, &mut |info| array.push(&info)) {
            Ok(()) => array.finish(),
            Err(e) => {
                array.abort(&e);
                Err(e)
            }
        }
    });
    let whole = match streaming.await {
        Ok(()) => {
            let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(stream));
            return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
        }
        // Never started: the job is over, with the whole answer or an error.
        Err(_) => job
            .await
            .map_err(|e| ApiError::internal(format!("a file operation panicked: {e}")))??,
    };
    let whole = whole.expect("an answer that never started streaming is whole");
    Ok(([(header::CONTENT_TYPE, "application/json")], whole).into_response())
}

/// A JSON array written in chunks to a response body.
struct JsonArray {
    chunks: mpsc::Sender<Result<Bytes, std::io::Error>>,
    /// Told when the first chunk goes out (the response starts then).
    started: Option<oneshot::Sender<()>>,
    buffer: Vec<u8>,
    items: usize,
}

impl JsonArray {
    fn push(&mut self, item: &impl Serialize) -> Result<(), FileError> {
        self.buffer.push(if self.items == 0 { b'[' } else { b',' });
        serde_json::to_writer(&mut self.buffer, item)
            .map_err(|e| FileError::Failed(format!("cannot encode an entry: {e}")))?;
        self.items += 1;
        if self.buffer.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), FileError> {
        if let Some(started) = self.started.take() {
            let _ = started.send(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buffer));
        self.chunks
            .blocking_send(Ok(chunk))
            .map_err(|_| FileError::Failed("the client went away".into()))
    }

    /// Ends the array: sends the rest, or returns the whole array when nothing was sent yet.
    fn finish(mut self) -> Result<Option<Bytes>, FileError> {
        if self.items == 0 {
            self.buffer.push(b'[');
        }
        self.buffer.push(b']');
        if self.started.is_some() {
            return Ok(Some(Bytes::from(std::mem::take(&mut self.buffer))));
        }
        self.send().map(|()| None)
    }

    /// Ends a response that has started with an error: the client sees it cut short.
    fn abort(self, e: &FileError) {
        if self.started.is_none() {
            tracing::warn!(error = %e, "a listing failed after its answer had started");
            let _ = self
                .chunks
                .blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    }
}
