//! sandlet's descriptor limit, and the one the processes it starts get. As execd and the task
//! executor do (Go raises `RLIMIT_NOFILE`'s soft limit to the hard limit at start, since Go
//! 1.19), sandlet raises its own soft limit to the hard limit: the runtime's default soft limit
//! (often 1024) is for `select()`-era programs, and sandlet multiplexes many connections,
//! files and pipes. As Go does for the programs it starts (since Go 1.21), shims put the
//! limit sandlet was started with back before they start anything: tasks and commands see the
//! pod's limit, not sandlet's.

use std::sync::OnceLock;

/// The soft limit sandlet was started with, when it raised it.
static ORIGINAL_SOFT: OnceLock<u64> = OnceLock::new();

/// The shim's argument that carries the original soft limit.
const SHIM_ARG_PREFIX: &str = "--nofile-soft=";

/// Raises the soft limit to the hard limit; returns (before, after) when it changed.
pub fn raise() -> std::io::Result<Option<(u64, u64)>> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur >= limit.rlim_max {
        return Ok(None);
    }
    let original = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let _ = ORIGINAL_SOFT.set(original);
    Ok(Some((original, limit.rlim_max)))
}

/// What a shim is started with so that it restores the original limit (nothing when sandlet
/// did not change it).
pub fn shim_arg() -> Option<String> {
    ORIGINAL_SOFT
        .get()
        .map(|soft| format!("{SHIM_ARG_PREFIX}{soft}"))
}

/// In a shim, before anything else: restores the soft limit `arg` (from [`shim_arg`]) names.
/// Best effort: a limit that cannot be restored leaves the raised one, which is still valid.
pub fn restore(arg: &std::ffi::OsStr) {
    let Some(soft) = arg
        .to_str()
        .and_then(|a| a.strip_prefix(SHIM_ARG_PREFIX))
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && soft <= limit.rlim_max {
            limit.rlim_cur = soft;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
