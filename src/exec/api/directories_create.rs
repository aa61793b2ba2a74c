//! `POST /directories`: `{dir: {owner?, group?, mode?}}`, each `mkdir -p`; an existing directory
//! is fine. The mode and owner, when given, apply to the leaf.

use axum::response::Response;
use indexmap::IndexMap;

use super::files::Permission;
use super::scoped::Scoped;
use super::{ExecJson, empty_ok};
use crate::files::{FileError, set_permissions};
use crate::http::error::ApiError;

pub async fn create_directories(
    Scoped(api): Scoped,
    ExecJson(request): ExecJson<Option<IndexMap<String, Permission>>>,
) -> Result<Response, ApiError> {
    let request = request.unwrap_or_default();
    api.files
        .run(move |place| {
            let mut checked = Vec::with_capacity(request.len());
            for (raw, permission) in &request {
                checked.push((place.resolve(raw)?, permission.resolve(place)?));
            }
            for (path, p) in checked {
                let made = place
                    .root
                    .create_dirs(&path, 0o755)
                    .map_err(|e| FileError::io(format!("cannot create the directory {path}"), e))?;
                set_permissions(place, &path, p.mode, p.uid, p.gid)?;
                made.keep();
            }
            Ok(())
        })
        .await?;
    Ok(empty_ok())
}
