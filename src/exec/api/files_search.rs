//! `GET /files/search?path=<dir>&pattern=<glob>`: files below `path` whose name matches (see
//! `files::glob`); directories are never returned and symlinks never followed. The answer
//! streams as the walk finds it (see `files::walk_response`).

use axum::extract::RawQuery;
use axum::response::Response;

use super::files::{query_values, required_query, walk_response};
use super::scoped::Scoped;
use crate::files::glob::Pattern;
use crate::files::{FileError, search};
use crate::http::error::ApiError;

pub async fn search_files(
    Scoped(api): Scoped,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let raw = required_query(query.as_deref(), "path")?;
    let pattern = query_values(query.as_deref(), "pattern")
        .into_iter()
        .next()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "**".into());
    let pattern = Pattern::parse(&pattern).map_err(FileError::Invalid)?;
    let limit = api.files.config.max_listed;
    walk_response(&api.files, move |place, found| {
        search(place, &place.resolve(&raw)?, &pattern, limit, found)
    })
    .await
}
