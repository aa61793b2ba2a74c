//! What a session changed in its persistent overlays, read from their upper layers: `diff`
//! writes it as a gzip'd tar (each overlay's changes under its path; a deletion as an empty
//! `.wh.<name>` entry and a directory the session replaced whole with a `.wh..wh..opq` entry in
//! it, the OCI layer conventions), `commit` writes it onto the sandbox's directories below the
//! overlays. Both act on the sandbox's filesystem as the session's user (the caller's
//! [`Place`]): the kernel decides what may be read and written.
//!
//! In an upper layer overlayfs marks a deletion with a character device 0:0 and a replaced
//! directory with the `trusted.overlay.opaque` attribute `y`; the layers are mounted without
//! redirects and metacopy, so every other entry is the whole new file, link or directory.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, SFlag};

use crate::files::root::{is_dir, is_file, is_symlink};
use crate::files::{FileError, Place, Staged, remove_dir, walk_below};

/// One persistent overlay: where it is and where its upper layer is, both in the sandbox.
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: String,
    pub upper: String,
}

/// What an upper layer's entry means for the directory below it.
enum Change {
    /// `path` was deleted.
    Deleted,
    /// A directory, which replaces whatever was there when `opaque`.
    Directory {
        opaque: bool,
    },
    File,
    Symlink(String),
    /// Sockets, fifos, devices: nothing a diff or commit carries.
    Other,
}

fn change(place: &Place, path: &str, st: &FileStat) -> Result<Change, FileError> {
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    Ok(if kind == SFlag::S_IFCHR && st.st_rdev == 0 {
        Change::Deleted
    } else if is_dir(st) {
        Change::Directory {
            opaque: opaque(place, path)?,
        }
    } else if is_file(st) {
        Change::File
    } else if is_symlink(st) {
        let entry = place
            .root
            .entry(path)
            .map_err(|e| FileError::io(format!("cannot read {path}"), e))?;
        let target = nix::fcntl::readlinkat(&entry.parent, entry.name.as_c_str())
            .map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
        Change::Symlink(target.to_string_lossy().into_owned())
    } else {
        Change::Other
    })
}

/// Whether overlayfs marked the directory `path` as replacing the lower one.
fn opaque(place: &Place, path: &str) -> Result<bool, FileError> {
    let fd = place
        .root
        .open_at(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        )
        .map_err(|e| FileError::io(format!("cannot open {path}"), e))?;
    let name = CString::new("trusted.overlay.opaque").expect("no NUL");
    let mut value = [0u8; 4];
    // SAFETY: a valid fd, name and buffer of the size passed.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    Ok(n == 1 && value[0] == b'y')
}

/// The sandbox path an upper layer's entry stands for.
fn below(layer: &Layer, entry: &str) -> String {
    let rel = &entry[layer.upper.len()..];
    if layer.path == "/" {
        rel.to_string()
    } else {
        format!("{}{rel}", layer.path)
    }
}

/// Writes the layers' changes to `out` as a tar.gz (see the module docs).
pub fn diff(place: &Place, layers: &[Layer], out: impl Write) -> Result<(), FileError> {
    let failed = |e: std::io::Error| FileError::Failed(format!("cannot write the diff: {e}"));
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        out,
        flate2::Compression::fast(),
    ));
    tar.follow_symlinks(false);
    for layer in layers {
        walk_below(place, &layer.upper, &mut |entry, st| {
            let name = below(layer, entry);
            let name = name.trim_start_matches('/');
            let mut header = tar::Header::new_gnu();
            header.set_mode(st.st_mode & 0o7777);
            header.set_uid(st.st_uid.into());
            header.set_gid(st.st_gid.into());
            header.set_mtime(st.st_mtime.max(0) as u64);
            match change(place, entry, st)? {
                Change::Deleted => {
                    let (dir, base) = name.rsplit_once('/').unwrap_or(("", name));
                    let marker = if dir.is_empty() {
                        format!(".wh.{base}")
                    } else {
                        format!("{dir}/.wh.{base}")
                    };
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(0o644);
                    header.set_size(0);
                    tar.append_data(&mut header, marker, std::io::empty())
                        .map_err(failed)?;
                }
                Change::Directory { opaque } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{name}/"), std::io::empty())
                        .map_err(failed)?;
                    if opaque {
                        let mut marker = tar::Header::new_gnu();
                        marker.set_entry_type(tar::EntryType::Regular);
                        marker.set_mode(0o644);
                        marker.set_size(0);
                        tar.append_data(
                            &mut marker,
                            format!("{name}/.wh..wh..opq"),
                            std::io::empty(),
                        )
                        .map_err(failed)?;
                    }
                    return Ok(true);
                }
                Change::File => {
                    let file = open_file(place, entry)?;
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(st.st_size as u64);
                    tar.append_data(&mut header, name, std::fs::File::from(file))
                        .map_err(failed)?;
                }
                Change::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    tar.append_link(&mut header, name, target).map_err(failed)?;
                }
                Change::Other => {}
            }
            Ok(false)
        })?;
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .map(drop)
        .map_err(failed)
}

/// Writes the layers' changes onto the sandbox's directories below the overlays: deletions
/// delete, replaced directories are emptied first, files and links replace what was there
/// (each file atomically). The layers keep their content, so the session sees no change.
pub fn commit(place: &Place, layers: &[Layer]) -> Result<usize, FileError> {
    let mut applied = 0;
    for layer in layers {
        walk_below(place, &layer.upper, &mut |entry, st| {
            let target = below(layer, entry);
            applied += 1;
            match change(place, entry, st)? {
                Change::Deleted => remove_dir(place, &target).map(|()| false),
                Change::Directory { opaque } => {
                    let existing = place.root.lstat(&target).ok();
                    if opaque || existing.as_ref().is_some_and(|t| !is_dir(t)) {
                        remove_dir(place, &target)?;
                    }
                    place
                        .root
                        .create_dirs(&target, st.st_mode & 0o7777)
                        .map_err(|e| FileError::io(format!("cannot create {target}"), e))?
                        .keep();
                    Ok(true)
                }
                Change::File => {
                    if place.root.lstat(&target).is_ok_and(|t| is_dir(&t)) {
                        remove_dir(place, &target)?;
                    }
                    let source = std::fs::File::from(open_file(place, entry)?);
                    let len = source
                        .metadata()
                        .map_err(|e| FileError::io(format!("cannot read {entry}"), e))?
                        .len();
                    let mut staged = Staged::create(place, &target)?;
                    staged.copy_from(&source, 0, len)?;
                    staged.commit(st.st_mode & 0o7777, None, None)?;
                    Ok(false)
                }
                Change::Symlink(to) => {
                    remove_dir(place, &target)?;
                    let entry = place
                        .root
                        .entry(&target)
                        .map_err(|e| FileError::io(format!("cannot link {target}"), e))?;
                    nix::unistd::symlinkat(to.as_str(), &entry.parent, entry.name.as_c_str())
                        .map_err(|e| FileError::io(format!("cannot link {target}"), e.into()))?;
                    Ok(false)
                }
                Change::Other => Ok(false),
            }
        })?;
    }
    Ok(applied)
}

fn open_file(place: &Place, path: &str) -> Result<OwnedFd, FileError> {
    place
        .root
        .open_at(path, OFlag::O_RDONLY | OFlag::O_NOFOLLOW)
        .map_err(|e| FileError::io(format!("cannot read {path}"), e))
}
