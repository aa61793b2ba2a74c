//! `POST /files/permissions`: `{path: {owner?, group?, mode?}}`. Every entry is checked (path,
//! mode digits, owner and group in the sandbox's account files) before any is applied; an owner
//! or group left out stays as it is.

use axum::response::Response;
use indexmap::IndexMap;

use super::files::Permission;
use super::scoped::Scoped;
use super::{ExecJson, empty_ok};
use crate::files::{FileError, set_permissions};
use crate::http::error::ApiError;

pub async fn set_file_permissions(
    Scoped(api): Scoped,
    ExecJson(request): ExecJson<Option<IndexMap<String, Permission>>>,
) -> Result<Response, ApiError> {
    let request = request.unwrap_or_default();
    api.files
        .run(move |place| {
            let mut checked = Vec::with_capacity(request.len());
            for (raw, permission) in &request {
                let path = place.resolve(raw)?;
                place
                    .root
                    .stat(&path)
                    .map_err(|e| FileError::io(format!("file not found: {path}"), e))?;
                checked.push((path, permission.resolve(place)?));
            }
            for (path, p) in checked {
                set_permissions(place, &path, p.mode, p.uid, p.gid)?;
            }
            Ok(())
        })
        .await?;
    Ok(empty_ok())
}
