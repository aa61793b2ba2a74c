//! One supervisor per started task: it learns the task's exit, enforces its timeout, carries out
//! stop requests (TERM the tree, grace, KILL the tree) and sees the tree gone.

use std::future::Future;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::TaskManager;
use crate::deadline;
use crate::process::{ExitWatch, PidFd, Tree};

/// After KILL, the tree is swept again at this interval until it is gone, so processes forked
/// during a sweep are caught by the next one.
const KILL_SWEEP_INTERVAL: Duration = Duration::from_millis(100);

pub(super) struct Watched {
    pub tree: Tree,
    /// The shim's pidfd, when the shim is alive; it exits once the whole tree is gone.
    pub shim: Option<PidFd>,
    /// Whether the shim is our own child (started by this sandlet) and so ours to reap.
    pub shim_is_child: bool,
    /// `None` when the task has already ended and only its tree is left.
    pub exit: Option<ExitWatch>,
    /// When the task times out, and its timeout in seconds.
    pub deadline: Option<(Instant, i64)>,
}

pub(super) async fn supervise(
    manager: TaskManager,
    name: String,
    seq: u64,
    watched: Watched,
    mut stop: mpsc::UnboundedReceiver<()>,
) {
    let Watched {
        tree,
        shim,
        shim_is_child,
        exit,
        deadline,
    } = watched;
    let mut exit = exit.map(|watch| Box::pin(watch.ended()));
    let mut tree_gone = shim.is_none();
    let mut stop_open = true;
    let mut kill_at: Option<Instant> = None;
    let far = deadline::far();
    while exit.is_some() || !tree_gone {
        let timeout_at = deadline.filter(|_| exit.is_some() && kill_at.is_none());
        tokio::select! {
            biased;
            record = optional(&mut exit) => {
                exit = None;
                manager.on_exit(&name, seq, record);
            }
            _ = async { shim.as_ref().expect("guarded").exited().await }, if !tree_gone => {
                if shim_is_child {
                    manager.reaper().reap_owned(shim.as_ref().expect("guarded"));
                }
                tree_gone = true;
            }
            request = stop.recv(), if stop_open => match request {
                Some(()) if kill_at.is_none() => {
                    let n = tree.signal(Signal::SIGTERM);
                    tracing::info!(task = %name, descendants = n, "stopping task: sent SIGTERM");
                    kill_at = Some(deadline::after(manager.stop_grace()).unwrap_or(far));
                }
                Some(()) => {}
                None => stop_open = false,
            },
            _ = sleep_until(timeout_at.map_or(far, |(at, _)| at)), if timeout_at.is_some() => {
                let seconds = timeout_at.map_or(0, |(_, s)| s);
                manager.on_timeout(&name, seq, seconds);
                let n = tree.signal(Signal::SIGTERM);
                tracing::info!(task = %name, timeout_seconds = seconds, descendants = n, "task timed out: sent SIGTERM");
                kill_at = Some(deadline::after(manager.stop_grace()).unwrap_or(far));
            }
            _ = sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                let n = tree.signal(Signal::SIGKILL);
                tracing::info!(task = %name, descendants = n, "stop grace over: sent SIGKILL");
                kill_at = Some(Instant::now() + KILL_SWEEP_INTERVAL);
            }
        }
    }
    manager.on_tree_gone(&name, seq);
}

async fn optional<F: Future + Unpin>(future: &mut Option<F>) -> F::Output {
    match future {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
