//! sandlet's side of starting a task: spawn the shim, wait for its start report, and hand back
//! what it takes to watch the task end.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::fcntl::OFlag;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::unix::pipe;

use super::{EXIT_FILE, ExitRecord, Outcome, PidFd, ProcessIdentity, Reaper};
use crate::atomic_file;

/// How long a shim may take to report that the task started.
const START_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exit may take to be recorded after the task's process is seen gone.
const EXIT_RECORD_WAIT: Duration = Duration::from_secs(5);

pub struct LaunchSpec<'a> {
    pub task_dir: &'a Path,
    pub program: &'a str,
    pub args: &'a [String],
    /// The complete environment of the task.
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    pub working_dir: Option<&'a Path>,
    pub log_limit: u64,
}

pub struct Launched {
    pub shim: ProcessIdentity,
    /// The shim is sandlet's child: whoever holds this reaps it through the [`Reaper`].
    pub shim_pidfd: PidFd,
    pub task: ProcessIdentity,
    pub started_at: DateTime<Utc>,
    pub exit: ExitWatch,
}

/// Starts a task under a new shim. `Err` is a message for a task that could not start.
pub async fn launch(reaper: &Reaper, spec: LaunchSpec<'_>) -> Result<Launched, String> {
    if let Some(dir) = spec.working_dir
        && !dir.is_dir()
    {
        return Err(format!(
            "workingDir {} does not exist or is not a directory",
            dir.display()
        ));
    }
    let (report_r, report_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0("sandlet-shim")
        .arg(super::shim::ROLE)
        .arg("--task-dir")
        .arg(spec.task_dir)
        .arg("--log-limit")
        .arg(spec.log_limit.to_string())
        .arg("--")
        .arg(spec.program)
        .args(spec.args)
        .env_clear()
        .envs(spec.env)
        // Its own group: signals meant for sandlet's group (a terminal's Ctrl-C) skip the shims.
        .process_group(0)
        .stdin(Stdio::from(report_w))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(dir) = spec.working_dir {
        command.current_dir(dir);
    }
    let spawned = reaper.spawn_owned(|| command.spawn());
    // Drop our copy of the report pipe's write end, so its EOF means the shim is gone.
    drop(command);
    let (child, shim_pidfd) = spawned.map_err(|e| format!("cannot start the task's shim: {e}"))?;
    let shim_pid = child.id() as i32;

    let receiver = pipe::Receiver::from_owned_fd(report_r)
        .map_err(|e| format!("cannot watch the shim: {e}"))?;
    let mut lines = BufReader::new(receiver).lines();
    let first = tokio::time::timeout(START_REPORT_TIMEOUT, lines.next_line()).await;
    let line = match first {
        Ok(Ok(Some(line))) => line,
        other => {
            let why = match other {
                Err(_) => "did not report within 10 s".to_string(),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(None)) => "exited without a report".to_string(),
                Ok(Ok(Some(_))) => unreachable!(),
            };
            let _ = shim_pidfd.send_signal(libc::SIGKILL);
            let _ = shim_pidfd.exited().await;
            reaper.reap_owned(&shim_pidfd);
            return Err(format!("the task's shim {why}"));
        }
    };
    match parse_start(&line) {
        Ok((task, shim_ticks, started_at)) => Ok(Launched {
            shim: ProcessIdentity {
                pid: shim_pid,
                start_ticks: shim_ticks,
            },
            shim_pidfd,
            task,
            started_at,
            exit: ExitWatch::Report {
                lines,
                dir: spec.task_dir.to_owned(),
            },
        }),
        Err(message) => {
            let _ = shim_pidfd.exited().await;
            reaper.reap_owned(&shim_pidfd);
            Err(message)
        }
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
    Report {
        lines: Lines<BufReader<pipe::Receiver>>,
        dir: PathBuf,
    },
    /// A task re-adopted after a restart: watched through its pidfd, read from the exit file.
    Adopted {
        task: PidFd,
        shim: ProcessIdentity,
        dir: PathBuf,
    },
}

impl ExitWatch {
    pub async fn ended(self) -> ExitRecord {
        match self {
            ExitWatch::Report { mut lines, dir } => {
                // Anything but "X" (EOF: the shim died) falls back to what the exit file says.
                let _ = lines.next_line().await;
                read_exit_record(&dir).unwrap_or_else(|| lost(
                    "ShimLost",
                    "the task's shim ended before it recorded the exit status; the process may have been killed along with it",
                ))
            }
            ExitWatch::Adopted { task, shim, dir } => {
                let _ = task.exited().await;
                // The shim records the exit right after reaping; wait for it while the shim lives.
                let deadline = tokio::time::Instant::now() + EXIT_RECORD_WAIT;
                loop {
                    if let Some(record) = read_exit_record(&dir) {
                        return record;
                    }
                    if !shim.is_alive() || tokio::time::Instant::now() >= deadline {
                        return read_exit_record(&dir).unwrap_or_else(|| lost(
                            "ExitStatusLost",
                            "the task's process ended but its shim did not record the exit status",
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
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
