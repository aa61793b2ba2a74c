//! `POST /files/replace?verbose=`: `{path: {old, new}}`, every literal occurrence of `old`
//! replaced. Every entry is checked (non-empty `old`, an existing regular file within the size
//! limit) before any file changes; each file is then replaced atomically, its mode and owner
//! kept (see `files::Staged`).

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::json;

use super::files::query_values;
use super::{ExecApi, ExecJson, empty_ok};
use crate::files::root::is_file;
use crate::files::{FileError, Staged, read_limited};
use crate::http::error::ApiError;

#[derive(Debug, Deserialize)]
pub struct Replacement {
    #[serde(default)]
    old: String,
    #[serde(default)]
    new: String,
}

pub async fn replace_contents(
    State(api): State<ExecApi>,
    RawQuery(query): RawQuery,
    ExecJson(request): ExecJson<Option<IndexMap<String, Replacement>>>,
) -> Result<Response, ApiError> {
    let verbose = query_values(query.as_deref(), "verbose")
        .first()
        .is_some_and(|v| v == "true");
    let request = request.unwrap_or_default();
    let limit = api.files.config.max_replace_bytes;
    let counts = api
        .files
        .run(move |place| {
            let mut checked = Vec::with_capacity(request.len());
            for (raw, r) in &request {
                if r.old.is_empty() {
                    return Err(FileError::Invalid(format!(
                        "old content must not be empty (for {raw})"
                    )));
                }
                let path = place.resolve(raw)?;
                let st = place
                    .root
                    .stat(&path)
                    .map_err(|e| FileError::io(format!("file not found: {path}"), e))?;
                if !is_file(&st) {
                    return Err(FileError::Invalid(format!("{path} is not a regular file")));
                }
                if st.st_size as u64 > limit {
                    return Err(FileError::TooLarge(format!(
                        "{path} is {} bytes; replace handles files up to {limit} bytes (--exec-max-replace-bytes)",
                        st.st_size
                    )));
                }
                checked.push((raw.clone(), path, r));
            }
            let mut counts = IndexMap::new();
            for (raw, path, r) in checked {
                let content = read_limited(&place.root, &path, limit)?;
                let (replaced, count) = replace_all(&content, r.old.as_bytes(), r.new.as_bytes());
                if count > 0 {
                    let mut staged = Staged::create(place, &path)?;
                    staged.write_all(&replaced)?;
                    staged.commit(0, None, None)?;
                }
                counts.insert(raw, count);
            }
            Ok(counts)
        })
        .await?;
    if !verbose {
        return Ok(empty_ok());
    }
    let body: IndexMap<String, serde_json::Value> = counts
        .into_iter()
        .map(|(path, n)| (path, json!({"replacedCount": n})))
        .collect();
    Ok(Json(body).into_response())
}

/// `content` with every non-overlapping `old` replaced by `new`, and how many there were.
fn replace_all(content: &[u8], old: &[u8], new: &[u8]) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(content.len());
    let mut count = 0;
    let mut rest = content;
    while let Some(at) = memchr::memmem::find(rest, old) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(new);
        rest = &rest[at + old.len()..];
        count += 1;
    }
    out.extend_from_slice(rest);
    (out, count)
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_every_non_overlapping_occurrence() {
        assert_eq!(
            super::replace_all(b"aaaa", b"aa", b"b"),
            (b"bb".to_vec(), 2)
        );
        assert_eq!(
            super::replace_all(b"hello execd\n", b"hello", b"hi"),
            (b"hi execd\n".to_vec(), 1)
        );
        assert_eq!(super::replace_all(b"x", b"y", b"z"), (b"x".to_vec(), 0));
        assert_eq!(super::replace_all(b"a-a", b"a", b""), (b"-".to_vec(), 2));
    }
}
