//! `GET /tasks/{name}/logs?stream=stdout|stderr&offset=N&limit=M&follow=true`.
//!
//! Offsets are byte positions in the whole stream and never change (see `process::output`).
//! Headers say where the answer sits: `X-Log-Start` (the oldest byte still kept), `X-Log-Offset`
//! (the offset of the first byte sent: the one asked for, or `X-Log-Start` when that was
//! rotated away), `X-Log-Next` (where to continue; not sent when following) and `X-Log-Complete`
//! (`true` once the task has ended and everything has been read). With `follow=true` the
//! response streams output as it is written and ends when the task has ended.

use std::path::PathBuf;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};

use super::{TaskApi, task_name};
use crate::http::error::ApiError;
use crate::http::extract::{Params, Segment};
use crate::process::read_log;
use crate::tasks::{FeedEvent, TaskManager};

/// Bytes per response (non-follow) at most, and the default.
pub const MAX_LOG_READ: usize = 4 << 20;
const DEFAULT_LOG_READ: usize = 1 << 20;
const FOLLOW_CHUNK: usize = 64 << 10;
/// Output is written by the shim, not through sandlet, so a follower looks for more at this
/// interval; the task's end wakes it at once.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    #[serde(default = "stdout")]
    stream: String,
    #[serde(default)]
    offset: u64,
    limit: Option<usize>,
    #[serde(default)]
    follow: bool,
}

fn stdout() -> String {
    "stdout".into()
}

pub async fn task_logs(
    State(api): State<TaskApi>,
    segment: Segment,
    Params(q): Params<LogQuery>,
) -> Result<Response, ApiError> {
    let name = task_name(segment)?;
    let stream: &'static str = match q.stream.as_str() {
        "stdout" => "stdout",
        "stderr" => "stderr",
        other => {
            return Err(ApiError::bad_request(
                "InvalidQuery",
                format!("stream must be stdout or stderr, not {other:?}"),
            ));
        }
    };
    let limit = q.limit.unwrap_or(DEFAULT_LOG_READ);
    if limit == 0 || limit > MAX_LOG_READ {
        return Err(ApiError::bad_request(
            "InvalidQuery",
            format!("limit must be between 1 and {MAX_LOG_READ}"),
        ));
    }
    let (dir, ended) = api.tasks.output_of(&name)?;
    let chunk = read_log(
        &dir,
        stream,
        q.offset,
        if q.follow { FOLLOW_CHUNK } else { limit },
    )
    .map_err(|e| ApiError::internal(format!("cannot read the task's {stream}: {e}")))?;
    let next = chunk.offset + chunk.data.len() as u64;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("x-log-start", chunk.start.into());
    headers.insert("x-log-offset", chunk.offset.into());
    if !q.follow {
        headers.insert("x-log-next", next.into());
        headers.insert(
            "x-log-complete",
            HeaderValue::from_static(if ended && next >= chunk.end {
                "true"
            } else {
                "false"
            }),
        );
        return Ok((headers, chunk.data).into_response());
    }
    let (_, _, rx) = api.tasks.subscribe();
    let follow = Follow {
        manager: api.tasks.clone(),
        name,
        dir,
        stream,
        offset: next,
        rx,
        shutdown: api.shutdown.clone(),
    };
    let first = futures_util::stream::iter(
        (!chunk.data.is_empty()).then(|| Ok::<_, std::io::Error>(Bytes::from(chunk.data))),
    );
    let rest = futures_util::stream::unfold(follow, Follow::next);
    Ok((
        headers,
        Body::from_stream(futures_util::StreamExt::chain(first, rest)),
    )
        .into_response())
}

struct Follow {
    manager: TaskManager,
    name: String,
    dir: PathBuf,
    stream: &'static str,
    offset: u64,
    rx: broadcast::Receiver<FeedEvent>,
    shutdown: watch::Receiver<bool>,
}

impl Follow {
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Follow)> {
        loop {
            // Whether the task had ended is read *before* the file, so the last bytes are never missed.
            let ended = match self.manager.output_of(&self.name) {
                Ok((_, ended)) => ended,
                Err(_) => true, // forgotten: nothing more will be written
            };
            let chunk = match read_log(&self.dir, self.stream, self.offset, FOLLOW_CHUNK) {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(e) => return Some((Err(e), self)),
            };
            if !chunk.data.is_empty() {
                self.offset = chunk.offset + chunk.data.len() as u64;
                return Some((Ok(Bytes::from(chunk.data)), self));
            }
            if ended || *self.shutdown.borrow() {
                return None;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
                _ = self.shutdown.changed() => {}
                event = self.rx.recv() => {
                    if let Err(broadcast::error::RecvError::Closed) = event {
                        return None;
                    }
                }
            }
        }
    }
}
