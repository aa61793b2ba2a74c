//! `GET /directories/list?path=<dir>&depth=<n>`: a directory's tree to `depth` (default 1).

use axum::Json;
use axum::extract::{RawQuery, State};

use super::files::{query_values, required_query};
use super::{ExecApi, invalid};
use crate::files::{FileInfo, list};
use crate::http::error::ApiError;

pub async fn list_directory(
    State(api): State<ExecApi>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<FileInfo>>, ApiError> {
    let raw = required_query(query.as_deref(), "path")?;
    let depth = match query_values(query.as_deref(), "depth").into_iter().next() {
        None => 1,
        Some(d) => d
            .parse::<usize>()
            .map_err(|_| invalid(format!("invalid query parameter 'depth': {d}")))?,
    };
    let limit = api.files.config.max_listed;
    let found = api
        .files
        .run(move |place| list(place, &place.resolve(&raw)?, depth, limit))
        .await?;
    Ok(Json(found))
}
