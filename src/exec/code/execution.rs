//! One run of code in a kernel: the `execute_request`, then the kernel's messages for it
//! (matched by `parent_header.msg_id`; execd takes every message) turned into execd's events
//! until the kernel is idle again, with pings, the run's deadline and the kernel's death.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use super::channel::{ChannelError, KernelChannel, KernelMessage};
use super::jupyter::Jupyter;
use crate::exec::events::Event;
use crate::exec::run::{INTERRUPT_GRACE, PING_INTERVAL};

/// Where a run's events go. The run goes on when the client has gone (as in execd); its events
/// are then dropped.
pub struct Sink {
    tx: mpsc::Sender<Bytes>,
    connected: bool,
}

impl Sink {
    pub fn new(tx: mpsc::Sender<Bytes>) -> Sink {
        Sink {
            tx,
            connected: true,
        }
    }

    pub async fn send(&mut self, event: Event) {
        if self.connected && self.tx.send(event.frame()).await.is_err() {
            self.connected = false;
        }
    }

    /// Awaits `work` (waiting for the context's turn, starting Jupyter or a kernel: seconds),
    /// pinging meanwhile as during the run, so the stream never goes quiet.
    pub async fn pinging<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        let mut pings =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = pings.tick() => self.send(Event::ping()).await,
            }
        }
    }
}

/// How a run ended, for the kernel it ran in.
pub enum Ended {
    /// The kernel is idle again (the code may have raised: that was sent as an event).
    Idle,
    /// The kernel died or was restarted: its state is gone.
    KernelLost,
    /// The connection to the kernel broke.
    ChannelLost,
}

pub struct Run<'a> {
    pub jupyter: &'a Jupyter,
    pub kernel_id: &'a str,
    pub channel: &'a mut KernelChannel,
    pub code: &'a str,
    /// When the request came in (execution times count from it, as execd's).
    pub received: Instant,
    pub timeout: Option<Duration>,
    /// Told when the context is deleted while the run would not stop on an interrupt.
    pub stop: &'a tokio::sync::Notify,
}

impl Run<'_> {
    pub async fn run(self, sink: &mut Sink) -> Ended {
        let Run {
            jupyter,
            kernel_id,
            channel,
            code,
            received,
            timeout,
            stop,
        } = self;
        let msg_id = match channel.execute(code).await {
            Ok(id) => id,
            Err(e) => {
                sink.send(lost_event(&e)).await;
                return Ended::ChannelLost;
            }
        };
        // The deadline counts the code's own time, from when the kernel was sent it (not the
        // wait for the context's turn or for the kernel to start).
        let start = tokio::time::Instant::now();
        let mut pings =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
        let far = start + Duration::from_secs(86400 * 365);
        let deadline = timeout.map(|t| start + t);
        // Set once the deadline passed and the kernel was interrupted.
        let mut interrupted_at: Option<tokio::time::Instant> = None;
        loop {
            let give_up = interrupted_at.map(|at| at + INTERRUPT_GRACE);
            let message = tokio::select! {
                message = channel.next() => message,
                _ = pings.tick() => {
                    sink.send(Event::ping()).await;
                    continue;
                }
                _ = stop.notified() => {
                    sink.send(Event::error_with(
                        "ContextDeleted",
                        "the context was deleted while this ran, and the run did not stop on an interrupt; its kernel is shut down".into(),
                        Vec::new(),
                    )).await;
                    return Ended::KernelLost;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && interrupted_at.is_none() => {
                    interrupted_at = Some(tokio::time::Instant::now());
                    if let Err(e) = jupyter.interrupt(kernel_id).await {
                        tracing::warn!(kernel = kernel_id, error = %e, "cannot interrupt a kernel past its run's deadline");
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(give_up.unwrap_or(far)), if give_up.is_some() => {
                    // It did not stop on the interrupt: the kernel is shut down (by the caller,
                    // once this stream has ended), and its state with it.
                    let timeout = timeout.unwrap_or_default();
                    sink.send(Event::error_with(
                        "TimeoutError",
                        format!("the run did not end within its timeout of {} ms and did not stop on an interrupt; its kernel is shut down (the next run starts a fresh one) and its state is lost", timeout.as_millis()),
                        Vec::new(),
                    )).await;
                    return Ended::KernelLost;
                }
            };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    sink.send(lost_event(&e)).await;
                    return Ended::ChannelLost;
                }
            };
            if let Some(state) = kernel_gone(&message) {
                sink.send(Event::error(
                    "KernelDied",
                    format!("the kernel died (Jupyter reports it {state}); its state is lost; the next run starts from a fresh kernel"),
                    format!("kernel {kernel_id} {state}"),
                ))
                .await;
                return Ended::KernelLost;
            }
            if message.parent_id != msg_id {
                continue;
            }
            match (message.channel.as_str(), message.msg_type.as_str()) {
                ("iopub", "stream") => {
                    let text = message.content["text"].as_str().unwrap_or_default();
                    if !text.is_empty() {
                        let stderr = message.content["name"] == "stderr";
                        sink.send(Event::output(stderr, text.to_string())).await;
                    }
                }
                ("iopub", "execute_result") => {
                    let count = message.content["execution_count"].as_i64().unwrap_or(0);
                    if count > 0 {
                        sink.send(Event::execution_count(count)).await;
                    }
                    if let Some(event) = result_event(&message) {
                        sink.send(event).await;
                    }
                }
                // What execd drops: plots and other displayed values, with their MIME bundles.
                ("iopub", "display_data" | "update_display_data") => {
                    if let Some(event) = result_event(&message) {
                        sink.send(event).await;
                    }
                }
                ("iopub", "error") => {
                    if interrupted_at.is_some() {
                        // The KeyboardInterrupt of the deadline's interrupt: said below.
                        continue;
                    }
                    let c = &message.content;
                    let traceback = c["traceback"]
                        .as_array()
                        .map(|lines| {
                            lines
                                .iter()
                                .map(|l| l.as_str().unwrap_or_default().to_string())
                                .collect()
                        })
                        .unwrap_or_default();
                    sink.send(Event::status("error")).await;
                    sink.send(Event::error_with(
                        c["ename"].as_str().unwrap_or_default(),
                        c["evalue"].as_str().unwrap_or_default().to_string(),
                        traceback,
                    ))
                    .await;
                }
                ("iopub", "status") if message.content["execution_state"] == "idle" => {
                    if interrupted_at.is_some() {
                        let timeout = timeout.unwrap_or_default();
                        sink.send(Event::error(
                            "TimeoutError",
                            format!("the run did not end within its timeout of {} ms; the kernel was interrupted", timeout.as_millis()),
                            "interrupted".into(),
                        ))
                        .await;
                    } else {
                        sink.send(Event::complete(received.elapsed().as_millis() as i64))
                            .await;
                    }
                    return Ended::Idle;
                }
                _ => {}
            }
        }
    }
}

/// `restarting` or `dead`, when the message says the kernel died (Jupyter's restarter sends
/// these to every connection, answering no request).
fn kernel_gone(message: &KernelMessage) -> Option<&'static str> {
    if message.channel != "iopub" || message.msg_type != "status" {
        return None;
    }
    match message.content["execution_state"].as_str() {
        Some("restarting") => Some("restarting"),
        Some("dead") => Some("dead"),
        _ => None,
    }
}

fn result_event(message: &KernelMessage) -> Option<Event> {
    match &message.content["data"] {
        Value::Object(bundle) if !bundle.is_empty() => Some(Event::result(bundle.clone())),
        _ => None,
    }
}

fn lost_event(e: &ChannelError) -> Event {
    Event::error(
        "KernelConnectionLost",
        format!("{e}; if Jupyter stopped, the next run starts a new kernel"),
        e.to_string(),
    )
}
