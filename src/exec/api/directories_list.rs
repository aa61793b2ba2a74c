//! `GET /directories/list?path=<dir>&depth=<n>`: a directory's tree to `depth` (default 1),
//! streamed as the walk finds it (see `files::walk_response`).

use axum::extract::RawQuery;
use axum::response::Response;

use super::files::{query_values, required_query, walk_response};
use super::invalid;
use super::scoped::Scoped;
use crate::files::list;
use crate::http::error::ApiError;

pub async fn list_directory(
    Scoped(api): Scoped,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let raw = required_query(query.as_deref(), "path")?;
    let depth = match query_values(query.as_deref(), "depth").into_iter().next() {
        None => 1,
        Some(d) => d
            .parse::<usize>()
            .map_err(|_| invalid(format!("invalid query parameter 'depth': {d}")))?,
    };
    let limit = api.files.config.max_listed;
    walk_response(&api.files, move |place, found| {
        list(place, &place.resolve(&raw)?, depth, limit, found)
    })
    .await
}
