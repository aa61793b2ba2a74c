//! The one owner of child exits in sandlet.
//!
//! sandlet is a child subreaper, so processes orphaned below it (for instance when a shim is
//! killed) become its children. Children with an owner (shims) are reaped by that owner through
//! their pidfd; everything else is reaped here on SIGCHLD. The registry lock is held across
//! spawn + registration, so this reaper can never take an owned child's exit status.

use std::collections::HashSet;
use std::io;
use std::process::Child;
use std::sync::{Arc, Mutex};

use tokio::signal::unix::{SignalKind, signal};

use super::PidFd;

pub struct Reaper {
    owned: Mutex<HashSet<i32>>,
}

impl Reaper {
    /// Makes this process a child subreaper and starts reaping orphans. Needs a tokio runtime.
    pub fn install() -> io::Result<Arc<Reaper>> {
        nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)?;
        let reaper = Arc::new(Reaper {
            owned: Mutex::new(HashSet::new()),
        });
        let mut sigchld = signal(SignalKind::child())?;
        let weak = Arc::downgrade(&reaper);
        tokio::spawn(async move {
            while sigchld.recv().await.is_some() {
                let Some(reaper) = weak.upgrade() else { break };
                reaper.reap_orphans();
            }
        });
        Ok(reaper)
    }

    /// Spawns a child whose exit the caller will own, and returns its pidfd.
    pub fn spawn_owned(
        &self,
        spawn: impl FnOnce() -> io::Result<Child>,
    ) -> io::Result<(Child, PidFd)> {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let child = spawn()?;
        let pid = child.id() as i32;
        let pidfd = PidFd::open(pid)?;
        owned.insert(pid);
        Ok((child, pidfd))
    }

    /// Reaps an owned child that has exited and forgets it.
    pub fn reap_owned(&self, pidfd: &PidFd) {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = pidfd.reap() {
            tracing::warn!(pid = pidfd.pid(), error = %e, "could not reap shim");
        }
        owned.remove(&pidfd.pid());
    }

    fn reap_orphans(&self) {
        let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        for pid in own_children() {
            if owned.contains(&pid) {
                continue;
            }
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on one specific child with a buffer we own.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG,
                )
            };
            if rc == 0 && unsafe { info.si_pid() } == pid {
                tracing::debug!(pid, "reaped an orphaned process");
            }
        }
    }
}

/// Direct children of this process, from every thread's `children` list.
fn own_children() -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(threads) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for thread in threads.flatten() {
        if let Ok(list) = std::fs::read_to_string(thread.path().join("children")) {
            pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids
}
