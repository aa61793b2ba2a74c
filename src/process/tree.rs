//! Signalling a whole process tree: the task's process group plus every descendant of its shim,
//! so children that left the group (setsid, daemonising) are reached too.

use std::collections::HashMap;

use nix::sys::signal::Signal;

use super::ProcessIdentity;

/// The tree under one shim. The shim itself is never signalled: it has to outlive the tree to
/// reap it and record the exit status.
#[derive(Debug, Clone, Copy)]
pub struct Tree {
    pub shim: ProcessIdentity,
    /// The task's process group (the task leader's pid).
    pub pgid: i32,
}

impl Tree {
    /// Sends `signal` to the group and to each live descendant of the shim; returns how many
    /// processes were signalled individually.
    pub fn signal(&self, signal: Signal) -> usize {
        // The group first: it reaches processes forked after the /proc walk below.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pgid), signal);
        if !self.shim.is_alive() {
            return 0;
        }
        let mut sent = 0;
        for identity in descendants(self.shim.pid) {
            if super::pidfd::signal_identity(identity, signal as i32).is_ok() {
                sent += 1;
            }
        }
        sent
    }
}

/// Every process whose parent chain leads to `root`, from one read of `/proc`.
fn descendants(root: i32) -> Vec<ProcessIdentity> {
    let mut children: HashMap<i32, Vec<ProcessIdentity>> = HashMap::new();
    for pid in super::all_pids().unwrap_or_default() {
        if let Ok(stat) = super::stat(pid) {
            children.entry(stat.ppid).or_default().push(stat.identity);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for child in children.remove(&pid).unwrap_or_default() {
            queue.push(child.pid);
            found.push(child);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_grandchildren() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let sh = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while descendants(sh).is_empty() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let found = descendants(sh);
        assert_eq!(found.len(), 1, "the backgrounded sleep: {found:?}");
        assert!(
            descendants(std::process::id() as i32)
                .iter()
                .any(|p| p.pid == found[0].pid)
        );
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(found[0].pid), Signal::SIGKILL);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
