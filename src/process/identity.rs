//! A process is named by its pid *and* its start time: a bare pid can be recycled by an unrelated
//! process, the pair cannot.

use std::io;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// Every pid in `/proc` (of this process's PID namespace, as mounted).
pub fn all_pids() -> io::Result<Vec<i32>> {
    Ok(std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

pub fn stat(pid: i32) -> io::Result<ProcStat> {
    parse_stat(pid, &std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

fn parse_stat(pid: i32, text: &str) -> io::Result<ProcStat> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unreadable /proc/{pid}/stat"),
        )
    };
    // The command name (field 2) may hold spaces and ')'; the fields after the last ')' do not.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .ok_or_else(bad)?
        .1
        .split_whitespace()
        .collect();
    // fields[0] is field 3 (state), fields[1] field 4 (ppid), fields[19] field 22 (starttime).
    let state = fields.first().ok_or_else(bad)?;
    Ok(ProcStat {
        identity: ProcessIdentity {
            pid,
            start_ticks: fields
                .get(19)
                .and_then(|f| f.parse().ok())
                .ok_or_else(bad)?,
        },
        ppid: fields.get(1).and_then(|f| f.parse().ok()).ok_or_else(bad)?,
        zombie: matches!(*state, "Z" | "X"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let text = "42 (a b) c) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 1000 10";
        let s = parse_stat(42, text).unwrap();
        assert_eq!(
            (s.ppid, s.identity.start_ticks, s.zombie),
            (7, 12345, false)
        );
        assert!(parse_stat(42, "42 (x) Z 1").is_err());
    }

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
