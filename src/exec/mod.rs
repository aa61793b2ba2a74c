//! The exec API on :44772, wire-compatible with OpenSandbox `execd` (commands, bash sessions,
//! code interpreting, metrics), so the OpenSandbox server and SDKs work unchanged. Commands and
//! session runs are processes under shims, started and placed like tasks (see `run.rs`).

pub mod api;
pub mod code;
mod commands;
mod env_file;
mod events;
mod metrics;
pub mod pty;
mod run;
mod sessions;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use code::Code;
pub use commands::{CommandError, Commands, Request};
pub use env_file::EnvFile;
pub use metrics::Metrics;
pub use pty::Ptys;
pub(crate) use run::{Driven, Driver, Spawn, SpawnError, spawn};
pub use sessions::Sessions;

/// Limits and places of the exec API (documented defaults in the README).
#[derive(Debug)]
pub struct ExecConfig {
    /// Per-command directories (background output logs, shim records).
    pub data_dir: PathBuf,
    /// Commands and session runs running at once, at most.
    pub max_running: usize,
    /// Finished command records kept, at most; the oldest go first.
    pub keep_finished: usize,
    /// How long a finished command's record and output are kept.
    pub keep_finished_for: Duration,
    /// Bytes of a background command's output kept (the newest).
    pub log_limit: u64,
    /// Bash sessions at once, at most.
    pub max_sessions: usize,
    /// How long a bash session may sit unused before it is removed.
    pub session_idle: Duration,
    /// PTY sessions at once, at most.
    pub max_ptys: usize,
    /// How long a PTY session nobody is attached to may sit before it is removed.
    pub pty_idle: Duration,
    /// The `EXECD_ENVS` file every start loads (`None`: off).
    pub env_file: Option<EnvFile>,
    pub running: AtomicUsize,
}

/// One of `max_running`, held while a command or session run is running.
pub struct RunSlot(Arc<ExecConfig>);

impl RunSlot {
    pub fn take(config: &Arc<ExecConfig>) -> Result<RunSlot, String> {
        let taken = config.running.fetch_add(1, Ordering::AcqRel);
        if taken >= config.max_running {
            config.running.fetch_sub(1, Ordering::AcqRel);
            return Err(format!(
                "{taken} commands are running; the limit is {} (--exec-max-running)",
                config.max_running
            ));
        }
        Ok(RunSlot(Arc::clone(config)))
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// 16 random bytes.
fn random_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom into a buffer we own.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n > 0 {
            filled += n as usize;
        }
    }
    bytes
}

/// A command id as execd makes them: a UUIDv4 without dashes, 32 lowercase hex digits.
pub fn new_id() -> String {
    uuid_v4().replace('-', "")
}

/// A UUIDv4 with dashes (bash session ids).
pub fn uuid_v4() -> String {
    let mut b = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Removes the background output logs an earlier sandlet left in `data_dir`. Its processes are
/// not there to stop: each one's shim killed its whole tree when that sandlet ended.
pub fn remove_leftovers(data_dir: &std::path::Path) {
    // `isolated`: isolated sessions' holder specs not yet read by a holder.
    for dir in ["commands", "isolated"].map(|d| data_dir.join(d)) {
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an earlier run's leftovers");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_execd_shapes() {
        let id = new_id();
        assert_eq!(id.len(), 32);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let uuid = uuid_v4();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
        assert_ne!(new_id(), new_id());
    }
}

/// Expands a path as execd does, without its bugs: a leading `~` is `$HOME`, `$NAME` and
/// `${NAME}` come from the request's variables over sandlet's environment, and a name defined
/// in neither is an error naming it. Other `$` are left alone.
pub fn expand_path(path: &str, envs: &[(String, String)]) -> Result<String, String> {
    let lookup = |name: &str| {
        envs.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name).ok())
    };
    if path.contains('\0') {
        return Err(format!("the directory {path:?} contains NUL"));
    }
    let mut path = path.to_string();
    if path == "~" || path.starts_with("~/") {
        let home = lookup("HOME").ok_or("~ used but HOME is not set")?;
        path = format!("{home}{}", &path[1..]);
    }
    let (out, mut missing) = substitute(&path, lookup);
    if !missing.is_empty() {
        missing.sort();
        return Err(format!(
            "path references undefined environment variables: {}",
            missing.join(",")
        ));
    }
    Ok(out)
}

/// `s` with `$NAME` and `${NAME}` replaced by their values from `lookup`, and the names it has
/// no value for (replaced by nothing). Any other `$` stays as it is.
pub(crate) fn substitute(
    s: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> (String, Vec<String>) {
    let mut out = String::with_capacity(s.len());
    let mut missing = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if !sessions::is_name(name) {
            out.push('$');
            rest = after;
            continue;
        }
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None => missing.push(name.to_string()),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    (out, missing)
}

#[cfg(test)]
mod expand_tests {
    use super::expand_path;

    #[test]
    fn home_and_variables_expand_and_unknown_names_are_named() {
        let envs = [
            ("HOME".to_string(), "/home/u".to_string()),
            ("D".to_string(), "x".to_string()),
        ];
        assert_eq!(expand_path("~/a", &envs).unwrap(), "/home/u/a");
        assert_eq!(expand_path("/t/$D/${D}y", &envs).unwrap(), "/t/x/xy");
        assert_eq!(expand_path("/cost$5", &envs).unwrap(), "/cost$5");
        assert_eq!(
            expand_path("/$NOPE_B/$NOPE_A", &envs).unwrap_err(),
            "path references undefined environment variables: NOPE_A,NOPE_B"
        );
    }
}
