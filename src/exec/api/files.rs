//! What the file and directory routes share: the error mapping, repeated query parameters and
//! execd's permission objects.

use axum::http::StatusCode;
use serde::Deserialize;

use crate::files::{FileError, Place, octal_mode};
use crate::http::error::ApiError;

impl From<FileError> for ApiError {
    fn from(e: FileError) -> ApiError {
        let (status, code) = match &e {
            FileError::NotFound(_) => (StatusCode::NOT_FOUND, "FILE_NOT_FOUND"),
            FileError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST_BODY"),
            FileError::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT"),
            FileError::Denied(_) => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
            FileError::NoSpace(_) => (StatusCode::INSUFFICIENT_STORAGE, "NO_SPACE"),
            FileError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "LIMIT_EXCEEDED"),
            FileError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            FileError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "RUNTIME_ERROR"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Every value of a query parameter that may repeat (`?path=a&path=b`).
pub fn query_values(query: Option<&str>, key: &str) -> Vec<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// A required query parameter (the first, if repeated).
pub fn required_query(query: Option<&str>, key: &str) -> Result<String, ApiError> {
    query_values(query, key)
        .into_iter()
        .next()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("MISSING_QUERY", format!("missing query parameter '{key}'"))
        })
}

/// execd's `Permission`: an owner and group (names or numbers) and a mode in octal digits.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Permission {
    pub owner: Option<String>,
    pub group: Option<String>,
    pub mode: Option<u32>,
}

/// A permission checked against the sandbox: the mode as bits, the owner and group as ids.
pub struct Resolved {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Permission {
    pub fn resolve(&self, place: &Place) -> Result<Resolved, FileError> {
        let (uid, gid) = place.ids(self.owner.as_deref(), self.group.as_deref())?;
        Ok(Resolved {
            mode: octal_mode(self.mode.unwrap_or(0))?,
            uid,
            gid,
        })
    }
}
