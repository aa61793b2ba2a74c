//! `POST /files/mv`: `[{src, dest}]`, in order. A destination that exists is refused, atomically
//! (`RENAME_NOREPLACE`: no check-then-rename race); its parent directories are created.

use axum::response::Response;
use nix::fcntl::{RenameFlags, renameat2};
use serde::Deserialize;

use super::scoped::Scoped;
use super::{ExecJson, empty_ok};
use crate::files::{FileError, root};
use crate::http::error::ApiError;

#[derive(Debug, Deserialize)]
pub struct Move {
    src: String,
    dest: String,
}

pub async fn move_files(
    Scoped(api): Scoped,
    ExecJson(moves): ExecJson<Vec<Move>>,
) -> Result<Response, ApiError> {
    api.files
        .run(move |place| {
            let mut checked = Vec::with_capacity(moves.len());
            for m in &moves {
                let (src, dest) = (place.resolve(&m.src)?, place.resolve(&m.dest)?);
                place
                    .root
                    .lstat(&src)
                    .map_err(|e| FileError::io(format!("source path not found: {src}"), e))?;
                if place.root.lstat(&dest).is_ok() {
                    return Err(FileError::Conflict(format!(
                        "destination path already exists: {dest}"
                    )));
                }
                checked.push((src, dest));
            }
            for (src, dest) in checked {
                let Some((dest_parent, _)) = root::split(&dest) else {
                    return Err(FileError::Conflict("cannot move onto the root".into()));
                };
                let made = place.root.create_dirs(dest_parent, 0o755).map_err(|e| {
                    FileError::io(format!("cannot create the directory {dest_parent}"), e)
                })?;
                let (from, to) = (
                    place
                        .root
                        .entry(&src)
                        .map_err(|e| FileError::io(format!("cannot move {src}"), e))?,
                    place
                        .root
                        .entry(&dest)
                        .map_err(|e| FileError::io(format!("cannot move to {dest}"), e))?,
                );
                renameat2(
                    &from.parent,
                    from.name.as_c_str(),
                    &to.parent,
                    to.name.as_c_str(),
                    RenameFlags::RENAME_NOREPLACE,
                )
                .map_err(|e| match e {
                    nix::errno::Errno::EXDEV => FileError::Conflict(format!(
                        "cannot move {src} to {dest}: they are on different filesystems"
                    )),
                    nix::errno::Errno::EEXIST => {
                        FileError::Conflict(format!("destination path already exists: {dest}"))
                    }
                    e => FileError::io(format!("cannot move {src} to {dest}"), e.into()),
                })?;
                made.keep();
            }
            Ok(())
        })
        .await?;
    Ok(empty_ok())
}
