//! `GET /watchTasks`: the change feed, as Server-Sent Events. A `snapshot` event (the whole
//! table and its version) comes first, then one `task` or `deleted` event per change, each with
//! the table version as its SSE id. A client that falls too far behind gets a fresh snapshot
//! instead of the changes it missed, so it never holds a wrong picture.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};

use super::TaskApi;
use crate::tasks::wire::Task;
use crate::tasks::{FeedEvent, TaskManager};

pub async fn watch_tasks(
    State(api): State<TaskApi>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (version, tasks, rx) = api.tasks.subscribe();
    let feed = Feed {
        manager: api.tasks.clone(),
        rx,
        snapshot: Some((version, tasks)),
    };
    let mut shutdown = api.shutdown.clone();
    let events = futures_util::stream::unfold(feed, Feed::next).map(Ok);
    Sse::new(events.take_until(async move {
        let _ = shutdown.wait_for(|down| *down).await;
    }))
    .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

struct Feed {
    manager: TaskManager,
    rx: broadcast::Receiver<FeedEvent>,
    snapshot: Option<(u64, Vec<Task>)>,
}

impl Feed {
    async fn next(mut self) -> Option<(Event, Feed)> {
        if let Some((version, tasks)) = self.snapshot.take() {
            let data = json!({"version": version, "tasks": tasks});
            return Some((event("snapshot", version, data), self));
        }
        let event = match self.rx.recv().await {
            Ok(FeedEvent::Task { version, task }) => {
                event("task", version, json!({"version": version, "task": task}))
            }
            Ok(FeedEvent::Deleted { version, name }) => event(
                "deleted",
                version,
                json!({"version": version, "name": name}),
            ),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "change feed subscriber fell behind; sending a fresh snapshot"
                );
                let (version, tasks, rx) = self.manager.subscribe();
                self.rx = rx;
                event(
                    "snapshot",
                    version,
                    json!({"version": version, "tasks": tasks}),
                )
            }
            Err(RecvError::Closed) => return None,
        };
        Some((event, self))
    }
}

fn event(kind: &str, version: u64, data: serde_json::Value) -> Event {
    Event::default()
        .event(kind)
        .id(version.to_string())
        .data(data.to_string())
}
