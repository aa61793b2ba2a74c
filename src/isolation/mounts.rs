//! The filesystem an isolated session sees, built by its PID 1 in a mount namespace of its own
//! (a copy of the sandbox's, made private so nothing propagates back):
//!
//! 1. a tmpfs over a scratch directory becomes the root for a moment (`pivot_root`), with the
//!    sandbox's root below it at `/oldroot`: every source is reached from there, even one a later
//!    mount covers (the sandbox's `/tmp` under the session's own);
//! 2. the session's root at `/newroot`: the sandbox's whole tree bound read-only, or an overlay
//!    of it when `/` is one of the session's overlays (then the sandbox's other mounts are bound
//!    read-only over it, since an overlay sees only the root filesystem itself);
//! 3. its own `/proc` (of its PID namespace, with the sandbox's masked `/proc` paths masked
//!    again), a minimal `/dev` (the usual device nodes, its own `devpts` and `/dev/shm`), `/tmp`
//!    (a private tmpfs, or the sandbox's with the balanced profile) and a private `/run`; the
//!    directory of persistent overlay layers and sandlet's own directories are hidden;
//! 4. the overlays, binds and writable extras, shallow first, so a nested one shadows its
//!    ancestors below itself;
//! 5. `nosuid` everywhere, and the session's root becomes the root (`pivot_root(".", ".")`),
//!    the scratch and the sandbox's tree detached.
//!
//! Overlay layers are named to the kernel by `/proc/self/fd/N` paths (of a `/proc` the scratch
//! root mounts for itself) of directories opened beforehand, so no path ever needs escaping in
//! the mount options.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;

use super::holder::HolderError;
use super::spec::{HolderSpec, MountSpec};

/// Where the sandbox's root is while the session's is built.
const OLD: &str = "/oldroot";
/// Where the session's root is built.
const NEW: &str = "/newroot";
/// Where the tmpfs upper layers of non-persistent overlays are mounted.
const UPPERS: &str = "/uppers";

/// `mount_setattr(2)`, which sets a flag on a whole tree of mounts at once.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Device nodes bound from the sandbox's `/dev` into the session's.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn failed(doing: impl std::fmt::Display, e: impl std::fmt::Display) -> HolderError {
    HolderError::Failed(format!("{doing}: {e}"))
}

/// Builds the session's filesystem (see the module docs) and makes it the root.
pub fn build(spec: &HolderSpec) -> Result<(), HolderError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| failed("cannot make the session's mounts private", e))?;
    let scratch = ["/tmp", "/dev", "/run", "/mnt"]
        .into_iter()
        .find(|d| Path::new(d).is_dir())
        .ok_or_else(|| {
            HolderError::Failed("no scratch directory (/tmp, /dev, /run, /mnt)".into())
        })?;
    tmpfs(scratch, "mode=0700", MsFlags::empty())?;
    for dir in ["newroot", "oldroot", "uppers", "proc"] {
        mkdir(&format!("{scratch}/{dir}"), 0o700)?;
    }
    nix::unistd::pivot_root(scratch, format!("{scratch}/oldroot").as_str())
        .map_err(|e| failed("cannot pivot to the scratch root", e))?;
    nix::unistd::chdir("/").map_err(|e| failed("cannot enter the scratch root", e))?;
    // A /proc of the scratch's own, whatever the sandbox has: the mount table and the
    // `/proc/self/fd` paths of overlay layers are read through it.
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| failed("cannot mount a /proc while building", e))?;
    let mounts = MountInfo::read()?;

    let root_overlay = spec.mounts.iter().position(|m| m.dest() == "/");
    match root_overlay.map(|i| &spec.mounts[i]) {
        Some(MountSpec::Overlay { persist, .. }) => {
            overlay(spec, root_overlay.unwrap_or_default(), "/", *persist)?;
            // The overlay sees the root filesystem alone: the sandbox's other mounts go over
            // it read-only, where they were.
            for point in mounts.children_of(OLD) {
                let inside = &point[OLD.len()..];
                if ["/proc", "/dev"].contains(&inside) {
                    continue;
                }
                bind(&point, &in_new(inside), true, true)?;
            }
        }
        Some(MountSpec::Bind { readonly, .. }) => {
            bind(OLD, NEW, true, *readonly)?;
        }
        None => bind(OLD, NEW, true, true)?,
    }
    // What the sandbox had mounted there is replaced, not covered (it would still show in the
    // session's mount table).
    for dir in ["/proc", "/dev", "/tmp", "/run"] {
        let _ = umount2(in_new(dir).as_str(), MntFlags::MNT_DETACH);
    }
    proc(&mounts)?;
    // An image without one of these directories gets none in the session either (the root
    // is read-only: no mount point can be made).
    let exists = |dir: &str| Path::new(&in_new(dir)).is_dir();
    if exists("/dev") {
        dev()?;
    }
    if exists("/tmp") {
        if spec.private_tmp {
            tmpfs(&in_new("/tmp"), "mode=1777", MsFlags::MS_NODEV)?;
        } else {
            bind(&format!("{OLD}/tmp"), &in_new("/tmp"), true, false)?;
        }
    }
    if exists("/run") {
        tmpfs(&in_new("/run"), "mode=0755", MsFlags::MS_NODEV)?;
    }
    // The layers of other sessions, sandlet's own records: not the session's to see.
    for dir in &spec.hidden {
        if Path::new(&in_new(dir)).is_dir() {
            tmpfs(&in_new(dir), "mode=0755,size=4k", MsFlags::MS_RDONLY)?;
        }
    }
    for (index, m) in spec.mounts.iter().enumerate() {
        if Some(index) == root_overlay {
            continue;
        }
        match m {
            MountSpec::Overlay { path, persist } => overlay(spec, index, path, *persist)?,
            MountSpec::Bind {
                source,
                dest,
                readonly,
            } => {
                let source = format!("{OLD}{source}");
                ensure_mount_point(&in_new(dest), Path::new(&source).is_dir())?;
                bind(&source, &in_new(dest), true, *readonly)?;
            }
        }
    }
    set_tree_attributes(NEW, MOUNT_ATTR_NOSUID)?;
    nix::unistd::chdir(NEW).map_err(|e| failed("cannot enter the session's root", e))?;
    nix::unistd::pivot_root(".", ".")
        .map_err(|e| failed("cannot pivot to the session's root", e))?;
    umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| failed("cannot detach the sandbox's root", e))?;
    nix::unistd::chdir("/").map_err(|e| failed("cannot enter the session's root", e))?;
    Ok(())
}

/// A path of the session, where it is while being built.
fn in_new(path: &str) -> String {
    if path == "/" {
        NEW.into()
    } else {
        format!("{NEW}{path}")
    }
}

/// The overlay at `path`: the sandbox's `path` below, an upper layer that persists in the
/// layers' directory (`persist`) or lives in a tmpfs, the session's.
fn overlay(spec: &HolderSpec, index: usize, path: &str, persist: bool) -> Result<(), HolderError> {
    let lower = if path == "/" {
        OLD.to_string()
    } else {
        format!("{OLD}{path}")
    };
    let (upper, work) = if persist {
        let dir = format!("{OLD}{}", spec.layer_dir(index));
        (format!("{dir}/upper"), format!("{dir}/work"))
    } else {
        let dir = format!("{UPPERS}/{index}");
        mkdir(&dir, 0o700)?;
        tmpfs(&dir, "mode=0755", MsFlags::empty())?;
        let (upper, work) = (format!("{dir}/upper"), format!("{dir}/work"));
        super::holder::make_upper(&lower, &upper, &work)?;
        (upper, work)
    };
    let target = in_new(path);
    if path != "/" {
        ensure_mount_point(&target, true)?;
    }
    let open_dir = |p: &str| {
        open(
            p,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| failed(format!("cannot open {p}"), e))
    };
    let layers: [OwnedFd; 3] = [open_dir(&lower)?, open_dir(&upper)?, open_dir(&work)?];
    let fd = |f: &OwnedFd| format!("/proc/self/fd/{}", f.as_raw_fd());
    let options = format!(
        "lowerdir={},upperdir={},workdir={},index=off,redirect_dir=off,metacopy=off",
        fd(&layers[0]),
        fd(&layers[1]),
        fd(&layers[2])
    );
    mount(
        Some("overlay"),
        target.as_str(),
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| failed(format!("cannot mount the overlay at {path}"), e))
}

/// overlayfs does its work in the upper layer with its mounter's rights: a work directory of
/// mode 0, copies of lower files given to their owners, modes set on files it does not own.
/// Without these capabilities (a container runtime's defaults) overlays fail, some only later.
const OVERLAY_CAPABILITIES: [(u32, &str); 4] = [
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
];

/// Whether this process can mount overlays; the error names what it lacks.
pub fn check_overlay_capabilities() -> Result<(), HolderError> {
    let effective = crate::process::enter::capability_set(std::process::id() as i32, "CapEff:")
        .map_err(|e| failed("cannot read sandlet's capabilities", e))?;
    let missing: Vec<&str> = OVERLAY_CAPABILITIES
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(HolderError::Unsupported(format!(
        "overlays need CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER and CAP_FSETID (a container runtime's defaults) in sandlet's container, which lacks {}",
        missing.join(", ")
    )))
}

/// A bind mount, of the whole tree below `source` with `recursive`, read-only or not.
fn bind(source: &str, target: &str, recursive: bool, readonly: bool) -> Result<(), HolderError> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, None::<&str>, flags, None::<&str>)
        .map_err(|e| failed(format!("cannot bind {source} to {target}"), e))?;
    if readonly {
        set_tree_attributes(target, MOUNT_ATTR_RDONLY)?;
    }
    Ok(())
}

fn tmpfs(target: &str, options: &str, flags: MsFlags) -> Result<(), HolderError> {
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        flags | MsFlags::MS_NOSUID,
        Some(options),
    )
    .map_err(|e| failed(format!("cannot mount a tmpfs at {target}"), e))
}

/// Sets `attributes` on the mount at `target` and every mount below it.
fn set_tree_attributes(target: &str, attributes: u64) -> Result<(), HolderError> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: attributes,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let path = CString::new(target).map_err(|e| failed(target, e))?;
    // SAFETY: a valid path and a mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(failed(
            format!(
                "cannot set the attributes of the mounts at {target} (Linux 5.12 or later is needed)"
            ),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The session's `/proc`: a procfs of its PID namespace, with the paths the sandbox's runtime
/// masked or made read-only (mounts below the sandbox's `/proc`) done so again.
fn proc(mounts: &MountInfo) -> Result<(), HolderError> {
    let target = in_new("/proc");
    mount(
        Some("proc"),
        target.as_str(),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| failed("cannot mount the session's /proc", e))?;
    let old_proc = format!("{OLD}/proc");
    for point in mounts.below(&old_proc) {
        let inside = &point[old_proc.len()..];
        let dest = format!("{target}{inside}");
        if !Path::new(&dest).exists() {
            continue;
        }
        bind(&point, &dest, false, mounts.is_readonly(&point))?;
    }
    Ok(())
}

/// The session's `/dev`: a tmpfs with the usual device nodes bound from the sandbox's, a
/// `devpts` of its own (its terminals are not the sandbox's) and a private `/dev/shm`.
fn dev() -> Result<(), HolderError> {
    let dev = in_new("/dev");
    tmpfs(&dev, "mode=0755", MsFlags::MS_NOEXEC)?;
    for name in DEVICES {
        let source = format!("{OLD}/dev/{name}");
        if !Path::new(&source).exists() {
            continue;
        }
        let target = format!("{dev}/{name}");
        std::fs::File::create(&target).map_err(|e| failed(format!("cannot create {target}"), e))?;
        bind(&source, &target, false, false)?;
    }
    for dir in ["pts", "shm"] {
        mkdir(&format!("{dev}/{dir}"), 0o755)?;
    }
    mount(
        Some("devpts"),
        format!("{dev}/pts").as_str(),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| failed("cannot mount the session's /dev/pts", e))?;
    tmpfs(&format!("{dev}/shm"), "mode=1777", MsFlags::MS_NODEV)?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, format!("{dev}/{link}"))
            .map_err(|e| failed(format!("cannot link /dev/{link}"), e))?;
    }
    Ok(())
}

/// Makes sure a mount point exists at `target`: a directory (or, for a file's bind, a file);
/// where the session's tree is read-only it had to exist in the sandbox already.
fn ensure_mount_point(target: &str, directory: bool) -> Result<(), HolderError> {
    if Path::new(target).exists() {
        return Ok(());
    }
    let made = if directory {
        std::fs::create_dir_all(target)
    } else {
        Path::new(target)
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::File::create(target).map(drop))
    };
    made.map_err(|e| {
        HolderError::Invalid(format!(
            "cannot make the mount point {} in the session: {e}",
            &target[NEW.len()..]
        ))
    })
}

fn mkdir(path: &str, mode: u32) -> Result<(), HolderError> {
    nix::unistd::mkdir(path, Mode::from_bits_truncate(mode))
        .map_err(|e| failed(format!("cannot create {path}"), e))
}

/// The mounts of this mount namespace, from `/proc/self/mountinfo`.
struct MountInfo {
    /// (id, parent id, mount point, read-only), in mount order.
    mounts: Vec<(u64, u64, String, bool)>,
}

impl MountInfo {
    fn read() -> Result<MountInfo, HolderError> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| failed("cannot read the mount table", e))?;
        Ok(MountInfo::parse(&text))
    }

    fn parse(text: &str) -> MountInfo {
        let mounts = text
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                let readonly = f.get(5)?.split(',').any(|o| o == "ro");
                Some((
                    f.first()?.parse().ok()?,
                    f.get(1)?.parse().ok()?,
                    unescape(f.get(4)?),
                    readonly,
                ))
            })
            .collect();
        MountInfo { mounts }
    }

    /// Mount points strictly below `dir`, in mount order.
    fn below<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = String> + 'a {
        self.mounts
            .iter()
            .filter(move |(_, _, point, _)| {
                point
                    .strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|(_, _, point, _)| point.clone())
    }

    /// The mount points whose parent is the mount at `dir` (the last one mounted there).
    fn children_of(&self, dir: &str) -> Vec<String> {
        let Some(parent) = self
            .mounts
            .iter()
            .rev()
            .find(|(_, _, point, _)| point == dir)
            .map(|(id, ..)| *id)
        else {
            return Vec::new();
        };
        self.mounts
            .iter()
            .filter(|(_, p, point, _)| *p == parent && point != dir)
            .map(|(_, _, point, _)| point.clone())
            .collect()
    }

    fn is_readonly(&self, point: &str) -> bool {
        self.mounts
            .iter()
            .rev()
            .find(|(_, _, p, _)| p == point)
            .is_some_and(|(.., ro)| *ro)
    }
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
21 1 0:20 / /oldroot rw,relatime - overlay overlay rw
22 21 0:21 / /oldroot/proc rw,nosuid - proc proc rw
23 22 0:22 / /oldroot/proc/acpi ro,relatime - tmpfs tmpfs ro
24 22 0:5 /null /oldroot/proc/kcore rw,nosuid - devtmpfs udev rw
25 21 0:23 / /oldroot/dev rw - tmpfs tmpfs rw
26 21 8:1 /data /oldroot/data\\040dir rw - ext4 /dev/sda1 rw
27 26 0:24 / /oldroot/data\\040dir/sub rw - tmpfs tmpfs rw
";

    #[test]
    fn the_mount_table_tells_masks_and_top_level_mounts() {
        let info = MountInfo::parse(MOUNTINFO);
        assert_eq!(
            info.below("/oldroot/proc").collect::<Vec<_>>(),
            ["/oldroot/proc/acpi", "/oldroot/proc/kcore"]
        );
        assert!(info.is_readonly("/oldroot/proc/acpi"));
        assert!(!info.is_readonly("/oldroot/proc/kcore"));
        assert_eq!(
            info.children_of("/oldroot"),
            ["/oldroot/proc", "/oldroot/dev", "/oldroot/data dir"]
        );
    }
}
