//! The shim role: `sandlet shim`, one per task.
//!
//! sandlet starts shims ahead of need (see `launch.rs`): a shim waits for its task's
//! [`ShimSpec`] as one JSON line on its standard input and reports on its standard output, a
//! unix socket. Given the spec, the shim
//! 1. is a child subreaper, so the task's whole tree stays below it;
//! 2. starts the task in its own process group, stdout and stderr on pipes;
//! 3. reports `S <pid> <start_ticks> <unix_nanos>`, then writes `run.json`;
//!    with [`OutputMode::Stream`] the pipes' read ends go to sandlet with that report
//!    (`SCM_RIGHTS`) and the shim keeps none;
//! 4. copies output into bounded log segments until the task is reaped and its pipes are drained
//!    (for at most [`DRAIN_GRACE`] once reaped, so a grandchild holding a pipe cannot hold back
//!    the exit);
//! 5. writes `exit.json` durably, then reports `X <the same record as JSON>`;
//! 6. keeps reaping (and logging) what is left of the tree until it has no children, then exits
//!    or, with [`ShimSpec::reuse`], restores its signal state, reports `R` and waits for the
//!    next spec (the exec API's commands: no fork+exec of a shim per command).
//!
//! A start failure writes `exit.json` (with [`ShimSpec::records`]) and reports `E <message>`.
//! End of input before a spec (sandlet went away) ends an idle shim quietly; a run that must not
//! outlive sandlet ([`ShimSpec::ends_with_sandlet`]) is killed, whole tree, when sandlet's end of
//! the report socket closes. The shim ignores the usual termination signals while it
//! supervises: sandlet stops the tree below it, and the shim must outlive that to record the
//! result.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::enter::{ChildSetup, Credentials, Kernel, Placement, Step, start_failure};
use super::output::SegmentWriter;
use super::{
    CLAIM_FILE, EXIT_FILE, ExitRecord, Outcome, ProcessIdentity, RUN_FILE, RunRecord, Tree,
};
use crate::atomic_file::{self, Durability};

/// Bytes read from a task's pipe at a time (a pipe holds up to 1 MiB, see `grow_pipe`).
const READ_BUFFER: usize = 256 << 10;

/// How long a reaped task's pipes may stay open (held by a descendant) before its exit is
/// recorded anyway.
pub const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// How often the tree of a run whose sandlet is gone is killed again, until nothing is left.
const ABANDONED_SWEEP: u16 = 10;

/// Where the shim role is selected: `sandlet shim` (argv[1]).
pub const ROLE: &str = "shim";

/// What a shim is asked to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShimSpec {
    /// Where the logs and records go; none for a run that keeps neither (its output goes to
    /// sandlet and `records` is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_dir: Option<PathBuf>,
    pub log_limit: u64,
    /// A path, or a name looked up on the `PATH` of `env` (execvp's rule).
    pub program: String,
    /// The name the program is called by (`argv[0]`), when not `program` itself (sandlet found
    /// the path already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg0: Option<String>,
    pub args: Vec<String>,
    /// Set on top of the environment the shim inherited from sandlet (the last value wins).
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    /// Start from an empty environment instead of the inherited one (sidecar mode: `env` then
    /// holds the main container's environment).
    #[serde(default)]
    pub clear_env: bool,
    /// The main container to enter (sidecar mode).
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Who to run as; unset keeps the shim's own user.
    #[serde(default)]
    pub credentials: Option<Credentials>,
    #[serde(default)]
    pub output: OutputMode,
    /// Whether the shim writes `run.json` and, durably before the exit is reported, `exit.json`
    /// (tasks: a result the controller saw survives a crash, and a restarted sandlet finds it).
    /// Commands of the exec API do not outlive sandlet: they learn their exit from the report
    /// alone, and sandlet writes their `run.json` itself, off the start's path.
    #[serde(default = "durable")]
    pub records: bool,
    /// Serve another spec once this run and its whole tree are gone (see the module docs).
    #[serde(default)]
    pub reuse: bool,
    /// The run does not outlive sandlet (the exec API's): when sandlet's end of the report
    /// socket closes, sandlet is gone (even SIGKILLed), and the shim kills the whole tree.
    /// Tasks leave it off: they outlive a restart and are re-adopted.
    #[serde(default)]
    pub ends_with_sandlet: bool,
}

fn durable() -> bool {
    true
}

impl ShimSpec {
    /// Writes one of the task's records, when it keeps them.
    fn record(&self, file: &str, value: &impl Serialize, durability: Durability) -> io::Result<()> {
        match (&self.task_dir, self.records) {
            (Some(dir), true) => atomic_file::write_json(&dir.join(file), value, durability),
            _ => Ok(()),
        }
    }
}

/// Where the task's output goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OutputMode {
    /// `stdout` and `stderr` log segments in the task's directory (tasks).
    #[default]
    Logs,
    /// stdout and stderr share one pipe, logged as one `output` stream in write order
    /// (background commands).
    Combined,
    /// Read by sandlet itself from the pipes, whose read ends it gets with the start report
    /// (foreground commands): a slow client slows the process down instead of losing output.
    Stream,
    /// Like `Stream`, and stdin is a pipe too, whose write end goes to sandlet after the two
    /// read ends (PTY sessions in pipe mode).
    Interactive,
    /// A terminal: the task is a session leader with a pseudo-terminal of the target's own
    /// `devpts` as its controlling terminal and stdio, 80x24; the master goes to sandlet with
    /// the start report (PTY sessions).
    Terminal,
}

impl OutputMode {
    /// Whether sandlet gets the task's stdio ends with the start report (the shim logs nothing).
    pub fn passed_to_sandlet(self) -> bool {
        matches!(
            self,
            OutputMode::Stream | OutputMode::Interactive | OutputMode::Terminal
        )
    }

    /// Whether the task reads input from sandlet (then it needs the fork path: see `supervise`).
    fn interactive(self) -> bool {
        matches!(self, OutputMode::Interactive | OutputMode::Terminal)
    }
}

/// A terminal's initial size, execd's.
const TERMINAL_ROWS: u16 = 24;
const TERMINAL_COLS: u16 = 80;

/// Set once the shim has entered an isolated session's PID namespace: its children are born
/// there from then on.
static IN_SESSION_PID_NAMESPACE: AtomicBool = AtomicBool::new(false);

/// Runs the shim; returns the process exit code.
pub fn run() -> i32 {
    // Unbuffered: every report is one write, flushed as it is made.
    // SAFETY: fd 1 is the report socket for the shim's whole life; ManuallyDrop never closes it.
    let mut report =
        std::mem::ManuallyDrop::new(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(1) });
    let report = &mut *report;
    // Done while the shim waits as a spare, off the task's start: the shim is a subreaper and
    // knows its own identity; and as the task inherits the shim's signal state, the shim starts
    // clean (sandlet's environment may have ignored some signals) and blocks what it handles
    // only once the task is started, which lets the task be spawned with posix_spawn, without
    // a fork-time hook.
    let prepared = nix::sys::prctl::set_child_subreaper(true)
        .map_err(io::Error::from)
        .and_then(|()| ProcessIdentity::of(std::process::id() as i32));
    let myself = match prepared {
        Ok(myself) => myself,
        Err(e) => {
            let _ = report.write_all(format!("E shim could not prepare: {e}\n").as_bytes());
            return 1;
        }
    };
    let mut stdin = std::io::stdin().lock();
    loop {
        if let Err(e) = reset_signals() {
            let _ = report.write_all(format!("E shim could not prepare: {e}\n").as_bytes());
            return 1;
        }
        let mut line = String::new();
        match stdin.read_line(&mut line) {
            Ok(0) => return 0, // sandlet went away, or has no more work for this shim
            Ok(_) => {}
            Err(e) => {
                let _ =
                    report.write_all(format!("E shim could not read its spec: {e}\n").as_bytes());
                return 1;
            }
        }
        let spec = match serde_json::from_str::<ShimSpec>(&line) {
            Ok(spec) => spec,
            Err(e) => {
                let _ =
                    report.write_all(format!("E shim got an unreadable spec: {e}\n").as_bytes());
                return 1;
            }
        };
        if let Err(e) = supervise(&spec, myself, &mut *report) {
            let _ = report.write_all(format!("E shim failed: {e}\n").as_bytes());
            return 1;
        }
        // A shim that entered an isolated session's PID namespace would fork the next task
        // into it: it serves no other.
        let reusable = spec.reuse && !IN_SESSION_PID_NAMESPACE.load(Ordering::Relaxed);
        if !reusable || report.write_all(b"R\n").is_err() {
            return 0;
        }
    }
}

fn supervise(spec: &ShimSpec, myself: ProcessIdentity, report: &mut impl Write) -> io::Result<()> {
    // A terminal's master stands in for the pipes: the task's stdio is its slave.
    let terminal = match spec.output {
        OutputMode::Terminal => Some(open_terminal(spec.placement.as_ref())?),
        _ => None,
    };
    let (out_r, out_w) = match &terminal {
        Some((_, slave)) => (None, slave.try_clone()?),
        None => {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
            super::grow_pipe(&w);
            (Some(r), blocking(w)?)
        }
    };
    let (err_r, err_w) = match (&terminal, spec.output) {
        (Some((_, slave)), _) => (None, slave.try_clone()?),
        (None, OutputMode::Combined) => (None, out_w.try_clone()?),
        (None, _) => {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
            super::grow_pipe(&w);
            (Some(r), blocking(w)?)
        }
    };
    // The task's stdin: the slave, a pipe from sandlet, or /dev/null.
    let (stdin_r, stdin_w) = match (&terminal, spec.output) {
        (Some((_, slave)), _) => (Some(slave.try_clone()?), None),
        (None, OutputMode::Interactive) => {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            (Some(r), Some(w))
        }
        _ => (None, None),
    };
    // A task's shim claims it before starting it, so that a restarted sandlet can tell a shim
    // that died before it started anything from one that may have (see `CLAIM_FILE`). Without
    // the claim the task does not start: it could run twice.
    let claimed = match (&spec.task_dir, spec.records) {
        (Some(dir), true) => File::create(dir.join(CLAIM_FILE)).map(drop),
        _ => Ok(()),
    };
    let setup = claimed
        .map_err(|e| format!("cannot record the claim of the task: {e}"))
        .and_then(|()| {
            ChildSetup::prepare(
                spec.placement.as_ref(),
                spec.credentials.as_ref(),
                spec.working_dir.as_deref(),
            )
        });
    let spawned = match setup {
        Err(message) => Err(message),
        Ok(setup) if setup.is_empty() && !spec.output.interactive() => {
            let mut env: Vec<(OsString, OsString)> = if spec.clear_env {
                Vec::new()
            } else {
                std::env::vars_os().collect()
            };
            for (k, v) in &spec.env {
                env.retain(|(existing, _)| existing.as_os_str() != k.as_str());
                env.push((k.into(), v.into()));
            }
            super::spawn::spawn(&super::spawn::Program {
                program: &spec.program,
                arg0: spec.arg0.as_deref().unwrap_or(&spec.program),
                args: &spec.args,
                env: &env,
                working_dir: spec.working_dir.as_deref(),
                stdout: out_w.as_fd(),
                stderr: err_w.as_fd(),
            })
            .map_err(|e| e.to_string())
        }
        Ok(setup) => {
            let mut command = Command::new(&spec.program);
            if let Some(arg0) = &spec.arg0 {
                command.arg0(arg0);
            }
            if spec.clear_env {
                command.env_clear();
            }
            command
                .args(&spec.args)
                .envs(spec.env.iter().map(|(k, v)| (k, v)))
                .stdout(out_w.try_clone()?)
                .stderr(err_w.try_clone()?);
            match &stdin_r {
                Some(r) => command.stdin(r.try_clone()?),
                None => command.stdin(Stdio::null()),
            };
            // A terminal's task makes its own session (and so its own group) instead.
            if terminal.is_none() {
                command.process_group(0);
            }
            spawn_with(
                &mut command,
                setup,
                spec.working_dir.as_deref(),
                terminal.is_some(),
            )
            .map(|child| child.id() as i32)
        }
    };
    // Our copies of the task's ends must go, or the pipes never reach EOF (and a terminal's
    // master never reads EIO once the task's tree is gone).
    drop((out_w, err_w, stdin_r));
    let mut handled = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        handled.add(sig);
    }
    // Reports to a sandlet that has gone must fail with EPIPE, not kill the shim mid-tree.
    // SAFETY: SIG_IGN runs no handler code.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) }?;
    // Blocked, these arrive on the signalfd. A SIGCHLD from before this point is not lost: the
    // loop below reaps before it first waits.
    handled.thread_block()?;
    let signals = SignalFd::with_flags(&handled, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let task_pid = match spawned {
        Ok(pid) => pid,
        Err(e) => {
            let message = format!("cannot start {:?}: {e}", spec.program);
            let record = ExitRecord {
                finished_at: Utc::now(),
                outcome: Outcome::StartFailed {
                    message: message.clone(),
                },
            };
            spec.record(EXIT_FILE, &record, Durability::Durable)?;
            report.write_all(format!("E {message}\n").as_bytes())?;
            report.flush()?;
            return Ok(());
        }
    };
    let started_at = Utc::now();
    let run = match ProcessIdentity::of(task_pid) {
        Ok(task) => RunRecord {
            shim: myself,
            task,
            started_at,
            target: spec.placement.as_ref().map(|p| p.target),
        },
        Err(e) => {
            // Nothing could supervise it: the task does not get to run.
            let _ = nix::sys::signal::killpg(Pid::from_raw(task_pid), Signal::SIGKILL);
            return Err(e);
        }
    };
    // One write per report: each write wakes sandlet.
    let started = format!(
        "S {} {} {}\n",
        run.task.pid,
        run.task.start_ticks,
        started_at.timestamp_nanos_opt().unwrap_or(0)
    );
    let outputs_read_by_sandlet = spec.output.passed_to_sandlet();
    let announced = if outputs_read_by_sandlet {
        // The read ends (and the stdin or terminal) travel with the start report: sandlet
        // reads the task's output straight from its pipes, and the shim, holding no end,
        // cannot hold the pipes open.
        let raw = |fd: &Option<OwnedFd>| fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        let ends = [
            raw(&out_r),
            raw(&err_r),
            raw(&stdin_w),
            terminal
                .as_ref()
                .map_or(-1, |(master, _)| master.as_raw_fd()),
        ];
        send_with_fds(started.as_bytes(), &ends)
    } else {
        report
            .write_all(started.as_bytes())
            .and_then(|()| report.flush())
    };
    // From here on the task runs, and nothing may stop the shim from supervising it: a write
    // that fails (a full disk) costs that file, never the task or its exit status. If sandlet
    // died since it sent the spec, a task runs on for a restarted sandlet to find (`run.json`
    // below); a run that must not outlive sandlet is killed.
    let tree = Tree {
        shim: myself,
        pgid: task_pid,
    };
    let mut abandoned = announced.is_err() && spec.ends_with_sandlet;
    // After the report, off sandlet's start path; only the shim writes it, so a restarted
    // sandlet finds it whether or not sandlet itself lived through this moment.
    let _ = spec.record(RUN_FILE, &run, Durability::Atomic);

    let sink = |stream: &'static str| {
        spec.task_dir
            .as_deref()
            .and_then(|dir| SegmentWriter::create(dir, stream, spec.log_limit).ok())
            .map_or(Sink::Nowhere, Sink::Log)
    };
    let mut outputs = Vec::new();
    if !outputs_read_by_sandlet {
        let stdout = if spec.output == OutputMode::Combined {
            COMBINED_LOG
        } else {
            "stdout"
        };
        if let Some(out_r) = out_r {
            outputs.push(Output::new(out_r, sink(stdout)));
        }
        if let Some(err_r) = err_r {
            outputs.push(Output::new(err_r, sink("stderr")));
        }
    } else {
        // sandlet has its own copies now.
        drop((out_r, err_r, stdin_w, terminal));
    }
    let mut ended: Option<(ExitRecord, Instant)> = None;
    let mut reported = false;
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        if abandoned {
            // On every turn: the group reaches late forks, the walk those that left the group.
            tree.signal(Signal::SIGKILL);
        }
        let no_children = reap(task_pid, &mut ended)?;
        if !reported
            && let Some((record, reaped_at)) = &ended
            && (outputs.iter().all(|o| o.pipe.is_none()) || reaped_at.elapsed() >= DRAIN_GRACE)
        {
            let _ = spec.record(EXIT_FILE, record, Durability::Durable);
            // The record also travels on the report, so a failed write costs durability, not
            // the result. sandlet may be gone (being restarted): the exit file is then the record.
            let line = format!("X {}\n", serde_json::to_string(record).unwrap_or_default());
            let _ = report
                .write_all(line.as_bytes())
                .and_then(|()| report.flush());
            reported = true;
        }
        if reported && no_children {
            break;
        }
        let timeout = match (&ended, reported) {
            _ if abandoned => PollTimeout::from(ABANDONED_SWEEP),
            (Some((_, reaped_at)), false) => {
                let left = DRAIN_GRACE.saturating_sub(reaped_at.elapsed());
                PollTimeout::try_from(left.as_millis().max(1) as u64).unwrap_or(PollTimeout::MAX)
            }
            _ => PollTimeout::NONE,
        };
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        // No events asked: a closed peer is reported as POLLHUP all the same.
        let report_socket = std::io::stdout();
        let watch_sandlet = spec.ends_with_sandlet && !abandoned;
        if watch_sandlet {
            fds.push(PollFd::new(report_socket.as_fd(), PollFlags::empty()));
        }
        let open: Vec<usize> = (0..outputs.len())
            .filter(|&i| outputs[i].pipe.is_some())
            .collect();
        for &i in &open {
            fds.push(PollFd::new(
                outputs[i].pipe.as_ref().expect("open").as_fd(),
                PollFlags::POLLIN,
            ));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if watch_sandlet
            && fds[1]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
        {
            abandoned = true;
        }
        drop(fds);
        while let Ok(Some(_)) = signals.read_signal() {}
        for &i in &open {
            outputs[i].copy(&mut buf);
        }
    }
    for output in &mut outputs {
        output.copy(&mut buf);
    }
    Ok(())
}

/// The log of a background command's stdout and stderr together.
pub const COMBINED_LOG: &str = "output";

/// Where one output stream goes.
enum Sink {
    Log(SegmentWriter),
    /// A log that could not be created or written any more (a full disk).
    Nowhere,
}

/// One output stream: the pipe from the task and where its bytes go. A sink that fails is
/// given up; the pipe is still drained, so the task never blocks on a full pipe.
struct Output {
    pipe: Option<OwnedFd>,
    sink: Sink,
}

impl Output {
    fn new(pipe: OwnedFd, sink: Sink) -> Output {
        Output {
            pipe: Some(pipe),
            sink,
        }
    }

    /// Copies what the pipe holds now; closes it at EOF.
    fn copy(&mut self, buf: &mut [u8]) {
        let Some(pipe) = &self.pipe else { return };
        let Ok(clone) = pipe.try_clone() else { return };
        let mut file = File::from(clone);
        loop {
            match file.read(buf) {
                Ok(0) => {
                    self.pipe = None;
                    return;
                }
                Ok(n) => {
                    let written = match &mut self.sink {
                        Sink::Log(log) => log.write(&buf[..n]),
                        Sink::Nowhere => Ok(()),
                    };
                    if written.is_err() {
                        self.sink = Sink::Nowhere;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: drained for now. Anything else: the pipe is unusable; stop reading it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.pipe = None;
                    return;
                }
            }
        }
    }
}

/// Reaps every exited child; records the task's own ending. Returns true when no child is left.
fn reap(task_pid: i32, ended: &mut Option<(ExitRecord, Instant)>) -> io::Result<bool> {
    loop {
        let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Ok(false),
            Ok(status) => status,
            Err(Errno::ECHILD) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if status.pid() != Some(Pid::from_raw(task_pid)) {
            continue; // an orphan of the task's tree
        }
        let outcome = match status {
            WaitStatus::Exited(_, code) => Outcome::Exited { code },
            WaitStatus::Signaled(_, signal, _) => Outcome::Signaled {
                signal: signal as i32,
            },
            _ => continue,
        };
        *ended = Some((
            ExitRecord {
                finished_at: Utc::now(),
                outcome,
            },
            Instant::now(),
        ));
    }
}

/// Spawns through fork with `setup` applied in the child. A failing step writes its code on a
/// pipe before the hook fails, so the error names the step.
fn spawn_with(
    command: &mut Command,
    setup: ChildSetup,
    working_dir: Option<&std::path::Path>,
    controlling_terminal: bool,
) -> Result<std::process::Child, String> {
    use std::os::fd::AsRawFd;
    if setup.enter_pid_namespace()? {
        IN_SESSION_PID_NAMESPACE.store(true, Ordering::Relaxed);
    }
    let (step_r, step_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| e.to_string())?;
    let step_fd = step_w.as_raw_fd();
    // SAFETY: the hook only makes syscalls on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let mut applied = setup.apply(&Kernel);
            if applied.is_ok() && controlling_terminal {
                // A new session, whose controlling terminal is the slave on stdin.
                applied = nix::unistd::setsid()
                    .and_then(|_| Errno::result(libc::ioctl(0, libc::TIOCSCTTY, 0)))
                    .map(drop)
                    .map_err(|e| (Step::ControllingTerminal, e));
            }
            applied.map_err(|(step, errno)| {
                let code = step as u8;
                libc::write(step_fd, (&code as *const u8).cast(), 1);
                io::Error::from(errno)
            })
        });
    }
    let spawned = command.spawn();
    drop(step_w);
    spawned.map_err(|e| {
        let mut code = [0u8; 1];
        let step = (nix::unistd::read(&step_r, &mut code) == Ok(1)).then_some(code[0]);
        let dir = working_dir.map(|d| d.display().to_string());
        start_failure(step, &e, dir.as_deref())
    })
}

/// No blocked signals and every disposition at its default, whatever sandlet's own
/// environment ignored (a `nohup`ed SIGHUP, say). The real-time signals are included, and with
/// a raw syscall: libc's own (32 and 33 for glibc) cannot be set through `sigaction`, and a
/// process started by glibc's `posix_spawn` gets them ignored, which its exec'd programs would
/// inherit (a musl program's timers and cancellation use them).
fn reset_signals() -> io::Result<()> {
    SigSet::empty().thread_set_mask()?;
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for signal in 1..=libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installs SIG_DFL (no handler code) from a struct in the kernel's layout.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends `line` on the report socket (fd 1) with the open descriptors of `fds` attached.
fn send_with_fds(line: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds: Vec<RawFd> = fds.iter().copied().filter(|fd| *fd >= 0).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        1,
        &[io::IoSlice::new(line)],
        &rights,
        MsgFlags::empty(),
        None,
    )?;
    if sent < line.len() {
        // The descriptors went with the first byte; the rest of the line follows plainly.
        let mut rest = &line[sent..];
        while !rest.is_empty() {
            match nix::unistd::write(std::io::stdout(), rest) {
                Ok(n) => rest = &rest[n..],
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// A new pseudo-terminal of the target's `devpts` (sidecar mode: `/dev/ptmx` resolved inside
/// the main container's root, so the terminal is one its processes can name, and a symlink in
/// the container cannot lead outside it): the master, and its slave opened through the master
/// (`TIOCGPTPEER`, no path lookup at all), not a controlling terminal of the shim.
fn open_terminal(placement: Option<&Placement>) -> io::Result<(OwnedFd, OwnedFd)> {
    let root = match placement {
        None => "/".to_string(),
        Some(p) => format!("/proc/{}/root", p.target.pid),
    };
    let master = crate::files::root::Root::open(root.as_ref())
        .and_then(|root| root.open_at("/dev/ptmx", OFlag::O_RDWR | OFlag::O_NOCTTY))
        .map_err(|e| io::Error::other(format!("cannot open /dev/ptmx in {root}: {e}")))?;
    let unlock: libc::c_int = 0;
    let size = libc::winsize {
        ws_row: TERMINAL_ROWS,
        ws_col: TERMINAL_COLS,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: each ioctl reads or writes one value of the type the kernel expects.
    let slave = unsafe {
        Errno::result(libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock))?;
        Errno::result(libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size))?;
        let fd = Errno::result(libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    Ok((master, slave))
}

/// The task gets ordinary blocking pipe ends; only the shim's read ends are non-blocking.
fn blocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    let flags = OFlag::from_bits_truncate(nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?);
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK),
    )?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_is_one_json_line() {
        let spec = ShimSpec {
            task_dir: Some("/d/t".into()),
            log_limit: 64,
            program: "/bin/sh".into(),
            arg0: Some("sh".into()),
            args: vec!["-c".into(), "echo 'a\nb'".into()],
            env: vec![("A".into(), "1\n2".into())],
            working_dir: None,
            clear_env: false,
            placement: None,
            credentials: None,
            output: OutputMode::Logs,
            records: true,
            reuse: false,
            ends_with_sandlet: false,
        };
        let line = serde_json::to_string(&spec).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<ShimSpec>(&line).unwrap(), spec);
    }
}
