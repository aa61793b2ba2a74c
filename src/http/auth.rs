//! The bearer token. Read once from a file (a Secret mounted only into sandlet), compared in
//! constant time, never logged: this type has no `Debug`.

use std::io;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;

#[derive(Clone)]
pub struct Auth {
    token: Option<Arc<[u8]>>,
}

impl Auth {
    pub fn none() -> Auth {
        Auth { token: None }
    }

    /// Reads the token from `path`; surrounding whitespace (a trailing newline) is not part of it.
    pub fn from_file(path: &Path) -> io::Result<Auth> {
        let raw = std::fs::read(path)?;
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("token file {} is empty", path.display()),
            ));
        }
        Ok(Auth {
            token: Some(token.into()),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.token.is_some()
    }

    fn admits(&self, presented: Option<&[u8]>) -> bool {
        match (&self.token, presented) {
            (None, _) => true,
            (Some(token), Some(presented)) => bool::from(presented.ct_eq(token)),
            (Some(_), None) => false,
        }
    }
}

/// Middleware for every protected route: `Authorization: Bearer <token>`.
pub async fn require_token(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if !auth.admits(presented) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "missing or wrong bearer token",
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_trimmed_and_compared_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let auth = Auth::from_file(&path).unwrap();
        assert!(auth.admits(Some(b"s3cret")));
        assert!(!auth.admits(Some(b"s3cret\n")));
        assert!(!auth.admits(Some(b"s3cre")));
        assert!(!auth.admits(None));
        assert!(Auth::none().admits(None));
        std::fs::write(&path, " \n").unwrap();
        assert!(Auth::from_file(&path).is_err());
    }
}
