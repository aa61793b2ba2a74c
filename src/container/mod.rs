//! Where sidecar-mode processes will run: the pod's main container, found among the processes
//! of the shared PID namespace.
//!
//! Three ways to find it:
//! - by the `SANDBOX_MAIN_CONTAINER=<name>` environment marker, as the Go executor and existing
//!   Pool templates do (reading another process's environment needs CAP_SYS_PTRACE);
//! - with no marker, as the one other container: the processes whose mount namespace is
//!   neither sandlet's nor that of the pod's PID 1 (the pause container). More than one such
//!   mount namespace is ambiguous and refused;
//! - when nothing is configured: the marked container if there is one, else the one other
//!   container (see [`Locator::MarkedOrOther`] and [`shares_pid_namespace`]).
//!
//! Either way, sandlet's own descendants never count, nor anything under a sandlet shim (tasks of
//! a previous sandlet instance, orphaned to the pause container by a restart): tasks run inside
//! the main container and inherit its environment, marker included. Of the candidates the oldest
//! process wins: the container's first process, not something it started later.

pub(crate) mod cgroup;
mod users;
mod watch;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::process::enter::{Credentials, Placement};
use crate::process::{ProcessIdentity, all_pids, stat};
pub use users::UserDb;
pub use watch::{Located, TargetWatch};

pub const MARKER_VAR: &str = "SANDBOX_MAIN_CONTAINER";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// The process carrying `SANDBOX_MAIN_CONTAINER=<value>`.
    Marker(String),
    /// The one container other than sandlet's and the pause container.
    OtherContainer,
    /// The container carrying the marker with this value if one does, else the one other
    /// container: what sandlet does when nothing says which (the OpenSandbox Pool templates
    /// set no environment on their containers).
    MarkedOrOther(String),
}

/// Whether sandlet shares its PID namespace with other containers (`shareProcessNamespace`):
/// then PID 1 is the pod's pause container, in a mount namespace not sandlet's. In a container
/// of its own (or inside the main container without a shared PID namespace) PID 1 is that
/// container's own first process. A PID 1 sandlet cannot look at (no CAP_SYS_PTRACE) counts as
/// not shared: without that capability sandlet could not enter another container anyway.
pub fn shares_pid_namespace() -> bool {
    crate::process::enter::same_namespace(1, "mnt") == Some(false)
}

/// The main container, as located.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub process: ProcessIdentity,
    pub uid: u32,
    pub gid: u32,
    /// Inode of its mount namespace: a changed value means the container was replaced.
    pub mount_namespace: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "no process carries {MARKER_VAR}={0} (is the main container running, and does sandlet have CAP_SYS_PTRACE?)"
    )]
    MarkerNotFound(String),
    #[error("no container other than sandlet's and the pause container was found")]
    NoOtherContainer,
    #[error(
        "{0} other containers were found; set the {MARKER_VAR} marker on the main one to choose"
    )]
    Ambiguous(usize),
    #[error("reading /proc: {0}")]
    Proc(#[from] io::Error),
}

/// Finds the main container's oldest process.
pub fn locate(locator: &Locator) -> Result<Target, TargetError> {
    let me = std::process::id() as i32;
    let own_mnt = mount_namespace(me)?;
    let pause_mnt = mount_namespace(1).ok();
    let mut candidates: Vec<(Target, u64)> = Vec::new();
    for pid in all_pids()? {
        if pid == me || pid == 1 {
            continue;
        }
        let Ok(mnt) = mount_namespace(pid) else {
            continue;
        };
        let other = mnt != own_mnt && Some(mnt) != pause_mnt;
        let matches = match locator {
            Locator::Marker(value) => has_marker(pid, value),
            Locator::OtherContainer => other,
            // Marked processes are sorted out below; here, any other container's.
            Locator::MarkedOrOther(_) => other,
        };
        // The parent-chain walk (a /proc read per ancestor) only for processes that match.
        if !matches || started_by_sandlet(pid, me) || in_runtime_init(pid) {
            continue;
        }
        let (Ok(stat), Some((uid, gid))) = (stat(pid), ids(pid)) else {
            continue;
        };
        if stat.zombie {
            continue;
        }
        candidates.push((
            Target {
                process: stat.identity,
                uid,
                gid,
                mount_namespace: mnt,
            },
            stat.identity.start_ticks,
        ));
    }
    if let Locator::MarkedOrOther(value) = locator
        && candidates
            .iter()
            .any(|(t, _)| has_marker(t.process.pid, value))
    {
        candidates.retain(|(t, _)| has_marker(t.process.pid, value));
    }
    if matches!(locator, Locator::OtherContainer | Locator::MarkedOrOther(_)) {
        let mut namespaces: Vec<u64> = candidates.iter().map(|(t, _)| t.mount_namespace).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        if namespaces.len() > 1 {
            return Err(TargetError::Ambiguous(namespaces.len()));
        }
    }
    candidates
        .into_iter()
        .min_by_key(|(_, started)| *started)
        .map(|(t, _)| t)
        .ok_or(match locator {
            Locator::Marker(value) => TargetError::MarkerNotFound(value.clone()),
            Locator::OtherContainer | Locator::MarkedOrOther(_) => TargetError::NoOtherContainer,
        })
}

/// Why a process cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// Sidecar mode, and the main container is not there right now.
    #[error("{0}")]
    Unavailable(String),
    /// The requested user cannot be resolved.
    #[error("{0}")]
    User(String),
}

/// How a process is to be started: where, as whom, from which environment.
#[derive(Debug, Default, Clone)]
pub struct StartIn {
    /// Replace the inherited environment with `env` (sidecar mode), rather than add to it.
    pub clear_env: bool,
    /// The environment under the request's own variables.
    pub env: Vec<(String, String)>,
    pub placement: Option<Placement>,
    pub credentials: Option<Credentials>,
    /// Where the process's absolute paths resolve: `/`, or the main container's root.
    pub root: PathBuf,
}

/// Resolves where a process runs and as whom. With a `watch` (sidecar mode) it runs in the main
/// container: its namespaces and cgroups, its environment, by default its user and groups, and
/// `user` (`name[:group]` or numbers) resolved in its `/etc/passwd` and `/etc/group`. Without one
/// (local mode) it runs next to sandlet, as sandlet's user unless `user` is given. `HOME` and
/// `USER` follow the user the process runs as, where the account files know it.
pub fn start_in(watch: Option<&TargetWatch>, user: &str) -> Result<StartIn, PlaceError> {
    let Some(watch) = watch else {
        let root = PathBuf::from("/");
        if user.is_empty() {
            return Ok(StartIn {
                root,
                ..StartIn::default()
            });
        }
        let resolved = UserDb::read(&root)
            .and_then(|db| db.resolve(user))
            .map_err(PlaceError::User)?;
        return Ok(StartIn {
            env: account_env(resolved.name.as_deref(), &resolved.home),
            credentials: Some(resolved.credentials),
            root,
            ..StartIn::default()
        });
    };
    let located = watch.current().map_err(PlaceError::Unavailable)?;
    let db = UserDb::read(&located.root()).map_err(PlaceError::User)?;
    let (credentials, account_vars) = if user.is_empty() {
        let t = &located.target;
        let vars = db
            .by_uid(t.uid)
            .map(|a| account_env(Some(&a.name), &a.home))
            .unwrap_or_default();
        let credentials = Credentials {
            uid: t.uid,
            gid: t.gid,
            groups: located.groups.clone(),
        };
        (credentials, vars)
    } else {
        let resolved = db.resolve(user).map_err(PlaceError::User)?;
        let vars = account_env(resolved.name.as_deref(), &resolved.home);
        (resolved.credentials, vars)
    };
    let mut env = located.environ.clone();
    crate::http::auth::strip_credentials(&mut env);
    env.extend(account_vars);
    Ok(StartIn {
        clear_env: true,
        env,
        placement: Some(Placement {
            target: located.target.process,
            method: located.method,
            cgroups: located
                .cgroups
                .iter()
                .filter_map(|c| c.procs.clone())
                .collect(),
            bounding_set: located.bounding_set,
            no_new_privs: located.no_new_privs,
        }),
        credentials: Some(credentials),
        root: located.root(),
    })
}

/// What `path` (absolute) is inside `root`, with every symlink and `..` resolved inside it.
pub fn metadata_in(root: &Path, path: &str) -> io::Result<std::fs::Metadata> {
    if root == Path::new("/") {
        // sandlet's own root: nothing to stay inside of, and one syscall instead of five.
        return std::fs::metadata(path);
    }
    let fd = crate::files::root::Root::open(root)?.open_at(path, nix::fcntl::OFlag::O_PATH)?;
    std::fs::File::from(fd).metadata()
}

/// The sandbox's working directory, as a path inside it: sandlet's own (local mode), or that of
/// the main container's first process (its image's `WORKDIR`); `/` when it cannot be read.
pub fn working_dir(located: Option<&Located>) -> String {
    let dir = match located {
        None => std::env::current_dir(),
        Some(located) => std::fs::read_link(format!("/proc/{}/cwd", located.target.process.pid)),
    };
    dir.map(|d| d.to_string_lossy().into_owned())
        .ok()
        .filter(|d| d.starts_with('/'))
        .unwrap_or_else(|| "/".into())
}

fn account_env(name: Option<&str>, home: &str) -> Vec<(String, String)> {
    let mut env = vec![("HOME".to_string(), home.to_string())];
    if let Some(name) = name {
        env.push(("USER".to_string(), name.to_string()));
    }
    env
}

fn mount_namespace(pid: i32) -> io::Result<u64> {
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/mnt"))?.ino())
}

fn has_marker(pid: i32, value: &str) -> bool {
    let wanted = format!("{MARKER_VAR}={value}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == wanted.as_bytes()))
}

/// The real uid and gid, from `/proc/<pid>/status`.
fn ids(pid: i32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let first = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((first("Uid:")?, first("Gid:")?))
}

/// Whether `pid` is a container's first process still in the runtime's hands: runc's init
/// (`runc:[2:INIT]`, earlier stages `runc:[0:PARENT]`, `runc:[1:CHILD]`) is already in the
/// container's namespaces and root, but still root, with runc's environment, until it execs
/// the container's command. Found there (a restarting main container, seen on a real node),
/// every later task would run as root with that environment.
fn in_runtime_init(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.starts_with(b"runc:["))
}

/// Whether `pid` descends from this sandlet or from any sandlet shim (see the module docs).
fn started_by_sandlet(mut pid: i32, me: i32) -> bool {
    // Bounded: a parent chain is never longer than the number of processes.
    for _ in 0..4096 {
        let Ok(s) = stat(pid) else { return false };
        if s.ppid == me || is_shim(s.ppid) {
            return true;
        }
        if s.ppid <= 1 {
            return false;
        }
        pid = s.ppid;
    }
    false
}

fn is_shim(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.starts_with(crate::process::SHIM_ARGV0.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_children_never_count_and_a_missing_marker_is_named() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARKER_VAR, "unit-test-marker")
            .spawn()
            .unwrap();
        let found = locate(&Locator::Marker("unit-test-marker".into()));
        child.kill().unwrap();
        child.wait().unwrap();
        let err = found.unwrap_err();
        assert!(
            matches!(err, TargetError::MarkerNotFound(ref m) if m == "unit-test-marker"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("SANDBOX_MAIN_CONTAINER=unit-test-marker")
        );
    }
}
