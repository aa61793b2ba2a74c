//! Isolated execution sessions (execd 1.1's `/v1/isolated/*`), built by sandlet itself rather
//! than with bubblewrap: each session is a set of namespaces (PID, mount, UTS, IPC; network
//! unless shared; user with `uid_mode: userns`) held by a process of sandlet's (`holder.rs`)
//! and a filesystem of its own (`mounts.rs`): the sandbox's tree read-only, private `/tmp`,
//! `/run`, `/dev` and `/proc`, and the requested overlays (upper layers in a tmpfs, or
//! persistent in the layers' directory for `diff` and `commit`), binds and writable extras.
//!
//! A run is a command (`exec::Commands`, so the same events, status and logs) whose shim
//! starts it inside the session's namespaces, as the session's user, from the session's
//! environment (the sandbox's as a command gets it, filtered by `env_passthrough`). In sidecar
//! mode the session is made inside the main container (the holder enters it first), so its
//! files, users and cgroups are the container's. The session's files are reached through its
//! PID 1 (`/proc/<pid>/root`), acting as its user, only below its own mounts.
//!
//! A session ends when deleted, when idle longer than its timeout (no run active), or with
//! sandlet (the holder's shim kills it): the kernel ends every process of its PID namespace,
//! and the holder removes its persistent layers (an earlier sandlet's are removed when the
//! next session is made).

mod artifacts;
mod holder;
mod mounts;
mod spec;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use indexmap::IndexMap;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::container::{PlaceError, StartIn, TargetWatch, start_in};
use crate::exec::{
    CommandError, Commands, Driven, Driver, ExecConfig, Request, Spawn, SpawnError, spawn, uuid_v4,
};
use crate::files::{Files, SessionView};
use crate::process::enter::{Credentials, Method, Placement};
use crate::process::shim::OutputMode;
use crate::process::{Launcher, ProcessIdentity};

pub use artifacts::{Layer, commit, diff};
pub use holder::{Probe, ROLE, run as run_holder};
pub use spec::{CreateRequest, Plan};

use holder::HolderError;
use spec::{HolderSpec, Limits, MountSpec};

/// How long a session's holder may take to set the session up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a probe's findings are trusted.
const PROBE_FOR: Duration = Duration::from_secs(30);
/// How long a delete waits for the session's processes to be gone.
const END_WAIT: Duration = Duration::from_secs(10);

/// Limits and places of isolated sessions (documented defaults in the README).
#[derive(Debug, Clone)]
pub struct IsolationConfig {
    /// Sessions at once, at most.
    pub max_sessions: usize,
    /// A session's idle timeout when its request has none (0: none).
    pub default_idle_seconds: u64,
    /// Where persistent upper layers are kept, by its path in the sandbox.
    pub layers_dir: String,
    /// Directories whose subtrees `binds` and `extra_writable` may name.
    pub writable: Vec<String>,
    /// Directories of the sandbox sessions must not see (sandlet's own, in local mode).
    pub hidden: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The session is not active, or its runs stand in the way.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Limit(String),
    /// Isolation (or what was asked of it) cannot be had here.
    #[error("{0}")]
    Unsupported(String),
    /// Sidecar mode, and the main container is not there right now.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

pub struct Isolation {
    exec: Arc<ExecConfig>,
    config: IsolationConfig,
    launcher: Arc<Launcher>,
    target: Option<Arc<TargetWatch>>,
    commands: Arc<Commands>,
    files: Arc<Files>,
    sessions: Mutex<IndexMap<String, Arc<Session>>>,
    /// Ids of sessions being made: they count against the limit already, and their layers are
    /// not another holder's to remove as stale.
    starting: Mutex<Vec<String>>,
    probe: tokio::sync::Mutex<Option<(Instant, Result<Probe, String>)>>,
}

/// One session.
pub struct Session {
    pub id: String,
    pub created_at: DateTime<Utc>,
    /// What it was made with (echoed), `uid` and `gid` as resolved.
    pub plan: Plan,
    holder: HolderSpec,
    /// Where its runs start: its PID 1's namespaces, its user, its environment.
    start: StartIn,
    credentials: Credentials,
    home: String,
    pid1: ProcessIdentity,
    /// The holder's keeper, in the sandbox's namespaces: its root is the sandbox's.
    keeper: i32,
    state: Mutex<State>,
    /// Ids of its runs (commands), in start order.
    runs: Mutex<Vec<String>>,
    /// When a run last ended, or the session was made.
    last_activity: Mutex<(Instant, DateTime<Utc>)>,
    /// Turns true when the holder has ended.
    ended: watch::Receiver<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Active,
    /// Its holder ended by itself (killed from outside): nothing runs there any more.
    Dead(String),
    /// Ended for being idle; kept to say so until deleted.
    Destroyed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Active => "active",
            State::Dead(_) => "dead",
            State::Destroyed => "destroyed",
        }
    }
}

/// What a background run's start answers.
#[derive(Debug, Serialize)]
pub struct BackgroundRun {
    pub session_id: String,
    pub run_id: String,
    pub started_at: String,
}

impl Isolation {
    pub fn new(
        exec: Arc<ExecConfig>,
        config: IsolationConfig,
        launcher: Arc<Launcher>,
        target: Option<Arc<TargetWatch>>,
        commands: Arc<Commands>,
        files: Arc<Files>,
    ) -> Arc<Isolation> {
        Arc::new(Isolation {
            exec,
            config,
            launcher,
            target,
            commands,
            files,
            sessions: Mutex::new(IndexMap::new()),
            starting: Mutex::new(Vec::new()),
            probe: tokio::sync::Mutex::new(None),
        })
    }

    /// `GET /v1/isolated/capabilities`: what a probe session found (probed at most every 30 s).
    pub async fn capabilities(&self) -> Value {
        let probe = self.probe().await;
        let bounded = self.target.is_some();
        let layer = |state: &str, message: &str| json!({"state": state, "message": message});
        let (available, message) = match &probe {
            Ok(p) => (
                true,
                match (&p.persist_message, &p.userns_message) {
                    (None, None) => String::new(),
                    (a, b) => [a.as_deref(), b.as_deref()]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>()
                        .join("; "),
                },
            ),
            Err(why) => (false, why.clone()),
        };
        let found = probe.unwrap_or_default();
        json!({
            "available": available,
            "isolator": "sandlet",
            "version": env!("CARGO_PKG_VERSION"),
            "message": message,
            "setpriv_available": available,
            "userns_available": available && found.userns,
            "commit_supported": available && found.persist,
            "diff_supported": available && found.persist,
            "hardening": {
                "init_mode": "none",
                "signal_shield": false,
                "cap_drop": if bounded {
                    layer("active", "runs keep at most the main container's capabilities (its bounding set)")
                } else {
                    layer("disabled", "runs keep sandlet's capability bounding set; a uid other than 0 has no capabilities")
                },
                "seccomp": layer("unsupported", "sandlet installs no seccomp filter of its own"),
                "landlock": layer("unsupported", "sandlet does not use Landlock"),
                "ebpf": layer("unsupported", "sandlet does not use eBPF"),
            },
        })
    }

    async fn probe(&self) -> Result<Probe, String> {
        let mut cached = self.probe.lock().await;
        if let Some((at, found)) = &*cached
            && at.elapsed() < PROBE_FOR
        {
            return found.clone();
        }
        let found = self.run_probe().await;
        *cached = Some((Instant::now(), found.clone()));
        found
    }

    async fn run_probe(&self) -> Result<Probe, String> {
        let place = self.sandbox_place("").map_err(|e| e.to_string())?;
        let spec = HolderSpec {
            session: "probe".into(),
            placement: place.placement.clone(),
            share_net: true,
            private_tmp: true,
            userns: None,
            mounts: vec![MountSpec::Overlay {
                path: "/".into(),
                persist: false,
            }],
            owner: None,
            upper_root: self.config.layers_dir.clone(),
            hidden: self.hidden(),
            live: self.session_ids(),
            probe: true,
        };
        let (line, driver) = self.start_holder(&spec).await.map_err(|e| e.to_string())?;
        let mut driver = driver;
        while !matches!(driver.next().await, Driven::Ended(_)) {}
        driver.finish(Arc::clone(&self.launcher));
        let found = line
            .strip_prefix("probe ")
            .ok_or_else(|| format!("the probe said {line:?}"))?;
        serde_json::from_str(found).map_err(|e| format!("the probe's answer {found:?}: {e}"))
    }

    /// `POST /v1/isolated/session`.
    pub async fn create(self: &Arc<Self>, request: CreateRequest) -> Result<Value, IsolationError> {
        let mut plan = Plan::new(
            request,
            &Limits {
                writable: &self.config.writable,
                default_idle_seconds: self.config.default_idle_seconds,
            },
        )
        .map_err(IsolationError::Invalid)?;
        let id = uuid_v4();
        let _slot = self.take_slot(&id)?;
        let probe = self.probe().await.map_err(IsolationError::Unsupported)?;
        if plan.uid_mode == spec::UidMode::Userns && !probe.userns {
            return Err(IsolationError::Unsupported(format!(
                "uid_mode userns is not available here: {}",
                probe.userns_message.unwrap_or_default()
            )));
        }
        let user = self.user_of(&plan)?;
        let place = self.sandbox_place(&user)?;
        let credentials = place
            .credentials
            .clone()
            .ok_or_else(|| IsolationError::Failed("no credentials for the session".into()))?;
        plan.uid = Some(credentials.uid);
        plan.gid = Some(credentials.gid);
        let holder = HolderSpec {
            session: id.clone(),
            placement: place.placement.clone(),
            share_net: plan.share_net,
            private_tmp: plan.profile == spec::Profile::Strict,
            userns: (plan.uid_mode == spec::UidMode::Userns)
                .then_some((credentials.uid, credentials.gid)),
            mounts: plan.mounts(),
            owner: Some((credentials.uid, credentials.gid)),
            upper_root: self.config.layers_dir.clone(),
            hidden: self.hidden(),
            live: self.session_ids(),
            probe: false,
        };
        let (line, driver) = self.start_holder(&holder).await?;
        let pid: i32 = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| IsolationError::Failed(format!("the session's holder said {line:?}")))?;
        let pid1 = match ProcessIdentity::of(pid) {
            Ok(p) => p,
            Err(e) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(IsolationError::Failed(format!(
                    "the session's PID 1 is gone: {e}"
                )));
            }
        };
        let env = self.session_env(&plan, &place);
        let home = env
            .iter()
            .rev()
            .find(|(k, _)| k == "HOME")
            .map_or_else(|| "/".to_string(), |(_, v)| v.clone());
        let container = place.placement.clone();
        let start = StartIn {
            clear_env: true,
            env,
            placement: Some(Placement {
                target: pid1,
                method: Method::Namespaces,
                cgroups: container
                    .as_ref()
                    .map(|c| c.cgroups.clone())
                    .unwrap_or_default(),
                bounding_set: match &container {
                    Some(c) => c.bounding_set,
                    None => crate::process::enter::bounding_set().unwrap_or(u64::MAX),
                },
                no_new_privs: container.as_ref().is_some_and(|c| c.no_new_privs),
            }),
            credentials: Some(credentials.clone()),
            root: PathBuf::from(format!("/proc/{pid}/root")),
        };
        let (ended_tx, ended) = watch::channel(false);
        let now = Utc::now();
        let session = Arc::new(Session {
            id: id.clone(),
            created_at: now,
            plan,
            keeper: driver.task_pid(),
            holder,
            start,
            credentials,
            home,
            pid1,
            state: Mutex::new(State::Active),
            runs: Mutex::new(Vec::new()),
            last_activity: Mutex::new((Instant::now(), now)),
            ended,
        });
        self.lock().insert(id.clone(), Arc::clone(&session));
        let watcher = Arc::clone(&session);
        let launcher = Arc::clone(&self.launcher);
        tokio::spawn(async move {
            let mut driver = driver;
            let record = loop {
                if let Driven::Ended(record) = driver.next().await {
                    break record;
                }
            };
            {
                let mut state = watcher.lock_state();
                if *state == State::Active {
                    tracing::warn!(session = %watcher.id, outcome = ?record.outcome, "isolated session's holder ended by itself");
                    *state = State::Dead(format!(
                        "the session's processes ended ({:?})",
                        record.outcome
                    ));
                }
            }
            let _ = ended_tx.send(true);
            driver.finish(launcher);
        });
        tracing::info!(session = %id, pid1 = pid, "isolated session created");
        Ok(session.info())
    }

    /// What sessions must not see: the layers' directory and sandlet's own directories.
    fn hidden(&self) -> Vec<String> {
        let mut hidden = vec![self.config.layers_dir.clone()];
        hidden.extend(self.config.hidden.iter().cloned());
        hidden
    }

    /// One of `max_sessions` for session `id` while it is made, given back when it is made
    /// (then the session counts) or not.
    fn take_slot<'a>(&'a self, id: &str) -> Result<impl Drop + 'a, IsolationError> {
        struct Slot<'a>(&'a Isolation, String);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                self.0.lock_starting().retain(|s| *s != self.1);
            }
        }
        let table = self.lock();
        let mut starting = self.lock_starting();
        let active = table.values().filter(|s| s.is_active()).count() + starting.len();
        if active >= self.config.max_sessions {
            return Err(IsolationError::Limit(format!(
                "{active} isolated sessions exist; the limit is {} (--exec-isolation-max-sessions); delete one first",
                self.config.max_sessions
            )));
        }
        starting.push(id.to_string());
        Ok(Slot(self, id.to_string()))
    }

    /// Starts a holder and waits for its first line (`ready`, `probe` or an error).
    async fn start_holder(&self, spec: &HolderSpec) -> Result<(String, Driver), IsolationError> {
        let dir = self.exec.data_dir.join("isolated");
        let file = dir.join(format!("{}-{}.json", spec.session, uuid_v4()));
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            crate::atomic_file::write_json(&file, spec, crate::atomic_file::Durability::Atomic)
        });
        written
            .map_err(|e| IsolationError::Failed(format!("cannot write {}: {e}", file.display())))?;
        let spawn_spec = Spawn {
            script: String::new(),
            argv: Some(vec![
                "/proc/self/exe".into(),
                ROLE.into(),
                file.to_string_lossy().into_owned(),
            ]),
            interactive: false,
            cwd: None,
            envs: Vec::new(),
            env_override: None,
            env_file: None,
            uid: None,
            gid: None,
            output: OutputMode::Stream,
            dir: None,
            log_limit: self.exec.log_limit,
        };
        // Next to sandlet: in sidecar mode the holder enters the main container itself.
        let started = spawn(&self.launcher, None, spawn_spec)
            .await
            .map_err(|e| match e {
                SpawnError::Invalid(m) | SpawnError::Failed(m) => IsolationError::Failed(m),
            })?;
        let (_, interrupts) = mpsc::unbounded_channel();
        let mut driver = Driver::new(started, None, interrupts, false);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let first = tokio::time::timeout(SETUP_TIMEOUT, async {
            loop {
                match driver.next().await {
                    Driven::Output(1, data) => {
                        out.extend_from_slice(&data);
                        if let Some(end) = out.iter().position(|b| *b == b'\n') {
                            return Ok(String::from_utf8_lossy(&out[..end]).into_owned());
                        }
                    }
                    Driven::Output(_, data) => err.extend_from_slice(&data),
                    Driven::Ping => {}
                    Driven::Ended(record) => {
                        return Err(format!(
                            "the session's holder ended ({:?}) before it was ready: {}",
                            record.outcome,
                            String::from_utf8_lossy(&err).trim()
                        ));
                    }
                }
            }
        })
        .await;
        let line = match first {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => {
                driver.finish(Arc::clone(&self.launcher));
                return Err(IsolationError::Failed(e));
            }
            Err(_) => {
                driver.kill_leftovers();
                driver.finish(Arc::clone(&self.launcher));
                return Err(IsolationError::Failed(format!(
                    "the session was not set up within {SETUP_TIMEOUT:?}"
                )));
            }
        };
        if let Some(e) = HolderError::from_line(&line) {
            let mut driver = driver;
            while !matches!(driver.next().await, Driven::Ended(_)) {}
            driver.finish(Arc::clone(&self.launcher));
            return Err(match e {
                HolderError::Invalid(m) => IsolationError::Invalid(m),
                HolderError::Unsupported(m) => IsolationError::Unsupported(m),
                HolderError::Failed(m) => IsolationError::Failed(m),
            });
        }
        Ok((line, driver))
    }

    /// `user[:group]` for `start_in`: the plan's ids over the sandbox's own user's.
    fn user_of(&self, plan: &Plan) -> Result<String, IsolationError> {
        let default_uid = match &self.target {
            None => nix::unistd::geteuid().as_raw(),
            Some(watch) => {
                watch
                    .current()
                    .map_err(IsolationError::Unavailable)?
                    .target
                    .uid
            }
        };
        Ok(match (plan.uid, plan.gid) {
            (uid, Some(gid)) => format!("{}:{gid}", uid.unwrap_or(default_uid)),
            (uid, None) => uid.unwrap_or(default_uid).to_string(),
        })
    }

    /// Where a session is made: the sandbox (the main container in sidecar mode), as `user`.
    fn sandbox_place(&self, user: &str) -> Result<StartIn, IsolationError> {
        let place = start_in(self.target.as_deref(), user).map_err(|e| match e {
            PlaceError::Unavailable(m) => IsolationError::Unavailable(m),
            PlaceError::User(m) => IsolationError::Invalid(m),
        })?;
        if let Some(p) = &place.placement
            && p.method != Method::Namespaces
        {
            return Err(IsolationError::Unsupported(
                "sandlet cannot enter the main container's namespaces (it lacks CAP_SYS_ADMIN), so it cannot make sessions there".into(),
            ));
        }
        Ok(place)
    }

    /// The environment a session's runs start from: what a command would get (with the
    /// `EXECD_ENVS` file), less what `env_passthrough` keeps out, with the session user's `HOME`
    /// and `USER`.
    fn session_env(&self, plan: &Plan, place: &StartIn) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = if place.clear_env {
            place.env.clone()
        } else {
            std::env::vars().chain(place.env.iter().cloned()).collect()
        };
        if let Some(file) = &self.exec.env_file {
            let vars = file.variables(&place.root, &env);
            env.extend(vars);
        }
        let account: Vec<(String, String)> = place
            .env
            .iter()
            .filter(|(k, _)| k == "HOME" || k == "USER")
            .cloned()
            .collect();
        env.retain(|(k, _)| plan.passes(k));
        env.extend(account);
        env
    }

    pub fn list(&self) -> Value {
        self.evict_idle();
        let sessions: Vec<Value> = self
            .lock()
            .values()
            .map(|s| {
                let state = s.status();
                json!({
                    "session_id": s.id,
                    "status": state["status"],
                    "created_at": state["created_at"],
                    "last_run_at": state["last_run_at"],
                    "idle_remaining_seconds": state["idle_remaining_seconds"],
                })
            })
            .collect();
        json!({"sessions": sessions})
    }

    /// A session, with its idle timeout applied first (the sweep runs only now and then).
    pub fn get(&self, id: &str) -> Result<Arc<Session>, IsolationError> {
        self.evict_idle();
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| IsolationError::NotFound(format!("isolated session {id} not found")))
    }

    /// An active session, for what only runs in one.
    fn active(&self, id: &str) -> Result<Arc<Session>, IsolationError> {
        let session = self.get(id)?;
        match &*session.lock_state() {
            State::Active => Ok(Arc::clone(&session)),
            State::Dead(why) => Err(IsolationError::Conflict(format!(
                "isolated session {id} is dead: {why}"
            ))),
            State::Destroyed => Err(IsolationError::Conflict(format!(
                "isolated session {id} was destroyed after being idle for {} s",
                session.plan.idle_timeout_seconds
            ))),
        }
    }

    /// `DELETE /v1/isolated/session/{id}`: ends the session (every process of it) and forgets
    /// it and its runs; returns once its processes are gone.
    pub async fn delete(&self, id: &str) -> Result<(), IsolationError> {
        let session = self
            .lock()
            .shift_remove(id)
            .ok_or_else(|| IsolationError::NotFound(format!("isolated session {id} not found")))?;
        session.end(State::Destroyed);
        let mut ended = session.ended.clone();
        let _ = tokio::time::timeout(END_WAIT, ended.wait_for(|e| *e)).await;
        self.commands.forget(&session.lock_runs());
        tracing::info!(session = id, "isolated session deleted");
        Ok(())
    }

    /// Ends sessions idle longer than their timeout (a run in progress keeps one alive), and
    /// forgets ended ones older than the command retention.
    pub fn evict_idle(&self) {
        let sessions: Vec<Arc<Session>> = self.lock().values().cloned().collect();
        for session in sessions {
            if session.is_active()
                && let Some(remaining) = session.idle_remaining(&self.commands)
                && remaining == 0
            {
                tracing::info!(session = %session.id, "isolated session idle too long; destroyed");
                session.end(State::Destroyed);
            }
            let age = session.lock_activity().0.elapsed();
            if !session.is_active() && age > self.exec.keep_finished_for {
                self.lock().shift_remove(&session.id);
                self.commands.forget(&session.lock_runs());
            }
        }
    }

    /// `POST /v1/isolated/session/{id}/run`: a run's event stream (foreground) or its start.
    pub async fn run(
        &self,
        id: &str,
        code: String,
        envs: Vec<(String, String)>,
        timeout: Option<Duration>,
        background: bool,
    ) -> Result<Result<mpsc::Receiver<Bytes>, BackgroundRun>, IsolationError> {
        let session = self.active(id)?;
        let run_id = uuid_v4();
        session.lock_runs().push(run_id.clone());
        let request = Request {
            id: Some(run_id.clone()),
            place: Some(session.start.clone()),
            stop_when_client_leaves: !background,
            command: code,
            argv: None,
            cwd: Some(session.plan.default_cwd().to_string()),
            envs,
            uid: None,
            gid: None,
            timeout: if background { None } else { timeout },
            background,
        };
        let frames = self.commands.run(request).await.map_err(|e| match e {
            CommandError::Invalid(m) => IsolationError::Invalid(m),
            CommandError::Limit(m) => IsolationError::Limit(m),
            CommandError::NotFound(m) | CommandError::NotRunning(m) => IsolationError::Failed(m),
        })?;
        if !background {
            return Ok(Ok(frames));
        }
        let started_at = self
            .commands
            .status(&run_id)
            .map(|(c, _)| c.started_at)
            .unwrap_or_else(Utc::now);
        Ok(Err(BackgroundRun {
            session_id: session.id.clone(),
            run_id,
            started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        }))
    }

    /// `GET /v1/isolated/session/{id}/runs/{run}`.
    pub fn run_status(&self, id: &str, run: &str) -> Result<Value, IsolationError> {
        let session = self.get(id)?;
        let not_found = || IsolationError::NotFound(format!("run {run} not found in session {id}"));
        if !session.lock_runs().iter().any(|r| r == run) {
            return Err(not_found());
        }
        let (command, status) = self.commands.status(run).ok_or_else(not_found)?;
        let time = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        let mut answer = json!({
            "session_id": id,
            "run_id": run,
            "running": status.running,
            "started_at": time(command.started_at),
        });
        if let Some(f) = status.finished {
            answer["exit_code"] = json!(f.exit_code);
            answer["finished_at"] = json!(time(f.at));
            if !f.error.is_empty() {
                answer["error"] = json!(f.error);
            }
        }
        Ok(answer)
    }

    /// `GET /v1/isolated/session/{id}/runs/{run}/logs?cursor=`: bytes from `cursor`, next cursor.
    pub fn run_logs(
        &self,
        id: &str,
        run: &str,
        cursor: u64,
        max: usize,
    ) -> Result<(Vec<u8>, u64), IsolationError> {
        let session = self.get(id)?;
        if !session.lock_runs().iter().any(|r| r == run) {
            return Err(IsolationError::NotFound(format!(
                "run {run} not found in session {id}"
            )));
        }
        self.commands.logs(run, cursor, max).map_err(|e| match e {
            CommandError::NotFound(m) => IsolationError::NotFound(m),
            CommandError::Invalid(m) => IsolationError::Invalid(m),
            CommandError::Limit(m) | CommandError::NotRunning(m) => IsolationError::Failed(m),
        })
    }

    /// The session's files, as its user, below its mounts.
    pub fn files(&self, id: &str) -> Result<Arc<Files>, IsolationError> {
        let session = self.active(id)?;
        Ok(self.files.in_session(SessionView {
            root: session.start.root.clone(),
            credentials: session.credentials.clone(),
            home: session.home.clone(),
            cwd: session.plan.default_cwd().to_string(),
            within: session.plan.file_roots(),
        }))
    }

    /// The sandbox's files as the session's user, and the session's persistent layers: what
    /// `diff` and `commit` work on.
    pub fn layers(&self, id: &str) -> Result<(Arc<Files>, Vec<Layer>), IsolationError> {
        let session = self.active(id)?;
        let layers: Vec<Layer> = session
            .holder
            .mounts
            .iter()
            .enumerate()
            .filter_map(|(i, m)| match m {
                MountSpec::Overlay {
                    path,
                    persist: true,
                } => Some(Layer {
                    path: path.clone(),
                    upper: format!("{}/upper", session.holder.layer_dir(i)),
                }),
                _ => None,
            })
            .collect();
        if layers.is_empty() {
            return Err(IsolationError::NotFound(format!(
                "isolated session {id} has no persistent overlay: nothing was kept to diff or commit"
            )));
        }
        let files = self.files.in_session(SessionView {
            root: PathBuf::from(format!("/proc/{}/root", session.keeper)),
            credentials: session.credentials.clone(),
            home: session.home.clone(),
            cwd: "/".into(),
            within: Vec::new(),
        });
        Ok((files, layers))
    }

    /// Whether a run of the session is in progress (commit waits for none).
    pub fn has_active_runs(&self, id: &str) -> bool {
        self.get(id)
            .is_ok_and(|s| s.active_runs(&self.commands) > 0)
    }

    /// Sessions alive or being made.
    fn session_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.extend(self.lock_starting().iter().cloned());
        ids
    }

    fn lock_starting(&self) -> MutexGuard<'_, Vec<String>> {
        self.starting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, IndexMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Session {
    fn is_active(&self) -> bool {
        *self.lock_state() == State::Active
    }

    /// Ends the session: SIGKILL to its PID 1, which the kernel follows with every process of
    /// the session; the holder then removes its persistent layers and exits.
    fn end(&self, why: State) {
        let mut state = self.lock_state();
        if *state == State::Active {
            *state = why;
        }
        let _ = crate::process::signal_identity(self.pid1, libc::SIGKILL);
    }

    fn active_runs(&self, commands: &Commands) -> usize {
        self.lock_runs()
            .iter()
            .filter(|r| commands.status(r).is_some_and(|(_, s)| s.running))
            .count()
    }

    /// Seconds until an idle session ends; `None` without a timeout. A run in progress keeps
    /// the whole timeout ahead (and the last run's end starts it again).
    fn idle_remaining(&self, commands: &Commands) -> Option<u64> {
        let timeout = self.plan.idle_timeout_seconds;
        if timeout == 0 {
            return None;
        }
        let runs: Vec<String> = self.lock_runs().clone();
        let mut last = *self.lock_activity();
        let mut running = false;
        for run in &runs {
            match commands.status(run) {
                Some((_, s)) if s.running => running = true,
                Some((_, s)) => {
                    if let Some(f) = s.finished
                        && f.at > last.1
                    {
                        let ago = (Utc::now() - f.at).to_std().unwrap_or_default();
                        last = (Instant::now() - ago, f.at);
                    }
                }
                None => {}
            }
        }
        *self.lock_activity() = last;
        if running {
            return Some(timeout);
        }
        Some(timeout.saturating_sub(last.0.elapsed().as_secs()))
    }

    /// `GET /v1/isolated/session/{id}`: its state and what it was made with.
    pub fn status_with(&self, commands: &Commands) -> Value {
        let idle = if self.is_active() {
            self.idle_remaining(commands)
        } else {
            None
        };
        let mut state = self.status();
        state["idle_remaining_seconds"] = json!(idle);
        state
    }

    fn status(&self) -> Value {
        let mut state = serde_json::to_value(&self.plan).unwrap_or_default();
        let time = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        state["status"] = json!(self.lock_state().name());
        state["session_id"] = json!(self.id);
        state["created_at"] = json!(time(self.created_at));
        state["last_run_at"] = json!(time(self.lock_activity().1));
        state["idle_remaining_seconds"] = Value::Null;
        state
    }

    /// What `POST /v1/isolated/session` answers: the id, the time and the plan.
    fn info(&self) -> Value {
        let mut info = serde_json::to_value(&self.plan).unwrap_or_default();
        info["session_id"] = json!(self.id);
        info["created_at"] = json!(
            self.created_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        );
        info
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_runs(&self) -> MutexGuard<'_, Vec<String>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_activity(&self) -> MutexGuard<'_, (Instant, DateTime<Utc>)> {
        self.last_activity.lock().unwrap_or_else(|e| e.into_inner())
    }
}
