//! The sandbox's files, for the exec API's `/files` and `/directories` routes: every path is
//! expanded as execd expands it, then resolved inside the sandbox's root (see `root.rs`); in
//! sidecar mode operations run with the main container's user's rights (see `acting.rs`).

pub(crate) mod acting;
pub mod glob;
mod info;
pub mod root;
mod staging;
mod tree;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use info::FileInfo;
pub use staging::{Filesystems, Parked, Staged, write_pieces};
pub use tree::{list, remove_dir, remove_file, search, walk_below};

use crate::container::{TargetWatch, UserDb};
use crate::process::enter::Credentials;
use root::Root;

/// Limits of the file API (documented defaults in the README).
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Bytes one upload request may carry, all its files together.
    pub max_upload_bytes: u64,
    /// Files one upload request may carry.
    pub max_upload_files: usize,
    /// Entries one listing or search may return.
    pub max_listed: usize,
    /// Listings and searches walking at once.
    pub max_walks: usize,
    /// Listings and searches waiting for their turn, at most.
    pub max_queued_walks: usize,
    /// Largest file `/files/replace` reads or writes.
    pub max_replace_bytes: u64,
    /// Where upload content waits when it arrives before its metadata (sandlet's own disk).
    pub spool_dir: PathBuf,
}

/// Why a file operation failed, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The path's state forbids it: exists, is a directory, is a mount point, is the root.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    TooLarge(String),
    /// Sidecar mode, and the main container is not there right now.
    #[error("{0}")]
    Unavailable(String),
    /// Too many requests of this kind at once.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

impl FileError {
    /// An operation's error, classified by its errno, with what was being done.
    pub fn io(doing: impl std::fmt::Display, e: io::Error) -> FileError {
        let message = format!("{doing}: {e}");
        match e.raw_os_error() {
            Some(libc::ENOENT) => FileError::NotFound(message),
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => FileError::Denied(message),
            Some(libc::ENOSPC | libc::EDQUOT) => FileError::NoSpace(message),
            Some(libc::EEXIST | libc::ENOTEMPTY | libc::EISDIR | libc::ENOTDIR | libc::EBUSY) => {
                FileError::Conflict(message)
            }
            Some(libc::ENAMETOOLONG | libc::ELOOP | libc::EINVAL) => FileError::Invalid(message),
            _ => FileError::Failed(message),
        }
    }
}

pub struct Files {
    target: Option<Arc<TargetWatch>>,
    pub config: FilesConfig,
    /// Turns to walk a tree (see [`Files::walk_turn`]), shared by every scope.
    walks: Arc<Semaphore>,
    /// Requests waiting for a turn, in every scope.
    waiting: Arc<AtomicUsize>,
    scope: Scope,
}

/// Whose rights the operations have, and in which filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// The sandbox's user's: the main container's in sidecar mode, sandlet's own in local mode.
    Sandbox,
    /// A uid and gid's, with the groups the sandbox's account files give the uid, and its
    /// home as `~` (execd 1.1's `/v1/filesystem/{uid}/{gid}`). The uid must be one the
    /// sandbox's `/etc/passwd` knows.
    Identity { uid: u32, gid: u32 },
    /// An isolated session's filesystem (reached through its PID 1), as the session's user,
    /// only below the session's own mounts.
    Session(SessionView),
}

/// Where an isolated session's files are and who acts on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The session's root, `/proc/<its PID 1>/root`.
    pub root: PathBuf,
    pub credentials: Credentials,
    /// `~`.
    pub home: String,
    /// What relative paths are relative to.
    pub cwd: String,
    /// The only paths the routes reach (with what is below them): the session's overlays,
    /// binds and writable extras.
    pub within: Vec<String>,
}

/// Where one request's paths resolve, and as whom.
pub struct Place {
    pub root: Root,
    /// Variables `$NAME` and `~` expand from.
    env: Vec<(String, String)>,
    /// What relative paths are relative to: sandlet's working directory, or the main
    /// container's first process's (its image's `WORKDIR`).
    cwd: String,
    acting: Option<Credentials>,
    root_path: PathBuf,
    users: OnceLock<UserDb>,
    /// When not empty, the only paths (and what is below them) a request may name.
    within: Vec<String>,
}

impl Files {
    pub fn new(target: Option<Arc<TargetWatch>>, config: FilesConfig) -> Arc<Files> {
        Arc::new(Files {
            target,
            walks: Arc::new(Semaphore::new(config.max_walks)),
            waiting: Arc::new(AtomicUsize::new(0)),
            config,
            scope: Scope::Sandbox,
        })
    }

    /// An isolated session's files, as its user.
    pub fn in_session(&self, view: SessionView) -> Arc<Files> {
        Arc::new(Files {
            target: None,
            config: self.config.clone(),
            walks: Arc::clone(&self.walks),
            waiting: Arc::clone(&self.waiting),
            scope: Scope::Session(view),
        })
    }

    /// The same files, acted on as `uid` and `gid`: the kernel decides what they may do, and
    /// what they create is theirs.
    pub fn as_identity(&self, uid: u32, gid: u32) -> Arc<Files> {
        Arc::new(Files {
            target: self.target.clone(),
            config: self.config.clone(),
            walks: Arc::clone(&self.walks),
            waiting: Arc::clone(&self.waiting),
            scope: Scope::Identity { uid, gid },
        })
    }

    /// Runs `op` on a blocking thread, in the sandbox's place and with its user's rights.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        op: impl FnOnce(&Place) -> Result<T, FileError> + Send + 'static,
    ) -> Result<T, FileError> {
        self.spawn(op)
            .await
            .map_err(|e| FileError::Failed(format!("a file operation panicked: {e}")))?
    }

    /// Starts `op` as [`Files::run`] does, without waiting for it.
    pub fn spawn<T: Send + 'static>(
        self: &Arc<Self>,
        op: impl FnOnce(&Place) -> Result<T, FileError> + Send + 'static,
    ) -> tokio::task::JoinHandle<Result<T, FileError>> {
        let files = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let place = files.place()?;
            let _acting = place.act()?;
            op(&place)
        })
    }

    /// A turn to walk a tree (a listing or a search), held for the walk: at most
    /// `max_walks` run at once, which bounds the memory walks take (a directory's names each,
    /// per level); more wait for a turn, at most `max_queued_walks` of them, and more are
    /// refused.
    pub async fn walk_turn(&self) -> Result<OwnedSemaphorePermit, FileError> {
        if let Ok(turn) = Arc::clone(&self.walks).try_acquire_owned() {
            return Ok(turn);
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let waiting = Waiting(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.config.max_queued_walks {
            return Err(FileError::Busy(format!(
                "{} listings and searches are running and {} waiting; try again later (--exec-max-walks, --exec-max-queued-walks)",
                self.config.max_walks, self.config.max_queued_walks
            )));
        }
        let turn = Arc::clone(&self.walks)
            .acquire_owned()
            .await
            .map_err(|_| FileError::Failed("the file API is shutting down".into()))?;
        drop(waiting);
        Ok(turn)
    }

    /// The place for a request of several steps (see [`on`]), found off the async threads.
    pub async fn open_place(self: &Arc<Self>) -> Result<Arc<Place>, FileError> {
        let files = Arc::clone(self);
        blocking(move || files.place().map(Arc::new)).await
    }

    fn place(&self) -> Result<Place, FileError> {
        if let Scope::Session(view) = &self.scope {
            return Ok(Place {
                root: Root::open(&view.root).map_err(|e| {
                    FileError::Unavailable(format!("the session's filesystem is gone: {e}"))
                })?,
                env: vec![("HOME".into(), view.home.clone())],
                cwd: view.cwd.clone(),
                acting: Some(view.credentials.clone()),
                root_path: view.root.clone(),
                users: OnceLock::new(),
                within: view.within.clone(),
            });
        }
        let mut place = self.sandbox_place()?;
        if let Scope::Identity { uid, gid } = &self.scope {
            let (uid, gid) = (*uid, *gid);
            place.become_identity(uid, gid)?;
        }
        Ok(place)
    }

    fn sandbox_place(&self) -> Result<Place, FileError> {
        let Some(watch) = &self.target else {
            return Ok(Place {
                root: Root::open("/".as_ref()).map_err(|e| FileError::io("cannot open /", e))?,
                env: Vec::new(),
                cwd: crate::container::working_dir(None),
                acting: None,
                root_path: "/".into(),
                users: OnceLock::new(),
                within: Vec::new(),
            });
        };
        let located = watch.current().map_err(FileError::Unavailable)?;
        let root_path = located.root();
        let root = Root::open(&root_path).map_err(|e| {
            FileError::Unavailable(format!(
                "cannot open the main container's root {}: {e}",
                root_path.display()
            ))
        })?;
        let cwd = crate::container::working_dir(Some(&located));
        let mut place = Place {
            root,
            env: located.environ.clone(),
            cwd,
            acting: Some(Credentials {
                uid: located.target.uid,
                gid: located.target.gid,
                groups: located.groups.clone(),
            }),
            root_path,
            users: OnceLock::new(),
            within: Vec::new(),
        };
        // `~` needs a HOME: the user's from the container's passwd if its environment has none.
        let uid = located.target.uid;
        if !place.env.iter().any(|(k, _)| k == "HOME")
            && let Some(home) = place.users().by_uid(uid).map(|a| a.home.clone())
        {
            place.env.push(("HOME".into(), home));
        }
        Ok(place)
    }
}

/// Runs `op` on a blocking thread with `place`'s user's rights (requests that take several
/// steps, such as uploads, keep one place throughout).
pub async fn on<T: Send + 'static>(
    place: Arc<Place>,
    op: impl FnOnce(&Place) -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    blocking(move || {
        let _acting = place.act()?;
        op(&place)
    })
    .await
}

async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|e| FileError::Failed(format!("a file operation panicked: {e}")))?
}

impl Place {
    fn act(&self) -> Result<Option<acting::ActingAs>, FileError> {
        self.acting
            .as_ref()
            .map(acting::act_as)
            .transpose()
            .map_err(|e| FileError::Failed(e.to_string()))
    }

    /// Acts as `uid` (which the sandbox must know) and `gid` from now on, with the uid's groups,
    /// and its home as `~`.
    fn become_identity(&mut self, uid: u32, gid: u32) -> Result<(), FileError> {
        let users = self.users();
        if users.by_uid(uid).is_none() {
            return Err(FileError::Invalid(format!(
                "uid {uid} is not in the sandbox's /etc/passwd"
            )));
        }
        let user = users
            .resolve(&format!("{uid}:{gid}"))
            .map_err(FileError::Invalid)?;
        self.acting = Some(user.credentials);
        self.env.retain(|(k, _)| k != "HOME");
        self.env.push(("HOME".into(), user.home));
        Ok(())
    }

    /// A request's path as the sandbox means it: `~` and `$NAME` expanded, made absolute and
    /// cleaned. Where it leads is up to the root (see `root.rs`).
    pub fn resolve(&self, raw: &str) -> Result<String, FileError> {
        if raw.is_empty() {
            return Err(FileError::Invalid("the path is empty".into()));
        }
        if raw.contains('\0') {
            return Err(FileError::Invalid(format!("the path {raw:?} contains NUL")));
        }
        let expanded = crate::exec::expand_path(raw, &self.env).map_err(FileError::Invalid)?;
        let path = root::clean(&self.cwd, &expanded);
        let inside = |dir: &String| {
            dir == "/"
                || path == *dir
                || path
                    .strip_prefix(dir.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        };
        if !self.within.is_empty() && !self.within.iter().any(inside) {
            return Err(FileError::Invalid(format!(
                "{path} is outside the session's overlays and binds ({})",
                self.within.join(", ")
            )));
        }
        Ok(path)
    }

    /// Every path of a request resolved, before any is acted on.
    pub fn resolve_all(&self, raw: &[String]) -> Result<Vec<String>, FileError> {
        raw.iter().map(|p| self.resolve(p)).collect()
    }

    /// The sandbox's account files (owner and group names).
    pub fn users(&self) -> &UserDb {
        self.users.get_or_init(|| {
            UserDb::read(&self.root_path).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the sandbox's account files; owners show as numbers");
                UserDb::default()
            })
        })
    }

    /// What `path` (resolved) is, without following a final symlink.
    pub fn info(&self, path: &str) -> Result<FileInfo, FileError> {
        let st = self
            .root
            .lstat(path)
            .map_err(|e| FileError::io(format!("file not found: {path}"), e))?;
        Ok(FileInfo::new(path.to_string(), &st, self.users()))
    }

    /// An owner and group as given (names in the sandbox's account files, or numbers).
    pub fn ids(
        &self,
        owner: Option<&str>,
        group: Option<&str>,
    ) -> Result<(Option<u32>, Option<u32>), FileError> {
        let users = self.users();
        let uid = match owner.filter(|o| !o.is_empty()) {
            None => None,
            Some(o) => Some(o.parse().ok().or_else(|| users.uid_of(o)).ok_or_else(|| {
                FileError::Invalid(format!("owner {o:?} is not in the sandbox's /etc/passwd"))
            })?),
        };
        let gid = match group.filter(|g| !g.is_empty()) {
            None => None,
            Some(g) => Some(g.parse().ok().or_else(|| users.gid_of(g)).ok_or_else(|| {
                FileError::Invalid(format!("group {g:?} is not in the sandbox's /etc/group"))
            })?),
        };
        Ok((uid, gid))
    }
}

/// execd's `mode`: permission bits written as octal digits in a decimal number (755 is 0o755).
pub fn octal_mode(mode: u32) -> Result<u32, FileError> {
    let digits = mode.to_string();
    if digits.len() > 4 || digits.chars().any(|c| !('0'..='7').contains(&c)) {
        return Err(FileError::Invalid(format!(
            "mode {mode} is not octal permission digits (0-7, at most 4 digits, such as 644 or 2775)"
        )));
    }
    Ok(u32::from_str_radix(&digits, 8).expect("octal digits"))
}

/// Applies a mode (0: unchanged) and owner/group to the file `path` leads to.
pub fn set_permissions(
    place: &Place,
    path: &str,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), FileError> {
    use nix::fcntl::OFlag;
    let fd = place
        .root
        .open_at(path, OFlag::O_PATH)
        .map_err(|e| FileError::io(format!("cannot change permissions of {path}"), e))?;
    if mode != 0 {
        root::chmod_fd(std::os::fd::AsFd::as_fd(&fd), mode)
            .map_err(|e| FileError::io(format!("cannot chmod {path}"), e))?;
    }
    if uid.is_some() || gid.is_some() {
        root::chown_fd(std::os::fd::AsFd::as_fd(&fd), uid, gid)
            .map_err(|e| FileError::io(format!("cannot chown {path}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_digits_in_decimal() {
        assert_eq!(octal_mode(755).unwrap(), 0o755);
        assert_eq!(octal_mode(644).unwrap(), 0o644);
        assert_eq!(octal_mode(2775).unwrap(), 0o2775);
        assert_eq!(octal_mode(0).unwrap(), 0);
        assert!(octal_mode(758).is_err());
        assert!(octal_mode(17777).is_err());
    }
}
