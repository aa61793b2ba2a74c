//! Walks of a directory tree inside the sandbox: listing, searching and removing. A walk holds
//! the fd of each directory it is in and opens children relative to it without following
//! symlinks, so a link planted mid-walk can neither lead it outside the root nor loop it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
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
/// entries by name (bytes), symlinks listed and never followed.
pub fn list(
    place: &Place,
    dir: &str,
    depth: usize,
    limit: usize,
) -> Result<Vec<FileInfo>, FileError> {
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
    let mut found = Vec::new();
    if depth == 0 {
        return Ok(found);
    }
    let fd = open_dir(place, dir)?;
    walk(fd, dir, 1, &mut |path, st, level| {
        if found.len() == limit {
            return Err(too_many(limit, "listing"));
        }
        found.push(FileInfo::new(path.to_string(), st, place.users()));
        Ok(level < depth)
    })?;
    Ok(found)
}

/// Files (anything but directories) under `path` whose name matches `pattern`; `path` itself
/// when it is not a directory.
pub fn search(
    place: &Place,
    path: &str,
    pattern: &Pattern,
    limit: usize,
) -> Result<Vec<FileInfo>, FileError> {
    let st = place
        .root
        .lstat(path)
        .map_err(|e| FileError::io(format!("file not found: {path}"), e))?;
    if !is_dir(&st) {
        let name = root::split(path).map_or("", |(_, n)| n);
        return Ok(if pattern.matches(name) {
            vec![FileInfo::new(path.to_string(), &st, place.users())]
        } else {
            Vec::new()
        });
    }
    let mut found = Vec::new();
    let fd = open_dir(place, path)?;
    walk(fd, path, 1, &mut |path, st, _| {
        if is_dir(st) {
            return Ok(true);
        }
        let name = root::split(path).map_or("", |(_, n)| n);
        if pattern.matches(name) {
            if found.len() == limit {
                return Err(too_many(limit, "search"));
            }
            found.push(FileInfo::new(path.to_string(), st, place.users()));
        }
        Ok(false)
    })?;
    Ok(found)
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
        for (name, st) in entries(&mut dir, path)? {
            if !is_dir(&st) {
                continue;
            }
            let child_path = join(path, &name);
            let child = open_child(dir.as_fd(), &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(|e| FileError::io(format!("cannot open {child_path}"), e))?;
            if is_mount_root(child.as_fd())
                .map_err(|e| FileError::io(format!("cannot inspect {child_path}"), e))?
            {
                return Err(mount_point(&child_path));
            }
            let child = Dir::from_fd(child)
                .map_err(|e| FileError::io(format!("cannot read {child_path}"), e.into()))?;
            visit(child, &child_path, depth + 1)?;
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
        for (name, st) in entries(&mut dir, path)? {
            let child_path = join(path, &name);
            if is_dir(&st) {
                let child = open_child(dir.as_fd(), &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                    .map_err(|e| FileError::io(format!("cannot open {child_path}"), e))?;
                let child = Dir::from_fd(child)
                    .map_err(|e| FileError::io(format!("cannot read {child_path}"), e.into()))?;
                visit(child, &child_path, depth + 1)?;
            }
            let how = if is_dir(&st) {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            unlinkat(&dir, name.as_os_str(), how)
                .map_err(|e| FileError::io(format!("cannot remove {child_path}"), e.into()))?;
        }
        Ok(())
    }
    let dir =
        Dir::from_fd(fd).map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
    visit(dir, path, 1)
}

/// Visits every entry below the directory `fd` (at `path`), pre-order by name; `visit` says
/// whether to descend into a directory (symlinks never are).
fn walk(
    fd: OwnedFd,
    path: &str,
    level: usize,
    visit: &mut dyn FnMut(&str, &FileStat, usize) -> Result<bool, FileError>,
) -> Result<(), FileError> {
    if level > MAX_DEPTH {
        return Err(too_deep(path));
    }
    let mut dir =
        Dir::from_fd(fd).map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
    for (name, st) in entries(&mut dir, path)? {
        let child_path = join(path, &name);
        if visit(&child_path, &st, level)? && is_dir(&st) {
            let child = open_child(dir.as_fd(), &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(|e| FileError::io(format!("cannot open {child_path}"), e))?;
            walk(child, &child_path, level + 1, visit)?;
        }
    }
    Ok(())
}

/// A directory's entries (not `.` and `..`) with their lstat, sorted by name bytes.
fn entries(dir: &mut Dir, path: &str) -> Result<Vec<(OsString, FileStat)>, FileError> {
    let mut names: Vec<OsString> = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names
        .into_iter()
        .filter_map(
            |name| match fstatat(&*dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => Some(Ok((name, st))),
                // Removed since it was listed.
                Err(nix::errno::Errno::ENOENT) => None,
                Err(e) => Some(Err(FileError::io(
                    format!("cannot inspect {}", join(path, &name)),
                    e.into(),
                ))),
            },
        )
        .collect()
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
