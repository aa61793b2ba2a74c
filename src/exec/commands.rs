//! The command table: every command is registered *before* its `init` event is sent (so its
//! status and logs answer from that moment), keeps a bounded record once finished (by count and
//! by age), and has its directory (the background output log) removed with the record.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use indexmap::IndexMap;
use tokio::sync::mpsc;

use super::events::{Event, LineFrames};
use super::run::{Driven, Driver, Spawn, SpawnError, spawn, spawn_in};
use super::{ExecConfig, RunSlot, new_id};
use crate::container::{StartIn, TargetWatch};
use crate::process::shim::{COMBINED_LOG, OutputMode};
use crate::process::{ExitRecord, Launcher, Outcome};

/// Frames buffered between a foreground command and its client: a slower client slows the
/// command down (through the shim), it never loses output.
const STREAM_BUFFER: usize = 64;

pub struct Commands {
    config: Arc<ExecConfig>,
    launcher: Arc<Launcher>,
    target: Option<Arc<TargetWatch>>,
    table: Mutex<IndexMap<String, Arc<Command>>>,
}

pub struct Command {
    pub id: String,
    pub content: String,
    pub started_at: DateTime<Utc>,
    /// A background command's directory, with its output log; a foreground command has none.
    log_dir: Option<PathBuf>,
    state: Mutex<State>,
}

enum State {
    Running {
        interrupt: mpsc::UnboundedSender<()>,
    },
    Finished(Finished),
}

#[derive(Clone)]
pub struct Finished {
    pub exit_code: i32,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// A command's status, as `GET /command/status/{id}` shows it.
pub struct Status {
    pub running: bool,
    pub finished: Option<Finished>,
}

/// What `POST /command` asked for (or an isolated session's run, with `place`).
pub struct Request {
    /// The command's id; a fresh one when `None`.
    pub id: Option<String>,
    /// Where and as whom to start, resolved by the caller (an isolated session); `None`: the
    /// sandbox, as `uid` and `gid` say.
    pub place: Option<StartIn>,
    /// Stop the command when its client goes away (an isolated session's foreground runs, as
    /// bash sessions' runs); `/command` runs on.
    pub stop_when_client_leaves: bool,
    /// The shell script, or `argv` as the shell would read it (the status's `content`).
    pub command: String,
    /// The program and arguments to run without a shell, if not `command`.
    pub argv: Option<Vec<String>>,
    pub cwd: Option<String>,
    pub envs: Vec<(String, String)>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub timeout: Option<Duration>,
    pub background: bool,
}

pub enum CommandError {
    Invalid(String),
    Limit(String),
    NotFound(String),
    NotRunning(String),
}

impl Commands {
    pub fn new(
        config: Arc<ExecConfig>,
        launcher: Arc<Launcher>,
        target: Option<Arc<TargetWatch>>,
    ) -> Arc<Commands> {
        Arc::new(Commands {
            config,
            launcher,
            target,
            table: Mutex::new(IndexMap::new()),
        })
    }

    /// Starts a command and returns its event stream: `init`, then (foreground) `ping`s,
    /// output lines and exactly one of `execution_complete` / `error`; (background) just
    /// `execution_complete`. Errors before anything started are returned, not streamed.
    pub async fn run(
        self: &Arc<Self>,
        request: Request,
    ) -> Result<mpsc::Receiver<Bytes>, CommandError> {
        let slot = RunSlot::take(&self.config).map_err(CommandError::Limit)?;
        let received = std::time::Instant::now();
        let id = request.id.clone().unwrap_or_else(new_id);
        // A background command's log is there from its start; a foreground command keeps
        // nothing on disk (its shim, not a record, stops it should sandlet die).
        let log_dir = if request.background {
            let dir = self.config.data_dir.join("commands").join(&id);
            std::fs::create_dir_all(&dir).map_err(|e| {
                CommandError::Limit(format!("cannot create {}: {e}", dir.display()))
            })?;
            Some(dir)
        } else {
            None
        };
        let spec = Spawn {
            script: request.command.clone(),
            argv: request.argv,
            interactive: false,
            cwd: request.cwd,
            envs: request.envs,
            env_override: None,
            env_file: self.config.env_file.clone(),
            uid: request.uid,
            gid: request.gid,
            output: if request.background {
                OutputMode::Combined
            } else {
                OutputMode::Stream
            },
            dir: log_dir.clone(),
            log_limit: self.config.log_limit,
        };
        let (interrupt, interrupts) = mpsc::unbounded_channel();
        let command = Arc::new(Command {
            id: id.clone(),
            content: request.command,
            started_at: Utc::now(),
            log_dir,
            state: Mutex::new(State::Running { interrupt }),
        });
        let spawned = match request.place {
            Some(place) => spawn_in(&self.launcher, place, spec).await,
            None => spawn(&self.launcher, self.target.as_deref(), spec).await,
        };
        let started = match spawned {
            Ok(started) => Some(started),
            Err(SpawnError::Invalid(message)) => {
                command.remove_log();
                return Err(CommandError::Invalid(message));
            }
            Err(SpawnError::Failed(message)) => {
                tracing::warn!(command = %id, %message, "command could not start");
                command.finish(Finished {
                    exit_code: 255,
                    error: message.clone(),
                    at: Utc::now(),
                });
                self.insert(Arc::clone(&command));
                let (tx, rx) = mpsc::channel(2);
                let _ = tx.try_send(Event::init(&id).frame());
                let _ =
                    tx.try_send(Event::error("CommandExecError", message.clone(), message).frame());
                return Ok(rx);
            }
        };
        let started = started.expect("handled above");
        self.insert(Arc::clone(&command));
        tracing::info!(command = %id, background = request.background, pid = started.tree.pgid, "command started");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        // Registered before init: its status answers from the moment the client has its id.
        // A foreground stream's first ping goes out in the same write.
        let mut first = Event::init(&id).frame().to_vec();
        if !request.background {
            first.extend_from_slice(&Event::ping().frame());
        }
        let _ = tx.send(Bytes::from(first)).await;
        let driver = Driver::new(started, request.timeout, interrupts, !request.background);
        let launcher = Arc::clone(&self.launcher);
        let table = Arc::clone(self);
        if request.background {
            let _ = tx
                .send(Event::complete(received.elapsed().as_millis() as i64).frame())
                .await;
            drop(tx);
            tokio::spawn(async move {
                let mut driver = driver;
                let record = loop {
                    if let Driven::Ended(record) = driver.next().await {
                        break record;
                    }
                };
                command.finish(finished_of(&record, &driver));
                driver.finish(launcher);
                drop(slot);
                table.evict_expired();
            });
        } else {
            let stop_when_client_leaves = request.stop_when_client_leaves;
            tokio::spawn(async move {
                let record = stream(
                    driver,
                    &tx,
                    launcher,
                    &command,
                    received,
                    stop_when_client_leaves,
                )
                .await;
                tracing::debug!(command = %command.id, outcome = ?record.outcome, "command ended");
                drop(slot);
                table.evict_expired();
            });
        }
        Ok(rx)
    }

    pub fn status(&self, id: &str) -> Option<(Arc<Command>, Status)> {
        let command = Arc::clone(self.lock().get(id)?);
        let status = match &*command.lock() {
            State::Running { .. } => Status {
                running: true,
                finished: None,
            },
            State::Finished(f) => Status {
                running: false,
                finished: Some(f.clone()),
            },
        };
        Some((command, status))
    }

    /// The background output from byte `cursor`, at most `max` bytes, and the next cursor.
    pub fn logs(&self, id: &str, cursor: u64, max: usize) -> Result<(Vec<u8>, u64), CommandError> {
        let command = Arc::clone(
            self.lock()
                .get(id)
                .ok_or_else(|| CommandError::NotFound(format!("command not found: {id}")))?,
        );
        let Some(dir) = &command.log_dir else {
            return Err(CommandError::Invalid(format!(
                "command {id} is not running in background; its output was streamed"
            )));
        };
        let chunk = crate::process::read_log(dir, COMBINED_LOG, cursor, max)
            .map_err(|e| CommandError::Invalid(format!("cannot read the output of {id}: {e}")))?;
        let next = (chunk.offset + chunk.data.len() as u64).max(cursor);
        Ok((chunk.data, next))
    }

    /// Interrupts a running command: SIGTERM to its tree, SIGKILL after the grace.
    pub fn interrupt(&self, id: &str) -> Result<(), CommandError> {
        let command = Arc::clone(
            self.lock()
                .get(id)
                .ok_or_else(|| CommandError::NotFound(format!("command not found: {id}")))?,
        );
        if command.stop() {
            tracing::info!(command = id, "command interrupted");
            Ok(())
        } else {
            Err(CommandError::NotRunning(format!(
                "command {id} is not running"
            )))
        }
    }

    /// Forgets commands (an isolated session's runs, with the session), stopping any still
    /// running, and removes their directories.
    pub fn forget(&self, ids: &[String]) {
        let mut table = self.lock();
        for id in ids {
            if let Some(command) = table.shift_remove(id) {
                command.stop();
                command.remove_log();
            }
        }
    }

    /// Adds a command and lets go of the oldest finished ones beyond the retention limits.
    fn insert(&self, command: Arc<Command>) {
        let mut table = self.lock();
        table.insert(command.id.clone(), command);
        self.evict(&mut table);
    }

    /// Forgets finished commands past `keep_finished` (oldest first) or older than
    /// `keep_finished_for`, and removes their directories.
    pub fn evict_expired(&self) {
        let mut table = self.lock();
        self.evict(&mut table);
    }

    fn evict(&self, table: &mut IndexMap<String, Arc<Command>>) {
        let now = Utc::now();
        let max_age = chrono::Duration::from_std(self.config.keep_finished_for).unwrap_or_default();
        let finished: Vec<(String, DateTime<Utc>)> = table
            .values()
            .filter_map(|c| match &*c.lock() {
                State::Finished(f) => Some((c.id.clone(), f.at)),
                State::Running { .. } => None,
            })
            .collect();
        let excess = finished.len().saturating_sub(self.config.keep_finished);
        for (i, (id, at)) in finished.iter().enumerate() {
            if (i < excess || now - *at > max_age)
                && let Some(c) = table.shift_remove(id)
            {
                c.remove_log();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, IndexMap<String, Arc<Command>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Command {
    fn remove_log(&self) {
        if let Some(dir) = &self.log_dir
            && let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a command's directory");
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Interrupts the command if it runs (SIGTERM to its tree, SIGKILL after the grace);
    /// whether it did.
    fn stop(&self) -> bool {
        match &*self.lock() {
            State::Running { interrupt } => interrupt.send(()).is_ok(),
            State::Finished(_) => false,
        }
    }

    fn finish(&self, finished: Finished) {
        *self.lock() = State::Finished(finished);
    }
}

/// Forwards a foreground command's output as line events until it ends, then the terminal
/// event. A client that went away stops receiving; the command runs on to its end (as in
/// execd) and its status records how it ended, unless `stop_when_client_leaves`: then it is
/// interrupted (its whole tree).
async fn stream(
    mut driver: Driver,
    tx: &mpsc::Sender<Bytes>,
    launcher: Arc<Launcher>,
    command: &Command,
    received: std::time::Instant,
    stop_when_client_leaves: bool,
) -> ExitRecord {
    let mut frames = [LineFrames::new(false), LineFrames::new(true)];
    let mut connected = true;
    let client_left = || {
        if stop_when_client_leaves {
            command.stop();
        }
        false
    };
    let record = loop {
        match driver.next().await {
            Driven::Output(stream, data) => {
                if !connected {
                    continue;
                }
                let mut out = Vec::with_capacity(data.len() + data.len() / 2);
                frames[usize::from(stream == 2)].feed(&data, &mut out);
                if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                    connected = client_left();
                }
            }
            Driven::Ping => {
                if connected && tx.send(Event::ping().frame()).await.is_err() {
                    connected = client_left();
                }
            }
            Driven::Ended(record) => break record,
        }
    };
    let finished = finished_of(&record, &driver);
    command.finish(finished.clone());
    if connected {
        let mut out = Vec::new();
        for f in &mut frames {
            f.finish(&mut out);
        }
        if !out.is_empty() {
            let _ = tx.send(Bytes::from(out)).await;
        }
        let end = if finished.exit_code == 0 && finished.error.is_empty() {
            Event::complete(received.elapsed().as_millis() as i64)
        } else {
            Event::error(
                "CommandExecError",
                finished.exit_code.to_string(),
                finished.error.clone(),
            )
        };
        let _ = tx.send(end.frame()).await;
    }
    driver.finish(launcher);
    record
}

/// The status fields of an ending, as execd reports them: the exit code, or -1 with
/// `signal: <name>` for a signal.
fn finished_of(record: &ExitRecord, driver: &Driver) -> Finished {
    let (exit_code, error) = match &record.outcome {
        Outcome::Exited { code: 0 } => (0, String::new()),
        Outcome::Exited { code } => (*code, format!("exit status {code}")),
        Outcome::Signaled { signal } => (-1, format!("signal: {}", signal_text(*signal))),
        Outcome::StartFailed { message } => (255, message.clone()),
        Outcome::Lost { message, .. } => (-1, message.clone()),
    };
    let error = match (driver.timed_out, error.is_empty()) {
        (true, false) => format!("{error} (timeout)"),
        _ => error,
    };
    Finished {
        exit_code,
        error,
        at: record.finished_at,
    }
}

/// Go's wording of a signal in `exec.ExitError`.
fn signal_text(signal: i32) -> String {
    match signal {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        3 => "quit".into(),
        6 => "aborted".into(),
        9 => "killed".into(),
        13 => "broken pipe".into(),
        15 => "terminated".into(),
        n => format!("signal {n}"),
    }
}
