//! `DELETE /files?path=...`: removes files and symlinks (never what a link points to); missing
//! ones are no error, directories are refused (that is `DELETE /directories`).

use axum::extract::RawQuery;
use axum::response::Response;

use super::empty_ok;
use super::files::query_values;
use super::scoped::Scoped;
use crate::files::remove_file;
use crate::http::error::ApiError;

pub async fn delete_files(
    Scoped(api): Scoped,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let raw = query_values(query.as_deref(), "path");
    api.files
        .run(move |place| {
            let paths = place.resolve_all(&raw)?;
            paths.iter().try_for_each(|p| remove_file(place, p))
        })
        .await?;
    Ok(empty_ok())
}
