//! A simulated Kubernetes pod, built with real namespaces (root only):
//! - a PID namespace whose PID 1 plays the pause container;
//! - a main container in its own mount, UTS and IPC namespaces, `pivot_root`ed into a busybox
//!   rootfs with its own `/etc/passwd` and hostname, running as uid 1000 with the
//!   `SANDBOX_MAIN_CONTAINER=main` marker, the way OpenSandbox Pool templates mark it;
//! - a sidecar place: the pod's PID namespace, the host's filesystem, a `/proc` of the pod.
//!
//! Like a container runtime, the main container gets a reduced capability bounding set (the
//! runtime defaults, plus CAP_SYS_ADMIN its setup script needs for mount, pivot_root and
//! hostname); CAP_SYS_PTRACE in particular is not in it.
//!
//! Dropping the pod SIGKILLs its PID 1, which takes every process of the pod with it, even when
//! a test fails. `Pod::start` returns `None`, printing why, where a pod cannot be built.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{DEADLINE, Sandlet, wait_until};

pub const BUSYBOX: &str = "/bin/busybox";
pub const MAIN_UID: u32 = 1000;
pub const MAIN_HOSTNAME: &str = "sandbox-main";
/// A user only the rootfs knows.
pub const WORKER_UID: u32 = 1001;
/// The main container's bounding set: a container runtime's defaults plus CAP_SYS_ADMIN.
pub const MAIN_BOUNDING_SET: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap,+net_bind_service,+sys_chroot,+mknod,+audit_write,+setfcap,+sys_admin";
/// The capabilities sandlet is given in the sidecar tests: the documented minimal set.
pub const SIDECAR_CAPABILITIES: &str =
    "-all,+sys_ptrace,+dac_read_search,+sys_admin,+sys_chroot,+setuid,+setgid,+setpcap,+kill";
const APPLETS: &[&str] = &[
    "sh",
    "sleep",
    "cat",
    "env",
    "hostname",
    "id",
    "ls",
    "mount",
    "umount",
    "pivot_root",
    "pwd",
    "su",
    "whoami",
    "echo",
    "true",
    "false",
    "touch",
    "mkdir",
    "head",
    "tr",
    "grep",
    "kill",
    "ps",
    "readlink",
    "tty",
    "stty",
    "dirname",
    "printf",
];

/// What the main container's image has beyond busybox: host directories bind-mounted
/// read-only at the same paths (a language runtime, say), symlinks, and environment.
#[derive(Debug, Clone, Default)]
pub struct Image {
    pub binds: Vec<PathBuf>,
    /// `(link, target)`: `link` (absolute, in the rootfs) points at `target`.
    pub links: Vec<(PathBuf, PathBuf)>,
    pub env: Vec<(String, String)>,
}

pub struct Pod {
    /// Host pid of the pod's PID 1 (the pause).
    pub pid1: i32,
    /// Host pid of the main container's process.
    pub main_pid: i32,
    pub rootfs: PathBuf,
    image: Image,
    mark: String,
    pause: Child,
    main: Child,
    cgroups: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Pod {
    pub fn start() -> Option<Pod> {
        Pod::start_with(Image::default())
    }

    /// A pod whose main container's image has `image` on top of busybox.
    pub fn start_with(image: Image) -> Option<Pod> {
        if !super::root_or_skip("a simulated pod: namespaces, pivot_root") {
            return None;
        }
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} is missing (Debian package busybox-static): `./test` installs it"
        );
        let dir = tempfile::Builder::new()
            .prefix("sandlet-pod-")
            .tempdir()
            .unwrap();
        let rootfs = dir.path().join("rootfs");
        build_rootfs(&rootfs);
        for (link, target) in &image.links {
            let at = rootfs.join(link.strip_prefix("/").unwrap());
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, at).unwrap();
        }
        let mark = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();

        // `--kill-child`: if this test process dies, the pod's PID 1 (and so the pod) goes too.
        let pause = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "sleep", "infinity"])
            // Killed with its namespace at teardown, it complains about its signal mask.
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        let pid1: i32 = wait_for(|| {
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", pause.id()))
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        let main = start_main(pid1, &rootfs, &mark, &image, &dir.path().join("main.log"));
        let mut pod = Pod {
            pid1,
            main_pid: 0,
            rootfs,
            image,
            mark,
            pause,
            main,
            cgroups: Vec::new(),
            _dir: dir,
        };
        pod.main_pid = pod.find_main(&[]);
        Some(pod)
    }

    /// The main container's process: the one with this pod's mark that runs as the main user
    /// and is none of `earlier` (processes that existed before it was started, such as tasks of
    /// a previous incarnation, which inherit the mark; namespace inodes are reused, so they
    /// cannot tell incarnations apart).
    fn find_main(&self, earlier: &[i32]) -> i32 {
        let mark = format!("POD_MARK={}", self.mark);
        let log = self.main_log();
        wait_for_or(
            || std::fs::read_to_string(&log).unwrap_or_default(),
            || {
                pids().into_iter().find(|&pid| {
                    !earlier.contains(&pid)
                        && uid_of(pid) == Some(MAIN_UID)
                        && std::fs::read(format!("/proc/{pid}/environ"))
                            .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == mark.as_bytes()))
                })
            },
        )
    }

    /// Where the main container's setup writes its errors.
    fn main_log(&self) -> PathBuf {
        self._dir.path().join("main.log")
    }

    /// Simulates a container restart: the main container's process is killed and a new one, in
    /// new namespaces on the same rootfs, takes its place (and its cgroups).
    pub fn restart_main(&mut self) {
        let old = self.main_pid;
        unsafe { libc_kill(old, 9) };
        let _ = self.main.wait();
        wait_gone(&[old]);
        let earlier = pids();
        self.main = start_main(
            self.pid1,
            &self.rootfs,
            &self.mark,
            &self.image,
            &self.main_log(),
        );
        self.main_pid = self.find_main(&earlier);
        for cgroup in self.cgroups.clone() {
            self.put_main_in(&cgroup);
        }
    }

    /// Moves the main container's process into `cgroup` (a directory of a cgroup tree), which
    /// this pod removes when it is dropped; restarts put the new process there too.
    pub fn put_main_in(&mut self, cgroup: &Path) {
        std::fs::create_dir_all(cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), self.main_pid.to_string()).unwrap();
        if !self.cgroups.iter().any(|c| c == cgroup) {
            self.cgroups.push(cgroup.to_owned());
        }
    }

    /// sandlet serving in this pod's sidecar place in sidecar mode, holding only `capabilities`
    /// (a `setpriv --bounding-set` list), after `setup` ran there (see `sidecar_with`).
    pub fn sidecar_sandlet(
        &self,
        setup: &'static str,
        capabilities: &'static str,
        args: &[&str],
    ) -> Sandlet {
        let pid1 = self.pid1;
        let args: Vec<&str> = ["--enable-sidecar-mode"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        Sandlet::start_as(&args, move || {
            let mut cmd = sidecar_command(pid1, setup, "setpriv");
            cmd.arg(format!("--bounding-set={capabilities}")).args([
                "--inh-caps=-all",
                "--",
                env!("CARGO_BIN_EXE_sandlet"),
            ]);
            cmd
        })
    }

    /// sandlet in the sidecar's place with nothing configured (no flag, no environment), as a
    /// Pool template that only swaps the image would run it, holding `capabilities`.
    pub fn sidecar_sandlet_unconfigured(&self, capabilities: &'static str) -> Sandlet {
        let pid1 = self.pid1;
        Sandlet::start_as(&[], move || {
            let mut cmd = sidecar_command(pid1, "", "setpriv");
            cmd.arg(format!("--bounding-set={capabilities}")).args([
                "--inh-caps=-all",
                "--",
                env!("CARGO_BIN_EXE_sandlet"),
            ]);
            cmd
        })
    }

    /// A name unique to this pod, for things it creates outside its directory.
    pub fn mark(&self) -> &str {
        &self.mark
    }

    /// A command in the sidecar's place: the pod's PID namespace with a `/proc` of the pod, and
    /// the host's filesystem. `program` and the arguments added to the command run there.
    pub fn sidecar(&self, program: impl AsRef<OsStr>) -> Command {
        self.sidecar_with("", program)
    }

    /// Like `sidecar`, running the shell commands `setup` there first (as root, in the
    /// sidecar's own mount namespace).
    pub fn sidecar_with(&self, setup: &str, program: impl AsRef<OsStr>) -> Command {
        sidecar_command(self.pid1, setup, program)
    }

    /// Runs `sh -c script` in the sidecar's place and returns its stdout.
    pub fn sidecar_sh(&self, script: &str) -> String {
        let out = self
            .sidecar("sh")
            .args(["-c", script])
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "sidecar script failed: {script}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Whether any process of this pod still exists.
    pub fn any_alive(&self) -> bool {
        pids()
            .into_iter()
            .any(|pid| pid == self.pid1 || pid == self.main_pid)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // PID 1 of a PID namespace takes every process of the namespace with it.
        unsafe { libc_kill(self.pid1, 9) };
        let _ = self.pause.wait();
        let _ = self.main.wait();
        // A cgroup can be removed once the last process in it is gone.
        for cgroup in self.cgroups.iter().rev() {
            let deadline = Instant::now() + DEADLINE;
            while cgroup.exists()
                && std::fs::remove_dir(cgroup).is_err()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(parent) = cgroup.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// Starts a main container in the pod: new mount, UTS and IPC namespaces, a reduced bounding
/// set, the script below.
fn start_main(pid1: i32, rootfs: &Path, mark: &str, image: &Image, log: &Path) -> Child {
    let binds: Vec<String> = image
        .binds
        .iter()
        .map(|b| b.display().to_string())
        .collect();
    let env: Vec<String> = image.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Command::new("nsenter")
        .args([
            "--target",
            &pid1.to_string(),
            "--pid",
            "--",
            "setpriv",
            &format!("--bounding-set={MAIN_BOUNDING_SET}"),
            "--",
            "unshare",
            "--mount",
            "--uts",
            "--ipc",
            "--",
            "sh",
            "-c",
        ])
        .arg(MAIN_CONTAINER_SCRIPT)
        .env("ROOTFS", rootfs)
        .env("POD_MARK", mark)
        .env("POD_BINDS", binds.join(" "))
        .env("POD_ENV", env.join(" "))
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("nsenter")
}

/// The sidecar's place in the pod of `pid1` (see [`Pod::sidecar_with`]).
pub fn sidecar_command(pid1: i32, setup: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.args([
        "--target",
        &pid1.to_string(),
        "--pid",
        "--",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
    ])
    .args([
        "sh",
        "-c",
        &format!("mount -t proc proc /proc && {{ {setup} true; }} && exec \"$@\""),
        "sidecar",
    ])
    .arg(program);
    cmd
}

/// Runs in the new namespaces as root, then becomes the main container's process.
const MAIN_CONTAINER_SCRIPT: &str = r#"
set -e
mount --make-rprivate /
mount --bind "$ROOTFS" "$ROOTFS"
mount -t proc proc "$ROOTFS/proc"
mount --bind /dev/null "$ROOTFS/dev/null"
# As a container runtime does: a devpts instance of its own, for terminals (PTY sessions).
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$ROOTFS/dev/pts"
for dir in $POD_BINDS; do
  mkdir -p "$ROOTFS$dir"
  mount --rbind "$dir" "$ROOTFS$dir"
  mount -o remount,bind,ro "$ROOTFS$dir"
done
cd "$ROOTFS"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
hostname sandbox-main
cd /work
exec env -i SANDBOX_MAIN_CONTAINER=main MAIN_VAR=from-main PATH=/bin HOME=/home/sandbox POD_MARK="$POD_MARK" $POD_ENV \
  EXECD_ACCESS_TOKEN=main-container-execd-token \
  su -p -s /bin/sh sandbox -c "exec sleep 1000000"
"#;

fn build_rootfs(root: &Path) {
    for dir in [
        "bin",
        "etc",
        "tmp",
        "proc",
        "dev/pts",
        "home/sandbox",
        "home/worker",
        "work",
        ".oldroot",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    std::fs::write(root.join("dev/null"), "").unwrap();
    std::os::unix::fs::symlink("pts/ptmx", root.join("dev/ptmx")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\nworker:x:1001:1001:worker:/home/worker:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nsandbox:x:1000:\nworker:x:1001:\nextra:x:2000:sandbox,worker\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/sandbox-rootfs"), "busybox-rootfs\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        root.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    for dir in ["home/sandbox", "work"] {
        std::os::unix::fs::chown(root.join(dir), Some(MAIN_UID), Some(MAIN_UID)).unwrap();
    }
}

/// Like `wait_for`, with `why()` in the failure message.
fn wait_for_or<T>(why: impl Fn() -> String, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the simulated pod's main container did not come up: {}",
            why()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the simulated pod did not come up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A process's pid as its own (innermost) PID namespace sees it.
pub fn pod_pid(host_pid: i32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap();
    nspid.split_whitespace().last().unwrap().parse().unwrap()
}

pub fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Waits until no process of the pod is left.
pub fn wait_gone(pod_pids: &[i32]) {
    wait_until("the pod's processes are gone", || {
        pod_pids
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
    });
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
