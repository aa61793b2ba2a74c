//! The file and directory routes under a prefix that says whose files they act on, with the
//! same handlers: `/v1/filesystem/{uid}/{gid}/...` acts as that identity (execd 1.1, the SDK's
//! `files_with_identity`), `/v1/isolated/session/{id}/...` on an isolated session's files as
//! its user. A prefix's middleware puts a [`FilesScope`] on the request; the
//! handlers take the API through [`Scoped`], which hands them that scope's files.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ExecApi, invalid};
use crate::files::Files;

/// The files a request acts on, when a route prefix chose them.
#[derive(Clone)]
pub struct FilesScope(pub Arc<Files>);

/// Marks a request under `/v1/isolated/session/{id}/...`, for the few answers that differ there.
#[derive(Clone, Copy)]
pub struct InSession;

/// The exec API as a file route sees it: its `files` are those of the request's scope.
pub struct Scoped(pub ExecApi);

impl FromRequestParts<ExecApi> for Scoped {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, api: &ExecApi) -> Result<Self, Self::Rejection> {
        let mut api = api.clone();
        if let Some(FilesScope(files)) = parts.extensions.get::<FilesScope>() {
            api.files = Arc::clone(files);
        }
        Ok(Scoped(api))
    }
}

/// The largest id the SDK sends: `(uid_t)-1` means "no change" to the kernel, never an id.
const MAX_ID: u32 = u32::MAX - 1;

/// `/v1/filesystem/{uid}/{gid}/...`: the request's files are acted on as `uid` and `gid`.
pub async fn identity(
    State(api): State<ExecApi>,
    Path(params): Path<HashMap<String, String>>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = |name: &str| {
        let raw = params.get(name).map(String::as_str).unwrap_or_default();
        raw.parse::<u32>()
            .ok()
            .filter(|v| *v <= MAX_ID)
            .ok_or_else(|| {
                invalid(format!(
                    "{name} {raw:?} is not an integer between 0 and {MAX_ID}"
                ))
            })
    };
    let (uid, gid) = match (id("uid"), id("gid")) {
        (Ok(uid), Ok(gid)) => (uid, gid),
        (Err(e), _) | (_, Err(e)) => return e.into_response(),
    };
    request
        .extensions_mut()
        .insert(FilesScope(api.files.as_identity(uid, gid)));
    next.run(request).await
}

/// `/v1/isolated/session/{id}/...` (file routes): the session's files, as its user.
pub async fn session(
    State(api): State<ExecApi>,
    Path(params): Path<HashMap<String, String>>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    match api.isolation.files(id) {
        Ok(files) => {
            request.extensions_mut().insert(FilesScope(files));
            request.extensions_mut().insert(InSession);
            next.run(request).await
        }
        Err(e) => crate::http::error::ApiError::from(e).into_response(),
    }
}
