//! The sandbox's filesystem as sandlet reaches it: `/` in local mode, the main container's root
//! (`/proc/<pid>/root`) in sidecar mode. Every path is resolved by the kernel inside that root
//! (`openat2` with `RESOLVE_IN_ROOT`), so absolute symlinks, `..` and a symlink swapped in
//! mid-request all stay inside it. A final component is handled through its parent directory's
//! fd (`*at` calls), so operations that must not follow a symlink (lstat, unlink, rename) never
//! do, and those that follow one resolve it inside the root too.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, open, openat, openat2, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};

/// Symlinks followed while resolving one final component, as the kernel's own limit.
const MAX_SYMLINK_HOPS: usize = 40;

pub struct Root {
    dir: OwnedFd,
}

/// A path's last component and the directory holding it, resolved inside the root.
pub struct Entry {
    pub parent: OwnedFd,
    pub name: CString,
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        let dir = open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { dir })
    }

    /// Opens `path` (absolute, cleaned) inside the root. A final symlink is followed, inside
    /// the root, unless `flags` has `O_NOFOLLOW` (then `O_PATH` opens the link itself).
    pub fn open_at(&self, path: &str, flags: OFlag) -> io::Result<OwnedFd> {
        // openat2 refuses flags O_PATH ignores, O_NOCTTY among them.
        let extra = if flags.contains(OFlag::O_PATH) {
            OFlag::O_CLOEXEC
        } else {
            OFlag::O_CLOEXEC | OFlag::O_NOCTTY
        };
        let how = OpenHow::new()
            .flags(flags | extra)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        Ok(openat2(&self.dir, relative(path), how)?)
    }

    /// The directory holding `path` and its last component; the root itself has neither.
    pub fn entry(&self, path: &str) -> io::Result<Entry> {
        let (parent, name) = split(path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root has no parent"))?;
        Ok(Entry {
            parent: self.open_at(parent, OFlag::O_PATH | OFlag::O_DIRECTORY)?,
            name: CString::new(name)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?,
        })
    }

    /// What `path` itself is: a final symlink is reported, not followed.
    pub fn lstat(&self, path: &str) -> io::Result<FileStat> {
        if split(path).is_none() {
            return Ok(fstat(&self.dir)?);
        }
        let entry = self.entry(path)?;
        Ok(fstatat(
            &entry.parent,
            entry.name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?)
    }

    /// What `path` leads to, final symlinks followed inside the root.
    pub fn stat(&self, path: &str) -> io::Result<FileStat> {
        Ok(fstat(self.open_at(path, OFlag::O_PATH)?)?)
    }

    /// `path` with its final symlinks resolved inside the root: where a write that replaces
    /// the file (a new inode renamed into place) must go so that a link keeps pointing at it.
    /// Missing files resolve to themselves (a dangling link to where it points), and so do paths
    /// whose directory is missing.
    pub fn real_path(&self, path: &str) -> io::Result<String> {
        let mut path = path.to_string();
        for _ in 0..MAX_SYMLINK_HOPS {
            let Some((parent, _)) = split(&path) else {
                return Ok(path);
            };
            let entry = match self.entry(&path) {
                Ok(entry) => entry,
                // Its directory is not there (yet: an upload makes it), so no link to follow.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(path),
                Err(e) => return Err(e),
            };
            match readlinkat(&entry.parent, entry.name.as_c_str()) {
                Ok(target) => {
                    let target = target.to_string_lossy().into_owned();
                    path = clean(parent, &target);
                }
                // Not a symlink, or not there: this is the file.
                Err(Errno::EINVAL | Errno::ENOENT) => return Ok(path),
                Err(e) => return Err(e.into()),
            }
        }
        Err(Errno::ELOOP.into())
    }

    /// `mkdir -p` inside the root; returns the directories it made, which go again unless kept
    /// (see [`MadeDirs`]), also when it fails halfway.
    pub fn create_dirs(&self, path: &str, mode: u32) -> io::Result<MadeDirs> {
        let mut made = MadeDirs::default();
        let mut prefix = String::new();
        for component in path.split('/').filter(|c| !c.is_empty()) {
            prefix.push('/');
            prefix.push_str(component);
            match self.open_at(&prefix, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            let entry = self.entry(&prefix)?;
            match mkdirat(
                &entry.parent,
                entry.name.as_c_str(),
                Mode::from_bits_truncate(mode),
            ) {
                Ok(()) => made.dirs.push((prefix.clone(), entry)),
                // Someone else made it meanwhile; if it is not a directory, the next step says so.
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // What stands at the end must be a directory (a file there is an error, not success).
        self.open_at(path, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        Ok(made)
    }
}

/// Directories [`Root::create_dirs`] made, outermost first. Dropped, it removes them again,
/// innermost first and each only while empty (one another request has put something in
/// stays): an operation that fails after making them leaves nothing behind. [`MadeDirs::keep`]
/// once it succeeded.
#[derive(Default)]
pub struct MadeDirs {
    dirs: Vec<(String, Entry)>,
}

impl MadeDirs {
    pub fn keep(mut self) {
        self.dirs.clear();
    }

    /// Their paths, outermost first, the descriptors closed: whoever takes them removes them
    /// when they are not kept.
    pub fn into_paths(mut self) -> Vec<String> {
        std::mem::take(&mut self.dirs)
            .into_iter()
            .map(|(path, _)| path)
            .collect()
    }

    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.dirs.iter().map(|(path, _)| path.as_str())
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for (_, dir) in self.dirs.iter().rev() {
            let _ = nix::unistd::unlinkat(
                &dir.parent,
                dir.name.as_c_str(),
                nix::unistd::UnlinkatFlags::RemoveDir,
            );
        }
    }
}

/// An open directory's child, never following a symlink: walks that start inside the root stay
/// there without resolving paths again.
pub fn open_child(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlag) -> io::Result<OwnedFd> {
    Ok(openat(
        dir,
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
        Mode::empty(),
    )?)
}

/// Whether `fd` is the root of a mount (a bind-mounted file included).
pub fn is_mount_root(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: statx into a zeroed struct we own; the fd is valid for the call.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            0,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let attr = libc::STATX_ATTR_MOUNT_ROOT as u64;
    Ok(stx.stx_attributes_mask & attr != 0 && stx.stx_attributes & attr != 0)
}

/// Changes the mode of what `fd` (possibly `O_PATH`) refers to: `fchmod` refuses `O_PATH` fds,
/// and the file may not be openable for reading; the fd's `/proc` link names that very inode.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        link.as_str(),
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )?;
    Ok(())
}

/// Owner and group of what `fd` refers to; `None` leaves that id as it is.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    nix::unistd::fchownat(
        fd,
        c"",
        uid.map(nix::unistd::Uid::from_raw),
        gid.map(nix::unistd::Gid::from_raw),
        AtFlags::AT_EMPTY_PATH,
    )?;
    Ok(())
}

pub fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

pub fn is_symlink(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
}

pub fn is_file(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

/// `path` made absolute against `base` (absolute) and cleaned lexically: no `.`, `..` or `//`
/// (as execd's `filepath.Abs`; `..` at the root stays at the root).
pub fn clean(base: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{base}/{path}")
    };
    for component in joined.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A cleaned absolute path's parent and last component; `None` for `/`.
pub fn split(path: &str) -> Option<(&str, &str)> {
    let at = path.rfind('/')?;
    let name = &path[at + 1..];
    if name.is_empty() {
        return None;
    }
    Some((if at == 0 { "/" } else { &path[..at] }, name))
}

/// The path as `openat2` takes it relative to the root's fd.
fn relative(path: &str) -> &str {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() { "." } else { trimmed }
}

/// The bytes of a name, for the `*at` calls.
pub fn name_of(name: &CString) -> &OsStr {
    OsStr::from_bytes(name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn paths_clean_lexically_against_a_base() {
        assert_eq!(clean("/home/u", "a/./b//c/../d"), "/home/u/a/b/d");
        assert_eq!(clean("/home/u", "/x/../../.."), "/");
        assert_eq!(clean("/", "."), "/");
        assert_eq!(clean("/w", "../../etc"), "/etc");
        assert_eq!(split("/a/b"), Some(("/a", "b")));
        assert_eq!(split("/a"), Some(("/", "a")));
        assert_eq!(split("/"), None);
    }

    #[test]
    fn symlinks_and_dot_dots_never_leave_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host").unwrap();
        let root_dir = tempfile::tempdir().unwrap();
        let r = root_dir.path();
        std::fs::write(r.join("secret"), "inside").unwrap();
        symlink("/", r.join("to-root")).unwrap();
        symlink("../../../../..", r.join("up")).unwrap();
        symlink(outside.path().join("secret"), r.join("abs")).unwrap();
        let root = Root::open(r).unwrap();
        let read = |p: &str| {
            let fd = root.open_at(p, OFlag::O_RDONLY).unwrap();
            std::fs::read_to_string(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
        };
        assert_eq!(read("/to-root/secret"), "inside");
        assert_eq!(read("/up/secret"), "inside");
        // The host path of the outside file, looked up inside the root: not there.
        assert_eq!(
            root.open_at("/abs", OFlag::O_RDONLY).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(is_symlink(&root.lstat("/abs").unwrap()));
        // A link to a link to the root resolves to the root, inside.
        assert_eq!(root.real_path("/to-root").unwrap(), "/");
        assert_eq!(root.real_path("/up").unwrap(), "/");
        assert_eq!(
            root.real_path("/missing/dir/file").unwrap(),
            "/missing/dir/file"
        );
        let made = root.create_dirs("/to-root/new/deeper", 0o755).unwrap();
        assert_eq!(
            made.paths().collect::<Vec<_>>(),
            ["/to-root/new", "/to-root/new/deeper"]
        );
        made.keep();
        assert!(r.join("new/deeper").is_dir());
        std::fs::write(r.join("file"), "").unwrap();
        assert!(root.create_dirs("/file/sub", 0o755).is_err());
        // Not kept: gone again, but not a directory someone has put something in meanwhile.
        let made = root.create_dirs("/gone/too", 0o755).unwrap();
        drop(made);
        assert!(!r.join("gone").exists());
        let made = root.create_dirs("/used/here", 0o755).unwrap();
        std::fs::write(r.join("used/note"), "").unwrap();
        drop(made);
        assert!(r.join("used/note").exists() && !r.join("used/here").exists());
    }
}
