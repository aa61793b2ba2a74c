//! `POST /files/replace?verbose=`: `{path: {old, new}}`, every literal occurrence of `old`
//! replaced. Every entry is checked (non-empty `old`, an existing regular file within the size
//! limit, and a result within it too) before any file changes; each file is then streamed
//! through a staged file with constant memory and replaced atomically, its mode and owner kept
//! (see `files::Staged`). Without `verbose` the answer is empty, except in an isolated session:
//! there the 1.1 SDK's `replace_contents_detailed` asks without it and reads the counts.

use std::fs::File;
use std::io::Read;

use axum::Extension;
use axum::Json;
use axum::extract::RawQuery;
use axum::response::{IntoResponse, Response};
use indexmap::IndexMap;
use memchr::memmem::Finder;
use nix::fcntl::OFlag;
use serde::Deserialize;
use serde_json::json;

use super::files::query_values;
use super::scoped::{InSession, Scoped};
use super::{ExecJson, empty_ok};
use crate::files::root::is_file;
use crate::files::{FileError, Place, Staged};
use crate::http::error::ApiError;

#[derive(Debug, Deserialize)]
pub struct Replacement {
    #[serde(default)]
    old: String,
    #[serde(default)]
    new: String,
}

pub async fn replace_contents(
    Scoped(api): Scoped,
    in_session: Option<Extension<InSession>>,
    RawQuery(query): RawQuery,
    ExecJson(request): ExecJson<Option<IndexMap<String, Replacement>>>,
) -> Result<Response, ApiError> {
    let verbose = match query_values(query.as_deref(), "verbose").first() {
        Some(v) => v == "true",
        None => in_session.is_some(),
    };
    let request = request.unwrap_or_default();
    let limit = api.files.config.max_replace_bytes;
    let counts = api
        .files
        .run(move |place| {
            // Every entry checked, and the size of its result known (a counting read), before
            // any file changes; one file open at a time.
            let mut checked = Vec::with_capacity(request.len());
            for (raw, r) in &request {
                if r.old.is_empty() {
                    return Err(FileError::Invalid(format!(
                        "old content must not be empty (for {raw})"
                    )));
                }
                let path = place.resolve(raw)?;
                let finder = Finder::new(r.old.as_bytes());
                let (count, size) = replace_all(
                    &mut open_within(place, &path, limit)?,
                    &finder,
                    r.new.as_bytes(),
                    &mut |_| Ok(()),
                )?;
                let result = size as i128
                    + count as i128 * (r.new.len() as i128 - r.old.len() as i128);
                if result > limit as i128 {
                    return Err(FileError::TooLarge(format!(
                        "replacing in {path} would make it {result} bytes; replace writes files up to {limit} bytes (--exec-max-replace-bytes)"
                    )));
                }
                checked.push((raw.clone(), path, finder, r, count));
            }
            let mut counts = IndexMap::new();
            for (raw, path, finder, r, count) in checked {
                if count > 0 {
                    let count = rewrite(place, &path, &finder, r.new.as_bytes(), limit)?;
                    counts.insert(raw, count);
                } else {
                    counts.insert(raw, 0);
                }
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

/// Bytes read at a time, and gathered for one write.
const CHUNK: usize = 256 << 10;

/// `path` opened for reading, when it is a regular file of at most `limit` bytes.
fn open_within(place: &Place, path: &str, limit: u64) -> Result<File, FileError> {
    let fd = place
        .root
        .open_at(path, OFlag::O_RDONLY)
        .map_err(|e| FileError::io(format!("file not found: {path}"), e))?;
    let file = File::from(fd);
    let st = nix::sys::stat::fstat(&file)
        .map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
    if !is_file(&st) {
        return Err(FileError::Invalid(format!("{path} is not a regular file")));
    }
    if st.st_size as u64 > limit {
        return Err(FileError::TooLarge(format!(
            "{path} is {} bytes; replace handles files up to {limit} bytes (--exec-max-replace-bytes)",
            st.st_size
        )));
    }
    Ok(file)
}

/// Replaces `path` by its content with every occurrence replaced, streamed through a staged
/// file (constant memory whatever the sizes); returns how many there were.
fn rewrite(
    place: &Place,
    path: &str,
    finder: &Finder,
    new: &[u8],
    limit: u64,
) -> Result<usize, FileError> {
    let mut source = open_within(place, path, limit)?;
    let mut staged = Staged::create(place, path)?;
    let mut pending = Vec::with_capacity(CHUNK);
    let mut written = 0u64;
    let (count, _) = replace_all(&mut source, finder, new, &mut |piece| {
        written += piece.len() as u64;
        if written > limit {
            return Err(FileError::TooLarge(format!(
                "{path} changed while replaced: the result passed {limit} bytes (--exec-max-replace-bytes)"
            )));
        }
        pending.extend_from_slice(piece);
        if pending.len() >= CHUNK {
            staged.write_all(&pending)?;
            pending.clear();
        }
        Ok(())
    })?;
    staged.write_all(&pending)?;
    staged.commit(0, None, None)?;
    Ok(count)
}

/// Streams `input` to `out` with every non-overlapping occurrence `finder` finds replaced by
/// `new`, leftmost first (as a replace over the whole content at once); returns how many there
/// were and how many bytes were read. Holds one chunk and the needle's length.
fn replace_all(
    input: &mut impl Read,
    finder: &Finder,
    new: &[u8],
    out: &mut dyn FnMut(&[u8]) -> Result<(), FileError>,
) -> Result<(usize, u64), FileError> {
    let old_len = finder.needle().len();
    // An empty needle is refused with the request (it would be found everywhere, forever).
    debug_assert!(old_len > 0);
    let mut buffer = vec![0u8; CHUNK.max(2 * old_len)];
    let (mut filled, mut count, mut read) = (0, 0, 0u64);
    loop {
        let n = match input.read(&mut buffer[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FileError::io("cannot read the file to replace in", e)),
        };
        read += n as u64;
        filled += n;
        let at_end = n == 0;
        if !at_end && filled < buffer.len() {
            continue;
        }
        let mut start = 0;
        while let Some(at) = finder.find(&buffer[start..filled]) {
            out(&buffer[start..start + at])?;
            out(new)?;
            start += at + old_len;
            count += 1;
        }
        // The tail could be the start of an occurrence that the next read completes.
        let keep = if at_end {
            0
        } else {
            (filled - start).min(old_len - 1)
        };
        out(&buffer[start..filled - keep])?;
        buffer.copy_within(filled - keep..filled, 0);
        filled = keep;
        if at_end {
            return Ok((count, read));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replaced(content: &[u8], old: &[u8], new: &[u8]) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let (count, read) = replace_all(&mut &content[..], &Finder::new(old), new, &mut |p| {
            out.extend_from_slice(p);
            Ok(())
        })
        .unwrap();
        assert_eq!(read, content.len() as u64);
        (out, count)
    }

    #[test]
    fn replaces_every_non_overlapping_occurrence() {
        assert_eq!(replaced(b"aaaa", b"aa", b"b"), (b"bb".to_vec(), 2));
        assert_eq!(
            replaced(b"hello execd\n", b"hello", b"hi"),
            (b"hi execd\n".to_vec(), 1)
        );
        assert_eq!(replaced(b"x", b"y", b"z"), (b"x".to_vec(), 0));
        assert_eq!(replaced(b"a-a", b"a", b""), (b"-".to_vec(), 2));
        assert_eq!(replaced(b"", b"a", b"b"), (b"".to_vec(), 0));
    }

    /// Occurrences across chunk boundaries are found as in one pass over the whole content.
    #[test]
    fn streaming_matches_a_replace_over_the_whole_content() {
        let mut content = Vec::new();
        for i in 0..(3 * CHUNK / 7) {
            content.extend_from_slice(if i % 5 == 0 { b"abcab" } else { b"xyab" });
        }
        for old in [&b"ab"[..], b"abcab", b"bca", b"xyabx", b"b"] {
            let whole = {
                let (mut out, mut count, mut rest) = (Vec::new(), 0, &content[..]);
                while let Some(at) = memchr::memmem::find(rest, old) {
                    out.extend_from_slice(&rest[..at]);
                    out.extend_from_slice(b"<>");
                    rest = &rest[at + old.len()..];
                    count += 1;
                }
                out.extend_from_slice(rest);
                (out, count)
            };
            assert_eq!(replaced(&content, old, b"<>"), whole, "old {old:?}");
        }
    }
}
