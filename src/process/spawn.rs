//! Starting a program as a fresh process: posix_spawn (the parent waits only for the exec, not
//! a copy of its memory), in its own process group, with no signal blocked and every signal at
//! its default disposition.
//!
//! Why not `std::process::Command`: glibc's posix_spawn leaves the child's libc-internal
//! signals (32 and 33) *ignored* unless they are named in `POSIX_SPAWN_SETSIGDEF`, and an
//! ignored disposition survives exec; std names only SIGPIPE there. So every program would
//! start with two real-time signals ignored (which a musl program uses for its timers and
//! thread cancellation). The set is filled here bit by bit, because glibc's `sigfillset` and
//! `sigaddset` refuse exactly those two signals.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where execvp looks when the environment has no PATH.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

pub struct Program<'a> {
    /// A path, or a name looked up in the `PATH` of `env`.
    pub program: &'a str,
    /// `argv[0]`.
    pub arg0: &'a str,
    pub args: &'a [String],
    /// The whole environment of the new process.
    pub env: &'a [(OsString, OsString)],
    pub working_dir: Option<&'a Path>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
}

/// Starts `program` with `/dev/null` as stdin; returns its pid (also its process group).
pub fn spawn(program: &Program) -> io::Result<i32> {
    let path = resolve(program.program, program.env, program.working_dir)?;
    let path = c_string(path.as_os_str())?;
    let argv = std::iter::once(Ok(c_string(OsStr::new(program.arg0))?))
        .chain(program.args.iter().map(|a| c_string(OsStr::new(a))))
        .collect::<io::Result<Vec<CString>>>()?;
    let envp = program
        .env
        .iter()
        .map(|(k, v)| {
            let mut entry = k.clone();
            entry.push("=");
            entry.push(v);
            c_string(&entry)
        })
        .collect::<io::Result<Vec<CString>>>()?;
    let dir = program
        .working_dir
        .map(|d| c_string(d.as_os_str()))
        .transpose()?;
    let null_terminated = |v: &[CString]| {
        v.iter()
            .map(|s| s.as_ptr() as *mut libc::c_char)
            .chain(std::iter::once(std::ptr::null_mut()))
            .collect::<Vec<_>>()
    };
    let (argv_ptrs, envp_ptrs) = (null_terminated(&argv), null_terminated(&envp));

    let mut actions = FileActions::new()?;
    let dev_null = c"/dev/null";
    check(unsafe {
        libc::posix_spawn_file_actions_addopen(
            &mut actions.0,
            0,
            dev_null.as_ptr(),
            libc::O_RDONLY,
            0,
        )
    })?;
    for (fd, target) in [(program.stdout, 1), (program.stderr, 2)] {
        check(unsafe {
            libc::posix_spawn_file_actions_adddup2(&mut actions.0, fd.as_raw_fd(), target)
        })?;
    }
    if let Some(dir) = &dir {
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut actions.0, dir.as_ptr()) })?;
    }

    let mut attrs = Attributes::new()?;
    // SAFETY: zeroed sigset_t is the empty set; every bit set is every signal (see the module
    // docs for why it is not built with sigfillset).
    let none: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset_t is plain bits; filling its bytes names every signal.
    unsafe {
        std::ptr::write_bytes(
            (&mut all as *mut libc::sigset_t).cast::<u8>(),
            0xff,
            std::mem::size_of::<libc::sigset_t>(),
        )
    };
    check(unsafe { libc::posix_spawnattr_setsigmask(&mut attrs.0, &none) })?;
    check(unsafe { libc::posix_spawnattr_setsigdefault(&mut attrs.0, &all) })?;
    check(unsafe { libc::posix_spawnattr_setpgroup(&mut attrs.0, 0) })?;
    let flags =
        libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF | libc::POSIX_SPAWN_SETPGROUP;
    check(unsafe { libc::posix_spawnattr_setflags(&mut attrs.0, flags as libc::c_short) })?;

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer refers to a live, NUL-terminated value owned above.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attrs.0,
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
        )
    })?;
    Ok(pid)
}

/// The file execvp would run: `program` itself if it has a slash, else the first executable
/// regular file named so in a directory of PATH (absolute entries only).
fn resolve(program: &str, env: &[(OsString, OsString)], dir: Option<&Path>) -> io::Result<PathBuf> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or_else(|| OsString::from(DEFAULT_PATH), |(_, v)| v.clone());
    let mut denied = false;
    for entry in path.as_bytes().split(|b| *b == b':') {
        let entry = Path::new(OsStr::from_bytes(entry));
        let candidate = match (entry.is_absolute(), dir) {
            (true, _) => entry.join(program),
            // A relative entry is relative to where the program starts.
            (false, Some(dir)) => dir.join(entry).join(program),
            (false, None) => entry.join(program),
        };
        let Ok(c) = c_string(candidate.as_os_str()) else {
            continue;
        };
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() => {
                // SAFETY: access on a NUL-terminated path we own.
                if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
                    return Ok(candidate);
                }
                denied = true;
            }
            _ => {}
        }
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        // SAFETY: init fills the zeroed value before any other use.
        let mut actions = FileActions(unsafe { std::mem::zeroed() });
        check(unsafe { libc::posix_spawn_file_actions_init(&mut actions.0) })?;
        Ok(actions)
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    fn new() -> io::Result<Attributes> {
        // SAFETY: init fills the zeroed value before any other use.
        let mut attrs = Attributes(unsafe { std::mem::zeroed() });
        check(unsafe { libc::posix_spawnattr_init(&mut attrs.0) })?;
        Ok(attrs)
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(path: &str) -> Vec<(OsString, OsString)> {
        vec![("PATH".into(), path.into())]
    }

    #[test]
    fn names_are_found_in_the_programs_own_path() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let searched = format!("/nonexistent:{}", dir.path().display());
        // Found but not executable: EACCES, as execvp says.
        assert_eq!(
            resolve("tool", &env(&searched), None)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EACCES)
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve("tool", &env(&searched), None).unwrap(), tool);
    }

    #[test]
    fn paths_are_taken_as_they_are_and_missing_names_are_enoent() {
        assert_eq!(
            resolve("./x", &env("/bin"), None).unwrap(),
            PathBuf::from("./x")
        );
        assert_eq!(
            resolve("no-such-program-here", &env("/bin"), None)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOENT)
        );
    }
}
