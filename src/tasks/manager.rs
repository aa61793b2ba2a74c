//! The task table: one lock-protected map in creation order, a version bumped on every visible
//! change, and a broadcast of those changes (the change feed). Disk writes under the lock are
//! small renames without fsync; the only fsyncs are of final results.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use indexmap::IndexMap;
use tokio::sync::{broadcast, mpsc};

use super::TaskError;
use super::state::{Outcome, StopCause, TaskState};
use super::store::{SetIntent, Store, TaskRecord, Verdict};
use super::supervisor::{Watched, supervise};
use super::validate::check_task;
use super::wire::{Process, Task};
use crate::atomic_file::{self, Durability};
use crate::container::{TargetWatch, start_in};
use crate::deadline;
use crate::process::shim::{OutputMode, ShimSpec};
use crate::process::{
    self, ExitRecord, ExitWatch, LaunchRecord, Launcher, PidFd, ProcessIdentity, Reaper, RunRecord,
    Tree,
};

#[derive(Debug, Clone)]
pub struct TaskConfig {
    pub data_dir: PathBuf,
    /// Tasks not yet terminal, at most.
    pub max_active: usize,
    /// Tasks kept (terminal ones included), at most.
    pub max_tasks: usize,
    /// Between SIGTERM and SIGKILL when a task's tree is stopped.
    pub stop_grace: Duration,
    /// Bytes of each output stream kept per task.
    pub log_limit: u64,
}

/// A change to the task table, numbered by the table's version.
#[derive(Debug, Clone)]
pub enum FeedEvent {
    Task { version: u64, task: Box<Task> },
    Deleted { version: u64, name: String },
}

#[derive(Clone)]
pub struct TaskManager(Arc<Shared>);

struct Shared {
    config: TaskConfig,
    store: Store,
    launcher: Arc<Launcher>,
    /// The main container, in sidecar mode.
    target: Option<Arc<TargetWatch>>,
    inner: Mutex<Inner>,
    feed: broadcast::Sender<FeedEvent>,
}

struct Inner {
    tasks: IndexMap<String, Entry>,
    version: u64,
    next_seq: u64,
}

struct Entry {
    record: TaskRecord,
    state: TaskState,
    /// Stop requests to the task's supervisor, while one watches the task's tree.
    control: Option<mpsc::UnboundedSender<()>>,
    /// The main container's process the task was started in (sidecar mode).
    incarnation: Option<ProcessIdentity>,
}

impl Entry {
    fn wire(&self) -> Task {
        Task {
            name: self.record.name.clone(),
            deletion_timestamp: self.record.removal_requested_at,
            process: Some(self.record.process.clone()),
            pod_template_spec: None,
            process_status: Some(self.state.to_wire()),
            pod_status: None,
        }
    }
}

/// A task that was accepted and is to be started.
struct ToStart {
    name: String,
    seq: u64,
    process: Process,
}

impl TaskManager {
    /// Opens the data dir and recovers every task recorded there (see `recover`).
    pub fn open(
        config: TaskConfig,
        launcher: Arc<Launcher>,
        target: Option<Arc<TargetWatch>>,
    ) -> Result<TaskManager, TaskError> {
        let store = Store::open(&config.data_dir)?;
        let (feed, _) = broadcast::channel(1024);
        let manager = TaskManager(Arc::new(Shared {
            config,
            store,
            launcher,
            target,
            inner: Mutex::new(Inner {
                tasks: IndexMap::new(),
                version: 0,
                next_seq: 1,
            }),
            feed,
        }));
        let never_launched = manager.recover()?;
        if !never_launched.is_empty() {
            let starter = manager.clone();
            tokio::spawn(async move { starter.start_all(never_launched).await });
        }
        Ok(manager)
    }

    pub fn list(&self) -> Vec<Task> {
        self.lock().tasks.values().map(Entry::wire).collect()
    }

    pub fn get(&self, name: &str) -> Option<Task> {
        self.lock().tasks.get(name).map(Entry::wire)
    }

    /// The current table and its version, plus every change after it.
    pub fn subscribe(&self) -> (u64, Vec<Task>, broadcast::Receiver<FeedEvent>) {
        let inner = self.lock();
        let rx = self.0.feed.subscribe();
        (
            inner.version,
            inner.tasks.values().map(Entry::wire).collect(),
            rx,
        )
    }

    /// Where a task's files are, and whether it has ended (its output is complete).
    pub fn output_of(&self, name: &str) -> Result<(PathBuf, bool), TaskError> {
        let inner = self.lock();
        let entry = inner
            .tasks
            .get(name)
            .ok_or_else(|| TaskError::NotFound(name.into()))?;
        Ok((self.0.store.task_dir(name), entry.state.is_terminal()))
    }

    /// `POST /setTasks`: makes the table match `desired`. The whole list is checked before
    /// anything changes; tasks not in it are stopped and then forgotten.
    pub async fn sync(&self, desired: Vec<Task>) -> Result<Vec<Task>, TaskError> {
        let mut wanted: IndexMap<String, Process> = IndexMap::new();
        for task in &desired {
            let process = check_task(task).map_err(TaskError::Invalid)?;
            if wanted.insert(task.name.clone(), process).is_some() {
                return Err(TaskError::Invalid(format!(
                    "task {:?} appears more than once",
                    task.name
                )));
            }
        }
        let to_start = {
            let mut inner = self.lock();
            self.apply(&mut inner, &wanted, true)?
        };
        self.start_all(to_start).await;
        Ok(self.list())
    }

    /// `POST /tasks`: adds one task. Returns whether it was created (an identical existing task
    /// is left as it is).
    pub async fn create(&self, task: Task) -> Result<(bool, Task), TaskError> {
        let process = check_task(&task).map_err(TaskError::Invalid)?;
        let wanted = IndexMap::from([(task.name.clone(), process)]);
        let to_start = {
            let mut inner = self.lock();
            self.apply(&mut inner, &wanted, false)?
        };
        let created = !to_start.is_empty();
        self.start_all(to_start).await;
        let task = self
            .get(&task.name)
            .ok_or_else(|| TaskError::NotFound(task.name.clone()))?;
        Ok((created, task))
    }

    /// `DELETE /tasks/{name}`: stops the task's tree, then forgets it. Unknown names are fine.
    pub fn remove(&self, name: &str) {
        let mut inner = self.lock();
        let Some(entry) = inner.tasks.get(name) else {
            return;
        };
        if entry.record.removal_requested_at.is_some() {
            return;
        }
        let marked = marked_for_removal(entry);
        self.save(&marked, Durability::Atomic);
        self.carry_out_removal(&mut inner, marked);
    }

    /// Checks conflicts and limits for `wanted`, then records the new tasks and, with
    /// `replacing`, marks every task missing from `wanted` for removal. Nothing is changed unless
    /// everything passes, and a change to several records is applied whole or not at all, also
    /// if sandlet dies in the middle (see [`SetIntent`]). Returns the tasks to start.
    fn apply(
        &self,
        inner: &mut Inner,
        wanted: &IndexMap<String, Process>,
        replacing: bool,
    ) -> Result<Vec<ToStart>, TaskError> {
        let mut new = Vec::new();
        for (name, process) in wanted {
            match inner.tasks.get(name) {
                Some(e) if e.record.removal_requested_at.is_some() => {
                    return Err(TaskError::Conflict(format!(
                        "task {name:?} is being removed; add it again once it is gone"
                    )));
                }
                Some(e) if e.record.process != *process => {
                    return Err(TaskError::Conflict(format!(
                        "task {name:?} already exists with a different spec; a task's spec cannot change: remove it first or use a new name"
                    )));
                }
                Some(_) => {}
                None => new.push((name, process)),
            }
        }
        let config = &self.0.config;
        if !new.is_empty() {
            let active = inner
                .tasks
                .values()
                .filter(|e| !e.state.is_terminal())
                .count()
                + new.len();
            if active > config.max_active {
                return Err(TaskError::Limit(format!(
                    "{active} tasks would be active; the limit is {} (--max-active-tasks)",
                    config.max_active
                )));
            }
            let forgotten_now = |(name, e): &(&String, &Entry)| {
                replacing
                    && !wanted.contains_key(*name)
                    && e.state.is_terminal()
                    && e.control.is_none()
            };
            let kept = inner
                .tasks
                .iter()
                .filter(|entry| !forgotten_now(entry))
                .count()
                + new.len();
            if kept > config.max_tasks {
                return Err(TaskError::Limit(format!(
                    "{kept} tasks would be kept; the limit is {} (--max-tasks); remove finished tasks first",
                    config.max_tasks
                )));
            }
        }
        let created: Vec<TaskRecord> = new
            .iter()
            .zip(inner.next_seq..)
            .map(|((name, process), seq)| TaskRecord::new(seq, (*name).clone(), (*process).clone()))
            .collect();
        let marked: Vec<TaskRecord> = inner
            .tasks
            .iter()
            .filter(|(name, e)| {
                replacing && !wanted.contains_key(*name) && e.record.removal_requested_at.is_none()
            })
            .map(|(_, e)| marked_for_removal(e))
            .collect();
        if created.is_empty() && marked.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(e) = self.write_change(&created, &marked) {
            // Removing tasks is how a full data dir gets space back: removals go ahead without
            // their records (a crash before they are done then leaves some tasks in place).
            if !created.is_empty() {
                return Err(e);
            }
            tracing::warn!(error = %e, "could not record removals; removing the tasks anyway");
        }

        // On disk in full: now the table, and only now any process.
        inner.next_seq += created.len() as u64;
        let mut to_start = Vec::new();
        for record in created {
            to_start.push(ToStart {
                name: record.name.clone(),
                seq: record.seq,
                process: record.process.clone(),
            });
            let entry = Entry {
                record,
                state: TaskState::Waiting,
                control: None,
                incarnation: None,
            };
            let task = entry.wire();
            inner.tasks.insert(task.name.clone(), entry);
            self.publish_task(inner, task);
        }
        for record in marked {
            self.carry_out_removal(inner, record);
        }
        Ok(to_start)
    }

    /// Writes new records and removal marks; more than one record change goes under a
    /// [`SetIntent`], rolled back if any write fails.
    fn write_change(&self, created: &[TaskRecord], marked: &[TaskRecord]) -> Result<(), TaskError> {
        let store = &self.0.store;
        let intent = (created.len() + marked.len() > 1).then(|| SetIntent {
            created: created.iter().map(|r| r.name.clone()).collect(),
            marked: marked.iter().map(|r| r.name.clone()).collect(),
        });
        if let Some(intent) = &intent {
            store.begin(intent)?;
        }
        let written = created
            .iter()
            .try_for_each(|r| store.create(r))
            .and_then(|()| {
                marked
                    .iter()
                    .try_for_each(|r| store.save(r, Durability::Atomic))
            })
            .and_then(|()| match intent {
                Some(_) => store.commit(),
                None => Ok(()),
            });
        if let Err(e) = written {
            if intent.is_some() {
                if let Err(undo) = store.roll_back() {
                    tracing::error!(error = %undo, "could not undo a partly written setTasks; the next start undoes it");
                }
            } else {
                for record in created {
                    let _ = store.delete(&record.name);
                }
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Starts the tasks in a task of their own: a client that disconnects (and so drops its
    /// request's future) must not leave a start half done.
    async fn start_all(&self, to_start: Vec<ToStart>) {
        if to_start.is_empty() {
            return;
        }
        let manager = self.clone();
        let starts = tokio::spawn(async move {
            futures_util::future::join_all(to_start.into_iter().map(|t| manager.start(t))).await;
        });
        if let Err(e) = starts.await {
            tracing::error!(error = %e, "task start panicked");
        }
    }

    async fn start(&self, task: ToStart) {
        let dir = self.0.store.task_dir(&task.name);
        let (program, rest) = task
            .process
            .command
            .split_first()
            .expect("validated: command is not empty");
        let launched = match start_in(self.0.target.as_deref(), &task.process.user) {
            Ok(place) => {
                // The base environment (sandlet's inherited one in local mode, the main
                // container's in sidecar mode), then the task's variables: the last value wins,
                // as with the Go executor.
                let mut env = place.env;
                env.extend(
                    task.process
                        .env
                        .iter()
                        .map(|v| (v.name.clone(), v.value.clone())),
                );
                let spec = ShimSpec {
                    task_dir: Some(dir),
                    log_limit: self.0.config.log_limit,
                    program: program.clone(),
                    arg0: None,
                    args: rest.iter().chain(&task.process.args).cloned().collect(),
                    env,
                    working_dir: (!task.process.working_dir.is_empty())
                        .then(|| PathBuf::from(&task.process.working_dir)),
                    clear_env: place.clear_env,
                    placement: place.placement,
                    credentials: place.credentials,
                    output: OutputMode::Logs,
                    records: true,
                    reuse: false,
                    ends_with_sandlet: false,
                };
                let incarnation = spec.placement.as_ref().map(|p| p.target);
                self.0
                    .launcher
                    .launch(spec)
                    .await
                    .map(|launched| (launched, incarnation))
            }
            Err(e) => Err(e.to_string()),
        };
        let mut inner = self.lock();
        let Some(entry) = inner
            .tasks
            .get_mut(&task.name)
            .filter(|e| e.record.seq == task.seq)
        else {
            return;
        };
        match launched {
            Ok((launched, incarnation)) => {
                tracing::info!(task = %task.name, pid = launched.task.pid, "task started");
                entry.state = TaskState::Running {
                    started_at: launched.started_at,
                };
                entry.incarnation = incarnation;
                let (tx, rx) = mpsc::unbounded_channel();
                if entry.record.removal_requested_at.is_some() {
                    let _ = tx.send(());
                }
                entry.control = Some(tx);
                // The container may have restarted while the task was being started.
                if let (Some(started_in), Some(watch)) = (incarnation, &self.0.target) {
                    let now = watch.current().ok().map(|l| l.target.process);
                    if now != Some(started_in) {
                        stop_for_restart(entry, started_in);
                        self.save(&entry.record, Durability::Atomic);
                    }
                }
                let timeout = task.process.timeout_seconds;
                let watched = Watched {
                    tree: Tree {
                        shim: launched.shim,
                        pgid: launched.task.pid,
                    },
                    shim: Some(launched.shim_pidfd),
                    shim_is_child: true,
                    exit: Some(launched.exit),
                    deadline: task_deadline(timeout, Duration::ZERO),
                };
                let wire = entry.wire();
                self.publish_task(&mut inner, wire);
                tokio::spawn(supervise(self.clone(), task.name, task.seq, watched, rx));
            }
            Err(message) => {
                tracing::warn!(task = %task.name, %message, "task could not start");
                let verdict = Verdict {
                    started_at: None,
                    finished_at: Utc::now(),
                    outcome: Outcome::StartFailed { message },
                };
                self.settle(&mut inner, &task.name, verdict);
            }
        }
    }

    /// Records an ending sandlet decided itself, durably, and publishes it.
    fn settle(&self, inner: &mut Inner, name: &str, verdict: Verdict) {
        let Some(entry) = inner.tasks.get_mut(name) else {
            return;
        };
        entry.state = TaskState::Terminated {
            started_at: verdict.started_at,
            finished_at: verdict.finished_at,
            outcome: verdict.outcome.clone(),
            stopped_by: entry.record.stop_cause.clone(),
        };
        entry.record.verdict = Some(verdict);
        self.save(&entry.record, Durability::Durable);
        if entry.record.removal_requested_at.is_some() && entry.control.is_none() {
            self.forget(inner, name);
        } else {
            let wire = entry.wire();
            self.publish_task(inner, wire);
        }
    }

    /// Puts a task's removal mark (already on disk) into effect: a task whose tree is gone is
    /// forgotten at once; otherwise its supervisor stops it, and it is forgotten when it ends.
    fn carry_out_removal(&self, inner: &mut Inner, marked: TaskRecord) {
        let name = marked.name.clone();
        let Some(entry) = inner.tasks.get_mut(&name) else {
            return;
        };
        entry.record = marked;
        if entry.state.is_terminal() && entry.control.is_none() {
            self.forget(inner, &name);
            return;
        }
        if let Some(control) = &entry.control {
            let _ = control.send(());
        }
        let wire = entry.wire();
        self.publish_task(inner, wire);
    }

    fn forget(&self, inner: &mut Inner, name: &str) {
        if let Err(e) = self.0.store.delete(name) {
            tracing::error!(task = name, error = %e, "could not delete the task's directory");
        }
        inner.tasks.shift_remove(name);
        inner.version += 1;
        tracing::info!(task = name, "task forgotten");
        let _ = self.0.feed.send(FeedEvent::Deleted {
            version: inner.version,
            name: name.to_string(),
        });
    }

    fn publish_task(&self, inner: &mut Inner, task: Task) {
        inner.version += 1;
        let _ = self.0.feed.send(FeedEvent::Task {
            version: inner.version,
            task: Box::new(task),
        });
    }

    fn save(&self, record: &TaskRecord, durability: Durability) {
        if let Err(e) = self.0.store.save(record, durability) {
            tracing::error!(task = %record.name, error = %e, "could not persist the task record");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    // --- called by supervisors ---

    pub(super) fn reaper(&self) -> &Reaper {
        self.0.launcher.reaper()
    }

    pub(super) fn stop_grace(&self) -> Duration {
        self.0.config.stop_grace
    }

    pub(super) fn on_exit(&self, name: &str, seq: u64, ended: ExitRecord) {
        let mut inner = self.lock();
        let Some(entry) = inner.tasks.get_mut(name).filter(|e| e.record.seq == seq) else {
            return;
        };
        let started_at = match entry.state {
            TaskState::Running { started_at } => Some(started_at),
            _ => None,
        };
        tracing::info!(task = name, outcome = ?ended.outcome, "task ended");
        if matches!(ended.outcome, Outcome::Lost { .. }) {
            let verdict = Verdict {
                started_at,
                finished_at: ended.finished_at,
                outcome: ended.outcome,
            };
            self.settle(&mut inner, name, verdict);
            return;
        }
        entry.state = TaskState::Terminated {
            started_at,
            finished_at: ended.finished_at,
            outcome: ended.outcome,
            stopped_by: entry.record.stop_cause.clone(),
        };
        let wire = entry.wire();
        self.publish_task(&mut inner, wire);
    }

    /// The main container's current process (`None`: it just ended). Every task started in
    /// another one is stopped: its container restarted.
    pub fn on_target(&self, current: Option<ProcessIdentity>) {
        let mut inner = self.lock();
        let mut stopped = Vec::new();
        for entry in inner.tasks.values_mut() {
            let Some(started_in) = entry.incarnation else {
                continue;
            };
            if Some(started_in) == current
                || entry.state.is_terminal()
                || entry.record.stop_cause.is_some()
            {
                continue;
            }
            stop_for_restart(entry, started_in);
            self.save(&entry.record, Durability::Atomic);
            stopped.push(entry.record.name.clone());
        }
        if !stopped.is_empty() {
            tracing::warn!(tasks = ?stopped, "stopping tasks whose main container restarted");
        }
    }

    pub(super) fn on_timeout(&self, name: &str, seq: u64, seconds: i64) {
        let mut inner = self.lock();
        let Some(entry) = inner.tasks.get_mut(name).filter(|e| e.record.seq == seq) else {
            return;
        };
        if entry.record.stop_cause.is_none() && !entry.state.is_terminal() {
            entry.record.stop_cause = Some(StopCause::Timeout { seconds });
            self.save(&entry.record, Durability::Atomic);
        }
    }

    pub(super) fn on_tree_gone(&self, name: &str, seq: u64) {
        let mut inner = self.lock();
        let Some(entry) = inner.tasks.get_mut(name).filter(|e| e.record.seq == seq) else {
            return;
        };
        entry.control = None;
        if entry.record.removal_requested_at.is_some() && entry.state.is_terminal() {
            self.forget(&mut inner, name);
        }
    }

    // --- recovery ---

    /// Rebuilds the table from disk after a (re)start. Nothing that may have run is run again:
    /// - a setTasks that was not applied whole is undone first (see [`SetIntent`]);
    /// - a task with a recorded ending keeps it (including an exit that happened while sandlet
    ///   was down, which its shim recorded);
    /// - a task whose process still runs (same pid *and* start time) is re-adopted: watched
    ///   through a pidfd, its timeout and stop requests enforced again;
    /// - a task whose process ended while its shim lives waits for the shim's record;
    /// - a task handed to a shim that has not recorded a start yet waits for it (see
    ///   [`LaunchRecord`](crate::process::LaunchRecord));
    /// - a task whose process and shim are gone without a record is failed with a reason;
    /// - a task that never reached a shim is returned, to be started: it provably never ran.
    fn recover(&self) -> Result<Vec<ToStart>, TaskError> {
        self.0.store.roll_back()?;
        let records = self.0.store.load_all()?;
        let mut inner = self.lock();
        let mut never_launched = Vec::new();
        for record in records {
            let name = record.name.clone();
            let seq = record.seq;
            let dir = self.0.store.task_dir(&name);
            inner.next_seq = inner.next_seq.max(seq + 1);
            let found = Found::read(&record, &dir);
            let shim_alive = found.launch.as_ref().and_then(|l| {
                PidFd::open_identity(l.shim)
                    .ok()
                    .filter(|_| l.shim.is_alive())
            });
            let judged = if record.verdict.is_some() || found.ended || found.run.is_some() {
                judge(&record, &dir, found.run)
            } else if let Some(shim) = shim_alive {
                tokio::spawn(await_launch(self.clone(), name.clone(), seq, shim, dir));
                Judged::waiting()
            } else if !found.claimed {
                // No shim ever started it (none had it, or the one that had it never claimed it).
                never_launched.push(ToStart {
                    name: name.clone(),
                    seq,
                    process: record.process.clone(),
                });
                Judged::waiting()
            } else {
                judge(&record, &dir, None)
            };
            inner.tasks.insert(
                name.clone(),
                Entry {
                    record,
                    state: TaskState::Waiting,
                    control: None,
                    incarnation: None,
                },
            );
            self.take_over(&mut inner, &name, judged);
        }
        Ok(never_launched)
    }

    /// The shim a task was handed to has recorded its start (`run`), or is gone: judge the task
    /// as recovery would have, and start it if that shim never claimed it.
    async fn adopt(&self, name: &str, seq: u64, run: Option<RunRecord>) {
        let dir = self.0.store.task_dir(name);
        let start = {
            let mut inner = self.lock();
            let Some(entry) = inner.tasks.get(name).filter(|e| e.record.seq == seq) else {
                return;
            };
            if run.is_none()
                && !dir.join(process::CLAIM_FILE).exists()
                && !dir.join(process::EXIT_FILE).exists()
            {
                Some(ToStart {
                    name: name.to_string(),
                    seq,
                    process: entry.record.process.clone(),
                })
            } else {
                let judged = judge(&entry.record, &dir, run);
                self.take_over(&mut inner, name, judged);
                None
            }
        };
        if let Some(start) = start {
            self.start_all(vec![start]).await;
        }
    }

    /// Installs what recovery judged of a task: its state, a durable verdict, a supervisor for
    /// what is left of it.
    fn take_over(&self, inner: &mut Inner, name: &str, judged: Judged) {
        let Some(entry) = inner.tasks.get_mut(name) else {
            return;
        };
        entry.state = judged.state;
        entry.incarnation = judged.incarnation;
        if let Some(verdict) = judged.verdict {
            entry.record.verdict = Some(verdict);
            self.save(&entry.record, Durability::Durable);
        }
        tracing::info!(task = %name, state = ?entry.state, watched = judged.watched.is_some(), "recovered task");
        if let Some(watched) = judged.watched {
            let (tx, rx) = mpsc::unbounded_channel();
            if entry.record.removal_requested_at.is_some() {
                let _ = tx.send(());
            }
            entry.control = Some(tx);
            let seq = entry.record.seq;
            tokio::spawn(supervise(self.clone(), name.to_string(), seq, watched, rx));
        }
        if entry.record.removal_requested_at.is_some()
            && entry.state.is_terminal()
            && entry.control.is_none()
        {
            self.forget(inner, name);
        } else {
            let wire = entry.wire();
            self.publish_task(inner, wire);
        }
    }
}

/// What a task's directory holds besides its record.
struct Found {
    launch: Option<LaunchRecord>,
    run: Option<RunRecord>,
    /// Whether its shim recorded an ending.
    ended: bool,
    /// Whether a shim claimed it (and so may have started it).
    claimed: bool,
}

impl Found {
    fn read(record: &TaskRecord, dir: &Path) -> Found {
        fn read<T: serde::de::DeserializeOwned>(name: &str, path: PathBuf) -> Option<T> {
            atomic_file::read_json(&path).unwrap_or_else(|e| {
                tracing::warn!(task = name, path = %path.display(), error = %e, "unreadable record");
                None
            })
        }
        Found {
            launch: read(&record.name, dir.join(process::LAUNCH_FILE)),
            run: read(&record.name, dir.join(process::RUN_FILE)),
            ended: dir.join(process::EXIT_FILE).exists(),
            claimed: dir.join(process::CLAIM_FILE).exists(),
        }
    }
}

/// What recovery concluded about a task.
struct Judged {
    state: TaskState,
    /// What is left to watch: the task, or the rest of its tree.
    watched: Option<Watched>,
    /// An ending sandlet decided, to be recorded.
    verdict: Option<Verdict>,
    /// The main container's process the task was started in (sidecar mode).
    incarnation: Option<ProcessIdentity>,
}

impl Judged {
    fn waiting() -> Judged {
        Judged {
            state: TaskState::Waiting,
            watched: None,
            verdict: None,
            incarnation: None,
        }
    }

    fn ended(
        record: &TaskRecord,
        started_at: Option<chrono::DateTime<Utc>>,
        finished_at: chrono::DateTime<Utc>,
        outcome: Outcome,
    ) -> Judged {
        Judged {
            state: TaskState::Terminated {
                started_at,
                finished_at,
                outcome,
                stopped_by: record.stop_cause.clone(),
            },
            ..Judged::waiting()
        }
    }

    /// An ending sandlet decides itself, recorded so that it reads the same after every restart.
    fn decided(
        record: &TaskRecord,
        started_at: Option<chrono::DateTime<Utc>>,
        outcome: Outcome,
    ) -> Judged {
        let verdict = Verdict {
            started_at,
            finished_at: Utc::now(),
            outcome,
        };
        Judged {
            verdict: Some(verdict.clone()),
            ..Judged::ended(record, started_at, verdict.finished_at, verdict.outcome)
        }
    }
}

/// Waits for the shim a task was handed to (by a sandlet that died before it learnt the start)
/// to record the start, or to end; then recovery's judgement applies.
async fn await_launch(manager: TaskManager, name: String, seq: u64, shim: PidFd, dir: PathBuf) {
    let run_record = || -> Option<RunRecord> {
        atomic_file::read_json(&dir.join(process::RUN_FILE))
            .ok()
            .flatten()
    };
    let mut pause = Duration::from_millis(1);
    let run = loop {
        if let Some(run) = run_record() {
            break Some(run);
        }
        tokio::select! {
            _ = shim.exited() => break run_record(),
            _ = tokio::time::sleep(pause) => pause = (pause * 2).min(Duration::from_millis(200)),
        }
    };
    manager.adopt(&name, seq, run).await;
}

/// A task's record with its removal requested now; a task not yet ended is then stopped by
/// sandlet (unless something else already is stopping it).
fn marked_for_removal(entry: &Entry) -> TaskRecord {
    let mut record = entry.record.clone();
    record.removal_requested_at = Some(Utc::now());
    if !entry.state.is_terminal() && record.stop_cause.is_none() {
        record.stop_cause = Some(StopCause::Removed);
    }
    record
}

/// When a task with `timeoutSeconds` that has run for `elapsed` times out, with its timeout;
/// `None` without a timeout, or with one so long that its deadline never comes.
fn task_deadline(timeout_seconds: i64, elapsed: Duration) -> Option<(tokio::time::Instant, i64)> {
    let timeout = u64::try_from(timeout_seconds).ok().filter(|&s| s > 0)?;
    let left = Duration::from_secs(timeout).saturating_sub(elapsed);
    Some((deadline::after(left)?, timeout_seconds))
}

/// Marks a task as stopped because the container it was started in is gone, and asks its
/// supervisor to stop it.
fn stop_for_restart(entry: &mut Entry, started_in: ProcessIdentity) {
    entry.record.stop_cause = Some(StopCause::ContainerRestarted {
        pid: started_in.pid,
    });
    if let Some(control) = &entry.control {
        let _ = control.send(());
    }
}

/// What recovery makes of a task that has a recorded ending or a run record (or, from
/// [`await_launch`], whose shim is gone): its ending if one is recorded, else whatever of it
/// still runs, else a verdict saying what was lost.
fn judge(record: &TaskRecord, dir: &Path, run: Option<RunRecord>) -> Judged {
    let incarnation = run.as_ref().and_then(|r| r.target);
    let started_at = run.as_ref().map(|r| r.started_at);
    // A shim still alive means part of the tree may be left to stop.
    let leftover = |run: &Option<RunRecord>| {
        let run = run.as_ref()?;
        Some(Watched {
            tree: Tree {
                shim: run.shim,
                pgid: run.task.pid,
            },
            shim: Some(PidFd::open_identity(run.shim).ok()?),
            shim_is_child: false,
            exit: None,
            deadline: None,
        })
    };
    let ended = |started_at, ended: ExitRecord| Judged {
        watched: leftover(&run),
        incarnation,
        ..Judged::ended(record, started_at, ended.finished_at, ended.outcome)
    };
    if let Some(v) = &record.verdict {
        let verdict = ExitRecord {
            finished_at: v.finished_at,
            outcome: v.outcome.clone(),
        };
        return ended(v.started_at, verdict);
    }
    if let Some(record) = process::read_exit_record(dir) {
        return ended(started_at, record);
    }
    let Some(run) = &run else {
        return Judged::decided(
            record,
            None,
            Outcome::Lost {
                reason: "ShimLost".into(),
                message: "the task's shim ended before it recorded a start; whether the task ran is not known".into(),
            },
        );
    };
    let task = PidFd::open_identity(run.task)
        .ok()
        .filter(|_| run.task.is_alive());
    let shim = PidFd::open_identity(run.shim)
        .ok()
        .filter(|_| run.shim.is_alive());
    if task.is_none() && shim.is_none() {
        // The shim may have recorded the exit between the first look and now.
        if let Some(record) = process::read_exit_record(dir) {
            return ended(started_at, record);
        }
        return Judged {
            incarnation,
            ..Judged::decided(
                record,
                started_at,
                Outcome::Lost {
                    reason: "ProcessLost".into(),
                    message: "the task's process ended while sandlet was not running and no exit status was recorded".into(),
                },
            )
        };
    }
    // The task runs, or its shim lives to record how it ended: watch for that, however long it
    // takes.
    let elapsed = (Utc::now() - run.started_at).to_std().unwrap_or_default();
    Judged {
        state: TaskState::Running {
            started_at: run.started_at,
        },
        watched: Some(Watched {
            tree: Tree {
                shim: run.shim,
                pgid: run.task.pid,
            },
            shim,
            shim_is_child: false,
            exit: Some(ExitWatch::Adopted {
                task,
                shim: run.shim,
                dir: dir.to_owned(),
            }),
            deadline: task_deadline(record.process.timeout_seconds, elapsed),
        }),
        verdict: None,
        incarnation,
    }
}
