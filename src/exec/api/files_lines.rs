//! `GET /files/download?path=&offset=&limit=` (execd 1.1): lines of a file rather than bytes, as
//! `text/plain`. `offset` is the first line (1-based, default 1), `limit` how many lines (default
//! all the rest); lines end at `\n` and are sent with their endings, as they are in the file. A
//! range past the end is an empty answer. Read with constant memory, a chunk at a time.

use std::fs::File;
use std::io::Read;
use std::ops::Range;

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;

use super::files::query_values;
use super::files_download::{body_from, send_read};
use super::invalid;
use crate::http::error::ApiError;

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

/// The lines of `file`, from its start, streamed by the download's chunked reader: each read
/// gives the part of a chunk of the file that is in the lines.
pub fn respond(mut file: File, lines: Lines) -> Response {
    let mut picker = Picker::new(lines);
    let mut response = body_from(move |tx| {
        let read_lines = |buf: &mut [u8]| loop {
            if picker.done() {
                return Ok(0);
            }
            let n = file.read(buf)?;
            if n == 0 {
                return Ok(0);
            }
            let picked = picker.pick(&buf[..n]);
            if !picked.is_empty() {
                let len = picked.len();
                buf.copy_within(picked, 0);
                return Ok(len);
            }
        };
        send_read(tx, read_lines, None);
    });
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

    /// Where in `chunk` (the bytes after the last chunk) the requested lines are.
    fn pick(&mut self, chunk: &[u8]) -> Range<usize> {
        let mut start = 0;
        while self.skip > 0 {
            match memchr::memchr(b'\n', &chunk[start..]) {
                Some(at) => {
                    self.skip -= 1;
                    start += at + 1;
                }
                None => return chunk.len()..chunk.len(),
            }
        }
        let Some(left) = &mut self.left else {
            return start..chunk.len();
        };
        let mut end = start;
        while *left > 0 {
            match memchr::memchr(b'\n', &chunk[end..]) {
                Some(at) => {
                    end += at + 1;
                    *left -= 1;
                }
                None => return start..chunk.len(),
            }
        }
        start..end
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
            out.extend_from_slice(&c[p.pick(c)]);
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
