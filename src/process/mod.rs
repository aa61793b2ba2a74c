//! Starting, watching and stopping process trees.
//!
//! Every task runs under a *shim*: sandlet re-executed in its `shim` role (the conmon /
//! containerd-shim pattern). The shim is the task's parent and the subreaper of its tree; it
//! copies the task's output into bounded log files and records the exit status in the task's
//! directory before it tells sandlet. Because the shim, not sandlet, is the parent, a task keeps
//! running and its exit status is still recorded while sandlet itself is down or restarting.

pub mod enter;
mod identity;
mod launch;
pub mod nofile;
mod output;
mod pidfd;
mod reaper;
pub mod shim;
mod spawn;
mod tree;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use identity::{ProcessIdentity, all_pids, stat};
pub use launch::{ExitWatch, Launched, Launcher, ShimEvent, read_exit_record};
pub use output::{LogChunk, read_log};
pub use pidfd::{PidFd, signal_identity};
pub use reaper::Reaper;
pub use tree::Tree;

/// How a process ended, as the kernel or sandlet saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Outcome {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    StartFailed {
        message: String,
    },
    /// sandlet could not learn how the process ended; `reason` says why.
    Lost {
        reason: String,
        message: String,
    },
}

/// `run.json`, written by the shim once the task's process exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub shim: ProcessIdentity,
    pub task: ProcessIdentity,
    pub started_at: DateTime<Utc>,
    /// The main container's process the task was started in (sidecar mode): once it is gone,
    /// the container has restarted and the task is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ProcessIdentity>,
}

/// `launch.json`, written by sandlet just before it hands a task to a shim: which shim has it.
/// A restarted sandlet that finds none knows the task never reached a shim (and can start it);
/// one that finds it waits for that shim while it lives, rather than guess what it did, and
/// then knows from the shim's [`CLAIM_FILE`] whether it may have started the task.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchRecord {
    pub shim: ProcessIdentity,
}

/// `exit.json`, written durably by the shim when the task's process has ended (or failed to start).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    pub finished_at: DateTime<Utc>,
    pub outcome: Outcome,
}

/// Grows a pipe to 1 MiB (the unprivileged maximum by default), so a fast writer and its
/// reader meet less often. Best effort: the default size works, only slower.
pub fn grow_pipe(fd: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

/// How shims show up in `ps` (and how sidecar mode tells a task's ancestry from a container's).
pub const SHIM_ARGV0: &str = "sandlet-shim";

pub const LAUNCH_FILE: &str = "launch.json";
/// Created (empty) by a task's shim once it has its spec, before it starts the task: a shim that
/// is gone without it never started anything, so a restarted sandlet may start the task.
pub const CLAIM_FILE: &str = "claim";
pub const RUN_FILE: &str = "run.json";
pub const EXIT_FILE: &str = "exit.json";
