//! `GET /files/info?path=...`: what each path is (not following a final symlink), keyed by the
//! paths as sent.

use axum::Json;
use axum::extract::RawQuery;
use indexmap::IndexMap;

use super::files::query_values;
use super::scoped::Scoped;
use crate::files::FileInfo;
use crate::http::error::ApiError;

pub async fn file_info(
    Scoped(api): Scoped,
    RawQuery(query): RawQuery,
) -> Result<Json<IndexMap<String, FileInfo>>, ApiError> {
    let paths = query_values(query.as_deref(), "path");
    let infos = api
        .files
        .run(move |place| {
            let mut infos = IndexMap::new();
            for raw in paths {
                let path = place.resolve(&raw)?;
                infos.insert(raw, place.info(&path)?);
            }
            Ok(infos)
        })
        .await?;
    Ok(Json(infos))
}
