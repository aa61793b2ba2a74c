//! Walks of a directory tree inside the sandbox: listing, searching and removing. A walk holds
//! the fd of each directory it is in and opens children relative to it without following
//! symlinks, so a link planted mid-walk can neither lead it outside the root nor loop it.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::glob::Pattern;
use super::root::{self, is_dir, is_mount_root, is_symlink, open_child};
use super::{FileError, FileInfo, Place};

/// Deeper trees are refused rather than walked on the stack.
const MAX_DEPTH: usize = 512;

/// Entries of `dir` up to `depth` levels down, in execd's order: pre-order, each directory's
/// entries by name (bytes), symlinks listed and never followed. Each is handed to `found` as
/// the walk reaches it; more than `limit` is an error before the first is handed over (the tree
/// is walked twice: counted by names alone, then listed with each entry's details).
pub fn list(
    place: &Place,
    dir: &str,
    depth: usize,
    limit: usize,
    found: &mut dyn FnMut(FileInfo) -> Result<(), FileError>,
) -> Result<(), FileError> {
    let st = place
        .root
        .lstat(dir)
        .map_err(|e| FileError::io(format!("directory not found: {dir}"), e))?;
    if is_symlink(&st) {
        return Err(FileError::Invalid(format!(
            "path is a symbolic link, refusing to traverse: {dir}"
        )));
    }
    if !is_dir(&st) {
        return Err(FileError::Invalid(format!(
            "path is not a directory: {dir}"
        )));
    }
    if depth == 0 {
        return Ok(());
    }
    let listing = |found: &mut dyn FnMut(&Entry) -> Result<(), FileError>| {
        walk(open_dir(place, dir)?, dir, 1, &mut |entry, level| {
            found(entry)?;
            Ok(level < depth)
        })
    };
    within_limit(limit, "listing", listing, place, found)
}

/// Files (anything but directories) under `path` whose name matches `pattern`, handed to
/// `found` as [`list`] does; `path` itself when it is not a directory.
pub fn search(
    place: &Place,
    path: &str,
    pattern: &Pattern,
    limit: usize,
    found: &mut dyn FnMut(FileInfo) -> Result<(), FileError>,
) -> Result<(), FileError> {
    let st = place
        .root
        .lstat(path)
        .map_err(|e| FileError::io(format!("file not found: {path}"), e))?;
    if !is_dir(&st) {
        let name = root::split(path).map_or("", |(_, n)| n);
        if pattern.matches(name) {
            found(FileInfo::new(path.to_string(), &st, place.users()))?;
        }
        return Ok(());
    }
    let searching = |found: &mut dyn FnMut(&Entry) -> Result<(), FileError>| {
        walk(open_dir(place, path)?, path, 1, &mut |entry, _| {
            if entry.is_dir()? {
                return Ok(true);
            }
            let name = root::split(entry.path).map_or("", |(_, n)| n);
            if pattern.matches(name) {
                found(entry)?;
            }
            Ok(false)
        })
    };
    within_limit(limit, "search", searching, place, found)
}

/// Runs `walk` once to count what it finds (refusing more than `limit` before anything is
/// handed over), then again handing each entry's details to `found`. Entries gone between the
/// walks are skipped; more than `limit` in the second (the tree grew meanwhile) is an error.
fn within_limit(
    limit: usize,
    what: &str,
    walk: impl Fn(&mut dyn FnMut(&Entry) -> Result<(), FileError>) -> Result<(), FileError>,
    place: &Place,
    found: &mut dyn FnMut(FileInfo) -> Result<(), FileError>,
) -> Result<(), FileError> {
    let mut counted = 0;
    walk(&mut |_| {
        counted += 1;
        if counted > limit {
            return Err(too_many(limit, what));
        }
        Ok(())
    })?;
    let mut handed = 0;
    walk(&mut |entry| {
        let Some(st) = entry.lstat()? else {
            return Ok(());
        };
        handed += 1;
        if handed > limit {
            return Err(too_many(limit, what));
        }
        found(FileInfo::new(entry.path.to_string(), &st, place.users()))
    })
}

/// Removes a file or symlink (the link, not its target); a missing one is no error.
pub fn remove_file(place: &Place, path: &str) -> Result<(), FileError> {
    let st = match place.root.lstat(path) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(FileError::io(format!("cannot remove {path}"), e)),
    };
    if is_dir(&st) {
        return Err(FileError::Conflict(format!(
            "{path} is a directory; remove it with DELETE /directories"
        )));
    }
    let entry = place
        .root
        .entry(path)
        .map_err(|e| FileError::io(format!("cannot remove {path}"), e))?;
    unlinkat(
        &entry.parent,
        entry.name.as_c_str(),
        UnlinkatFlags::NoRemoveDir,
    )
    .map_err(|e| FileError::io(format!("cannot remove {path}"), e.into()))
}

/// Removes `path` and everything below it; a missing one is no error. The sandbox's root and
/// mount points (anywhere in the tree) are refused before anything is removed.
pub fn remove_dir(place: &Place, path: &str) -> Result<(), FileError> {
    let Some((_, _)) = root::split(path) else {
        return Err(FileError::Conflict(
            "refusing to remove the sandbox's root directory".into(),
        ));
    };
    let st = match place.root.lstat(path) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(FileError::io(format!("cannot remove {path}"), e)),
    };
    let entry = place
        .root
        .entry(path)
        .map_err(|e| FileError::io(format!("cannot remove {path}"), e))?;
    let itself = open_child(
        entry.parent.as_fd(),
        root::name_of(&entry.name),
        OFlag::O_PATH,
    )
    .map_err(|e| FileError::io(format!("cannot remove {path}"), e))?;
    if is_mount_root(itself.as_fd())
        .map_err(|e| FileError::io(format!("cannot remove {path}"), e))?
    {
        return Err(mount_point(path));
    }
    if !is_dir(&st) {
        return unlinkat(
            &entry.parent,
            entry.name.as_c_str(),
            UnlinkatFlags::NoRemoveDir,
        )
        .map_err(|e| FileError::io(format!("cannot remove {path}"), e.into()));
    }
    // First make sure no mount point is inside, so a refusal removes nothing.
    check_no_mounts(place, path)?;
    let fd = open_dir(place, path)?;
    empty_dir(fd, path)?;
    unlinkat(
        &entry.parent,
        entry.name.as_c_str(),
        UnlinkatFlags::RemoveDir,
    )
    .map_err(|e| FileError::io(format!("cannot remove {path}"), e.into()))
}

fn check_no_mounts(place: &Place, path: &str) -> Result<(), FileError> {
    fn visit(mut dir: Dir, path: &str, depth: usize) -> Result<(), FileError> {
        if depth > MAX_DEPTH {
            return Err(too_deep(path));
        }
        let names = Names::read(&mut dir, path)?;
        for (name, kind) in names.sorted() {
            let child_path = join(path, name);
            let entry = Entry::new(dir.as_fd(), name, &child_path, kind);
            if !entry.is_dir()? {
                continue;
            }
            let child = open_child(dir.as_fd(), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(|e| FileError::io(format!("cannot open {}", entry.path), e))?;
            if is_mount_root(child.as_fd())
                .map_err(|e| FileError::io(format!("cannot inspect {}", entry.path), e))?
            {
                return Err(mount_point(entry.path));
            }
            let child = Dir::from_fd(child)
                .map_err(|e| FileError::io(format!("cannot read {}", entry.path), e.into()))?;
            visit(child, entry.path, depth + 1)?;
        }
        Ok(())
    }
    let dir = Dir::from_fd(open_dir(place, path)?)
        .map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
    visit(dir, path, 1)
}

/// Removes everything inside the directory `fd`.
fn empty_dir(fd: OwnedFd, path: &str) -> Result<(), FileError> {
    fn visit(mut dir: Dir, path: &str, depth: usize) -> Result<(), FileError> {
        if depth > MAX_DEPTH {
            return Err(too_deep(path));
        }
        let names = Names::read(&mut dir, path)?;
        for (name, kind) in names.sorted() {
            let child_path = join(path, name);
            let entry = Entry::new(dir.as_fd(), name, &child_path, kind);
            let is_dir = match entry.is_dir() {
                Ok(is_dir) => is_dir,
                // Removed since it was listed.
                Err(FileError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if is_dir {
                let child = open_child(dir.as_fd(), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                    .map_err(|e| FileError::io(format!("cannot open {child_path}"), e))?;
                let child = Dir::from_fd(child)
                    .map_err(|e| FileError::io(format!("cannot read {child_path}"), e.into()))?;
                visit(child, &child_path, depth + 1)?;
            }
            let how = if is_dir {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            unlinkat(&dir, name, how)
                .map_err(|e| FileError::io(format!("cannot remove {child_path}"), e.into()))?;
        }
        Ok(())
    }
    let dir =
        Dir::from_fd(fd).map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
    visit(dir, path, 1)
}

/// Visits every entry below the directory `path`, pre-order by name, with its lstat; `visit`
/// says whether to descend into a directory (symlinks never are). An entry removed while the
/// walk reaches it is skipped.
pub fn walk_below(
    place: &Place,
    path: &str,
    visit: &mut dyn FnMut(&str, &FileStat) -> Result<bool, FileError>,
) -> Result<(), FileError> {
    walk(
        open_dir(place, path)?,
        path,
        1,
        &mut |entry, _| match entry.lstat()? {
            Some(st) => visit(entry.path, &st),
            None => Err(FileError::NotFound(format!("{} was removed", entry.path))),
        },
    )
}

/// Visits every entry below the directory `fd` (at `path`), pre-order by name, with its level
/// (1 for `fd`'s own entries); `visit` says whether to descend into a directory (symlinks never
/// are). Holds one directory's names per level, no more.
fn walk(
    fd: OwnedFd,
    path: &str,
    level: usize,
    visit: &mut dyn FnMut(&Entry, usize) -> Result<bool, FileError>,
) -> Result<(), FileError> {
    if level > MAX_DEPTH {
        return Err(too_deep(path));
    }
    let mut dir =
        Dir::from_fd(fd).map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
    let names = Names::read(&mut dir, path)?;
    for (name, kind) in names.sorted() {
        let child_path = join(path, name);
        let entry = Entry::new(dir.as_fd(), name, &child_path, kind);
        let descend = visit(&entry, level).and_then(|descend| Ok(descend && entry.is_dir()?));
        let descend = match descend {
            Ok(descend) => descend,
            // Removed since it was listed.
            Err(FileError::NotFound(_)) if entry.vanished() => continue,
            Err(e) => return Err(e),
        };
        if descend {
            let child = match open_child(dir.as_fd(), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                Ok(child) => child,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(FileError::io(format!("cannot open {child_path}"), e)),
            };
            walk(child, &child_path, level + 1, visit)?;
        }
    }
    Ok(())
}

/// A directory's entry names (not `.` and `..`), in one buffer, with the kinds `getdents`
/// told: a directory of a million entries costs its names' bytes and 9 bytes per entry, not an
/// allocation and a stat each.
struct Names {
    bytes: Vec<u8>,
    /// Where each name ends in `bytes`.
    ends: Vec<u32>,
    /// `getdents`' `d_type`: [`KIND_DIR`], [`KIND_OTHER`] or [`KIND_UNKNOWN`].
    kinds: Vec<u8>,
}

const KIND_UNKNOWN: u8 = 0;
const KIND_DIR: u8 = 1;
const KIND_OTHER: u8 = 2;

impl Names {
    fn read(dir: &mut Dir, path: &str) -> Result<Names, FileError> {
        let mut names = Names {
            bytes: Vec::new(),
            ends: Vec::new(),
            kinds: Vec::new(),
        };
        for entry in dir.iter() {
            let entry =
                entry.map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            names.bytes.extend_from_slice(name);
            let end = u32::try_from(names.bytes.len())
                .map_err(|_| FileError::TooLarge(format!("{path} has more than 4 GiB of names")))?;
            names.ends.push(end);
            names.kinds.push(match entry.file_type() {
                Some(nix::dir::Type::Directory) => KIND_DIR,
                Some(_) => KIND_OTHER,
                None => KIND_UNKNOWN,
            });
        }
        names.bytes.shrink_to_fit();
        Ok(names)
    }

    fn name(&self, i: usize) -> &OsStr {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        OsStr::from_bytes(&self.bytes[start..self.ends[i] as usize])
    }

    /// Names and kinds, sorted by the names' bytes.
    fn sorted(&self) -> impl Iterator<Item = (&OsStr, u8)> {
        let mut order: Vec<u32> = (0..self.ends.len() as u32).collect();
        order.sort_unstable_by(|a, b| {
            self.name(*a as usize)
                .as_bytes()
                .cmp(self.name(*b as usize).as_bytes())
        });
        order
            .into_iter()
            .map(|i| (self.name(i as usize), self.kinds[i as usize]))
    }
}

/// An entry a walk has reached; what it is comes from `getdents` when it can, its stat only
/// when asked (once).
struct Entry<'a> {
    dir: BorrowedFd<'a>,
    name: &'a OsStr,
    path: &'a str,
    kind: u8,
    stat: std::cell::OnceCell<Option<FileStat>>,
}

impl<'a> Entry<'a> {
    fn new(dir: BorrowedFd<'a>, name: &'a OsStr, path: &'a str, kind: u8) -> Entry<'a> {
        Entry {
            dir,
            name,
            path,
            kind,
            stat: std::cell::OnceCell::new(),
        }
    }

    /// Its lstat; `None` when it has been removed since it was listed.
    fn lstat(&self) -> Result<Option<FileStat>, FileError> {
        if let Some(st) = self.stat.get() {
            return Ok(*st);
        }
        let st = match fstatat(self.dir, self.name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(nix::errno::Errno::ENOENT) => None,
            Err(e) => {
                return Err(FileError::io(
                    format!("cannot inspect {}", self.path),
                    e.into(),
                ));
            }
        };
        Ok(*self.stat.get_or_init(|| st))
    }

    /// Whether it is a directory (a symlink to one is not). A removed entry is `NotFound`.
    fn is_dir(&self) -> Result<bool, FileError> {
        match self.kind {
            KIND_DIR => Ok(true),
            KIND_OTHER => Ok(false),
            _ => match self.lstat()? {
                Some(st) => Ok(is_dir(&st)),
                None => Err(FileError::NotFound(format!("{} was removed", self.path))),
            },
        }
    }

    /// Whether an lstat found it removed.
    fn vanished(&self) -> bool {
        matches!(self.stat.get(), Some(None))
    }
}

fn open_dir(place: &Place, path: &str) -> Result<OwnedFd, FileError> {
    place
        .root
        .open_at(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        )
        .map_err(|e| FileError::io(format!("cannot open {path}"), e))
}

fn join(dir: &str, name: &OsStr) -> String {
    let name = name.to_string_lossy();
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn mount_point(path: &str) -> FileError {
    FileError::Conflict(format!(
        "refusing to remove {path}: it is a mount point (or holds one) of the sandbox"
    ))
}

fn too_many(limit: usize, what: &str) -> FileError {
    FileError::TooLarge(format!(
        "the {what} has more than {limit} entries (--exec-max-listed); narrow it with a path, depth or pattern"
    ))
}

fn too_deep(path: &str) -> FileError {
    FileError::Invalid(format!(
        "{path} is nested more than {MAX_DEPTH} levels deep"
    ))
}
