//! `POST /files/upload` (multipart/form-data): `metadata` parts (`{"path","owner"?,"group"?,
//! "mode"?}`, as a file part as the SDK sends it, or a plain value) paired by index with `file`
//! parts. Content streams to disk as it arrives, with constant memory: straight into the
//! destination's directory when its metadata came first, else into the request's spool file.
//! Nothing is put in place until the whole form has arrived and checks out; then each file
//! replaces its destination atomically (see `files::Staged`). A cut-off upload changes no file.
//! A form holds at most `--exec-max-upload-files` files, and a bounded number of descriptors
//! however many it has: a few staged files stay open, the rest are parked (`files::Parked`),
//! and content waiting for its metadata shares one spool file.

use std::fs::File;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::Field;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::empty_ok;
use super::scoped::Scoped;
use crate::files::{self, FileError, Filesystems, Parked, Place, Staged};
use crate::http::error::ApiError;

/// Writes queued for a file's writer thread.
const WRITE_AHEAD: usize = 4;
/// Bytes gathered from the network into one (vectored) write: the form parser hands out small
/// pieces, and a channel hand-off plus a syscall per piece would cost more than the data.
const WRITE_SIZE: usize = 1 << 20;
/// A metadata part larger than this is refused.
const MAX_METADATA_BYTES: usize = 64 << 10;
/// Staged files an upload keeps open (two descriptors each); the rest are parked. A form of up
/// to this many files leaves nothing visible before its commit, whatever happens.
const OPEN_STAGED: usize = 16;

#[derive(Debug, Deserialize)]
struct Metadata {
    #[serde(default)]
    path: String,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    mode: Option<u32>,
}

/// A checked metadata part: where its file goes and with which mode and owner.
struct Target {
    path: String,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// A file part's content on disk.
enum Content {
    /// In its destination's directory, unnamed and open.
    Staged(Staged),
    /// In its destination's directory, hidden and closed.
    Parked(Parked),
    /// In the request's spool file, until its metadata arrives.
    Spooled { offset: u64, len: u64 },
}

/// Where a part's bytes go while they arrive.
enum Sink {
    Staged(Staged),
    Spool(Arc<File>),
}

/// One upload's state: the parts so far, in order.
struct Upload {
    place: Arc<Place>,
    targets: Vec<Target>,
    contents: Vec<Content>,
    /// How many of `contents` are [`Content::Staged`].
    open: usize,
    /// Content waiting for its metadata (`O_APPEND`; vanishes when closed), and its length.
    spool: Option<(Arc<File>, u64)>,
    received: u64,
}

pub async fn upload(Scoped(api): Scoped, request: Request) -> Result<Response, ApiError> {
    let mut form = Multipart::from_request(request, &()).await.map_err(|e| {
        ApiError::bad_request(
            "INVALID_FILE",
            format!("multipart form is empty (the body must be multipart/form-data): {e}"),
        )
    })?;
    let mut upload = Upload {
        place: api.files.open_place().await?,
        targets: Vec::new(),
        contents: Vec::new(),
        open: 0,
        spool: None,
        received: 0,
    };
    if let Err(e) = upload.receive(&mut form, &api.files.config).await {
        // Removed before the answer: a client that sees the error sees nothing left behind.
        upload.discard().await;
        return Err(e);
    }
    upload.commit().await?;
    Ok(empty_ok())
}

impl Upload {
    /// Reads the form to its end: every file staged, spooled or parked, every metadata part
    /// checked, and the two paired.
    async fn receive(
        &mut self,
        form: &mut Multipart,
        config: &files::FilesConfig,
    ) -> Result<(), ApiError> {
        while let Some(field) = form.next_field().await.map_err(form_error)? {
            let name = field.name().unwrap_or_default();
            if !matches!(name, "metadata" | "file") {
                // Other fields are not execd's; their content is skipped.
                continue;
            }
            let parts = match name {
                "metadata" => self.targets.len(),
                _ => self.contents.len(),
            };
            if parts >= config.max_upload_files {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "LIMIT_EXCEEDED",
                    format!(
                        "the form has more than {} files (--exec-max-upload-files)",
                        config.max_upload_files
                    ),
                ));
            }
            if name == "metadata" {
                let target = metadata(&self.place, field).await?;
                self.targets.push(target);
                // A file that came before its metadata now has a destination.
                let index = self.targets.len() - 1;
                if let Some(&Content::Spooled { offset, len }) = self.contents.get(index) {
                    let (spool, _) = self.spool.clone().expect("spooled content has a spool");
                    let path = self.targets[index].path.clone();
                    let staged = files::on(Arc::clone(&self.place), move |place| {
                        let mut staged = Staged::create(place, &path)?;
                        staged.copy_from(&spool, offset, len)?;
                        Ok(staged)
                    })
                    .await?;
                    self.contents[index] = self.keep(staged).await?;
                }
            } else {
                let sink = match self.targets.get(self.contents.len()) {
                    Some(target) => {
                        let path = target.path.clone();
                        Sink::Staged(
                            files::on(Arc::clone(&self.place), move |place| {
                                Staged::create(place, &path)
                            })
                            .await?,
                        )
                    }
                    None => Sink::Spool(self.spool(&config.spool_dir)?),
                };
                let (sink, written) =
                    write_field(field, sink, &mut self.received, config.max_upload_bytes).await?;
                let content = match sink {
                    Sink::Staged(staged) => self.keep(staged).await?,
                    Sink::Spool(_) => {
                        let (_, spooled) = self.spool.as_mut().expect("just spooled");
                        *spooled += written;
                        Content::Spooled {
                            offset: *spooled - written,
                            len: written,
                        }
                    }
                };
                self.contents.push(content);
            }
        }
        if self.targets.is_empty() {
            return Err(ApiError::bad_request(
                "INVALID_FILE_METADATA",
                "metadata file is missing",
            ));
        }
        if self.contents.is_empty() {
            return Err(ApiError::bad_request(
                "INVALID_FILE_CONTENT",
                "file is missing",
            ));
        }
        if self.targets.len() != self.contents.len() {
            return Err(ApiError::bad_request(
                "INVALID_FILE",
                format!(
                    "metadata and file count mismatch: {} vs {}",
                    self.targets.len(),
                    self.contents.len()
                ),
            ));
        }
        Ok(())
    }

    /// Puts every file in place, in request order.
    async fn commit(&mut self) -> Result<(), ApiError> {
        let targets = std::mem::take(&mut self.targets);
        let mut pending = std::mem::take(&mut self.contents);
        files::on(Arc::clone(&self.place), move |place| {
            // Reversed: taken from the back in request order, and what a failed commit leaves is
            // dropped last file first (see `drop_last_first`).
            pending.reverse();
            let filesystems = Filesystems::of(pending.iter().filter_map(|c| match c {
                Content::Parked(parked) => Some(parked),
                _ => None,
            }));
            // The parked files' content durable before any of them is renamed into place.
            filesystems.sync(place)?;
            for target in &targets {
                match pending.pop().expect("as many contents as targets") {
                    Content::Staged(staged) => {
                        staged.commit(target.mode, target.uid, target.gid)?
                    }
                    Content::Parked(parked) => {
                        parked.commit(&target.path, target.mode, target.uid, target.gid)?
                    }
                    Content::Spooled { .. } => unreachable!("every file has its metadata by now"),
                }
            }
            // And their renames.
            filesystems.sync(place)
        })
        .await?;
        Ok(())
    }

    /// Removes what a failed upload staged.
    async fn discard(&mut self) {
        let contents = std::mem::take(&mut self.contents);
        let _ = tokio::task::spawn_blocking(move || drop_last_first(contents)).await;
    }
    /// Keeps a staged file open while few are, else parks it.
    async fn keep(&mut self, staged: Staged) -> Result<Content, ApiError> {
        if self.open < OPEN_STAGED {
            self.open += 1;
            return Ok(Content::Staged(staged));
        }
        let place = Arc::clone(&self.place);
        let parked = files::on(Arc::clone(&self.place), move |_| staged.park(place)).await?;
        Ok(Content::Parked(parked))
    }

    /// The request's spool file, made on first use.
    fn spool(&mut self, dir: &std::path::Path) -> Result<Arc<File>, ApiError> {
        if self.spool.is_none() {
            self.spool = Some((Arc::new(spool_file(dir)?), 0));
        }
        Ok(Arc::clone(&self.spool.as_ref().expect("just made").0))
    }
}

impl Drop for Upload {
    /// A failed upload's staged content goes, off the async threads: a large form's cleanup
    /// is a few syscalls per file.
    fn drop(&mut self) {
        let contents = std::mem::take(&mut self.contents);
        if !contents.is_empty() {
            tokio::task::spawn_blocking(move || drop_last_first(contents));
        }
    }
}

/// Removes staged content last file first, so that a directory made for an earlier file is
/// empty again (of later files' hidden content) by the time that file removes it.
fn drop_last_first(mut contents: Vec<Content>) {
    contents.reverse();
}

async fn metadata(place: &Arc<Place>, mut field: Field<'_>) -> Result<Target, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(form_error)? {
        if bytes.len() + chunk.len() > MAX_METADATA_BYTES {
            return Err(ApiError::bad_request(
                "INVALID_FILE_METADATA",
                format!("a metadata part is larger than {MAX_METADATA_BYTES} bytes"),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    let meta: Metadata = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "INVALID_FILE_METADATA",
            format!("invalid metadata format. {e}"),
        )
    })?;
    if meta.path.is_empty() {
        return Err(ApiError::bad_request(
            "INVALID_FILE_METADATA",
            "metadata path is empty",
        ));
    }
    let place = Arc::clone(place);
    Ok(files::on(place, move |place| {
        let (uid, gid) = place.ids(meta.owner.as_deref(), meta.group.as_deref())?;
        Ok(Target {
            path: place.resolve(&meta.path)?,
            mode: files::octal_mode(meta.mode.unwrap_or(0))?,
            uid,
            gid,
        })
    })
    .await?)
}

/// Streams a part's content into `sink` on a writer thread, a few chunks behind the network;
/// returns the sink and how many bytes the part had.
async fn write_field(
    mut field: Field<'_>,
    sink: Sink,
    received: &mut u64,
    limit: u64,
) -> Result<(Sink, u64), ApiError> {
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(WRITE_AHEAD);
    let writer = tokio::task::spawn_blocking(move || {
        let mut sink = sink;
        while let Some(pieces) = rx.blocking_recv() {
            match &mut sink {
                Sink::Staged(staged) => staged.write_pieces(&pieces)?,
                Sink::Spool(file) => files::write_pieces(&mut &**file, &pieces)
                    .map_err(|e| FileError::io("cannot spool an upload", e))?,
            }
        }
        Ok::<_, FileError>(sink)
    });
    let mut outcome: Result<(), ApiError> = Ok(());
    let mut gathered: Vec<Bytes> = Vec::new();
    let mut gathered_bytes = 0;
    let mut length = 0u64;
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                *received += chunk.len() as u64;
                length += chunk.len() as u64;
                if *received > limit {
                    outcome = Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "LIMIT_EXCEEDED",
                        format!(
                            "the upload is larger than {limit} bytes (--exec-max-upload-bytes)"
                        ),
                    ));
                    break;
                }
                gathered_bytes += chunk.len();
                gathered.push(chunk);
                // The writer gone means it failed; its error is the one to report.
                if gathered_bytes >= WRITE_SIZE {
                    gathered_bytes = 0;
                    if tx.send(std::mem::take(&mut gathered)).await.is_err() {
                        break;
                    }
                }
            }
            Ok(None) => {
                if !gathered.is_empty() {
                    let _ = tx.send(gathered).await;
                }
                break;
            }
            Err(e) => {
                outcome = Err(form_error(e));
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ApiError::internal(format!("an upload writer panicked: {e}")))?;
    outcome?;
    Ok((written?, length))
}

/// An unnamed file in sandlet's own data directory, for content whose destination is not known
/// yet; it vanishes when closed.
fn spool_file(dir: &std::path::Path) -> Result<File, ApiError> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    open(
        dir,
        OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_APPEND | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map(File::from)
    .map_err(|e| ApiError::internal(format!("cannot spool an upload in {}: {e}", dir.display())))
}

fn form_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::new(
        e.status(),
        "INVALID_FILE",
        format!("bad multipart form: {}", e.body_text()),
    )
}
