//! PTY sessions: an interactive shell per session, driven over a WebSocket (execd's `/pty`).
//!
//! The shell starts on the first connection, through the same launcher and shims as commands,
//! so in sidecar mode it runs inside the main container, on a terminal of the container's own
//! `devpts` (see `OutputMode::Terminal`), or on pipes in pipe mode. One task per shell (the
//! pump) reads its output into a 1 MiB replay ring with a monotonic byte counter; the one
//! attached client reads from the ring at its own position. The pump reads ahead of the client
//! by at most [`READ_AHEAD`] bytes, so a slow client slows the shell down, while with no client
//! the ring keeps the newest output. Attaching takes the replay and the live position under the
//! session's lock, so a reconnect sees every byte exactly once.
//!
//! Unlike execd: `TERM` defaults to `xterm-256color`; sessions are limited in number and reaped
//! when idle; a session whose shell exited replays its output, reports the exit and closes on
//! every later connection instead of starting a new shell.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::run::{Spawn, SpawnError, spawn};
use super::{ExecConfig, RunSlot, uuid_v4};
use crate::container::{PlaceError, TargetWatch, metadata_in, start_in};
use crate::process::shim::{DRAIN_GRACE, OutputMode};
use crate::process::{ExitWatch, Launcher, Outcome, ShimEvent, Tree};

/// Output kept for replay (execd's figure).
pub const RING_BYTES: usize = 1 << 20;
/// Largest live output frame (execd's figure).
pub const CHUNK_BYTES: usize = 32 << 10;
/// Output read from the shell ahead of what the attached client has taken, at most.
const READ_AHEAD: u64 = 256 << 10;
/// How long a session whose shell exited is kept for a client to collect the exit.
pub const EXITED_KEEP: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pty,
    Pipe,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Pty => "pty",
            Mode::Pipe => "pipe",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Limit(String),
    #[error("pty session {0} not found")]
    NotFound(String),
    #[error("another client is already connected to pty session {0}")]
    AlreadyConnected(String),
    #[error("{0}")]
    Failed(String),
}

pub struct Ptys {
    config: Arc<ExecConfig>,
    launcher: Arc<Launcher>,
    target: Option<Arc<TargetWatch>>,
    table: Mutex<HashMap<String, Arc<PtySession>>>,
}

pub struct PtySession {
    pub id: String,
    cwd: Option<String>,
    command: Option<String>,
    inner: Mutex<Inner>,
    /// Bumped on new output, on the shell's end and on a change of client: the attached client
    /// waits on it.
    changed: watch::Sender<()>,
    /// Bumped when the client has taken output or went away: the pump waits on it.
    progress: watch::Sender<()>,
    /// Held while the shell starts: two first connections start one shell.
    starting: tokio::sync::Mutex<()>,
}

struct Inner {
    ring: Ring,
    shell: Shell,
    /// The shell's tree, kept after its exit: what a leftover of it needs to be killed.
    tree: Option<Tree>,
    client: Option<Holder>,
    next_client: u64,
    /// Since when no client is attached.
    idle_since: Instant,
    removed: bool,
}

enum Shell {
    NotStarted,
    Running { mode: Mode, input: Input },
    Exited { mode: Mode, code: i32 },
}

/// Where stdin goes.
#[derive(Clone)]
enum Input {
    Terminal(Arc<AsyncFd<OwnedFd>>),
    Pipe(Arc<tokio::sync::Mutex<pipe::Sender>>),
}

struct Holder {
    id: u64,
    /// The next byte the client is sent.
    position: u64,
}

/// What an attached client is to do next.
pub enum Next {
    /// Output from `offset` on, of one stream (1 stdout or terminal, 2 stderr).
    Output(u8, Vec<u8>),
    Exit(i32),
    /// Another client took the session over.
    Evicted,
    Wait,
}

/// A client's claim on a session, made by [`Ptys::attach`].
pub struct Attached {
    pub session: Arc<PtySession>,
    pub client: u64,
    /// `(offset of the first byte, bytes)`, empty when there is nothing to replay.
    pub replay: (u64, Vec<u8>),
    pub mode: Mode,
}

impl Ptys {
    pub fn new(
        config: Arc<ExecConfig>,
        launcher: Arc<Launcher>,
        target: Option<Arc<TargetWatch>>,
    ) -> Arc<Ptys> {
        Arc::new(Ptys {
            config,
            launcher,
            target,
            table: Mutex::new(HashMap::new()),
        })
    }

    /// `POST /pty`. The working directory, already expanded, must exist where the shell will
    /// run (sandlet creates nothing inside the main container on a client's word).
    pub fn create(&self, cwd: Option<String>, command: Option<String>) -> Result<String, PtyError> {
        if let Some(dir) = &cwd {
            let place = start_in(self.target.as_deref(), "").map_err(|e| match e {
                PlaceError::Unavailable(m) => PtyError::Failed(m),
                PlaceError::User(m) => PtyError::Invalid(m),
            })?;
            if !dir.starts_with('/') {
                return Err(PtyError::Invalid(format!(
                    "cwd must be an absolute path: {dir}"
                )));
            }
            match metadata_in(&place.root, dir) {
                Ok(t) if t.is_dir() => {}
                Ok(_) => {
                    return Err(PtyError::Invalid(format!("cwd is not a directory: {dir}")));
                }
                Err(e) => {
                    return Err(PtyError::Invalid(format!("cwd does not exist: {dir}: {e}")));
                }
            }
        }
        // Applied here too, not only by the periodic sweep: the limit counts live sessions.
        self.evict_idle();
        let mut table = self.lock();
        if table.len() >= self.config.max_ptys {
            return Err(PtyError::Limit(format!(
                "{} pty sessions exist; the limit is {} (--exec-max-pty-sessions); delete one first",
                table.len(),
                self.config.max_ptys
            )));
        }
        let id = uuid_v4();
        table.insert(
            id.clone(),
            Arc::new(PtySession {
                id: id.clone(),
                cwd,
                command,
                inner: Mutex::new(Inner {
                    ring: Ring::default(),
                    shell: Shell::NotStarted,
                    tree: None,
                    client: None,
                    next_client: 0,
                    idle_since: Instant::now(),
                    removed: false,
                }),
                changed: watch::Sender::new(()),
                progress: watch::Sender::new(()),
                starting: tokio::sync::Mutex::new(()),
            }),
        );
        tracing::info!(session = %id, "pty session created");
        Ok(id)
    }

    pub fn get(&self, id: &str) -> Result<Arc<PtySession>, PtyError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| PtyError::NotFound(id.to_string()))
    }

    /// `DELETE /pty/{id}`: kills the shell's whole tree; an attached client gets `exit -1`.
    pub fn delete(&self, id: &str) -> Result<(), PtyError> {
        let session = self
            .lock()
            .remove(id)
            .ok_or_else(|| PtyError::NotFound(id.to_string()))?;
        self.finish(&session);
        tracing::info!(session = %id, "pty session deleted");
        Ok(())
    }

    /// Removes sessions nobody is attached to that sat idle too long (exited ones sooner).
    pub fn evict_idle(&self) {
        let idle = self.config.pty_idle;
        let expired: Vec<Arc<PtySession>> = {
            let mut table = self.lock();
            let ids: Vec<String> = table
                .values()
                .filter(|s| {
                    let inner = s.lock();
                    let limit = match inner.shell {
                        Shell::Exited { .. } => idle.min(EXITED_KEEP),
                        _ => idle,
                    };
                    inner.client.is_none() && inner.idle_since.elapsed() > limit
                })
                .map(|s| s.id.clone())
                .collect();
            ids.iter().filter_map(|id| table.remove(id)).collect()
        };
        for session in expired {
            tracing::info!(session = %session.id, "pty session idle too long; removed");
            self.finish(&session);
        }
    }

    fn finish(&self, session: &PtySession) {
        let mut inner = session.lock();
        inner.removed = true;
        // With the shim gone the whole tree is gone, and its group id may be someone else's.
        if let Some(tree) = inner.tree.filter(|t| t.shim.is_alive()) {
            tree.signal(Signal::SIGKILL);
        }
        if let Shell::Running { mode, .. } = inner.shell {
            inner.shell = Shell::Exited { mode, code: -1 };
        }
        drop(inner);
        session.changed.send_replace(());
    }

    /// Claims `session` for a new client: replay from `since` (clamped to what the ring
    /// holds), live output after it. `takeover` evicts the current client instead of failing.
    pub fn attach(
        &self,
        session: &Arc<PtySession>,
        since: i64,
        takeover: bool,
        mode: Mode,
    ) -> Result<Attached, PtyError> {
        let mut inner = session.lock();
        if inner.client.is_some() && !takeover {
            return Err(PtyError::AlreadyConnected(session.id.clone()));
        }
        inner.next_client += 1;
        let client = inner.next_client;
        let total = inner.ring.total;
        let from = (since.max(0) as u64).clamp(inner.ring.oldest(), total);
        let replay = (from, inner.ring.read(from, total));
        inner.client = Some(Holder {
            id: client,
            position: total,
        });
        let mode = match inner.shell {
            Shell::NotStarted => mode,
            Shell::Running { mode, .. } | Shell::Exited { mode, .. } => mode,
        };
        drop(inner);
        // An evicted client learns it here; the pump no longer waits for it.
        session.changed.send_replace(());
        session.progress.send_replace(());
        Ok(Attached {
            session: Arc::clone(session),
            client,
            replay,
            mode,
        })
    }

    /// Starts the session's shell unless it was started before (running or exited).
    pub async fn ensure_started(
        &self,
        session: &Arc<PtySession>,
        mode: Mode,
    ) -> Result<(), PtyError> {
        let _starting = session.starting.lock().await;
        if !matches!(session.lock().shell, Shell::NotStarted) {
            return Ok(());
        }
        let slot = RunSlot::take(&self.config).map_err(PtyError::Limit)?;
        let spec = Spawn {
            script: session.command.clone().unwrap_or_default(),
            argv: None,
            interactive: true,
            cwd: session.cwd.clone(),
            envs: Vec::new(),
            env_override: None,
            env_file: self.config.env_file.clone(),
            uid: None,
            gid: None,
            output: match mode {
                Mode::Pty => OutputMode::Terminal,
                Mode::Pipe => OutputMode::Interactive,
            },
            dir: None,
            log_limit: self.config.log_limit,
        };
        let started = spawn(&self.launcher, self.target.as_deref(), spec)
            .await
            .map_err(|e| match e {
                SpawnError::Invalid(m) | SpawnError::Failed(m) => PtyError::Failed(m),
            })?;
        let tree = started.tree;
        let passed = started
            .input
            .ok_or_else(|| "the shell's input end was not passed".to_string())
            .and_then(|fd| match mode {
                Mode::Pty => {
                    set_nonblocking(&fd)?;
                    // SAFETY: the descriptor is owned by the AsyncFd, open for as long as it is.
                    unsafe { AsyncFd::register(fd) }
                        .map(|fd| Input::Terminal(Arc::new(fd)))
                        .map_err(|e| e.to_string())
                }
                Mode::Pipe => pipe::Sender::from_owned_fd(fd)
                    .map(|p| Input::Pipe(Arc::new(tokio::sync::Mutex::new(p))))
                    .map_err(|e| e.to_string()),
            });
        let input = match passed {
            Ok(input) => input,
            Err(e) => {
                tree.signal(Signal::SIGKILL);
                return Err(PtyError::Failed(e));
            }
        };
        let terminal = match &input {
            Input::Terminal(fd) => Some(Arc::clone(fd)),
            Input::Pipe(_) => None,
        };
        {
            let mut inner = session.lock();
            inner.tree = Some(tree);
            inner.shell = Shell::Running { mode, input };
            if inner.removed {
                // Deleted while it started: it does not get to run.
                tree.signal(Signal::SIGKILL);
            }
        }
        tracing::info!(session = %session.id, pid = tree.pgid, mode = mode.as_str(), "pty shell started");
        let session = Arc::clone(session);
        let launcher = Arc::clone(&self.launcher);
        tokio::spawn(async move {
            let mut exit = started.exit;
            let code = pump(&session, &mut exit, terminal).await;
            drop(slot);
            {
                let mut inner = session.lock();
                if let Shell::Running { mode, .. } = inner.shell {
                    inner.shell = Shell::Exited { mode, code };
                }
            }
            session.changed.send_replace(());
            // The shim ends once what is left of the tree is gone (a delete kills it). Its
            // report socket stays open until then: the shim takes its closing for sandlet's end.
            let shim = started.shim_pidfd;
            let _ = shim.exited().await;
            launcher.reaper().reap_owned(&shim);
            drop(exit);
        });
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<PtySession>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads the shell's output into the session until the shell ended and its output is drained
/// (for at most [`DRAIN_GRACE`] after the exit: a leftover of the tree may hold the terminal);
/// returns the exit code, -1 for a signal.
async fn pump(
    session: &PtySession,
    exit: &mut ExitWatch,
    terminal: Option<Arc<AsyncFd<OwnedFd>>>,
) -> i32 {
    let mut terminal_open = terminal.is_some();
    let mut ended: Option<(i32, Instant)> = None;
    loop {
        if let Some((code, until)) = ended
            && (!terminal_open || Instant::now() >= until)
        {
            return code;
        }
        session.room().await;
        let until = ended.map(|(_, until)| until);
        tokio::select! {
            read = read_terminal(terminal.as_deref()), if terminal_open => match read {
                Some(data) => session.append(1, &data),
                None => terminal_open = false,
            },
            event = exit.next(), if ended.is_none() => match event {
                ShimEvent::Output(stream, data) => session.append(stream, &data),
                ShimEvent::Ended(record) => {
                    let code = match record.outcome {
                        Outcome::Exited { code } => code,
                        _ => -1,
                    };
                    ended = Some((code, Instant::now() + DRAIN_GRACE));
                }
            },
            _ = sleep_until(until.unwrap_or_else(Instant::now)), if until.is_some() => {}
        }
    }
}

/// One read of the terminal's master; `None` at its end (EIO once no process has the slave
/// open).
async fn read_terminal(fd: Option<&AsyncFd<OwnedFd>>) -> Option<Vec<u8>> {
    let fd = fd?;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let mut ready = fd.readable().await.ok()?;
        match ready.try_io(|f| nix::unistd::read(f.get_ref(), &mut buf).map_err(io::Error::from)) {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => {
                buf.truncate(n);
                return Some(buf);
            }
            Err(_would_block) => continue,
        }
    }
}

async fn write_terminal(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut ready = fd.writable().await?;
        match ready.try_io(|f| nix::unistd::write(f.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), String> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(|e| e.to_string())?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(|e| e.to_string())?;
    Ok(())
}

impl PtySession {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET /pty/{id}`: whether the shell runs, and the output counter.
    pub fn status(&self) -> (bool, u64) {
        let inner = self.lock();
        (
            matches!(inner.shell, Shell::Running { .. }),
            inner.ring.total,
        )
    }

    /// Whether a client is attached (the 409 before an upgrade).
    pub fn is_held(&self) -> bool {
        self.lock().client.is_some()
    }

    /// A receiver of [`PtySession::changed`], for one client.
    pub fn watch(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Waits until the pump may read more: no client, or the client is close enough.
    async fn room(&self) {
        loop {
            let mut progress = self.progress.subscribe();
            {
                let inner = self.lock();
                match &inner.client {
                    Some(c) if inner.ring.total.saturating_sub(c.position) > READ_AHEAD => {}
                    _ => return,
                }
            }
            let _ = progress.changed().await;
        }
    }

    fn append(&self, stream: u8, data: &[u8]) {
        self.lock().ring.append(stream, data);
        self.changed.send_replace(());
    }

    /// The next thing for `client` to send; output is taken (the position advances).
    pub fn next_for(&self, client: u64) -> Next {
        let mut inner = self.lock();
        let Inner {
            ring,
            client: holder,
            shell,
            ..
        } = &mut *inner;
        let Some(holder) = holder.as_mut().filter(|h| h.id == client) else {
            return Next::Evicted;
        };
        if holder.position < ring.total {
            // A client cannot fall behind the ring (the pump waits for it); if it ever did, it
            // goes on from the oldest byte kept.
            let from = holder.position.max(ring.oldest());
            let (stream, to) = ring.segment_end(from);
            let to = to.min(from + CHUNK_BYTES as u64);
            let data = ring.read(from, to);
            holder.position = to;
            drop(inner);
            self.progress.send_replace(());
            return Next::Output(stream, data);
        }
        match shell {
            Shell::Exited { code, .. } => Next::Exit(*code),
            _ => Next::Wait,
        }
    }

    /// The client went away; the session waits for the next one.
    pub fn detach(&self, client: u64) {
        let mut inner = self.lock();
        if inner.client.as_ref().is_some_and(|h| h.id == client) {
            inner.client = None;
            inner.idle_since = Instant::now();
        }
        drop(inner);
        self.progress.send_replace(());
    }

    /// Raw input for the shell; nothing once it ended.
    pub async fn write_stdin(&self, data: &[u8]) -> io::Result<()> {
        let input = match &self.lock().shell {
            Shell::Running { input, .. } => input.clone(),
            _ => return Ok(()),
        };
        match input {
            Input::Terminal(fd) => write_terminal(&fd, data).await,
            Input::Pipe(pipe) => pipe.lock().await.write_all(data).await,
        }
    }

    /// A new window size; a no-op in pipe mode or with a zero dimension.
    pub fn resize(&self, cols: u16, rows: u16) {
        if cols == 0 || rows == 0 {
            return;
        }
        if let Shell::Running {
            input: Input::Terminal(fd),
            ..
        } = &self.lock().shell
        {
            let size = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one winsize; the kernel signals SIGWINCH itself.
            unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        }
    }

    /// A signal for the shell: on a terminal, to its foreground process group (what the key
    /// would reach: a job the shell runs, with job control, has a group of its own), otherwise
    /// to the shell's group.
    pub fn signal(&self, signal: Signal) {
        let inner = self.lock();
        let (Shell::Running { input, .. }, Some(tree)) = (&inner.shell, inner.tree) else {
            return;
        };
        let mut group = tree.pgid;
        if let Input::Terminal(fd) = input {
            let mut foreground: libc::pid_t = 0;
            // SAFETY: TIOCGPGRP writes one pid_t.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGPGRP, &mut foreground) };
            if rc == 0 && foreground > 0 {
                group = foreground;
            }
        }
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group), signal);
    }
}

/// The replay ring: the newest [`RING_BYTES`] of output, the count of every byte ever written,
/// and where each stream's run of bytes starts (pipe mode has two).
#[derive(Default)]
struct Ring {
    bytes: VecDeque<u8>,
    total: u64,
    /// `(offset, stream)` of each run of one stream, oldest first; adjacent runs differ.
    segments: VecDeque<(u64, u8)>,
}

impl Ring {
    fn oldest(&self) -> u64 {
        self.total - self.bytes.len() as u64
    }

    fn append(&mut self, stream: u8, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.segments.back().is_none_or(|&(_, s)| s != stream) {
            self.segments.push_back((self.total, stream));
        }
        self.total += data.len() as u64;
        let keep = &data[data.len().saturating_sub(RING_BYTES)..];
        let overflow = (self.bytes.len() + keep.len()).saturating_sub(RING_BYTES);
        self.bytes.drain(..overflow);
        self.bytes.extend(keep);
        let oldest = self.oldest();
        while self.segments.len() > 1 && self.segments[1].0 <= oldest {
            self.segments.pop_front();
        }
    }

    /// Bytes `[from, to)`, both within what is kept.
    fn read(&self, from: u64, to: u64) -> Vec<u8> {
        let base = self.oldest();
        self.bytes
            .range((from - base) as usize..(to - base) as usize)
            .copied()
            .collect()
    }

    /// The stream of the byte at `from` and where its run ends.
    fn segment_end(&self, from: u64) -> (u8, u64) {
        let at = self.segments.partition_point(|&(start, _)| start <= from);
        let stream = at
            .checked_sub(1)
            .and_then(|i| self.segments.get(i))
            .map_or(1, |&(_, s)| s);
        let end = self
            .segments
            .get(at)
            .map_or(self.total, |&(start, _)| start);
        (stream, end)
    }
}

/// A signal by the names execd accepts; others are ignored.
pub fn signal_named(name: &str) -> Option<Signal> {
    Some(match name {
        "SIGINT" => Signal::SIGINT,
        "SIGTERM" => Signal::SIGTERM,
        "SIGKILL" => Signal::SIGKILL,
        "SIGQUIT" => Signal::SIGQUIT,
        "SIGHUP" => Signal::SIGHUP,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes_and_counts_all() {
        let mut ring = Ring::default();
        ring.append(1, b"abc");
        ring.append(2, b"de");
        assert_eq!(ring.read(0, 5), b"abcde");
        assert_eq!(ring.segment_end(0), (1, 3));
        assert_eq!(ring.segment_end(3), (2, 5));
        let big = vec![b'x'; RING_BYTES + 10];
        ring.append(2, &big);
        assert_eq!(ring.total, 5 + RING_BYTES as u64 + 10);
        assert_eq!(ring.oldest(), 15);
        assert_eq!(ring.bytes.len(), RING_BYTES);
        assert_eq!(ring.segment_end(ring.oldest()), (2, ring.total));
        ring.append(1, b"y");
        assert_eq!(ring.oldest(), 16);
        assert_eq!(ring.segment_end(ring.total - 1), (1, ring.total));
    }
}
