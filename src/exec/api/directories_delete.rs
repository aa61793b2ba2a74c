//! `DELETE /directories?path=...`: removes each tree (a file or symlink there too); missing ones
//! are no error. The sandbox's root and its mount points are refused before anything goes.

use axum::extract::RawQuery;
use axum::response::Response;

use super::empty_ok;
use super::files::query_values;
use super::scoped::Scoped;
use crate::files::{FileError, remove_dir, root};
use crate::http::error::ApiError;

pub async fn delete_directories(
    Scoped(api): Scoped,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let raw = query_values(query.as_deref(), "path");
    api.files
        .run(move |place| {
            let paths = place.resolve_all(&raw)?;
            if paths.iter().any(|p| root::split(p).is_none()) {
                return Err(FileError::Conflict(
                    "refusing to remove the sandbox's root directory".into(),
                ));
            }
            paths.iter().try_for_each(|p| remove_dir(place, p))
        })
        .await?;
    Ok(empty_ok())
}
