//! Task state by push. For every pod that runs a task, one task follows the pod's executor:
//! it declares the pod's task with `POST /setTasks` (the whole set: one task, or none to stop
//! it), holds sandlet's change feed (`GET /watchTasks`, SSE) and, for an executor without one
//! (the Go task-executor), polls `GET /getTasks` once a second. Every change wakes the
//! BatchSandbox's reconcile at once. An executor that cannot be reached makes its task
//! UNKNOWN, never "deleted"; the follower reconnects with backoff.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::ObjectRef;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::crd::BatchSandbox;

/// Per call to an executor (connect, `setTasks`, `getTasks`).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A feed silent for this long is reconnected (it may be dead without a FIN).
const FEED_IDLE: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A task's state as the counters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Declared, not reported yet (or waiting to start).
    Pending,
    Running,
    Succeed,
    Failed,
    /// The executor cannot be reached.
    Unknown,
}

/// What the follower of one pod last saw.
#[derive(Debug, Default, Clone)]
struct View {
    /// `None` until the executor first answers or fails to.
    reachable: Option<bool>,
    /// The executor's tasks by name, as last reported.
    tasks: BTreeMap<String, Value>,
}

struct Follower {
    owner: ObjectRef<BatchSandbox>,
    address: String,
    desired: watch::Sender<Option<Value>>,
    view: Arc<Mutex<View>>,
    /// Each task's state as [`Tracker::state`] last returned it.
    counted: BTreeMap<String, TaskState>,
    handle: JoinHandle<()>,
}

pub struct Tracker {
    followers: Mutex<BTreeMap<String, Follower>>,
    http: reqwest::Client,
    token: Option<String>,
    port: u16,
    wake: mpsc::UnboundedSender<ObjectRef<BatchSandbox>>,
    connections: Arc<Semaphore>,
}

impl Tracker {
    /// `wake` receives the BatchSandbox of every pod whose task state changed.
    pub fn new(
        token: Option<String>,
        port: u16,
        max_connections: usize,
        wake: mpsc::UnboundedSender<ObjectRef<BatchSandbox>>,
    ) -> Tracker {
        Tracker {
            followers: Mutex::new(BTreeMap::new()),
            http: reqwest::Client::builder()
                .connect_timeout(CALL_TIMEOUT)
                .build()
                .expect("an HTTP client without TLS builds"),
            token,
            port,
            wake,
            connections: Arc::new(Semaphore::new(max_connections)),
        }
    }

    /// Makes the executor at `ip` run exactly `task` (`None`: nothing), followed for `owner`.
    pub fn declare(
        &self,
        owner: &ObjectRef<BatchSandbox>,
        pod: &str,
        ip: &str,
        task: Option<Value>,
    ) {
        let address = format!("http://{ip}:{}", self.port);
        let mut followers = self.lock();
        if let Some(f) = followers.get(pod)
            && f.address == address
            && &f.owner == owner
        {
            f.desired.send_if_modified(|d| {
                let changed = *d != task;
                *d = task;
                changed
            });
            return;
        }
        if let Some(old) = followers.remove(pod) {
            old.handle.abort();
        }
        let (desired, desired_rx) = watch::channel(task);
        let view = Arc::new(Mutex::new(View::default()));
        let handle = tokio::spawn(follow(
            self.http.clone(),
            address.clone(),
            self.token.clone(),
            desired_rx,
            Arc::clone(&view),
            owner.clone(),
            self.wake.clone(),
            Arc::clone(&self.connections),
        ));
        followers.insert(
            pod.to_string(),
            Follower {
                owner: owner.clone(),
                address,
                desired,
                view,
                counted: BTreeMap::new(),
                handle,
            },
        );
    }

    /// The state of task `name` on `pod` as the counters take it, and the one the previous
    /// call returned for it (`None` before the first): the pair a state's events come from.
    /// The state is `None` while the pod's executor has not answered yet (or the pod is not
    /// followed): not known, which is neither pending nor unreachable.
    pub fn state(&self, pod: &str, name: &str) -> (Option<TaskState>, Option<TaskState>) {
        let mut followers = self.lock();
        let Some(follower) = followers.get_mut(pod) else {
            return (None, None);
        };
        let now = {
            let view = follower.view.lock().expect("view lock");
            match view.reachable {
                None => None,
                Some(false) => Some(TaskState::Unknown),
                Some(true) => Some(view.tasks.get(name).map_or(TaskState::Pending, state_of)),
            }
        };
        let before = match now {
            Some(now) => follower.counted.insert(name.to_string(), now),
            None => follower.counted.get(name).copied(),
        };
        (now, before)
    }

    /// Task `name` as `pod`'s executor last reported it.
    pub fn task(&self, pod: &str, name: &str) -> Option<Value> {
        let followers = self.lock();
        let view = followers.get(pod)?.view.lock().expect("view lock");
        view.tasks.get(name).cloned()
    }

    /// Whether `pod`'s executor is reachable and runs no task.
    pub fn is_idle(&self, pod: &str) -> bool {
        let followers = self.lock();
        followers.get(pod).is_some_and(|f| {
            let view = f.view.lock().expect("view lock");
            view.reachable == Some(true) && view.tasks.is_empty()
        })
    }

    /// Stops following `pod`.
    pub fn forget(&self, pod: &str) {
        if let Some(f) = self.lock().remove(pod) {
            f.handle.abort();
        }
    }

    /// The pods followed for `owner`.
    pub fn pods_of(&self, owner: &ObjectRef<BatchSandbox>) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, f)| &f.owner == owner)
            .map(|(pod, _)| pod.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Follower>> {
        self.followers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The followers go with the tracker: a controller stopped inside a process (a test's restart,
/// an embedding program) must not leave them declaring its last wishes to the executors, where
/// they would fight the next controller's.
impl Drop for Tracker {
    fn drop(&mut self) {
        for follower in self.lock().values() {
            follower.handle.abort();
        }
    }
}

/// RUNNING, SUCCEED (exit 0), FAILED (any other ending) from a task's `processStatus`.
pub fn state_of(task: &Value) -> TaskState {
    let status = &task["processStatus"];
    if status.get("running").is_some_and(|r| !r.is_null()) {
        TaskState::Running
    } else if let Some(t) = status.get("terminated").filter(|t| !t.is_null()) {
        if t["exitCode"].as_i64() == Some(0) {
            TaskState::Succeed
        } else {
            TaskState::Failed
        }
    } else {
        TaskState::Pending
    }
}

/// Applies a change to the view, waking the BatchSandbox when it changed anything.
type Update<'a> = dyn Fn(&(dyn Fn(&mut View) + Sync)) + Send + Sync + 'a;

#[allow(clippy::too_many_arguments)]
async fn follow(
    http: reqwest::Client,
    address: String,
    token: Option<String>,
    mut desired: watch::Receiver<Option<Value>>,
    view: Arc<Mutex<View>>,
    owner: ObjectRef<BatchSandbox>,
    wake: mpsc::UnboundedSender<ObjectRef<BatchSandbox>>,
    connections: Arc<Semaphore>,
) {
    let executor = Executor {
        http,
        address,
        token,
    };
    let update = |f: &(dyn Fn(&mut View) + Sync)| {
        let mut v = view.lock().expect("view lock");
        let before = (v.reachable, v.tasks.clone());
        f(&mut v);
        if (v.reachable, &v.tasks) != (before.0, &before.1) {
            tracing::debug!(executor = %executor.address, reachable = ?v.reachable, tasks = ?v.tasks.iter().map(|(n, t)| (n, state_of(t))).collect::<Vec<_>>(), "task view changed");
            let _ = wake.send(owner.clone());
        }
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let Ok(_permit) = connections.acquire().await else {
            return;
        };
        let ended = session(&executor, &mut desired, &update).await;
        if let Err(e) = ended {
            tracing::debug!(executor = %executor.address, error = %e, "executor unreachable; retrying");
            update(&|v| v.reachable = Some(false));
        }
        drop(_permit);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if view.lock().expect("view lock").reachable == Some(true) {
            backoff = BACKOFF_MIN;
        }
    }
}

/// One connection's life: declare, then follow the feed (or poll) until something fails.
async fn session(
    executor: &Executor,
    desired: &mut watch::Receiver<Option<Value>>,
    update: &Update<'_>,
) -> Result<(), String> {
    let declared = desired.borrow_and_update().clone();
    executor.declare(declared.as_ref()).await?;
    let response = executor.get("/watchTasks", None).await?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return poll(executor, desired, update).await;
    }
    if !response.status().is_success() {
        return Err(format!("watchTasks answered {}", response.status()));
    }
    let mut body = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            chunk = tokio::time::timeout(FEED_IDLE, body.next()) => {
                let chunk = match chunk {
                    Err(_) => return Err("the feed went quiet".into()),
                    Ok(None) => return Err("the feed ended".into()),
                    Ok(Some(Err(e))) => return Err(e.to_string()),
                    Ok(Some(Ok(chunk))) => chunk,
                };
                pending.extend_from_slice(&chunk);
                while let Some(end) = find(&pending, b"\n\n") {
                    let event: Vec<u8> = pending.drain(..end + 2).collect();
                    apply_event(&event, update);
                }
            }
            changed = desired.changed() => {
                if changed.is_err() {
                    return Ok(()); // the tracker forgot this pod
                }
                let declared = desired.borrow_and_update().clone();
                executor.declare(declared.as_ref()).await?;
            }
        }
    }
}

/// The Go executor has no feed: `GET /getTasks` once a second.
async fn poll(
    executor: &Executor,
    desired: &mut watch::Receiver<Option<Value>>,
    update: &Update<'_>,
) -> Result<(), String> {
    loop {
        let response = executor.get("/getTasks", Some(CALL_TIMEOUT)).await?;
        let tasks: Vec<Value> = response.json().await.map_err(|e| e.to_string())?;
        let tasks = by_name(tasks);
        update(&|v| {
            v.reachable = Some(true);
            v.tasks = tasks.clone();
        });
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            changed = desired.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let declared = desired.borrow_and_update().clone();
                executor.declare(declared.as_ref()).await?;
            }
        }
    }
}

fn apply_event(event: &[u8], update: &Update<'_>) {
    let text = String::from_utf8_lossy(event);
    let mut kind = "message";
    let mut data = String::new();
    for line in text.lines() {
        if let Some(k) = line.strip_prefix("event:") {
            kind = k.trim();
        } else if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    let Ok(data) = serde_json::from_str::<Value>(&data) else {
        return; // a comment or keep-alive
    };
    match kind {
        "snapshot" => {
            let tasks = by_name(data["tasks"].as_array().cloned().unwrap_or_default());
            update(&|v| {
                v.reachable = Some(true);
                v.tasks = tasks.clone();
            });
        }
        "task" => {
            let task = data["task"].clone();
            if let Some(name) = task["name"].as_str().map(str::to_string) {
                update(&|v| {
                    v.tasks.insert(name.clone(), task.clone());
                });
            }
        }
        "deleted" => {
            if let Some(name) = data["name"].as_str().map(str::to_string) {
                update(&|v| {
                    v.tasks.remove(&name);
                });
            }
        }
        _ => {}
    }
}

fn by_name(tasks: Vec<Value>) -> BTreeMap<String, Value> {
    tasks
        .into_iter()
        .filter_map(|t| Some((t["name"].as_str()?.to_string(), t)))
        .collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

struct Executor {
    http: reqwest::Client,
    address: String,
    token: Option<String>,
}

impl Executor {
    /// `POST /setTasks` with exactly this task, or none.
    async fn declare(&self, task: Option<&Value>) -> Result<(), String> {
        let tasks: Vec<&Value> = task.into_iter().collect();
        let mut request = self
            .http
            .post(format!("{}/setTasks", self.address))
            .timeout(CALL_TIMEOUT)
            .json(&tasks);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(format!("setTasks answered {status}: {body}"));
        }
        Ok(())
    }

    async fn get(
        &self,
        path: &str,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, String> {
        let mut request = self.http.get(format!("{}{path}", self.address));
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request.send().await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn followers_stop_with_their_tracker() {
        let (wake, mut woken) = mpsc::unbounded_channel();
        // Port 9 on loopback refuses: the follower keeps retrying, holding its `wake` sender.
        let tracker = Tracker::new(None, 9, 4, wake);
        let owner = ObjectRef::<BatchSandbox>::new("b").within("ns");
        tracker.declare(&owner, "ns/p", "127.0.0.1", None);
        drop(tracker);
        // Every sender gone (the tracker's and each follower's) closes the channel.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while woken.recv().await.is_some() {}
        })
        .await;
        assert!(closed.is_ok(), "a follower outlived its tracker");
    }

    #[test]
    fn states_follow_the_process_status() {
        let running = json!({"name": "t", "processStatus": {"running": {"startedAt": "x"}}});
        let ok = json!({"name": "t", "processStatus": {"terminated": {"exitCode": 0}}});
        let failed = json!({"name": "t", "processStatus": {"terminated": {"exitCode": -1}}});
        let waiting = json!({"name": "t", "processStatus": {"waiting": {}}});
        assert_eq!(state_of(&running), TaskState::Running);
        assert_eq!(state_of(&ok), TaskState::Succeed);
        assert_eq!(state_of(&failed), TaskState::Failed);
        assert_eq!(state_of(&waiting), TaskState::Pending);
    }

    #[test]
    fn feed_events_update_the_view() {
        let view = Mutex::new(View::default());
        let update = |f: &(dyn Fn(&mut View) + Sync)| f(&mut view.lock().unwrap());
        apply_event(
            b"event: snapshot\nid: 3\ndata: {\"version\":3,\"tasks\":[{\"name\":\"a\"}]}\n\n",
            &update,
        );
        assert_eq!(view.lock().unwrap().reachable, Some(true));
        apply_event(
            b"event: task\ndata: {\"version\":4,\"task\":{\"name\":\"b\"}}\n\n",
            &update,
        );
        apply_event(
            b"event: deleted\ndata: {\"version\":5,\"name\":\"a\"}\n\n",
            &update,
        );
        let names: Vec<String> = view.lock().unwrap().tasks.keys().cloned().collect();
        assert_eq!(names, ["b"]);
    }
}
