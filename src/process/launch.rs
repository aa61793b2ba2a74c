//! sandlet's side of starting a task: hand the task to a shim, wait for its start report, and
//! return what it takes to watch the task end.
//!
//! Shims are kept started ahead of need, already exec'd and waiting for a spec, so a start
//! costs one fork+exec (the task's) on the critical path instead of two. When the idle ones run
//! out, the next is started once the task has started, one at a time: a burst of starts that
//! finds the pool empty starts fresh shims for itself and leaves one spare behind, not one per
//! start (which left dozens idle for good). A shim started with
//! [`ShimSpec::reuse`] (the exec API's commands) comes back idle once its run and its tree are
//! gone, so a steady stream of commands forks no shims at all.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::fcntl::OFlag;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::pipe;
use tokio::time::Instant;

use super::shim::{DRAIN_GRACE, OutputMode, ROLE, ShimSpec};
use super::{
    EXIT_FILE, ExitRecord, LAUNCH_FILE, LaunchRecord, Outcome, PidFd, ProcessIdentity, Reaper,
};
use crate::atomic_file;

/// How long a shim may take to report that the task started.
const START_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a re-adopted task's exit record is looked for while its shim lives: from the
/// first to the last figure, doubling (a shim records an exit within a millisecond, unless it
/// is stopped or starved; then there is no hurry).
const EXIT_RECORD_POLL: (Duration, Duration) =
    (Duration::from_millis(2), Duration::from_millis(200));
/// Idle shims kept at most, counting the one being started; more are let go (a burst of
/// commands does not leave a crowd).
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
    /// Where the task's input goes: the write end of its stdin pipe
    /// ([`OutputMode::Interactive`]) or the terminal's master ([`OutputMode::Terminal`], also
    /// where its output comes from).
    pub input: Option<OwnedFd>,
}

/// A started shim, idle until it is sent a spec.
struct Shim {
    identity: ProcessIdentity,
    pidfd: PidFd,
    spec: pipe::Sender,
    reports: Reports,
}

/// A shim's report socket: lines (`S`, `E`, `X`, `R`). The start report of a
/// [`super::shim::OutputMode::Stream`] run carries the read ends of the task's stdout and stderr
/// pipes (`SCM_RIGHTS`), kept here until taken.
pub struct Reports {
    socket: UnixStream,
    /// Received, not yet returned as a line: kept across calls, so reading is cancel-safe.
    pending: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Bytes read from a streamed task's pipe at a time (a pipe holds up to 1 MiB).
const READ_CHUNK: usize = 128 << 10;

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

    fn new(socket: UnixStream) -> Reports {
        Reports {
            socket,
            pending: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// The next line, or `None` at the end. Cancel-safe: what was received stays in `pending`.
    async fn line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.pending) {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..end]).into_owned()));
            }
            if self.receive().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// One `recvmsg`: bytes into `pending`, passed descriptors into `fds`.
    async fn receive(&mut self) -> io::Result<usize> {
        let fd = self.socket.as_raw_fd();
        loop {
            self.socket.readable().await?;
            let mut chunk = [0u8; 4096];
            let received = self.socket.try_io(Interest::READABLE, || {
                let mut cmsg = nix::cmsg_space!([RawFd; 3]);
                let mut iov = [io::IoSliceMut::new(&mut chunk)];
                let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(passed) = c {
                        fds.extend(passed);
                    }
                }
                Ok((msg.bytes, fds))
            });
            match received {
                Ok((n, fds)) => {
                    // SAFETY: descriptors just received are ours alone.
                    self.fds.extend(
                        fds.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                    self.pending.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The ends passed with the start report: the pipes as streams 1 (stdout) and 2 (stderr),
    /// and the input end of an interactive task (see [`Launched::input`]).
    fn take_passed(&mut self, mode: OutputMode) -> io::Result<(Vec<Output>, Option<OwnedFd>)> {
        let mut fds = std::mem::take(&mut self.fds);
        let input = match mode {
            OutputMode::Interactive | OutputMode::Terminal => fds.pop(),
            _ => None,
        };
        let outputs = fds
            .into_iter()
            .zip(1u8..)
            .map(|(fd, stream)| Ok((stream, pipe::Receiver::from_owned_fd(fd)?)))
            .collect::<io::Result<_>>()?;
        Ok((outputs, input))
    }
}

/// A streamed task's pipe and its stream number.
type Output = (u8, pipe::Receiver);

pub struct Launcher {
    reaper: Arc<Reaper>,
    spares: Mutex<Spares>,
}

/// The shims waiting for work, and whether one more is on its way: together never more than
/// [`MAX_IDLE_SHIMS`].
#[derive(Default)]
struct Spares {
    /// Taken from the front, returned to the back: every idle shim gets work in turn, so one
    /// that died while idle is found out soon.
    idle: VecDeque<Shim>,
    refilling: bool,
}

impl Spares {
    fn room(&self) -> bool {
        self.idle.len() + usize::from(self.refilling) < MAX_IDLE_SHIMS
    }
}

impl Launcher {
    pub fn new(reaper: Arc<Reaper>) -> Arc<Launcher> {
        Arc::new(Launcher {
            reaper,
            spares: Mutex::new(Spares::default()),
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
        let spare = self.spares().idle.pop_front();
        let (shim, was_idle) = match spare {
            Some(mut shim) => match hand_over(&mut shim, &spec, &line).await {
                Ok(()) => (shim, true),
                // The shim died while idle (killed from outside): use a fresh one.
                Err(e) => {
                    tracing::warn!(pid = shim.identity.pid, error = %e, "idle shim is gone; starting a fresh one");
                    self.discard(shim).await;
                    (self.fresh_shim(&spec, &line).await?, false)
                }
            },
            None => (self.fresh_shim(&spec, &line).await?, false),
        };
        let task_dir = spec.task_dir.clone();
        let mut started = self.await_start(shim).await;
        if was_idle && matches!(started, Err(StartFailure::NeverRead)) {
            // An idle shim that died before it read its spec started nothing: a fresh one can.
            tracing::warn!("idle shim died before it started anything; starting a fresh one");
            started = self.await_start(self.fresh_shim(&spec, &line).await?).await;
        }
        let started = started.map_err(|e| e.to_string());
        // Refill off the critical path: the task has started (or failed) by now. The fork+exec
        // runs on a blocking thread, not on a runtime worker that serves requests.
        let refill = {
            let mut spares = self.spares();
            let needed = spares.idle.is_empty() && !spares.refilling;
            spares.refilling |= needed;
            needed
        };
        if refill {
            let launcher = Arc::clone(self);
            tokio::task::spawn_blocking(move || launcher.refill());
        }
        let (shim, shim_pidfd, mut reports, spec_pipe, (task, started_at)) = started?;
        let (outputs, input) = match reports.take_passed(spec.output) {
            Ok(passed) => passed,
            Err(e) => {
                // The task runs, but its output could not be read: it must not run unseen.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(task.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                tracing::warn!(pid = task.pid, error = %e, "cannot read the task's output; killed it");
                (Vec::new(), None)
            }
        };
        Ok(Launched {
            shim,
            shim_pidfd,
            task,
            started_at,
            exit: ExitWatch::Report {
                reports,
                dir: task_dir,
                outputs,
                buffer: Vec::new(),
                turn: 0,
                ending: None,
            },
            next_spec: spec.reuse.then_some(spec_pipe),
            input,
        })
    }

    /// Takes back a reusable shim whose run is over: `reports` has just said it is idle.
    pub fn idle(&self, shim: ProcessIdentity, pidfd: PidFd, spec: pipe::Sender, reports: Reports) {
        self.keep_or_let_go(Shim {
            identity: shim,
            pidfd,
            spec,
            reports,
        });
    }

    /// Keeps `shim` as a spare if there is room, else lets it go.
    fn keep_or_let_go(&self, shim: Shim) {
        let mut spares = self.spares();
        if spares.room() {
            spares.idle.push_back(shim);
            return;
        }
        drop(spares);
        let Shim { pidfd, spec, .. } = shim;
        // Its spec pipe closes here: the shim reads the end of it and exits.
        drop(spec);
        let reaper = Arc::clone(&self.reaper);
        tokio::spawn(async move {
            let _ = pidfd.exited().await;
            reaper.reap_owned(&pidfd);
        });
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, Spares> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn fresh_shim(&self, spec: &ShimSpec, spec_line: &[u8]) -> Result<Shim, String> {
        let mut shim = self
            .start_shim()
            .map_err(|e| format!("cannot start the task's shim: {e}"))?;
        if let Err(e) = hand_over(&mut shim, spec, spec_line).await {
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
            ProcessIdentity,
            PidFd,
            Reports,
            pipe::Sender,
            (ProcessIdentity, DateTime<Utc>),
        ),
        StartFailure,
    > {
        let failure = match tokio::time::timeout(START_REPORT_TIMEOUT, shim.reports.line()).await {
            Ok(Ok(Some(line))) => match parse_start(&line) {
                Ok(started) => {
                    return Ok((shim.identity, shim.pidfd, shim.reports, shim.spec, started));
                }
                Err(message) => StartFailure::Failed(message),
            },
            Err(_) => StartFailure::Failed("the task's shim did not report within 10 s".into()),
            Ok(Err(e)) => StartFailure::Failed(format!("the task's shim could not be read: {e}")),
            // Whether it died before reading the spec, the pipe tells: unread bytes stay in it.
            Ok(Ok(None)) if unread(&shim.spec) > 0 => StartFailure::NeverRead,
            Ok(Ok(None)) => StartFailure::Failed("the task's shim exited without a report".into()),
        };
        self.discard(shim).await;
        Err(failure)
    }

    async fn discard(&self, shim: Shim) {
        let _ = shim.pidfd.send_signal(libc::SIGKILL);
        let _ = shim.pidfd.exited().await;
        self.reaper.reap_owned(&shim.pidfd);
    }

    /// Starts the spare a launch asked for (it set `refilling`).
    fn refill(&self) {
        // Started outside the lock: a launch never waits for this fork+exec.
        let started = self.start_shim();
        self.spares().refilling = false;
        match started {
            Ok(shim) => self.keep_or_let_go(shim),
            Err(e) => {
                tracing::warn!(error = %e, "could not start a spare shim; the next task starts one itself")
            }
        }
    }

    fn start_shim(&self) -> io::Result<Shim> {
        let (spec_r, spec_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (report_r, report_w) = std::os::unix::net::UnixStream::pair()?;
        report_r.set_nonblocking(true)?;
        let mut command = Command::new("/proc/self/exe");
        command
            .arg0(super::SHIM_ARGV0)
            .arg(ROLE)
            .args(super::nofile::shim_arg())
            // Its own group: signals meant for sandlet's group (a terminal's Ctrl-C) skip the shims.
            .process_group(0)
            .stdin(Stdio::from(spec_r))
            .stdout(Stdio::from(OwnedFd::from(report_w)))
            // sandlet's own: a shim that panics says why in sandlet's log. Its tasks get their
            // own stderr.
            .stderr(Stdio::inherit());
        let spawned = self.reaper.spawn_owned(|| command.spawn());
        // Our copies of the shim's ends go now, so EOF on either pipe means the other side is gone.
        drop(command);
        let (child, pidfd) = spawned?;
        // Named by pid and start time: that is how a task's launch record names its shim.
        let identity = match ProcessIdentity::of(child.id() as i32) {
            Ok(identity) => identity,
            Err(e) => {
                let _ = pidfd.send_signal(libc::SIGKILL);
                return Err(e);
            }
        };
        Ok(Shim {
            identity,
            pidfd,
            spec: pipe::Sender::from_owned_fd(spec_w)?,
            reports: Reports::new(UnixStream::from_std(report_r)?),
        })
    }
}

/// Gives a shim its spec. A task's launch record names the shim first, so a sandlet restarted
/// after this point knows which shim may have the task (see [`LaunchRecord`]).
async fn hand_over(shim: &mut Shim, spec: &ShimSpec, spec_line: &[u8]) -> io::Result<()> {
    if spec.records
        && let Some(dir) = &spec.task_dir
    {
        let record = LaunchRecord {
            shim: shim.identity,
        };
        atomic_file::write_json(
            &dir.join(LAUNCH_FILE),
            &record,
            atomic_file::Durability::Atomic,
        )?;
    }
    shim.spec.write_all(spec_line).await
}

/// Why a shim did not report a start.
enum StartFailure {
    /// It ended before it read its spec: it started nothing.
    NeverRead,
    Failed(String),
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartFailure::NeverRead => {
                f.write_str("the task's shim exited before it read the task")
            }
            StartFailure::Failed(message) => f.write_str(message),
        }
    }
}

/// Bytes written to a pipe and not read yet.
fn unread(pipe: &pipe::Sender) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; a pipe answers it on either end.
    let rc = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 { n.max(0) as usize } else { 0 }
}

fn parse_start(line: &str) -> Result<(ProcessIdentity, DateTime<Utc>), String> {
    if let Some(message) = line.strip_prefix("E ") {
        return Err(message.to_string());
    }
    let fields: Vec<&str> = line
        .strip_prefix("S ")
        .unwrap_or_default()
        .split(' ')
        .collect();
    let parsed = match fields[..] {
        [pid, ticks, nanos] => (|| {
            Some((
                ProcessIdentity {
                    pid: pid.parse().ok()?,
                    start_ticks: ticks.parse().ok()?,
                },
                DateTime::from_timestamp_nanos(nanos.parse().ok()?),
            ))
        })(),
        _ => None,
    };
    parsed.ok_or_else(|| format!("the task's shim sent an unreadable report {line:?}"))
}

/// Learns how a task ended.
pub enum ExitWatch {
    /// A task this sandlet started: the shim reports on its socket; a streamed task's output is
    /// read here, from its pipes.
    Report {
        reports: Reports,
        /// Where the shim records the exit, if it does.
        dir: Option<PathBuf>,
        outputs: Vec<Output>,
        buffer: Vec<u8>,
        /// Which output is read first next time, so neither starves the other.
        turn: usize,
        /// The exit, once reported, and until when the pipes may still be drained.
        ending: Option<(ExitRecord, Instant)>,
    },
    /// A task re-adopted after a restart: watched through its pidfd while it still runs (`None`:
    /// it had ended already), then read from the exit file its shim writes.
    Adopted {
        task: Option<PidFd>,
        shim: ProcessIdentity,
        dir: PathBuf,
    },
    /// The ending has been reported.
    Done,
}

impl ExitWatch {
    /// The shim's report socket, once the ending has been read from it.
    pub fn into_reports(self) -> Option<Reports> {
        match self {
            ExitWatch::Report { reports, .. } => Some(reports),
            _ => None,
        }
    }

    /// The next output (streamed tasks only) or the ending. The ending comes once the pipes
    /// are at EOF, or [`DRAIN_GRACE`] after the exit when a leftover of the tree holds them
    /// open: it follows the exit, not the pipes.
    pub async fn next(&mut self) -> ShimEvent {
        match self {
            ExitWatch::Report {
                reports,
                dir,
                outputs,
                buffer,
                turn,
                ending,
            } => loop {
                if let Some((_, drain_until)) = ending
                    && (outputs.is_empty() || Instant::now() >= *drain_until)
                {
                    let leftovers = std::mem::take(outputs);
                    if !leftovers.is_empty() {
                        // What is left of the tree may write on: its output is dropped, never
                        // left to fill the pipe and block it (nor to kill it with SIGPIPE).
                        tokio::spawn(discard(leftovers));
                    }
                    let (record, _) = ending.take().expect("checked");
                    return ShimEvent::Ended(record);
                }
                let drain_until = ending.as_ref().map(|(_, until)| *until);
                tokio::select! {
                    biased;
                    read = read_some(outputs, buffer, turn), if !outputs.is_empty() => {
                        if let Some((stream, data)) = read {
                            return ShimEvent::Output(stream, data);
                        }
                    }
                    line = reports.line(), if ending.is_none() => {
                        // "X <record>"; anything else (EOF: the shim died) falls back to the
                        // exit file.
                        let record = line
                            .ok()
                            .flatten()
                            .and_then(|l| serde_json::from_str(l.strip_prefix("X ")?).ok())
                            .or_else(|| dir.as_deref().and_then(read_exit_record))
                            .unwrap_or_else(|| {
                                lost(
                                    "ShimLost",
                                    "the task's shim ended before it recorded the exit status; the process may have been killed along with it",
                                )
                            });
                        *ending = Some((record, Instant::now() + DRAIN_GRACE));
                    }
                    _ = tokio::time::sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => {}
                }
            },
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

/// Reads what one of `outputs` holds, starting with the one whose turn it is; `None` when a
/// pipe reached its end (it is dropped from `outputs`). Cancel-safe: a read either happens and
/// is returned, or does not happen.
async fn read_some(
    outputs: &mut Vec<Output>,
    buffer: &mut Vec<u8>,
    turn: &mut usize,
) -> Option<(u8, Vec<u8>)> {
    if buffer.is_empty() {
        buffer.resize(READ_CHUNK, 0);
    }
    std::future::poll_fn(|cx| {
        for i in 0..outputs.len() {
            let at = (*turn + i) % outputs.len();
            let (stream, pipe) = &outputs[at];
            loop {
                match pipe.poll_read_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(())) => match pipe.try_read(buffer) {
                        Ok(0) => {
                            outputs.remove(at);
                            return Poll::Ready(None);
                        }
                        Ok(n) => {
                            *turn = at + 1;
                            return Poll::Ready(Some((*stream, buffer[..n].to_vec())));
                        }
                        // Stale readiness, now cleared: poll again to be woken.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(_) => {
                            outputs.remove(at);
                            return Poll::Ready(None);
                        }
                    },
                    Poll::Ready(Err(_)) => {
                        outputs.remove(at);
                        return Poll::Ready(None);
                    }
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// Reads and drops what leftovers of a tree still write, until the pipes' ends.
async fn discard(outputs: Vec<Output>) {
    for (_, mut pipe) in outputs {
        tokio::spawn(async move {
            let mut buffer = vec![0; 16 << 10];
            while matches!(pipe.read(&mut buffer).await, Ok(n) if n > 0) {}
        });
    }
}

/// A re-adopted task ends when its process does; the shim records the exit right after reaping
/// it, so the record is waited for while the shim lives.
/// How a re-adopted task ended: as its shim records it. While the shim lives the record is
/// awaited, however long that takes (a stopped shim records the exit once it is continued);
/// only a shim gone without a record means the status is lost.
async fn adopted_end(task: Option<PidFd>, shim: ProcessIdentity, dir: PathBuf) -> ExitRecord {
    if let Some(task) = task {
        let _ = task.exited().await;
    }
    let shim = PidFd::open_identity(shim).ok();
    let mut shim_gone = shim.is_none();
    let (mut pause, longest) = EXIT_RECORD_POLL;
    loop {
        if let Some(record) = read_exit_record(&dir) {
            return record;
        }
        if shim_gone {
            return lost(
                "ExitStatusLost",
                "the task's process ended but its shim did not record the exit status",
            );
        }
        let shim = shim.as_ref().expect("not gone");
        tokio::select! {
            // Read once more: the record is written before the shim exits.
            _ = shim.exited() => shim_gone = true,
            _ = tokio::time::sleep(pause) => pause = (pause * 2).min(longest),
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
