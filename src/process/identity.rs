//! A process is named by its pid *and* its start time: a bare pid can be recycled by an unrelated
//! process, the pair cannot.

use std::io;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// The few `/proc/<pid>/stat` facts sandlet uses.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub identity: ProcessIdentity,
    pub ppid: i32,
    pub zombie: bool,
}

pub fn stat(pid: i32) -> io::Result<ProcStat> {
    let stat = procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .map_err(to_io)?;
    Ok(ProcStat {
        identity: ProcessIdentity {
            pid,
            start_ticks: stat.starttime,
        },
        ppid: stat.ppid,
        zombie: stat.state == 'Z' || stat.state == 'X',
    })
}

impl ProcessIdentity {
    pub fn of(pid: i32) -> io::Result<Self> {
        stat(pid).map(|s| s.identity)
    }

    /// True while this very process exists and has not exited (a zombie has exited).
    pub fn is_alive(&self) -> bool {
        stat(self.pid).is_ok_and(|s| s.identity == *self && !s.zombie)
    }
}

pub(crate) fn to_io(e: procfs::ProcError) -> io::Error {
    match e {
        procfs::ProcError::NotFound(_) => io::Error::from(io::ErrorKind::NotFound),
        procfs::ProcError::PermissionDenied(_) => io::Error::from(io::ErrorKind::PermissionDenied),
        procfs::ProcError::Io(e, _) => e,
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_identity_is_alive_and_a_changed_start_is_not() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        assert!(
            !ProcessIdentity {
                start_ticks: me.start_ticks + 1,
                ..me
            }
            .is_alive()
        );
    }
}
