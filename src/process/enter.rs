//! Putting a freshly forked task into its place before it execs: the main container's cgroups
//! and namespaces (sidecar mode), its default working directory, and the task's credentials.
//!
//! The shim prepares a [`ChildSetup`] before forking (every file opened, every string and list
//! allocated), because between fork and exec the child may only make plain syscalls. The steps
//! run in a fixed order, each one possible only after the one before:
//! 1. join the main container's cgroups (from sandlet's cgroup namespace, where both are visible);
//! 2. enter it, by one of two [`Method`]s: join its namespaces (cgroup, IPC, UTS, net, then mount
//!    last: it resets root and cwd), or, where sandlet may not join namespaces (no
//!    CAP_SYS_ADMIN, as with a container runtime's default capabilities), change root to its
//!    filesystem (`/proc/<pid>/root`, CAP_SYS_CHROOT). A PID namespace of its own (an isolated
//!    session's) is joined by the shim before it forks, as only children enter one
//!    ([`ChildSetup::enter_pid_namespace`]);
//! 3. go to its working directory (the fd of `/proc/<pid>/cwd`, opened before);
//! 4. drop the capabilities its bounding set lacks, so a root task never holds more than the
//!    container could (needs CAP_SETPCAP, so before the uid changes);
//! 5. supplementary groups; then its user namespace, if it has one of its own (an isolated
//!    session's, whose ids map to the same ids outside), while the task still has the
//!    capabilities to join it; then gid, uid (setuid away from root clears every capability);
//! 6. no_new_privs when the container has it;
//! 7. the requested working directory, as the task's user.
//!
//! A failing step reports its number on a pipe before the hook fails, so the start error says
//! which step it was, not just an errno.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::ProcessIdentity;

/// How a task enters the main container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Method {
    /// setns into each of its namespaces that differs from sandlet's: the task is in the
    /// container in every respect (needs CAP_SYS_ADMIN and CAP_SYS_CHROOT).
    Namespaces,
    /// chroot into its filesystem as its process sees it: its files, mounts and users, but
    /// sandlet's namespaces (in a pod, net, IPC and UTS are the pod's anyway; the mount and
    /// cgroup namespaces stay sandlet's). Needs only CAP_SYS_CHROOT, a runtime default.
    Chroot,
}

/// Where a task goes when sandlet runs as a sidecar: sandlet resolves it, the shim applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// The main container's process whose namespaces are joined. The shim checks it is still the
    /// same process after opening them, so a reused pid is never entered.
    pub target: ProcessIdentity,
    pub method: Method,
    /// `cgroup.procs` files of the main container's cgroups that sandlet can write.
    pub cgroups: Vec<PathBuf>,
    /// The main container's capability bounding set (a bit per capability).
    pub bounding_set: u64,
    pub no_new_privs: bool,
}

/// Who the task runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// The namespaces joined, in the order they are joined. A user namespace is never joined: a
/// main container in its own user namespace is refused when it is located.
const NAMESPACES: [(&str, CloneFlags); 5] = [
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// The last capability number the kernel may know; dropping an unknown one fails with EINVAL
/// and is ignored.
const LAST_CAPABILITY: u32 = 63;

/// One step of the setup, as reported when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    JoinCgroup = 1,
    JoinNamespace = 2,
    ChangeRoot = 11,
    ContainerDir = 3,
    DropCapabilities = 4,
    Groups = 5,
    JoinUserNamespace = 12,
    Gid = 6,
    Uid = 7,
    NoNewPrivs = 8,
    WorkingDir = 9,
    /// Not one of [`ChildSetup`]'s: a terminal's task becoming a session leader with it.
    ControllingTerminal = 10,
}

impl Step {
    fn from_code(code: u8) -> Option<Step> {
        use Step::*;
        [
            JoinCgroup,
            JoinNamespace,
            ChangeRoot,
            ContainerDir,
            DropCapabilities,
            Groups,
            JoinUserNamespace,
            Gid,
            Uid,
            NoNewPrivs,
            WorkingDir,
            ControllingTerminal,
        ]
        .into_iter()
        .find(|s| *s as u8 == code)
    }

    fn describe(self) -> &'static str {
        match self {
            Step::JoinCgroup => "join the main container's cgroup",
            Step::JoinNamespace => "enter the main container's namespaces",
            Step::ChangeRoot => "change root to the main container's filesystem",
            Step::ContainerDir => "enter the main container's working directory",
            Step::DropCapabilities => "limit capabilities to the main container's",
            Step::Groups => "set the supplementary groups",
            Step::JoinUserNamespace => "enter the isolated session's user namespace",
            Step::Gid => "set the group id",
            Step::Uid => "set the user id",
            Step::NoNewPrivs => "set no_new_privs",
            Step::WorkingDir => "change to the working directory",
            Step::ControllingTerminal => "make the terminal the controlling terminal",
        }
    }
}

/// The syscalls the child makes, behind a trait so the order and the stop-at-first-failure rule
/// are unit-tested without forking.
pub trait Syscalls {
    fn join_cgroup(&self, procs: RawFd) -> Result<(), Errno>;
    fn setns(&self, ns: RawFd, kind: CloneFlags) -> Result<(), Errno>;
    /// Makes the directory `dir` the root.
    fn chroot_to(&self, dir: RawFd) -> Result<(), Errno>;
    fn fchdir(&self, dir: RawFd) -> Result<(), Errno>;
    fn drop_bounding(&self, capability: u32) -> Result<(), Errno>;
    fn setgroups(&self, groups: &[libc::gid_t]) -> Result<(), Errno>;
    fn setgid(&self, gid: u32) -> Result<(), Errno>;
    fn setuid(&self, uid: u32) -> Result<(), Errno>;
    fn no_new_privs(&self) -> Result<(), Errno>;
    fn chdir(&self, dir: &CString) -> Result<(), Errno>;
}

/// Everything the child needs, opened before the fork.
#[derive(Debug, Default)]
pub struct ChildSetup {
    cgroups: Vec<OwnedFd>,
    namespaces: Vec<(OwnedFd, CloneFlags)>,
    /// The target's PID namespace, when it has one of its own: entered by the shim itself.
    pid_namespace: Option<OwnedFd>,
    /// The target's user namespace, when it has one of its own.
    user_namespace: Option<OwnedFd>,
    /// The container's root, for [`Method::Chroot`].
    root: Option<OwnedFd>,
    container_dir: Option<OwnedFd>,
    drop_capabilities: Vec<u32>,
    credentials: Option<(Vec<libc::gid_t>, u32, u32)>,
    no_new_privs: bool,
    working_dir: Option<CString>,
}

impl ChildSetup {
    /// Opens what `placement` needs. Namespaces the shim already shares with the container are
    /// left out.
    pub fn prepare(
        placement: Option<&Placement>,
        credentials: Option<&Credentials>,
        working_dir: Option<&std::path::Path>,
    ) -> Result<ChildSetup, String> {
        let mut setup = ChildSetup::default();
        if let Some(p) = placement {
            let pid = p.target.pid;
            for procs in &p.cgroups {
                let fd = open(procs, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| format!("cannot open {}: {e}", procs.display()))?;
                setup.cgroups.push(fd);
            }
            match p.method {
                Method::Namespaces => {
                    for (name, kind) in NAMESPACES {
                        if !differs(pid, name) {
                            continue;
                        }
                        let theirs = format!("/proc/{pid}/ns/{name}");
                        let fd = open(
                            theirs.as_str(),
                            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(|e| format!("cannot open {theirs}: {e}"))?;
                        setup.namespaces.push((fd, kind));
                    }
                    // Only an isolated session's differ: a main container shares the pod's
                    // PID namespace, and one in a user namespace of its own is refused.
                    let own = |name: &str| -> Result<Option<OwnedFd>, String> {
                        if same_namespace(pid, name) != Some(false) {
                            return Ok(None);
                        }
                        let theirs = format!("/proc/{pid}/ns/{name}");
                        open(
                            theirs.as_str(),
                            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )
                        .map(Some)
                        .map_err(|e| format!("cannot open {theirs}: {e}"))
                    };
                    setup.pid_namespace = own("pid")?;
                    setup.user_namespace = own("user")?;
                }
                Method::Chroot => {
                    let root = format!("/proc/{pid}/root");
                    setup.root = Some(
                        open(
                            root.as_str(),
                            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(|e| format!("cannot open {root}: {e}"))?,
                    );
                }
            }
            let cwd = format!("/proc/{pid}/cwd");
            setup.container_dir = Some(
                open(
                    cwd.as_str(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| format!("cannot open {cwd}: {e}"))?,
            );
            // Opened by pid: only now is it certain they belong to the process sandlet chose.
            if !p.target.is_alive() {
                return Err(format!(
                    "the main container's process {pid} is gone (the container restarted)"
                ));
            }
            let own = bounding_set().map_err(|e| format!("cannot read capabilities: {e}"))?;
            setup.drop_capabilities = (0..=LAST_CAPABILITY)
                .filter(|cap| own & (1 << cap) != 0 && p.bounding_set & (1 << cap) == 0)
                .collect();
            setup.no_new_privs = p.no_new_privs;
        }
        if let Some(c) = credentials {
            setup.credentials = Some((c.groups.clone(), c.gid, c.uid));
        }
        if let Some(dir) = working_dir {
            use std::os::unix::ffi::OsStrExt;
            setup.working_dir = Some(
                CString::new(dir.as_os_str().as_bytes())
                    .map_err(|_| "workingDir contains a NUL byte".to_string())?,
            );
        }
        Ok(setup)
    }

    /// Runs the steps in order; stops at the first failure and returns which step it was.
    pub fn apply(&self, sys: &impl Syscalls) -> Result<(), (Step, Errno)> {
        for fd in &self.cgroups {
            sys.join_cgroup(fd.as_raw_fd())
                .map_err(|e| (Step::JoinCgroup, e))?;
        }
        for (fd, kind) in &self.namespaces {
            sys.setns(fd.as_raw_fd(), *kind)
                .map_err(|e| (Step::JoinNamespace, e))?;
        }
        if let Some(root) = &self.root {
            sys.chroot_to(root.as_raw_fd())
                .map_err(|e| (Step::ChangeRoot, e))?;
        }
        if let Some(dir) = &self.container_dir {
            sys.fchdir(dir.as_raw_fd())
                .map_err(|e| (Step::ContainerDir, e))?;
        }
        for &cap in &self.drop_capabilities {
            match sys.drop_bounding(cap) {
                Ok(()) | Err(Errno::EINVAL) => {}
                Err(e) => return Err((Step::DropCapabilities, e)),
            }
        }
        if let Some((groups, _, _)) = &self.credentials {
            sys.setgroups(groups).map_err(|e| (Step::Groups, e))?;
        }
        if let Some(ns) = &self.user_namespace {
            sys.setns(ns.as_raw_fd(), CloneFlags::CLONE_NEWUSER)
                .map_err(|e| (Step::JoinUserNamespace, e))?;
        }
        if let Some((_, gid, uid)) = &self.credentials {
            sys.setgid(*gid).map_err(|e| (Step::Gid, e))?;
            sys.setuid(*uid).map_err(|e| (Step::Uid, e))?;
        }
        if self.no_new_privs {
            sys.no_new_privs().map_err(|e| (Step::NoNewPrivs, e))?;
        }
        if let Some(dir) = &self.working_dir {
            sys.chdir(dir).map_err(|e| (Step::WorkingDir, e))?;
        }
        Ok(())
    }

    /// Joins the target's own PID namespace, if it has one, for the children this process forks
    /// from now on (the task). There is no way back: a shim that did this serves no other task.
    pub fn enter_pid_namespace(&self) -> Result<bool, String> {
        let Some(ns) = &self.pid_namespace else {
            return Ok(false);
        };
        nix::sched::setns(ns, CloneFlags::CLONE_NEWPID)
            .map_err(|e| format!("cannot enter the isolated session's PID namespace: {e}"))?;
        Ok(true)
    }

    /// Whether the task needs the hook at all; without it, std can use posix_spawn.
    pub fn is_empty(&self) -> bool {
        self.cgroups.is_empty()
            && self.namespaces.is_empty()
            && self.pid_namespace.is_none()
            && self.user_namespace.is_none()
            && self.root.is_none()
            && self.container_dir.is_none()
            && self.credentials.is_none()
            && !self.no_new_privs
    }
}

/// Explains a failed start, given the step code the child reported (if any).
pub fn start_failure(code: Option<u8>, error: &io::Error, working_dir: Option<&str>) -> String {
    match code.and_then(Step::from_code) {
        Some(Step::WorkingDir) => format!(
            "cannot change to workingDir {:?}: {error}",
            working_dir.unwrap_or_default()
        ),
        Some(step) => format!("cannot {}: {error}", step.describe()),
        None => error.to_string(),
    }
}

/// The real syscalls, as made between fork and exec: no allocation, no locks. The credential
/// calls are raw syscalls: glibc's wrappers coordinate every thread of the process through
/// signals, which has no place in a forked child.
pub struct Kernel;

impl Syscalls for Kernel {
    fn join_cgroup(&self, procs: RawFd) -> Result<(), Errno> {
        // "0" moves the writing process itself.
        let n = unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) };
        Errno::result(n).map(drop)
    }
    fn setns(&self, ns: RawFd, kind: CloneFlags) -> Result<(), Errno> {
        Errno::result(unsafe { libc::setns(ns, kind.bits()) }).map(drop)
    }
    fn chroot_to(&self, dir: RawFd) -> Result<(), Errno> {
        Errno::result(unsafe { libc::fchdir(dir) })?;
        Errno::result(unsafe { libc::chroot(c".".as_ptr()) }).map(drop)
    }
    fn fchdir(&self, dir: RawFd) -> Result<(), Errno> {
        Errno::result(unsafe { libc::fchdir(dir) }).map(drop)
    }
    fn drop_bounding(&self, capability: u32) -> Result<(), Errno> {
        Errno::result(unsafe {
            libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0)
        })
        .map(drop)
    }
    fn setgroups(&self, groups: &[libc::gid_t]) -> Result<(), Errno> {
        Errno::result(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })
            .map(drop)
    }
    fn setgid(&self, gid: u32) -> Result<(), Errno> {
        Errno::result(unsafe { libc::syscall(libc::SYS_setgid, gid) }).map(drop)
    }
    fn setuid(&self, uid: u32) -> Result<(), Errno> {
        Errno::result(unsafe { libc::syscall(libc::SYS_setuid, uid) }).map(drop)
    }
    fn no_new_privs(&self) -> Result<(), Errno> {
        Errno::result(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(drop)
    }
    fn chdir(&self, dir: &CString) -> Result<(), Errno> {
        Errno::result(unsafe { libc::chdir(dir.as_ptr()) }).map(drop)
    }
}

/// Whether process `pid` is in the same namespace of kind `name` (`mnt`, `net`, ...) as this
/// process; `None` when that cannot be read (no such process, or no ptrace access to it).
pub fn same_namespace(pid: i32, name: &str) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: String| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    Some(id(format!("/proc/{pid}/ns/{name}"))? == id(format!("/proc/self/ns/{name}"))?)
}

/// Whether process `pid` is (or may be) in another namespace of kind `name` than this process.
pub fn differs(pid: i32, name: &str) -> bool {
    same_namespace(pid, name) != Some(true)
}

/// The namespaces a sidecar can join, in the order they are joined.
pub fn namespace_names() -> impl Iterator<Item = &'static str> {
    NAMESPACES.iter().map(|(name, _)| *name)
}

/// This process's capability bounding set.
pub fn bounding_set() -> io::Result<u64> {
    capability_set(std::process::id() as i32, "CapBnd:")
}

/// One capability set of a process, from `/proc/<pid>/status`.
pub fn capability_set(pid: i32, field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no {field} in status")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records each call; fails the call named in `fail`.
    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<String>>,
        fail: Option<&'static str>,
    }

    impl Recorder {
        fn call(&self, name: &'static str, detail: String) -> Result<(), Errno> {
            self.calls.borrow_mut().push(format!("{name} {detail}"));
            if self.fail == Some(name) {
                Err(Errno::EPERM)
            } else {
                Ok(())
            }
        }
    }

    impl Syscalls for Recorder {
        fn join_cgroup(&self, _: RawFd) -> Result<(), Errno> {
            self.call("cgroup", String::new())
        }
        fn setns(&self, _: RawFd, kind: CloneFlags) -> Result<(), Errno> {
            let name = NAMESPACES
                .iter()
                .find(|(_, k)| *k == kind)
                .map_or("user", |(name, _)| *name);
            self.call("setns", name.into())
        }
        fn chroot_to(&self, _: RawFd) -> Result<(), Errno> {
            self.call("chroot", String::new())
        }
        fn fchdir(&self, _: RawFd) -> Result<(), Errno> {
            self.call("fchdir", String::new())
        }
        fn drop_bounding(&self, cap: u32) -> Result<(), Errno> {
            self.call("drop", cap.to_string())
        }
        fn setgroups(&self, groups: &[libc::gid_t]) -> Result<(), Errno> {
            self.call("setgroups", format!("{groups:?}"))
        }
        fn setgid(&self, gid: u32) -> Result<(), Errno> {
            self.call("setgid", gid.to_string())
        }
        fn setuid(&self, uid: u32) -> Result<(), Errno> {
            self.call("setuid", uid.to_string())
        }
        fn no_new_privs(&self) -> Result<(), Errno> {
            self.call("nnp", String::new())
        }
        fn chdir(&self, dir: &CString) -> Result<(), Errno> {
            self.call("chdir", dir.to_string_lossy().into_owned())
        }
    }

    fn full_setup() -> ChildSetup {
        let fd = || open("/", OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        ChildSetup {
            cgroups: vec![fd(), fd()],
            namespaces: NAMESPACES.iter().map(|(_, k)| (fd(), *k)).collect(),
            pid_namespace: None,
            user_namespace: Some(fd()),
            root: None,
            container_dir: Some(fd()),
            drop_capabilities: vec![19, 21],
            credentials: Some((vec![1000, 2000], 1000, 1000)),
            no_new_privs: true,
            working_dir: Some(CString::new("/work").unwrap()),
        }
    }

    #[test]
    fn steps_run_in_the_fixed_order() {
        let sys = Recorder::default();
        full_setup().apply(&sys).unwrap();
        assert_eq!(
            *sys.calls.borrow(),
            [
                "cgroup ",
                "cgroup ",
                "setns cgroup",
                "setns ipc",
                "setns uts",
                "setns net",
                "setns mnt",
                "fchdir ",
                "drop 19",
                "drop 21",
                "setgroups [1000, 2000]",
                "setns user",
                "setgid 1000",
                "setuid 1000",
                "nnp ",
                "chdir /work",
            ]
        );
    }

    #[test]
    fn the_chroot_method_changes_root_before_the_container_directory() {
        let sys = Recorder::default();
        let setup = ChildSetup {
            namespaces: Vec::new(),
            user_namespace: None,
            root: Some(open("/", OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).unwrap()),
            ..full_setup()
        };
        setup.apply(&sys).unwrap();
        let calls = sys.calls.borrow();
        assert_eq!(calls[..4], ["cgroup ", "cgroup ", "chroot ", "fchdir "]);
        assert!(!calls.iter().any(|c| c.starts_with("setns")));
    }

    #[test]
    fn the_first_failure_stops_the_setup_and_names_its_step() {
        let sys = Recorder {
            fail: Some("setgid"),
            ..Recorder::default()
        };
        let err = full_setup().apply(&sys).unwrap_err();
        assert_eq!(err, (Step::Gid, Errno::EPERM));
        assert_eq!(sys.calls.borrow().last().unwrap(), "setgid 1000");
        let message = start_failure(Some(err.0 as u8), &io::Error::from(err.1), None);
        assert!(message.contains("set the group id"), "{message}");
    }

    #[test]
    fn an_empty_setup_needs_no_hook() {
        assert!(ChildSetup::default().is_empty());
        assert!(!full_setup().is_empty());
    }
}
