//! sandlet's side of starting a task: hand the task to a shim, wait for its start report, and
//! return what it takes to watch the task end.
//!
//! Shims are kept started ahead of need, already exec'd and waiting for a spec, so a start
//! costs one fork+exec (the task's) on the critical path instead of two. When the idle ones run
//! out, the next is started once the task has started. A shim started with
//! [`ShimSpec::reuse`] (the exec API's commands) comes back idle once its run and its tree are
//! gone, so a steady stream of commands forks no shims at all.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::fcntl::OFlag;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;

use super::shim::{ROLE, ShimSpec};
use super::{EXIT_FILE, ExitRecord, Outcome, PidFd, ProcessIdentity, Reaper};
use crate::atomic_file;

/// How long a shim may take to report that the task started.
const START_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exit may take to be recorded after the task's process is seen gone.
const EXIT_RECORD_WAIT: Duration = Duration::from_secs(5);
/// Idle shims kept at most; more are let go (a burst of commands does not leave a crowd).
const MAX_IDLE_SHIMS: usize = 4;

pub struct Launched {
    pub shim: ProcessIdentity,
    /// The shim is sandlet's child: whoever holds this reaps it through the [`Reaper`].
    pub shim_pidfd: PidFd,
    pub task: ProcessIdentity,
    pub started_at: DateTime<Utc>,
    pub exit: ExitWatch,
    /// A reusable shim's spec pipe: with its reports (in `exit`), what [`Launcher::idle`] needs.
    pub next_spec: Option<pipe::Sender>,
}

/// A started shim, idle until it is sent a spec.
struct Shim {
    pid: i32,
    pidfd: PidFd,
    spec: pipe::Sender,
    reports: Reports,
}

/// A shim's report pipe: lines (`S`, `E`, `X`), and with [`super::shim::OutputMode::Stream`]
/// output frames (`O<stream> <len>`, then the bytes).
pub struct Reports(BufReader<pipe::Receiver>);

/// Upper bound of one output frame, far above the shim's read buffer: anything larger is a
/// corrupt stream.
const MAX_FRAME: usize = 1 << 20;

/// What a shim reports after the start.
pub enum ShimEvent {
    /// Output of stream 1 (stdout) or 2 (stderr).
    Output(u8, Vec<u8>),
    Ended(ExitRecord),
}

impl Reports {
    /// Waits for a reusable shim to report that its run's tree is gone and it is idle; false
    /// when the shim ended (or sent anything else) instead.
    pub async fn idle(&mut self) -> bool {
        matches!(self.line().await, Ok(Some(line)) if line == "R")
    }

    async fn line(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        if self.0.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        if line.ends_with('\n') {
            line.pop();
        }
        Ok(Some(line))
    }
}

pub struct Launcher {
    reaper: Arc<Reaper>,
    idle: Mutex<Vec<Shim>>,
}

impl Launcher {
    pub fn new(reaper: Arc<Reaper>) -> Arc<Launcher> {
        Arc::new(Launcher {
            reaper,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn reaper(&self) -> &Reaper {
        &self.reaper
    }

    /// Starts a task. `Err` is a message for a task that could not start.
    pub async fn launch(self: &Arc<Self>, spec: ShimSpec) -> Result<Launched, String> {
        // In sidecar mode the directory is in the main container; the shim's child finds it there.
        if spec.placement.is_none()
            && let Some(dir) = &spec.working_dir
            && !dir.is_dir()
        {
            return Err(format!(
                "workingDir {} does not exist or is not a directory",
                dir.display()
            ));
        }
        let mut line = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let spare = self.idle_shims().pop();
        let shim = match spare {
            Some(mut shim) => match shim.spec.write_all(&line).await {
                Ok(()) => shim,
                // The shim died while idle (killed from outside): use a fresh one.
                Err(e) => {
                    tracing::warn!(pid = shim.pid, error = %e, "idle shim is gone; starting a fresh one");
                    self.discard(shim).await;
                    self.fresh_shim(&line).await?
                }
            },
            None => self.fresh_shim(&line).await?,
        };
        let task_dir = spec.task_dir.clone();
        let started = self.await_start(shim).await;
        // Refill off the critical path: the task has started (or failed) by now. The fork+exec
        // runs on a blocking thread, not on a runtime worker that serves requests.
        if self.idle_shims().is_empty() {
            let launcher = Arc::clone(self);
            tokio::task::spawn_blocking(move || launcher.refill());
        }
        let (shim_pid, shim_pidfd, reports, spec_pipe, (task, shim_ticks, started_at)) = started?;
        Ok(Launched {
            shim: ProcessIdentity {
                pid: shim_pid,
                start_ticks: shim_ticks,
            },
            shim_pidfd,
            task,
            started_at,
            exit: ExitWatch::Report {
                reports,
                dir: task_dir,
            },
            next_spec: spec.reuse.then_some(spec_pipe),
        })
    }

    /// Takes back a reusable shim whose run is over: `reports` has just said it is idle.
    pub fn idle(&self, pid: i32, pidfd: PidFd, spec: pipe::Sender, reports: Reports) {
        let mut idle = self.idle_shims();
        if idle.len() < MAX_IDLE_SHIMS {
            idle.push(Shim {
                pid,
                pidfd,
                spec,
                reports,
            });
            return;
        }
        drop(idle);
        // Its spec pipe closes here: the shim reads the end of it and exits.
        drop(spec);
        let reaper = Arc::clone(&self.reaper);
        tokio::spawn(async move {
            let _ = pidfd.exited().await;
            reaper.reap_owned(&pidfd);
        });
    }

    fn idle_shims(&self) -> std::sync::MutexGuard<'_, Vec<Shim>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn fresh_shim(&self, spec_line: &[u8]) -> Result<Shim, String> {
        let mut shim = self
            .start_shim()
            .map_err(|e| format!("cannot start the task's shim: {e}"))?;
        if let Err(e) = shim.spec.write_all(spec_line).await {
            self.discard(shim).await;
            return Err(format!("the task's shim could not be reached: {e}"));
        }
        Ok(shim)
    }

    /// Waits for the start report of a shim that has its spec.
    #[allow(clippy::type_complexity)]
    async fn await_start(
        &self,
        mut shim: Shim,
    ) -> Result<
        (
            i32,
            PidFd,
            Reports,
            pipe::Sender,
            (ProcessIdentity, u64, DateTime<Utc>),
        ),
        String,
    > {
        let failure = match tokio::time::timeout(START_REPORT_TIMEOUT, shim.reports.line()).await {
            Ok(Ok(Some(line))) => match parse_start(&line) {
                Ok(started) => {
                    return Ok((shim.pid, shim.pidfd, shim.reports, shim.spec, started));
                }
                Err(message) => message,
            },
            Err(_) => "the task's shim did not report within 10 s".into(),
            Ok(Err(e)) => format!("the task's shim could not be read: {e}"),
            Ok(Ok(None)) => "the task's shim exited without a report".into(),
        };
        self.discard(shim).await;
        Err(failure)
    }

    async fn discard(&self, shim: Shim) {
        let _ = shim.pidfd.send_signal(libc::SIGKILL);
        let _ = shim.pidfd.exited().await;
        self.reaper.reap_owned(&shim.pidfd);
    }

    fn refill(&self) {
        // Started outside the lock: a launch never waits for this fork+exec.
        match self.start_shim() {
            Ok(shim) => self.idle_shims().push(shim),
            Err(e) => {
                tracing::warn!(error = %e, "could not start a spare shim; the next task starts one itself")
            }
        }
    }

    fn start_shim(&self) -> io::Result<Shim> {
        let (spec_r, spec_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        super::grow_pipe(&report_w);
        let mut command = Command::new("/proc/self/exe");
        command
            .arg0(super::SHIM_ARGV0)
            .arg(ROLE)
            // Its own group: signals meant for sandlet's group (a terminal's Ctrl-C) skip the shims.
            .process_group(0)
            .stdin(Stdio::from(spec_r))
            .stdout(Stdio::from(report_w))
            .stderr(Stdio::null());
        let spawned = self.reaper.spawn_owned(|| command.spawn());
        // Our copies of the shim's ends go now, so EOF on either pipe means the other side is gone.
        drop(command);
        let (child, pidfd) = spawned?;
        Ok(Shim {
            pid: child.id() as i32,
            pidfd,
            spec: pipe::Sender::from_owned_fd(spec_w)?,
            reports: Reports(BufReader::with_capacity(
                256 << 10,
                pipe::Receiver::from_owned_fd(report_r)?,
            )),
        })
    }
}

fn parse_start(line: &str) -> Result<(ProcessIdentity, u64, DateTime<Utc>), String> {
    if let Some(message) = line.strip_prefix("E ") {
        return Err(message.to_string());
    }
    let fields: Vec<&str> = line
        .strip_prefix("S ")
        .unwrap_or_default()
        .split(' ')
        .collect();
    let parsed = match fields[..] {
        [pid, ticks, shim_ticks, nanos] => (|| {
            Some((
                ProcessIdentity {
                    pid: pid.parse().ok()?,
                    start_ticks: ticks.parse().ok()?,
                },
                shim_ticks.parse().ok()?,
                DateTime::from_timestamp_nanos(nanos.parse().ok()?),
            ))
        })(),
        _ => None,
    };
    parsed.ok_or_else(|| format!("the task's shim sent an unreadable report {line:?}"))
}

/// Learns how a task ended.
pub enum ExitWatch {
    /// A task this sandlet started: the shim reports on its pipe.
    Report { reports: Reports, dir: PathBuf },
    /// A task re-adopted after a restart: watched through its pidfd, read from the exit file.
    Adopted {
        task: PidFd,
        shim: ProcessIdentity,
        dir: PathBuf,
    },
    /// The ending has been reported.
    Done,
}

impl ExitWatch {
    /// The shim's report pipe, once the ending has been read from it.
    pub fn into_reports(self) -> Option<Reports> {
        match self {
            ExitWatch::Report { reports, .. } => Some(reports),
            _ => None,
        }
    }

    /// The next output frame or the ending; output is only reported in stream mode.
    pub async fn next(&mut self) -> ShimEvent {
        match self {
            ExitWatch::Report { reports, dir } => {
                // "O<n> <len>" + bytes, or "X <record>"; anything else (EOF: the shim died)
                // falls back to the exit file.
                if let Ok(Some(line)) = reports.line().await {
                    if let Some(frame) = line.strip_prefix('O')
                        && let Some((stream, len)) = frame.split_once(' ')
                        && let (Ok(stream), Ok(len)) = (stream.parse::<u8>(), len.parse::<usize>())
                        && len <= MAX_FRAME
                    {
                        let mut data = vec![0; len];
                        if reports.0.read_exact(&mut data).await.is_ok() {
                            return ShimEvent::Output(stream, data);
                        }
                    } else if let Some(record) = line
                        .strip_prefix("X ")
                        .and_then(|r| serde_json::from_str(r).ok())
                    {
                        return ShimEvent::Ended(record);
                    }
                }
                ShimEvent::Ended(read_exit_record(dir).unwrap_or_else(|| {
                    lost(
                        "ShimLost",
                        "the task's shim ended before it recorded the exit status; the process may have been killed along with it",
                    )
                }))
            }
            ExitWatch::Adopted { .. } => {
                let ExitWatch::Adopted { task, shim, dir } =
                    std::mem::replace(self, ExitWatch::Done)
                else {
                    unreachable!()
                };
                ShimEvent::Ended(adopted_end(task, shim, dir).await)
            }
            ExitWatch::Done => std::future::pending().await,
        }
    }

    pub async fn ended(mut self) -> ExitRecord {
        loop {
            if let ShimEvent::Ended(record) = self.next().await {
                return record;
            }
        }
    }
}

/// A re-adopted task ends when its process does; the shim records the exit right after reaping
/// it, so the record is waited for while the shim lives.
async fn adopted_end(task: PidFd, shim: ProcessIdentity, dir: PathBuf) -> ExitRecord {
    let _ = task.exited().await;
    let deadline = tokio::time::Instant::now() + EXIT_RECORD_WAIT;
    loop {
        if let Some(record) = read_exit_record(&dir) {
            return record;
        }
        if !shim.is_alive() || tokio::time::Instant::now() >= deadline {
            return read_exit_record(&dir).unwrap_or_else(|| {
                lost(
                    "ExitStatusLost",
                    "the task's process ended but its shim did not record the exit status",
                )
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub fn read_exit_record(dir: &Path) -> Option<ExitRecord> {
    match atomic_file::read_json(&dir.join(EXIT_FILE)) {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "unreadable exit record");
            None
        }
    }
}

fn lost(reason: &str, message: &str) -> ExitRecord {
    ExitRecord {
        finished_at: Utc::now(),
        outcome: Outcome::Lost {
            reason: reason.into(),
            message: message.into(),
        },
    }
}
