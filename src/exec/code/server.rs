//! Where the Jupyter server is: the one `JUPYTER_HOST` names (execd's way), or one sandlet
//! starts on demand and supervises.
//!
//! A managed server runs as the sandbox's process, placed like a command (sidecar mode: inside
//! the main container, as its user), under a shim through the same launcher, with its output in
//! a bounded log. It listens on 127.0.0.1:`JUPYTER_PORT` (44771, where the code-interpreter
//! image has it) with a random token only sandlet knows. It is started by the first call that
//! needs it, or by the first connection to that port: until then sandlet itself listens there
//! (socket activation), because the code-interpreter SDK checks that something accepts
//! connections on the port before its first call. When the server ends, its kernels are gone;
//! sandlet listens on the port again and starts a new server on the next demand.
//!
//! In sidecar mode, a main container whose environment names `JUPYTER_HOST` (the
//! code-interpreter image's, which starts its own server) gets that server used, as execd
//! inside it would: sandlet then starts nothing and leaves the port alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::CodeError;
use super::jupyter::Jupyter;
use crate::container::TargetWatch;
use crate::exec::run::{Driven, Driver, Spawn, SpawnError, locate_program, spawn};
use crate::process::shim::{COMBINED_LOG, OutputMode};
use crate::process::{Launcher, Outcome};

/// Between two looks at a starting server.
const READY_POLL: Duration = Duration::from_millis(50);
/// Bytes of the end of a failed server's log quoted in the error.
const LOG_TAIL: u64 = 2000;

/// How a managed server is started.
#[derive(Debug, Clone)]
pub struct ManagedConfig {
    /// `jupyter-server`, or a path to it.
    pub command: String,
    pub port: u16,
    pub start_timeout: Duration,
    /// Its output log's directory.
    pub log_dir: std::path::PathBuf,
    pub log_limit: u64,
}

pub enum Backend {
    /// `JUPYTER_HOST`: someone else's server; sandlet neither starts nor stops it.
    External(Jupyter),
    Managed(Arc<Managed>),
}

impl Backend {
    /// The server to talk to (starting a managed one), and its incarnation: kernels of another
    /// incarnation are gone.
    pub async fn endpoint(&self) -> Result<(Jupyter, u64), CodeError> {
        match self {
            Backend::External(jupyter) => Ok((jupyter.clone(), 0)),
            Backend::Managed(managed) => managed.endpoint().await,
        }
    }

    /// The incarnation running now, if one is (an external server is taken to be up).
    pub fn incarnation(&self) -> Option<u64> {
        match self {
            Backend::External(_) => Some(0),
            Backend::Managed(managed) => managed.running_incarnation(),
        }
    }
}

pub struct Managed {
    config: ManagedConfig,
    launcher: Arc<Launcher>,
    target: Option<Arc<TargetWatch>>,
    /// Held while a server starts, so that concurrent callers wait for the same one.
    state: Mutex<State>,
    /// The incarnation running now; 0 while none runs.
    running: AtomicU64,
    incarnations: AtomicU64,
    activation: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// `named_by_container`'s last answer: host, token and the client made for them.
    named: std::sync::Mutex<Option<(String, String, Jupyter)>>,
}

enum State {
    Stopped,
    Running { jupyter: Jupyter, incarnation: u64 },
}

impl Managed {
    pub fn new(
        config: ManagedConfig,
        launcher: Arc<Launcher>,
        target: Option<Arc<TargetWatch>>,
    ) -> Arc<Managed> {
        let managed = Arc::new(Managed {
            config,
            launcher,
            target,
            state: Mutex::new(State::Stopped),
            running: AtomicU64::new(0),
            incarnations: AtomicU64::new(0),
            activation: std::sync::Mutex::new(None),
            named: std::sync::Mutex::new(None),
        });
        // Listening on the port only where a server would start: where Jupyter is missing the
        // SDK's check then tells the truth, and a server the main container starts itself
        // finds its port free. In sidecar mode that is known once the container is found.
        match managed.target.clone() {
            None => managed.listen_if_installed(),
            Some(target) => {
                let managed = Arc::downgrade(&managed);
                tokio::spawn(async move {
                    target.located().await;
                    if let Some(managed) = managed.upgrade()
                        && managed.named_by_container().is_none()
                    {
                        managed.listen_if_installed();
                    }
                });
            }
        }
        managed
    }

    fn listen_if_installed(self: &Arc<Self>) {
        match locate_program(self.target.as_deref(), &self.config.command) {
            Ok(None) => tracing::info!(
                command = %self.config.command,
                "Jupyter is not installed; /code answers that it is not, and nothing listens on the Jupyter port"
            ),
            Ok(Some(_)) | Err(_) => self.listen_for_activation(),
        }
    }

    /// The server the main container's environment names (sidecar mode), if it names one.
    fn named_by_container(&self) -> Option<Jupyter> {
        let located = self.target.as_deref()?.current().ok()?;
        let var = |name: &str| {
            located
                .environ
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let host = var("JUPYTER_HOST").filter(|h| !h.is_empty())?;
        let token = var("JUPYTER_TOKEN").unwrap_or_default();
        let mut named = self.named.lock().unwrap_or_else(|e| e.into_inner());
        match &*named {
            Some((h, t, jupyter)) if *h == host && *t == token => Some(jupyter.clone()),
            _ => match Jupyter::new(&host, &token) {
                Ok(jupyter) => {
                    *named = Some((host, token, jupyter.clone()));
                    Some(jupyter)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the main container's JUPYTER_HOST is not usable; ignored");
                    None
                }
            },
        }
    }

    fn running_incarnation(&self) -> Option<u64> {
        if self.named_by_container().is_some() {
            return Some(0);
        }
        match self.running.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    async fn endpoint(self: &Arc<Self>) -> Result<(Jupyter, u64), CodeError> {
        if let Some(jupyter) = self.named_by_container() {
            return Ok((jupyter, 0));
        }
        let mut state = self.state.lock().await;
        if let State::Running {
            jupyter,
            incarnation,
        } = &*state
        {
            return Ok((jupyter.clone(), *incarnation));
        }
        let handle = self
            .activation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(listening) = handle {
            // The port is free for Jupyter once the listener is gone.
            listening.abort();
            let _ = listening.await;
        }
        match self.start().await {
            Ok((jupyter, incarnation)) => {
                *state = State::Running {
                    jupyter: jupyter.clone(),
                    incarnation,
                };
                self.running.store(incarnation, Ordering::Release);
                Ok((jupyter, incarnation))
            }
            Err(e) => {
                if !matches!(e, CodeError::NotInstalled(_)) {
                    self.listen_for_activation();
                }
                Err(e)
            }
        }
    }

    /// Starts a server and waits until it answers.
    async fn start(self: &Arc<Self>) -> Result<(Jupyter, u64), CodeError> {
        let config = &self.config;
        match locate_program(self.target.as_deref(), &config.command) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(CodeError::NotInstalled(format!(
                    "Jupyter is not installed in the sandbox: {} is not on its PATH (install jupyter_server and a kernel, e.g. `pip install jupyter_server ipykernel`, or point JUPYTER_HOST at a running server)",
                    config.command
                )));
            }
            Err(e) => return Err(CodeError::Unavailable(e)),
        }
        let token = crate::exec::new_id();
        let jupyter = Jupyter::new(&format!("http://127.0.0.1:{}", config.port), &token)
            .map_err(CodeError::Unavailable)?;
        let _ = std::fs::remove_dir_all(&config.log_dir);
        std::fs::create_dir_all(&config.log_dir).map_err(|e| {
            CodeError::Unavailable(format!("cannot create {}: {e}", config.log_dir.display()))
        })?;
        // The server's root is `/`, so a context's directory is its notebook path as it is.
        let script = format!(
            "{} --allow-root --ServerApp.ip=127.0.0.1 --ServerApp.port={} --ServerApp.port_retries=0 --ServerApp.root_dir=/ --ServerApp.open_browser=False",
            config.command, config.port
        );
        let spec = Spawn {
            script,
            argv: None,
            interactive: false,
            cwd: None,
            // Read by jupyter_server as its token: not on the command line for `ps` to show.
            envs: vec![("JUPYTER_TOKEN".into(), token)],
            env_override: None,
            env_file: None,
            uid: None,
            gid: None,
            output: OutputMode::Combined,
            dir: Some(config.log_dir.clone()),
            log_limit: config.log_limit,
        };
        let started = spawn(&self.launcher, self.target.as_deref(), spec)
            .await
            .map_err(|e| match e {
                SpawnError::Invalid(m) | SpawnError::Failed(m) => {
                    CodeError::Unavailable(format!("cannot start Jupyter: {m}"))
                }
            })?;
        let incarnation = self.incarnations.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::info!(
            incarnation,
            port = config.port,
            pid = started.tree.pgid,
            "starting Jupyter"
        );
        let (stop, stops) = mpsc::unbounded_channel();
        let (ended_tx, mut ended) = oneshot::channel();
        let driver = Driver::new(started, None, stops, false);
        tokio::spawn(Arc::clone(self).supervise(driver, incarnation, ended_tx));
        let deadline = tokio::time::Instant::now() + config.start_timeout;
        loop {
            if jupyter.answers().await {
                tracing::info!(incarnation, "Jupyter is up");
                return Ok((jupyter, incarnation));
            }
            tokio::select! {
                outcome = &mut ended => {
                    let how = outcome.unwrap_or_else(|_| "ended".into());
                    return Err(CodeError::Unavailable(format!(
                        "Jupyter {how} while starting; the end of its log: {}",
                        self.log_tail()
                    )));
                }
                _ = tokio::time::sleep(READY_POLL) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = stop.send(());
                return Err(CodeError::Unavailable(format!(
                    "Jupyter did not answer within {:?} (--jupyter-start-timeout-seconds) and was stopped; the end of its log: {}",
                    config.start_timeout,
                    self.log_tail()
                )));
            }
        }
    }

    /// Follows a server to its end; then its kernels are gone and the port is listened on
    /// again.
    async fn supervise(
        self: Arc<Self>,
        mut driver: Driver,
        incarnation: u64,
        ended: oneshot::Sender<String>,
    ) {
        let record = loop {
            if let Driven::Ended(record) = driver.next().await {
                break record;
            }
        };
        // Its kernels would live on as orphans: they go with it.
        driver.kill_leftovers();
        driver.finish(Arc::clone(&self.launcher));
        let how = match record.outcome {
            Outcome::Exited { code } => format!("exited with code {code}"),
            Outcome::Signaled { signal } => format!("was killed by signal {signal}"),
            Outcome::StartFailed { message } => format!("could not start ({message})"),
            Outcome::Lost { message, .. } => format!("was lost ({message})"),
        };
        tracing::warn!(
            incarnation,
            "Jupyter {how}; its kernels are gone; the next call starts a new one"
        );
        let _ = ended.send(how);
        let mut state = self.state.lock().await;
        if matches!(&*state, State::Running { incarnation: i, .. } if *i == incarnation) {
            *state = State::Stopped;
            self.running.store(0, Ordering::Release);
            self.listen_for_activation();
        }
    }

    /// Listens on the Jupyter port until the first connection, which starts the server.
    fn listen_for_activation(self: &Arc<Self>) {
        let port = self.config.port;
        let managed = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(port, error = %e, "cannot listen on the Jupyter port; Jupyter starts at the first /code call instead");
                    return;
                }
            };
            let Ok((connection, _)) = listener.accept().await else {
                return;
            };
            drop(connection);
            drop(listener);
            let Some(managed) = managed.upgrade() else {
                return;
            };
            // The handle of this task is taken by `endpoint`, which aborts it: the start goes
            // on in a task of its own.
            tokio::spawn(async move {
                if let Err(e) = managed.endpoint().await {
                    tracing::warn!(error = %e, "Jupyter, started by a connection to its port, did not come up");
                }
            });
        });
        let old = self
            .activation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task);
        if let Some(old) = old {
            old.abort();
        }
    }

    fn log_tail(&self) -> String {
        let chunk = crate::process::read_log(&self.config.log_dir, COMBINED_LOG, u64::MAX, 0)
            .ok()
            .map(|c| c.end)
            .and_then(|end| {
                crate::process::read_log(
                    &self.config.log_dir,
                    COMBINED_LOG,
                    end.saturating_sub(LOG_TAIL),
                    LOG_TAIL as usize,
                )
                .ok()
            });
        match chunk {
            Some(c) if !c.data.is_empty() => String::from_utf8_lossy(&c.data).trim().to_string(),
            _ => "(empty)".into(),
        }
    }
}
