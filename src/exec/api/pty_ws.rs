//! `GET /pty/{id}/ws`: the PTY session's WebSocket (execd's protocol, see the README).
//!
//! One loop per connection decides what to do next: take the client's messages, send output
//! the session has for it, send the exit, or ping. Outgoing messages go through a small channel
//! to a writer task, so a slow client never stops its own input (a Ctrl-C during a flood of
//! output) from being read, and output is taken from the session only as fast as the client
//! takes it.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::{ExecApi, pty_not_found};
use crate::exec::pty::{Attached, Mode, Next, PtyError, signal_named};
use crate::http::error::ApiError;

/// Between WebSocket pings (execd's figure).
const PING_EVERY: Duration = Duration::from_secs(30);
/// Silence after which a client is dropped (execd's figure).
const SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// One frame's write, at most (execd's figure).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// An evicted client's close frame, at most.
const EVICT_TIMEOUT: Duration = Duration::from_millis(200);
/// Messages queued for the writer: small, so output waits in the session's ring instead.
const OUTBOX: usize = 2;

pub async fn pty_ws(
    State(api): State<ExecApi>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let session = api.ptys.get(&id).map_err(pty_not_found)?;
    let takeover = query.get("takeover").is_some_and(|v| v == "1");
    // Only a real upgrade may take over; anything else finds the session busy.
    if session.is_held() && !(takeover && upgrade.is_ok()) {
        return Err(already_connected(&id));
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let mode = match query.get("pty").map(String::as_str) {
        Some("0") => Mode::Pipe,
        _ => Mode::Pty,
    };
    let since = query
        .get("since")
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let limit = api.pty_max_message;
    Ok(upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            serve(api, session, socket, since, takeover, mode).await;
        }))
}

fn already_connected(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "ALREADY_CONNECTED",
        PtyError::AlreadyConnected(id.to_string()).to_string(),
    )
}

async fn serve(
    api: ExecApi,
    session: std::sync::Arc<crate::exec::pty::PtySession>,
    socket: WebSocket,
    since: i64,
    takeover: bool,
    mode: Mode,
) {
    let (sink, mut incoming) = socket.split();
    let (outbox, queued) = mpsc::channel::<Message>(OUTBOX);
    let writer = tokio::spawn(write_out(sink, queued));
    let attached = match api.ptys.attach(&session, since, takeover, mode) {
        Ok(attached) => attached,
        Err(e) => {
            // Another client got in between the check and the upgrade.
            let _ = outbox
                .send(error_frame(&e.to_string(), "ALREADY_CONNECTED"))
                .await;
            drop(outbox);
            let _ = writer.await;
            return;
        }
    };
    let Attached {
        session,
        client,
        replay,
        mode,
    } = attached;
    if let Err(e) = api.ptys.ensure_started(&session, mode).await {
        let _ = outbox
            .send(error_frame(&e.to_string(), "START_FAILED"))
            .await;
        session.detach(client);
        drop(outbox);
        let _ = writer.await;
        return;
    }
    let (offset, bytes) = replay;
    if !bytes.is_empty() {
        let mut frame = Vec::with_capacity(9 + bytes.len());
        frame.push(0x03);
        frame.extend_from_slice(&offset.to_be_bytes());
        frame.extend_from_slice(&bytes);
        let _ = outbox.send(Message::Binary(frame.into())).await;
    }
    let connected = json!({"type": "connected", "session_id": session.id, "mode": mode.as_str()});
    let _ = outbox.send(text(connected)).await;

    let mut changes = session.watch();
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    let mut heard = Instant::now();
    let mut pending: Option<Message> = None;
    loop {
        if pending.is_none() {
            match session.next_for(client) {
                Next::Output(stream, data) => {
                    let mut frame = Vec::with_capacity(1 + data.len());
                    frame.push(stream);
                    frame.extend_from_slice(&data);
                    pending = Some(Message::Binary(frame.into()));
                }
                Next::Exit(code) => {
                    let _ = outbox
                        .send(text(json!({"type": "exit", "exit_code": code})))
                        .await;
                    let _ = outbox.send(close(1000, "process exited")).await;
                    break;
                }
                Next::Evicted => {
                    let _ = outbox.send(close(4001, "TAKEN_OVER")).await;
                    drop(outbox);
                    let _ = tokio::time::timeout(EVICT_TIMEOUT, writer).await;
                    return;
                }
                Next::Wait => {}
            }
        }
        tokio::select! {
            biased;
            message = incoming.next() => {
                heard = Instant::now();
                let Some(Ok(message)) = message else { break };
                match message {
                    Message::Binary(data) => {
                        if data.len() > 1
                            && data[0] == 0x00
                            && let Err(e) = session.write_stdin(&data[1..]).await
                        {
                            let _ = outbox
                                .send(error_frame(&format!("stdin write failed: {e}"), "STDIN_WRITE_FAILED"))
                                .await;
                            break;
                        }
                    }
                    Message::Text(body) => {
                        if let Some(reply) = control(&session, body.as_str()).await {
                            let _ = outbox.send(reply).await;
                        }
                    }
                    Message::Close(_) => break,
                    // axum answers pings itself; a pong only proves the client is there.
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            permit = outbox.reserve(), if pending.is_some() => match permit {
                Ok(permit) => permit.send(pending.take().expect("guarded")),
                Err(_) => break, // the writer failed: the connection is gone
            },
            _ = changes.changed(), if pending.is_none() => {}
            _ = ping.tick() => {
                if outbox.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            _ = sleep_until(heard + SILENCE_LIMIT) => break,
        }
    }
    session.detach(client);
    drop(outbox);
    let _ = writer.await;
}

/// A client's JSON frame; the answer to send, if any. Invalid JSON is ignored (execd).
async fn control(session: &crate::exec::pty::PtySession, body: &str) -> Option<Message> {
    #[derive(Deserialize)]
    struct Frame {
        #[serde(rename = "type", default)]
        kind: String,
        #[serde(default)]
        data: String,
        #[serde(default)]
        cols: u16,
        #[serde(default)]
        rows: u16,
        #[serde(default)]
        signal: String,
    }
    let frame: Frame = serde_json::from_str(body).ok()?;
    match frame.kind.as_str() {
        "stdin" => {
            let written = session.write_stdin(frame.data.as_bytes()).await;
            written
                .err()
                .map(|e| error_frame(&format!("stdin write failed: {e}"), "STDIN_WRITE_FAILED"))
        }
        "resize" => {
            session.resize(frame.cols, frame.rows);
            None
        }
        "signal" => {
            if let Some(signal) = signal_named(&frame.signal) {
                session.signal(signal);
            }
            None
        }
        "ping" => Some(text(json!({"type": "pong"}))),
        other => Some(error_frame(
            &format!("unknown frame type {other:?}"),
            "INVALID_FRAME",
        )),
    }
}

/// Sends what the loop queues, each write bounded by [`WRITE_TIMEOUT`]; a close frame ends it.
async fn write_out(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut queued: mpsc::Receiver<Message>,
) {
    while let Some(message) = queued.recv().await {
        let closing = matches!(message, Message::Close(_));
        match tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await {
            Ok(Ok(())) if !closing => {}
            _ => break,
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
}

fn text(value: Value) -> Message {
    Message::Text(value.to_string().into())
}

fn error_frame(message: &str, code: &str) -> Message {
    text(json!({"type": "error", "error": message, "code": code}))
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}
