//! Bash sessions: exported environment and working directory that persist across runs.
//!
//! As in execd there is no long-lived shell: a session is its environment and directory, and
//! each run is a fresh `bash -c` (or `sh -c`) under a shim that starts from them and, after the
//! user's command, dumps its environment (`/proc/self/environ` of a `cat`: exactly the exported
//! variables, NUL-separated, so any value survives) and `pwd` behind a marker line that carries a
//! random nonce per run, so output cannot spoof it. Unlike execd: the session's environment
//! replaces the process's (an `unset` sticks), runs of one session are serialized, a timeout or
//! a client that goes away kills the run's whole tree, and stderr stays stderr.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use tokio::sync::mpsc;

use super::events::{Event, LineFrames};
use super::run::{Driven, Driver, Spawn, SpawnError, spawn};
use super::{ExecConfig, RunSlot, new_id, uuid_v4};
use crate::container::{PlaceError, TargetWatch, start_in};
use crate::process::shim::OutputMode;
use crate::process::{Launcher, Outcome};

/// A run's timeout when the request gives none (execd's figure).
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Variables the shell sets for itself: never part of a session's state.
const SHELL_OWNED: [&str; 4] = ["_", "SHLVL", "PWD", "OLDPWD"];

pub struct Sessions {
    config: Arc<ExecConfig>,
    launcher: Arc<Launcher>,
    target: Option<Arc<TargetWatch>>,
    table: Mutex<HashMap<String, Arc<Session>>>,
}

pub struct Session {
    id: String,
    /// Held for the length of a run: runs of one session go one at a time.
    state: Arc<tokio::sync::Mutex<State>>,
    closed: AtomicBool,
    /// Stops the current run (delete, or its client going away).
    current: Mutex<Option<mpsc::UnboundedSender<()>>>,
    last_used: Mutex<Instant>,
}

struct State {
    env: Vec<(String, String)>,
    cwd: Option<String>,
    /// The directory is created by the first run (inside the container in sidecar mode).
    create_cwd: bool,
}

pub enum SessionError {
    Invalid(String),
    Limit(String),
    NotFound(String),
    Failed(String),
}

impl Sessions {
    pub fn new(
        config: Arc<ExecConfig>,
        launcher: Arc<Launcher>,
        target: Option<Arc<TargetWatch>>,
    ) -> Arc<Sessions> {
        Arc::new(Sessions {
            config,
            launcher,
            target,
            table: Mutex::new(HashMap::new()),
        })
    }

    /// `POST /session`: a session starting from the environment a command would get.
    pub fn create(&self, cwd: Option<String>) -> Result<String, SessionError> {
        let place = start_in(self.target.as_deref(), "").map_err(|e| match e {
            PlaceError::Unavailable(m) => SessionError::Failed(m),
            PlaceError::User(m) => SessionError::Invalid(m),
        })?;
        let mut env: Vec<(String, String)> = if place.clear_env {
            Vec::new()
        } else {
            std::env::vars().collect()
        };
        env.extend(place.env);
        if let Some(file) = &self.config.env_file {
            let vars = file.variables(&place.root, &env);
            env.extend(vars);
        }
        env.retain(|(k, _)| is_name(k) && !SHELL_OWNED.contains(&k.as_str()));
        let mut table = self.lock();
        if table.len() >= self.config.max_sessions {
            return Err(SessionError::Limit(format!(
                "{} sessions exist; the limit is {} (--exec-max-sessions); delete one first",
                table.len(),
                self.config.max_sessions
            )));
        }
        let id = uuid_v4();
        table.insert(
            id.clone(),
            Arc::new(Session {
                id: id.clone(),
                state: Arc::new(tokio::sync::Mutex::new(State {
                    env,
                    create_cwd: cwd.is_some(),
                    cwd,
                })),
                closed: AtomicBool::new(false),
                current: Mutex::new(None),
                last_used: Mutex::new(Instant::now()),
            }),
        );
        tracing::info!(session = %id, "bash session created");
        Ok(id)
    }

    /// `POST /session/{id}/run`: the event stream of one run.
    pub async fn run(
        self: &Arc<Self>,
        id: &str,
        command: String,
        cwd: Option<String>,
        timeout: Option<Duration>,
    ) -> Result<mpsc::Receiver<Bytes>, SessionError> {
        let session = self
            .get(id)
            .ok_or_else(|| SessionError::NotFound(format!("session {id} not found")))?;
        let slot = RunSlot::take(&self.config).map_err(SessionError::Limit)?;
        let received = std::time::Instant::now();
        let mut state = Arc::clone(&session.state).lock_owned().await;
        if session.closed.load(Ordering::Acquire) {
            return Err(SessionError::NotFound(format!("session {id} not found")));
        }
        let nonce = new_id();
        let marker = format!("__SANDLET_{nonce}__");
        let run_cwd = cwd.or_else(|| state.cwd.clone());
        let mut script = String::new();
        if let Some(dir) = &run_cwd {
            if state.create_cwd {
                script.push_str(&format!("mkdir -p -- {} && ", quote(dir)));
            }
            script.push_str(&format!("cd -- {} || exit 1\n", quote(dir)));
        }
        script.push_str(&command);
        script.push_str(&format!(
            "\n__sandlet_status=$?\nprintf '\\n%s\\n' '{marker}'\ncat /proc/self/environ\nprintf '\\n%s\\n' \"$(pwd)\"\nexit $__sandlet_status\n"
        ));
        let spec = Spawn {
            script,
            argv: None,
            interactive: false,
            cwd: None,
            envs: Vec::new(),
            env_override: Some(state.env.clone()),
            env_file: None,
            uid: None,
            gid: None,
            output: OutputMode::Stream,
            dir: None,
            log_limit: self.config.log_limit,
        };
        let started = match spawn(&self.launcher, self.target.as_deref(), spec).await {
            Ok(started) => started,
            Err(SpawnError::Invalid(m)) | Err(SpawnError::Failed(m)) => {
                return Err(SessionError::Failed(m));
            }
        };
        let (interrupt, interrupts) = mpsc::unbounded_channel();
        *session.lock_current() = Some(interrupt);
        let timeout = timeout.unwrap_or(DEFAULT_RUN_TIMEOUT);
        let mut driver = Driver::new(started, Some(timeout), interrupts, true);
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.send(Event::init(&session.id).frame()).await;
        let _ = tx.send(Event::ping().frame()).await;
        let launcher = Arc::clone(&self.launcher);
        tokio::spawn(async move {
            let mut out = Demux::new(marker.as_bytes());
            let mut stderr = LineFrames::new(true);
            let mut connected = true;
            let record = loop {
                let mut frame = Vec::new();
                match driver.next().await {
                    Driven::Output(2, data) => stderr.feed(&data, &mut frame),
                    Driven::Output(_, data) => out.feed(&data, &mut frame),
                    Driven::Ping => frame = Event::ping().frame().to_vec(),
                    Driven::Ended(record) => break record,
                }
                if connected && !frame.is_empty() && tx.send(Bytes::from(frame)).await.is_err() {
                    // The client went away: execd cancels the run; so does sandlet, whole tree.
                    connected = false;
                    if let Some(stop) = &*session.lock_current() {
                        let _ = stop.send(());
                    }
                }
            };
            let timed_out = driver.timed_out;
            *session.lock_current() = None;
            let mut last = Vec::new();
            out.finish(&mut last);
            stderr.finish(&mut last);
            let mut frames = vec![Bytes::from(last)];
            let end = match (&record.outcome, timed_out) {
                (_, true) => Event::error(
                    "CommandExecError",
                    "-1".into(),
                    format!("timeout after {} ms", timeout.as_millis()),
                ),
                (Outcome::Exited { code: 0 }, _) => {
                    Event::complete(received.elapsed().as_millis() as i64)
                }
                (Outcome::Exited { code }, _) => Event::error(
                    "CommandExecError",
                    code.to_string(),
                    format!("command exited with code {code}"),
                ),
                (Outcome::Signaled { signal }, _) => Event::error(
                    "CommandExecError",
                    "-1".into(),
                    format!("killed by signal {signal}"),
                ),
                (Outcome::StartFailed { message } | Outcome::Lost { message, .. }, _) => {
                    Event::error("CommandExecError", "-1".into(), message.clone())
                }
            };
            frames.push(end.frame());
            // The new state, only from a run that got to its epilogue.
            if let Some((env, pwd)) = out.state() {
                if !env.is_empty() {
                    state.env = env;
                }
                state.cwd = Some(pwd);
                state.create_cwd = false;
            }
            drop(state);
            *session.lock_last_used() = Instant::now();
            drop(slot);
            for frame in frames.into_iter().filter(|f| !f.is_empty()) {
                if !connected || tx.send(frame).await.is_err() {
                    break;
                }
            }
            driver.finish(launcher);
        });
        Ok(rx)
    }

    /// `DELETE /session/{id}`: stops a run in progress and forgets the session.
    pub fn delete(&self, id: &str) -> Result<(), SessionError> {
        let session = self
            .lock()
            .remove(id)
            .ok_or_else(|| SessionError::NotFound(format!("session {id} not found")))?;
        if let Some(stop) = &*session.lock_current() {
            let _ = stop.send(());
        }
        session.closed.store(true, Ordering::Release);
        tracing::info!(session = id, "bash session deleted");
        Ok(())
    }

    pub fn exists(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Removes sessions unused for longer than `session_idle`.
    pub fn evict_idle(&self) {
        let idle = self.config.session_idle;
        let expired: Vec<String> = self
            .lock()
            .values()
            .filter(|s| s.lock_current().is_none() && s.lock_last_used().elapsed() > idle)
            .map(|s| s.id.clone())
            .collect();
        for id in expired {
            tracing::info!(session = %id, "bash session idle too long; removed");
            let _ = self.delete(&id);
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Session {
    fn lock_current(&self) -> MutexGuard<'_, Option<mpsc::UnboundedSender<()>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn lock_last_used(&self) -> MutexGuard<'_, Instant> {
        self.last_used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Splits a run's stdout into the user's output (as line events) and, after the marker line,
/// the state dump. The marker is looked for in the raw bytes, across read boundaries.
struct Demux {
    marker: Vec<u8>,
    held: Vec<u8>,
    lines: LineFrames,
    state: Option<Vec<u8>>,
}

impl Demux {
    fn new(marker: &[u8]) -> Demux {
        let mut full = b"\n".to_vec();
        full.extend_from_slice(marker);
        full.push(b'\n');
        Demux {
            marker: full,
            held: Vec::new(),
            lines: LineFrames::new(false),
            state: None,
        }
    }

    /// Appends the frames of the output lines in `data` to `frames`.
    fn feed(&mut self, data: &[u8], frames: &mut Vec<u8>) {
        if let Some(state) = &mut self.state {
            state.extend_from_slice(data);
            return;
        }
        self.held.extend_from_slice(data);
        if let Some(at) = find(&self.held, &self.marker) {
            self.lines.feed(&self.held[..at], frames);
            self.state = Some(self.held[at + self.marker.len()..].to_vec());
            self.held.clear();
            return;
        }
        // Everything but a tail that could be the start of the marker is output.
        let keep = (self.marker.len() - 1).min(self.held.len());
        let out: Vec<u8> = self.held.drain(..self.held.len() - keep).collect();
        self.lines.feed(&out, frames);
    }

    fn finish(&mut self, frames: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.held);
        self.lines.feed(&held, frames);
        self.lines.finish(frames);
    }

    /// The exported environment and working directory the run ended with.
    fn state(&self) -> Option<EndState> {
        let blob = self.state.as_ref()?;
        let blob = blob.strip_suffix(b"\n")?;
        let split = blob.iter().rposition(|b| *b == b'\n')?;
        let pwd = String::from_utf8_lossy(&blob[split + 1..]).into_owned();
        let env = blob[..split]
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                let (k, v) = kv.split_once('=')?;
                (is_name(k) && !SHELL_OWNED.contains(&k)).then(|| (k.to_string(), v.to_string()))
            })
            .collect();
        Some((env, pwd))
    }
}

/// A run's exported environment and working directory at its end.
type EndState = (Vec<(String, String)>, String);

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A shell variable name.
pub(super) fn is_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Single-quoted for the shell.
pub(super) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demux(chunks: &[&[u8]]) -> (Vec<String>, Option<EndState>) {
        let mut d = Demux::new(b"__M__");
        let mut frames = Vec::new();
        for c in chunks {
            d.feed(c, &mut frames);
        }
        d.finish(&mut frames);
        let lines = String::from_utf8(frames)
            .unwrap()
            .split("\n\n")
            .filter(|f| !f.is_empty())
            .map(|f| {
                let e: serde_json::Value = serde_json::from_str(&f[6..]).unwrap();
                e["text"].as_str().unwrap().to_string()
            })
            .collect();
        (lines, d.state())
    }

    #[test]
    fn output_and_state_are_told_apart_across_reads() {
        let (lines, state) = demux(&[b"a\n\nb\n\n__", b"M__\nA=1\0B=x\ny\0_=/bin/cat\0\n/tmp\n"]);
        assert_eq!(lines, ["a\n", "\n", "b\n"]);
        let (env, pwd) = state.unwrap();
        assert_eq!(env, [("A".into(), "1".into()), ("B".into(), "x\ny".into())]);
        assert_eq!(pwd, "/tmp");
        // A last line without a newline is still one line.
        let (lines, state) = demux(&[b"{\"foo\":1}\n__M__\n\n/\n"]);
        assert_eq!(lines, ["{\"foo\":1}"]);
        assert_eq!(state.unwrap().1, "/");
    }

    #[test]
    fn a_run_that_never_reached_its_epilogue_has_no_state() {
        let (lines, state) = demux(&[b"partial"]);
        assert_eq!(lines, ["partial"]);
        assert!(state.is_none());
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
