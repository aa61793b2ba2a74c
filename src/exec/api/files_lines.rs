//! `GET /files/download?path=&offset=&limit=` (execd 1.1): lines of a file rather than bytes, as
//! `text/plain`. `offset` is the first line (1-based, default 1), `limit` how many lines (default
//! all the rest); lines end at `\n` and are sent with their endings, as they are in the file. A
//! range past the end is an empty answer. Read with constant memory, a chunk at a time.

use std::fs::File;
use std::io::Read;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use tokio::sync::mpsc;

use super::files::query_values;
use super::invalid;
use crate::http::error::ApiError;

/// Bytes read per chunk.
const CHUNK: usize = 256 << 10;
/// Chunks read ahead of the client.
const READ_AHEAD: usize = 4;

/// Which lines a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lines {
    /// The first line, from 1.
    first: u64,
    /// How many, at most.
    count: Option<u64>,
}

impl Lines {
    /// The lines asked for, if `offset` or `limit` is given; with a `Range` header too it is a
    /// 400, as they are two ways of asking for part of the file.
    pub fn requested(query: Option<&str>, headers: &HeaderMap) -> Result<Option<Lines>, ApiError> {
        let number = |key: &str| -> Result<Option<u64>, ApiError> {
            match query_values(query, key).into_iter().next() {
                None => Ok(None),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n >= 1 => Ok(Some(n)),
                    _ => Err(invalid(format!(
                        "invalid query parameter '{key}': {v:?} (a whole number from 1)"
                    ))),
                },
            }
        };
        let (offset, limit) = (number("offset")?, number("limit")?);
        if offset.is_none() && limit.is_none() {
            return Ok(None);
        }
        if headers.contains_key(header::RANGE) {
            return Err(invalid(
                "offset and limit (lines) and a Range header (bytes) are mutually exclusive",
            ));
        }
        Ok(Some(Lines {
            first: offset.unwrap_or(1),
            count: limit,
        }))
    }
}

/// The lines of `file`, from its start, streamed.
pub fn respond(file: File, lines: Lines) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut picker = Picker::new(lines);
        let mut file = file;
        let mut buf = vec![0u8; CHUNK];
        while !picker.done() {
            match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let picked = picker.pick(&buf[..n]);
                    if !picked.is_empty()
                        && tx
                            .blocking_send(Ok(Bytes::copy_from_slice(picked)))
                            .is_err()
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Picks the requested lines out of the file's bytes as they are read.
struct Picker {
    /// Line endings still to pass before the first line wanted.
    skip: u64,
    /// Line endings still to send (`None`: to the end).
    left: Option<u64>,
}

impl Picker {
    fn new(lines: Lines) -> Picker {
        Picker {
            skip: lines.first - 1,
            left: lines.count,
        }
    }

    fn done(&self) -> bool {
        self.left == Some(0)
    }

    /// The part of `chunk` (the bytes after the last chunk) that is in the requested lines.
    fn pick<'a>(&mut self, mut chunk: &'a [u8]) -> &'a [u8] {
        while self.skip > 0 {
            match memchr::memchr(b'\n', chunk) {
                Some(at) => {
                    self.skip -= 1;
                    chunk = &chunk[at + 1..];
                }
                None => return &[],
            }
        }
        let Some(left) = &mut self.left else {
            return chunk;
        };
        let mut end = 0;
        while *left > 0 {
            match memchr::memchr(b'\n', &chunk[end..]) {
                Some(at) => {
                    end += at + 1;
                    *left -= 1;
                }
                None => return chunk,
            }
        }
        &chunk[..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(first: u64, count: Option<u64>, chunks: &[&[u8]]) -> Vec<u8> {
        let mut p = Picker::new(Lines { first, count });
        let mut out = Vec::new();
        for c in chunks {
            if p.done() {
                break;
            }
            out.extend_from_slice(p.pick(c));
        }
        out
    }

    #[test]
    fn lines_are_picked_across_chunks_with_their_endings() {
        let text: &[&[u8]] = &[b"one\ntw", b"o\r\nthree\n", b"four"];
        assert_eq!(pick(1, None, text), b"one\ntwo\r\nthree\nfour");
        assert_eq!(pick(2, Some(2), text), b"two\r\nthree\n");
        assert_eq!(pick(3, None, text), b"three\nfour");
        assert_eq!(pick(4, Some(9), text), b"four");
        assert_eq!(pick(5, None, text), b"");
        assert_eq!(pick(1, Some(1), text), b"one\n");
    }

    #[test]
    fn offset_and_limit_are_checked_and_exclude_range() {
        let none = HeaderMap::new();
        assert_eq!(Lines::requested(Some("path=/x"), &none).unwrap(), None);
        assert_eq!(
            Lines::requested(Some("path=/x&limit=3"), &none).unwrap(),
            Some(Lines {
                first: 1,
                count: Some(3)
            })
        );
        for bad in ["offset=0", "limit=0", "offset=-1", "limit=x"] {
            assert!(Lines::requested(Some(bad), &none).is_err(), "{bad}");
        }
        let mut range = HeaderMap::new();
        range.insert(header::RANGE, HeaderValue::from_static("bytes=0-1"));
        let e = Lines::requested(Some("offset=2"), &range).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
    }
}
