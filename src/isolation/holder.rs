//! The `isolate` role: `sandlet isolate <file>`, one per isolated session, started under a shim
//! like any command; the file (in sandlet's data directory, removed once read) holds its
//! [`HolderSpec`] as JSON, kept out of the argv every process of the session could read. It is
//! two processes:
//!
//! - the *keeper*, in the sandbox's namespaces (it enters the main container's first in sidecar
//!   mode): it makes what the session needs in the sandbox (missing overlay directories, the
//!   persistent upper layers), creates the session's PID namespace and forks its first process,
//!   writes the user namespace's id maps when there is one, says `ready <pid>` on stdout, and
//!   waits; when the session's PID 1 is gone (killed to end the session) it removes the
//!   session's persistent layers and exits;
//! - the session's *PID 1*, in its own mount, UTS, IPC and (unless the network is shared)
//!   network namespaces: it builds the session's filesystem (`mounts.rs`), enters the user
//!   namespace if asked, and then only reaps. Its death ends every process of the session (the
//!   kernel kills a PID namespace with its first process); it dies with the keeper too.
//!
//! Runs join PID 1's namespaces through the shims (`process::enter`). Failures are reported as
//! `error invalid <message>` (the request cannot be met: a missing bind source, a persistent
//! overlay where layers cannot live), `error unsupported <message>` (sandlet lacks what it
//! takes) or `error failed <message>`. With `probe` set, the whole
//! setup is tried once and `probe <json>` says what works; nothing stays.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use serde::{Deserialize, Serialize};

use super::mounts;
use super::spec::{HolderSpec, MountSpec};
use crate::files::acting::act_as;
use crate::process::enter::{ChildSetup, Credentials, Kernel};

/// Where the role is selected: `sandlet isolate` (argv[1]).
pub const ROLE: &str = "isolate";

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// The request cannot be met as asked: the client's to change.
    #[error("{0}")]
    Invalid(String),
    /// What was asked cannot be had here (sandlet lacks what it takes).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Failed(String),
}

impl HolderError {
    fn line(&self) -> String {
        let (kind, message) = match self {
            HolderError::Invalid(m) => ("invalid", m),
            HolderError::Unsupported(m) => ("unsupported", m),
            HolderError::Failed(m) => ("failed", m),
        };
        format!("error {kind} {}\n", message.replace('\n', " "))
    }

    /// Parses an `error <kind> <message>` line.
    pub fn from_line(line: &str) -> Option<HolderError> {
        let rest = line.strip_prefix("error ")?;
        let (kind, message) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(match kind {
            "invalid" => HolderError::Invalid(message.into()),
            "unsupported" => HolderError::Unsupported(message.into()),
            _ => HolderError::Failed(message.into()),
        })
    }
}

/// What a probe found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// A user namespace could be made in a session.
    pub userns: bool,
    /// Why not, when not.
    pub userns_message: Option<String>,
    /// Persistent overlay layers can live in the layers' directory.
    pub persist: bool,
    pub persist_message: Option<String>,
}

/// Runs the role; returns the exit code.
pub fn run() -> i32 {
    let mut stdout = std::io::stdout();
    let read = std::env::args()
        .nth(2)
        .ok_or_else(|| "no spec file".to_string())
        .and_then(|file| {
            let text = std::fs::read(&file).map_err(|e| format!("{file}: {e}"));
            let _ = std::fs::remove_file(&file);
            serde_json::from_slice::<HolderSpec>(&text?).map_err(|e| format!("{file}: {e}"))
        });
    let spec = match read {
        Ok(spec) => spec,
        Err(why) => {
            let _ = stdout.write_all(
                HolderError::Failed(format!("bad holder spec: {why}"))
                    .line()
                    .as_bytes(),
            );
            return 1;
        }
    };
    match keep(&spec, &mut stdout) {
        Ok(code) => code,
        Err(e) => {
            let _ = stdout.write_all(e.line().as_bytes());
            let _ = stdout.flush();
            1
        }
    }
}

fn failed(doing: impl std::fmt::Display, e: impl std::fmt::Display) -> HolderError {
    HolderError::Failed(format!("{doing}: {e}"))
}

/// The keeper (see the module docs).
fn keep(spec: &HolderSpec, stdout: &mut impl Write) -> Result<i32, HolderError> {
    if let Some(placement) = &spec.placement {
        ChildSetup::prepare(Some(placement), None, None)
            .map_err(HolderError::Failed)?
            .apply(&Kernel)
            .map_err(|(step, e)| {
                failed(
                    format!("cannot enter the main container (step {step:?})"),
                    e,
                )
            })?;
    }
    if spec
        .mounts
        .iter()
        .any(|m| matches!(m, MountSpec::Overlay { .. }))
    {
        mounts::check_overlay_capabilities()?;
    }
    remove_stale_layers(spec);
    let persist = prepare_sandbox(spec)?;
    nix::sched::unshare(CloneFlags::CLONE_NEWPID)
        .map_err(|e| failed("cannot make the session's PID namespace", e))?;
    let (from_child, to_parent) = pipe()?;
    let (from_parent, to_child) = pipe()?;
    // SAFETY: the keeper is single-threaded (no runtime runs in this role).
    let child = match unsafe { fork() }.map_err(|e| failed("cannot fork the session's PID 1", e))? {
        ForkResult::Child => {
            drop((from_child, to_child));
            let code = init(spec, to_parent, from_parent);
            std::process::exit(code);
        }
        ForkResult::Parent { child } => child,
    };
    drop((to_parent, from_parent));
    let mut from_child = std::fs::File::from(from_child);
    let mut to_child = std::fs::File::from(to_child);
    let outcome = loop {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while from_child.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        match line.as_str() {
            "userns" => {
                let mapped = map_ids(child, spec.userns.unwrap_or((0, 0)));
                let answer = if mapped.is_ok() {
                    "mapped\n"
                } else {
                    "unmapped\n"
                };
                let _ = to_child.write_all(answer.as_bytes());
                if let Err(e) = mapped {
                    break Err(e);
                }
            }
            "ready" => break Ok(None),
            probe if probe.starts_with("probe ") => break Ok(Some(probe[6..].to_string())),
            error => {
                break Err(HolderError::from_line(error).unwrap_or_else(|| {
                    HolderError::Failed(
                        "the session's PID 1 ended while it was being set up".into(),
                    )
                }));
            }
        }
    };
    let report = match outcome {
        Ok(None) => format!("ready {child}\n"),
        Ok(Some(found)) => {
            let mut probe: Probe = serde_json::from_str(&found).unwrap_or_default();
            probe.persist = persist.is_ok();
            probe.persist_message = persist.err();
            format!(
                "probe {}\n",
                serde_json::to_string(&probe).unwrap_or_default()
            )
        }
        Err(e) => {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            e.line()
        }
    };
    let _ = stdout.write_all(report.as_bytes());
    let _ = stdout.flush();
    let code = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(..)) => break 0,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break 0,
        }
    };
    if spec
        .mounts
        .iter()
        .any(|m| matches!(m, MountSpec::Overlay { persist: true, .. }))
    {
        let _ = std::fs::remove_dir_all(spec.session_dir());
    }
    Ok(if report.starts_with("error") { 1 } else { code })
}

/// The session's PID 1 (see the module docs); returns its exit code if it ever ends.
fn init(spec: &HolderSpec, to_parent: OwnedFd, from_parent: OwnedFd) -> i32 {
    let mut to_parent = std::fs::File::from(to_parent);
    // SAFETY: plain prctl on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if let Err(e) = build(spec, &mut to_parent, from_parent) {
        let _ = to_parent.write_all(e.line().as_bytes());
        return 1;
    }
    if spec.probe {
        let probe = probe_userns();
        let _ = to_parent.write_all(
            format!(
                "probe {}\n",
                serde_json::to_string(&probe).unwrap_or_default()
            )
            .as_bytes(),
        );
        return 0;
    }
    let _ = to_parent.write_all(b"ready\n");
    drop(to_parent);
    // Nothing of the session's writes to the shim's pipes through PID 1.
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    reap_forever()
}

/// The session's namespaces and filesystem; the user namespace last, as the parent maps it.
fn build(
    spec: &HolderSpec,
    to_parent: &mut std::fs::File,
    from_parent: OwnedFd,
) -> Result<(), HolderError> {
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if !spec.share_net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    nix::sched::unshare(flags).map_err(|e| failed("cannot make the session's namespaces", e))?;
    if !spec.share_net {
        loopback_up()?;
    }
    mounts::build(spec)?;
    if spec.userns.is_some() {
        nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
            .map_err(|e| failed("cannot make the session's user namespace", e))?;
        to_parent
            .write_all(b"userns\n")
            .map_err(|e| failed("cannot ask for the id maps", e))?;
        let mut answer = [0u8; 7];
        let mut from_parent = std::fs::File::from(from_parent);
        let n = from_parent.read(&mut answer).unwrap_or(0);
        if &answer[..n.min(6)] != b"mapped" {
            return Err(HolderError::Failed(
                "the user namespace's ids were not mapped".into(),
            ));
        }
    }
    Ok(())
}

/// Reaps whatever ends in the session, forever.
fn reap_forever() -> i32 {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let _ = chld.thread_block();
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = chld.wait();
    }
}

/// Whether a process of the session could make a user namespace (forked, so the session's PID
/// 1 stays as it is).
fn probe_userns() -> Probe {
    // SAFETY: single-threaded; the child only unshares and exits.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let code = i32::from(nix::sched::unshare(CloneFlags::CLONE_NEWUSER).is_err());
            // SAFETY: exit without running the parent's destructors twice.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            let ok = matches!(waitpid(child, None), Ok(WaitStatus::Exited(_, 0)));
            Probe {
                userns: ok,
                userns_message: (!ok).then(|| {
                    "user namespaces cannot be made here (user.max_user_namespaces, or the runtime's seccomp profile)".into()
                }),
                ..Probe::default()
            }
        }
        Err(e) => Probe {
            userns_message: Some(format!("cannot fork: {e}")),
            ..Probe::default()
        },
    }
}

/// `uid uid 1` and `gid gid 1`: the session's ids are the same inside and out.
fn map_ids(child: Pid, (uid, gid): (u32, u32)) -> Result<(), HolderError> {
    for (file, line) in [
        ("uid_map", format!("{uid} {uid} 1\n")),
        ("gid_map", format!("{gid} {gid} 1\n")),
    ] {
        let path = format!("/proc/{child}/{file}");
        std::fs::write(&path, line).map_err(|e| failed(format!("cannot write {path}"), e))?;
    }
    Ok(())
}

/// A new network namespace has only a loopback interface, and it is down.
fn loopback_up() -> Result<(), HolderError> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| failed("cannot open a socket", e))?;
    // SAFETY: an ifreq naming "lo", read then written back with IFF_UP by the kernel's ioctls.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            request.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(socket.as_fd().as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) != 0 {
            return Err(failed(
                "cannot read the loopback's flags",
                std::io::Error::last_os_error(),
            ));
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_fd().as_raw_fd(), libc::SIOCSIFFLAGS, &request) != 0 {
            return Err(failed(
                "cannot bring the loopback up",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), HolderError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed("cannot make a pipe", e))
}

/// Removes the persistent layers of sessions that are gone (an earlier sandlet's).
fn remove_stale_layers(spec: &HolderSpec) {
    let dir = Path::new(&spec.upper_root).join("sandlet");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !spec.live.contains(&name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Makes in the sandbox what the session needs before its namespaces exist: missing overlay
/// directories (given to the session's owner) and mount points of binds, and the directories of
/// persistent layers. `Ok` when persistent layers can live in the layers' directory; the error
/// says why not (it fails the session only if it asked for one).
fn prepare_sandbox(spec: &HolderSpec) -> Result<Result<(), String>, HolderError> {
    let private = |path: &str| {
        (spec.private_tmp && super::spec::is_within(path, "/tmp"))
            || super::spec::is_within(path, "/run")
    };
    for m in &spec.mounts {
        match m {
            MountSpec::Overlay { path, .. } => make_dirs(path, spec.owner)?,
            MountSpec::Bind { source, dest, .. } => {
                let source_meta = std::fs::metadata(source).map_err(|e| {
                    HolderError::Invalid(format!("bind source {source} cannot be used: {e}"))
                })?;
                if source == dest {
                    continue;
                }
                if !private(dest) && !Path::new(dest).exists() {
                    if source_meta.is_dir() {
                        make_dirs(dest, None)?;
                    } else {
                        if let Some(parent) = Path::new(dest).parent() {
                            std::fs::create_dir_all(parent).map_err(|e| {
                                failed(format!("cannot create {}", parent.display()), e)
                            })?;
                        }
                        std::fs::File::create(dest)
                            .map_err(|e| failed(format!("cannot create {dest}"), e))?;
                    }
                }
            }
        }
    }
    let persist = layers_possible(&spec.upper_root);
    let wanted: Vec<usize> = spec
        .mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m, MountSpec::Overlay { persist: true, .. }))
        .map(|(i, _)| i)
        .collect();
    if wanted.is_empty() {
        return Ok(persist);
    }
    if let Err(why) = &persist {
        return Err(HolderError::Invalid(format!(
            "persistent overlays cannot be kept here: {why}; use persist: false, or give sandlet a layers directory (--exec-isolation-dir) on a filesystem overlayfs takes as upper (an emptyDir)"
        )));
    }
    let session_dir = spec.session_dir();
    for dir in [format!("{}/sandlet", spec.upper_root), session_dir.clone()] {
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed(format!("cannot create {dir}"), e)),
        }
        // Searchable by the layers' owners, listable by root alone.
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711));
    }
    for index in wanted {
        let MountSpec::Overlay { path, .. } = &spec.mounts[index] else {
            continue;
        };
        let dir = spec.layer_dir(index);
        std::fs::create_dir(&dir).map_err(|e| failed(format!("cannot create {dir}"), e))?;
        // The upper layer is made by the lower directory's owner, who may write here.
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        make_upper(path, &format!("{dir}/upper"), &format!("{dir}/work"))?;
    }
    Ok(Ok(()))
}

/// Whether overlayfs can take upper layers in `upper_root`: it exists and is not itself an
/// overlay (a container's root filesystem usually is).
fn layers_possible(upper_root: &str) -> Result<(), String> {
    let fs = nix::sys::statfs::statfs(upper_root).map_err(|e| format!("{upper_root}: {e}"))?;
    if fs.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC {
        return Err(format!("{upper_root} is on an overlay filesystem"));
    }
    Ok(())
}

/// `mkdir -p path`; the last directory, if made, goes to `owner`.
fn make_dirs(path: &str, owner: Option<(u32, u32)>) -> Result<(), HolderError> {
    if Path::new(path).is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|e| failed(format!("cannot create {path}"), e))?;
    if let Some((uid, gid)) = owner.filter(|o| *o != (0, 0)) {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
            failed(
                format!("cannot give the new directory {path} to {uid}:{gid} (sandlet needs CAP_CHOWN; or create it beforehand)"),
                e,
            )
        })?;
    }
    Ok(())
}

/// An overlay's upper layer and work directory for the lower directory `lower`: the upper's
/// root has the lower's owner and mode (the session's view of the directory is the upper's
/// root), so it is made by that owner, no CAP_CHOWN needed.
pub fn make_upper(lower: &str, upper: &str, work: &str) -> Result<(), HolderError> {
    let meta = std::fs::metadata(lower).map_err(|e| failed(format!("cannot read {lower}"), e))?;
    if !meta.is_dir() {
        return Err(HolderError::Invalid(format!(
            "overlay {lower} is not a directory"
        )));
    }
    nix::unistd::mkdir(work, nix::sys::stat::Mode::from_bits_truncate(0o700))
        .map_err(|e| failed(format!("cannot create {work}"), e))?;
    let owner = Credentials {
        uid: meta.uid(),
        gid: meta.gid(),
        groups: vec![meta.gid()],
    };
    let _acting =
        act_as(&owner).map_err(|e| failed("cannot act as the lower directory's owner", e))?;
    nix::unistd::mkdir(upper, nix::sys::stat::Mode::from_bits_truncate(0o700))
        .map_err(|e| failed(format!("cannot create {upper}"), e))?;
    std::fs::set_permissions(upper, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| failed(format!("cannot set the mode of {upper}"), e))
}
