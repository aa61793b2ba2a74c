//! Writing a file by replacing it: the new content goes to a file without a name in the
//! destination's directory (`O_TMPFILE`; a named hidden file where the filesystem lacks it), is
//! synced, given its mode and owner, and only then renamed over the destination. A reader sees
//! the old file or the new one, never a mix; an upload cut short (or a sandlet killed mid-write)
//! leaves the old file as it was.
//!
//! A request that stages many files (an upload form) keeps only a few open: the others are
//! [`Parked`] under their hidden names with their descriptors closed, so the descriptors one
//! request holds do not grow with its files.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{
    AtFlags, OFlag, PosixFadviseAdvice, RenameFlags, openat, posix_fadvise, renameat2,
};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};

use super::root::{self, MadeDirs, is_file};
use super::{FileError, Place};

/// Mode of a new file when the request gives none.
const DEFAULT_FILE_MODE: u32 = 0o644;

/// How much of a streamed file is written before the kernel is told to start writing it out.
/// The data goes to disk while the rest arrives instead of all at the final fsync, and a large
/// upload's share of the page cache (which counts against the container's memory) stays small.
const WRITEBACK_STEP: u64 = 8 << 20;
/// How far behind the newest data the writer waits for the writeback to be done: deep enough
/// to keep the disk's queue full (waiting for each step right behind was slower, measured),
/// shallow enough to bound what is in flight.
const WRITEBACK_LAG: u64 = 4 * WRITEBACK_STEP;

pub struct Staged {
    /// The path being replaced, for messages.
    pub path: String,
    /// The same with its final symlinks resolved: where the new file goes.
    real: String,
    parent: OwnedFd,
    name: CString,
    file: File,
    /// The hidden name, when `O_TMPFILE` was not available; removed unless committed.
    named: Option<CString>,
    /// Mode and owner of the file being replaced, kept unless the request sets them.
    previous: Option<(u32, u32, u32)>,
    writeback: Writeback,
    /// The parent directories this write made: kept once it is committed.
    made_dirs: MadeDirs,
}

/// Where the streamed content's writeback stands (see [`WRITEBACK_STEP`]).
#[derive(Default)]
struct Writeback {
    written: u64,
    /// Written out, or asked to be, up to here.
    started: u64,
    /// Known to be on disk up to here.
    done: u64,
}

impl Writeback {
    /// Counts `n` bytes written to `file`; once a step is full, starts its writeback and waits
    /// for what lies [`WRITEBACK_LAG`] behind. Best effort: the final fsync reports failures.
    fn wrote(&mut self, file: &File, n: u64) {
        self.written += n;
        if self.written - self.started < WRITEBACK_STEP {
            return;
        }
        let fd = file.as_raw_fd();
        let range = |from: u64, to: u64| (from as libc::off64_t, (to - from) as libc::off64_t);
        let (offset, len) = range(self.started, self.written);
        // SAFETY: plain syscalls on an open descriptor; they only start or wait for I/O.
        unsafe { libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE) };
        self.started = self.written;
        let settled = self.written.saturating_sub(WRITEBACK_LAG);
        if settled > self.done {
            let (offset, len) = range(self.done, settled);
            unsafe {
                libc::sync_file_range(
                    fd,
                    offset,
                    len,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )
            };
            self.done = settled;
        }
    }
}

/// Drops the page cache of the file about to be replaced: the rename frees it anyway, and
/// freeing it first means the old and the new content are never cached side by side (both
/// count against the container's memory) and the new content goes into pages that were just
/// in use. On the VM the figures come from (Firecracker, free page reporting on) that is a
/// tenfold difference: a new 512 MiB file took 2.0–2.7 s to write while the old one stayed
/// cached, 0.2 s with its cache dropped first (most likely because free memory there must be
/// backed by the host again on first touch, and just-freed pages still are). Dirty pages stay
/// (the advice only starts their writeback); a file that cannot be opened for reading keeps
/// its cache.
fn release_cache(parent: &OwnedFd, name: &CStr) {
    // Not following a link, nor waiting on a FIFO swapped in since the caller's fstatat.
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    if let Ok(old) = openat(parent, name, flags | OFlag::O_CLOEXEC, Mode::empty()) {
        let _ = posix_fadvise(&old, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

impl Staged {
    /// Prepares to replace the file `path` leads to, creating missing parent directories.
    pub fn create(place: &Place, path: &str) -> Result<Staged, FileError> {
        let real = place
            .root
            .real_path(path)
            .map_err(|e| FileError::io(format!("cannot resolve {path}"), e))?;
        let Some((parent_path, _)) = root::split(&real) else {
            return Err(FileError::Conflict(format!(
                "{path} is the sandbox's root directory"
            )));
        };
        let made_dirs = place
            .root
            .create_dirs(parent_path, 0o755)
            .map_err(|e| FileError::io(format!("cannot create the directory {parent_path}"), e))?;
        let entry = place
            .root
            .entry(&real)
            .map_err(|e| FileError::io(format!("cannot write {path}"), e))?;
        let previous = match fstatat(
            &entry.parent,
            entry.name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(std::io::Error::from)
        {
            Ok(st) if is_file(&st) => {
                release_cache(&entry.parent, &entry.name);
                Some((st.st_mode & 0o7777, st.st_uid, st.st_gid))
            }
            Ok(_) => {
                return Err(FileError::Conflict(format!(
                    "{path} exists and is not a regular file"
                )));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(FileError::io(format!("cannot write {path}"), e)),
        };
        let mode = Mode::from_bits_truncate(0o600);
        let (fd, named) = match openat(
            &entry.parent,
            ".",
            OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            mode,
        ) {
            Ok(fd) => (fd, None),
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EISDIR) => {
                let hidden = hidden_name(&entry.name);
                let fd = openat(
                    &entry.parent,
                    hidden.as_c_str(),
                    OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    mode,
                )
                .map_err(|e| FileError::io(format!("cannot write {path}"), e.into()))?;
                (fd, Some(hidden))
            }
            Err(e) => return Err(FileError::io(format!("cannot write {path}"), e.into())),
        };
        Ok(Staged {
            path: path.to_string(),
            real,
            parent: entry.parent,
            name: entry.name,
            file: File::from(fd),
            named,
            previous,
            writeback: Writeback::default(),
            made_dirs,
        })
    }

    /// Appends `pieces` in order (an upload's network chunks).
    pub fn write_pieces(&mut self, pieces: &[bytes::Bytes]) -> Result<(), FileError> {
        write_pieces(&mut self.file, pieces)
            .map_err(|e| FileError::io(format!("cannot write {}", self.path), e))?;
        let n = pieces.iter().map(|p| p.len() as u64).sum();
        self.writeback.wrote(&self.file, n);
        Ok(())
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), FileError> {
        self.file
            .write_all(bytes)
            .map_err(|e| FileError::io(format!("cannot write {}", self.path), e))?;
        self.writeback.wrote(&self.file, bytes.len() as u64);
        Ok(())
    }

    /// Appends `len` bytes of `spool` from `offset` (an upload's file that arrived before its
    /// metadata). Reads through the spool's own offset: the spool is written with `O_APPEND`.
    pub fn copy_from(&mut self, spool: &File, offset: u64, len: u64) -> Result<(), FileError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut spool = spool;
        let copied = spool
            .seek(SeekFrom::Start(offset))
            .and_then(|_| std::io::copy(&mut spool.take(len), &mut self.file))
            .map_err(|e| FileError::io(format!("cannot write {}", self.path), e))?;
        if copied != len {
            return Err(FileError::Failed(format!(
                "the upload's spool ended {} bytes short of {}",
                len - copied,
                self.path
            )));
        }
        Ok(())
    }

    /// Names the content (hidden) and closes it: see [`Parked`]. `place` is where it was
    /// created.
    pub fn park(mut self, place: Arc<Place>) -> Result<Parked, FileError> {
        let dev = nix::sys::stat::fstat(&self.parent)
            .map_err(|e| FileError::io(format!("cannot write {}", self.path), e.into()))?
            .st_dev;
        let hidden = self.name_it()?;
        // From here the parked file owns the hidden name and the directories made for it.
        self.named = None;
        let made_dirs = std::mem::take(&mut self.made_dirs).into_paths();
        let dir = root::split(&self.real)
            .map_or("/", |(dir, _)| dir)
            .to_string();
        Ok(Parked {
            place,
            dev,
            hidden: format!("{}/{}", dir.trim_end_matches('/'), hidden.to_string_lossy()),
            real: std::mem::take(&mut self.real),
            previous: self.previous,
            made_dirs,
        })
    }

    /// The content's hidden name in the destination's directory, linking the unnamed file
    /// there first if it has none yet.
    fn name_it(&mut self) -> Result<CString, FileError> {
        if let Some(hidden) = &self.named {
            return Ok(hidden.clone());
        }
        let hidden = hidden_name(&self.name);
        let proc_link = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        linkat(
            nix::fcntl::AT_FDCWD,
            proc_link.as_str(),
            &self.parent,
            hidden.as_c_str(),
            AtFlags::AT_SYMLINK_FOLLOW,
        )
        .map_err(|e| FileError::io(format!("cannot write {}", self.path), e.into()))?;
        self.named = Some(hidden.clone());
        Ok(hidden)
    }

    /// Puts the new content in place: mode (0 keeps the old file's, or 0644 for a new one) and
    /// owner (`None` keeps the old file's, or the writer's for a new one), then the rename.
    pub fn commit(
        mut self,
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), FileError> {
        let path = self.path.clone();
        let fail = |doing: &str, e: io::Error| FileError::io(format!("cannot {doing} {path}"), e);
        self.file.sync_all().map_err(|e| fail("sync", e))?;
        settle_mode_and_owner(self.file.as_fd(), self.previous, mode, uid, gid, &path)?;
        let link = self.name_it()?;
        rename_into_place(&self.parent, &link, &self.name).map_err(|e| fail("write", e))?;
        self.named = None;
        std::mem::take(&mut self.made_dirs).keep();
        Ok(())
    }
}

/// A staged file whose content is named (hidden) in its destination's directory, with no
/// descriptor open: an upload form of many files parks all but a few. Committing finds the
/// directory again by its path (inside the root, as every path is); dropped, it removes the
/// hidden file and the directories made for it. The cost against an open one: the hidden name
/// is visible meanwhile, and a sandlet killed before the commit leaves it behind (as the
/// fallback for filesystems without `O_TMPFILE` always has). Parked files are made durable
/// together (see [`Filesystems`]), not one fsync each.
pub struct Parked {
    place: Arc<Place>,
    /// The filesystem it is on.
    dev: u64,
    /// The destination, final symlinks resolved.
    real: String,
    /// The content's path, in the destination's directory.
    hidden: String,
    previous: Option<(u32, u32, u32)>,
    /// Outermost first.
    made_dirs: Vec<String>,
}

impl Parked {
    /// As [`Staged::commit`], but durable only with the [`Filesystems::sync`] before and after
    /// (the caller's); `path` is the destination as the request named it, for messages.
    pub fn commit(
        mut self,
        path: &str,
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), FileError> {
        let fail = |doing: &str, e: io::Error| FileError::io(format!("cannot {doing} {path}"), e);
        let destination = self
            .place
            .root
            .entry(&self.real)
            .map_err(|e| fail("write", e))?;
        let hidden = root::split(&self.hidden).map_or("", |(_, name)| name);
        let content = root::open_child(destination.parent.as_fd(), hidden.as_ref(), OFlag::O_PATH)
            .map_err(|e| fail("write", e))?;
        let st = nix::sys::stat::fstat(&content).map_err(|e| fail("write", e.into()))?;
        if !is_file(&st) {
            return Err(FileError::Conflict(format!(
                "the staged content of {path} was replaced by something else"
            )));
        }
        settle_mode_and_owner(content.as_fd(), self.previous, mode, uid, gid, path)?;
        let hidden = CString::new(hidden).expect("no NUL in a name");
        renameat2(
            &destination.parent,
            hidden.as_c_str(),
            &destination.parent,
            destination.name.as_c_str(),
            RenameFlags::empty(),
        )
        .map_err(|e| fail("write", e.into()))?;
        self.hidden.clear();
        self.made_dirs.clear();
        Ok(())
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        let remove = |path: &str, how| {
            if let Ok(entry) = self.place.root.entry(path) {
                let _ = unlinkat(&entry.parent, entry.name.as_c_str(), how);
            }
        };
        if !self.hidden.is_empty() {
            remove(&self.hidden, UnlinkatFlags::NoRemoveDir);
        }
        for dir in self.made_dirs.iter().rev() {
            remove(dir, UnlinkatFlags::RemoveDir);
        }
    }
}

/// The filesystems some parked files are on, each with a directory to reach it by. One
/// `syncfs` of each before the parked files are renamed into place makes their content
/// durable, and one after makes the renames durable: two for a form of thousands of files,
/// where a file and its directory synced each cost two fsyncs per file (a 25 000-file upload
/// took 60-120 s here, most of it in fsyncs). The price: whatever else was written to those
/// filesystems is synced with them.
pub struct Filesystems(Vec<(u64, String)>);

impl Filesystems {
    pub fn of<'a>(parked: impl IntoIterator<Item = &'a Parked>) -> Filesystems {
        let mut seen: Vec<(u64, String)> = Vec::new();
        for p in parked {
            if !seen.iter().any(|(dev, _)| *dev == p.dev) {
                let dir = root::split(&p.hidden).map_or("/", |(dir, _)| dir);
                seen.push((p.dev, dir.to_string()));
            }
        }
        Filesystems(seen)
    }

    /// Everything written to them made durable.
    pub fn sync(&self, place: &Place) -> Result<(), FileError> {
        for (_, dir) in &self.0 {
            let fail =
                |e: io::Error| FileError::io(format!("cannot sync the filesystem of {dir}"), e);
            let fd = place
                .root
                .open_at(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(fail)?;
            nix::unistd::syncfs(&fd).map_err(|e| fail(e.into()))?;
        }
        Ok(())
    }
}

/// Gives the new content `fd` its mode (0 keeps the old file's, or 0644 for a new one) and
/// owner (`None` keeps the old file's, or the writer's for a new one).
fn settle_mode_and_owner(
    fd: BorrowedFd<'_>,
    previous: Option<(u32, u32, u32)>,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
    path: &str,
) -> Result<(), FileError> {
    let fail = |doing: &str, e: io::Error| FileError::io(format!("cannot {doing} {path}"), e);
    let mode = match (mode, previous) {
        (0, Some((old, _, _))) => old,
        (0, None) => DEFAULT_FILE_MODE,
        (m, _) => m,
    };
    root::chmod_fd(fd, mode).map_err(|e| fail("chmod", e))?;
    let (old_uid, old_gid) = previous.map_or((None, None), |(_, u, g)| (Some(u), Some(g)));
    let (want_uid, want_gid) = (uid.or(old_uid), gid.or(old_gid));
    if want_uid.is_some() || want_gid.is_some() {
        match root::chown_fd(fd, want_uid, want_gid) {
            Ok(()) => {}
            // Keeping the old owner is best effort: without CAP_CHOWN the writer owns it.
            Err(e) if uid.is_none() && gid.is_none() => {
                tracing::info!(path = %path, error = %e, "the replaced file's owner could not be kept");
            }
            Err(e) => return Err(fail("chown", e)),
        }
    }
    Ok(())
}

/// Renames `hidden` over `name` in `dir`, and makes the rename durable (as execd syncs the
/// directory; best effort there too).
fn rename_into_place(dir: &OwnedFd, hidden: &CStr, name: &CStr) -> io::Result<()> {
    renameat2(dir, hidden, dir, name, RenameFlags::empty())?;
    if let Ok(dir) = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        let _ = nix::unistd::fsync(&dir);
    }
    Ok(())
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(hidden) = &self.named {
            let _ = unlinkat(&self.parent, hidden.as_c_str(), UnlinkatFlags::NoRemoveDir);
        }
        // The directories this write made go next, with the field (emptied by a commit).
    }
}

fn hidden_name(name: &CString) -> CString {
    let suffix: String = crate::exec::new_id().chars().take(12).collect();
    let mut hidden = b".".to_vec();
    // Room for the suffix within NAME_MAX (255).
    let keep = name.as_bytes().len().min(200);
    hidden.extend_from_slice(&name.as_bytes()[..keep]);
    hidden.extend_from_slice(format!(".sandlet-{suffix}").as_bytes());
    CString::new(hidden).expect("no NUL in a file name")
}

/// Writes every piece, in order, with as few syscalls as the kernel allows.
pub fn write_pieces(file: &mut impl Write, pieces: &[bytes::Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice> = pieces
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| std::io::IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
