//! `POST /files/upload` (multipart/form-data): `metadata` parts (`{"path","owner"?,"group"?,
//! "mode"?}`, as a file part as the SDK sends it, or a plain value) paired by index with `file`
//! parts. Content streams to disk as it arrives, with constant memory: straight into the
//! destination's directory when its metadata came first, else through a spool file. Nothing is
//! put in place until the whole form has arrived and checks out; then each file replaces its
//! destination atomically (see `files::Staged`). A cut-off upload changes no file.

use std::fs::File;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::Field;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{ExecApi, empty_ok};
use crate::files::{self, FileError, Place, Staged};
use crate::http::error::ApiError;

/// Writes queued for a file's writer thread.
const WRITE_AHEAD: usize = 4;
/// Bytes gathered from the network into one (vectored) write: the form parser hands out small
/// pieces, and a channel hand-off plus a syscall per piece would cost more than the data.
const WRITE_SIZE: usize = 1 << 20;
/// A metadata part larger than this is refused.
const MAX_METADATA_BYTES: usize = 64 << 10;

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

/// A file part's content on disk: at its destination, or spooled until its metadata arrives.
enum Content {
    Staged(Staged),
    Spooled(File),
}

pub async fn upload(State(api): State<ExecApi>, request: Request) -> Result<Response, ApiError> {
    let mut form = Multipart::from_request(request, &()).await.map_err(|e| {
        ApiError::bad_request(
            "INVALID_FILE",
            format!("multipart form is empty (the body must be multipart/form-data): {e}"),
        )
    })?;
    let place = api.files.open_place().await?;
    let limit = api.files.config.max_upload_bytes;
    let mut targets: Vec<Target> = Vec::new();
    let mut contents: Vec<Content> = Vec::new();
    let mut received = 0u64;
    while let Some(field) = form.next_field().await.map_err(form_error)? {
        match field.name() {
            Some("metadata") => {
                let target = metadata(&place, field).await?;
                // A file that came before its metadata now has a destination.
                let index = targets.len();
                targets.push(target);
                if let Some(Content::Spooled(_)) = contents.get(index) {
                    let Content::Spooled(spool) = contents.remove(index) else {
                        unreachable!()
                    };
                    let path = targets[index].path.clone();
                    let staged = files::on(Arc::clone(&place), move |place| {
                        let mut staged = Staged::create(place, &path)?;
                        let mut spool = spool;
                        staged.copy_from(&mut spool)?;
                        Ok(staged)
                    })
                    .await?;
                    contents.insert(index, Content::Staged(staged));
                }
            }
            Some("file") => {
                let index = contents.len();
                let content = match targets.get(index) {
                    Some(target) => {
                        let path = target.path.clone();
                        Content::Staged(
                            files::on(Arc::clone(&place), move |place| {
                                Staged::create(place, &path)
                            })
                            .await?,
                        )
                    }
                    None => Content::Spooled(spool_file(&api.files.config.spool_dir)?),
                };
                contents.push(write_field(field, content, &mut received, limit).await?);
            }
            // Other fields are not execd's; their content is skipped.
            _ => {}
        }
    }
    if targets.is_empty() {
        return Err(ApiError::bad_request(
            "INVALID_FILE_METADATA",
            "metadata file is missing",
        ));
    }
    if contents.is_empty() {
        return Err(ApiError::bad_request(
            "INVALID_FILE_CONTENT",
            "file is missing",
        ));
    }
    if targets.len() != contents.len() {
        return Err(ApiError::bad_request(
            "INVALID_FILE",
            format!(
                "metadata and file count mismatch: {} vs {}",
                targets.len(),
                contents.len()
            ),
        ));
    }
    files::on(place, move |_| {
        for (target, content) in targets.into_iter().zip(contents) {
            let Content::Staged(staged) = content else {
                unreachable!("every file has its metadata by now")
            };
            staged.commit(target.mode, target.uid, target.gid)?;
        }
        Ok(())
    })
    .await?;
    Ok(empty_ok())
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

/// Streams a part's content into `content` on a writer thread, a few chunks behind the network.
async fn write_field(
    mut field: Field<'_>,
    content: Content,
    received: &mut u64,
    limit: u64,
) -> Result<Content, ApiError> {
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(WRITE_AHEAD);
    let writer = tokio::task::spawn_blocking(move || {
        let mut content = content;
        while let Some(pieces) = rx.blocking_recv() {
            match &mut content {
                Content::Staged(staged) => staged.write_pieces(&pieces)?,
                Content::Spooled(file) => files::write_pieces(file, &pieces)
                    .map_err(|e| FileError::io("cannot spool an upload", e))?,
            }
        }
        Ok::<_, FileError>(content)
    });
    let mut outcome: Result<(), ApiError> = Ok(());
    let mut gathered: Vec<Bytes> = Vec::new();
    let mut gathered_bytes = 0;
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                *received += chunk.len() as u64;
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
    Ok(written?)
}

/// An unnamed file in sandlet's own data directory, for content whose destination is not known
/// yet; it vanishes when closed.
fn spool_file(dir: &std::path::Path) -> Result<File, ApiError> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    open(
        dir,
        OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
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
