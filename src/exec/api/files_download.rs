//! `GET /files/download?path=<p>`: a file's bytes, streamed from the file with constant memory.
//! `Range` (one range: 206; several: `multipart/byteranges`; none satisfiable: 416 with
//! `Content-Range: bytes */<size>`), `If-Range`, `If-None-Match` and `If-Modified-Since` work as
//! HTTP says; a directory or other non-file is refused instead of sent as garbage. `offset` and
//! `limit` ask for lines instead (see `files_lines.rs`).

use std::fs::File;
use std::os::unix::fs::FileExt;

use axum::body::{Body, Bytes};
use axum::extract::RawQuery;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeZone, Utc};
use nix::fcntl::OFlag;
use tokio::sync::mpsc;

use super::files::required_query;
use super::scoped::Scoped;
use crate::files::{FileError, root};
use crate::http::error::ApiError;

/// Bytes read from the file per chunk.
const CHUNK: usize = 256 << 10;
/// Chunks read ahead of the client.
const READ_AHEAD: usize = 4;
/// A request with more ranges than this gets the whole file (RFC 9110 allows ignoring Range).
const MAX_RANGES: usize = 64;
const BOUNDARY: &str = "sandlet-byteranges-7d1c3e";

struct Opened {
    file: File,
    /// `None`: a file of a kernel pseudo filesystem (`/proc`, `/sys`, ...), whose size the
    /// kernel does not know until it is read.
    size: Option<u64>,
    etag: String,
    modified: DateTime<Utc>,
    name: String,
}

pub async fn download(
    Scoped(api): Scoped,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let raw = required_query(query.as_deref(), "path")?;
    let lines = super::files_lines::Lines::requested(query.as_deref(), &headers)?;
    let opened = api
        .files
        .run(move |place| {
            let path = place.resolve(&raw)?;
            let fd = place
                .root
                .open_at(&path, OFlag::O_RDONLY | OFlag::O_NONBLOCK)
                .map_err(|e| FileError::io(format!("file not found: {path}"), e))?;
            let file = File::from(fd);
            let st = nix::sys::stat::fstat(&file)
                .map_err(|e| FileError::io(format!("cannot read {path}"), e.into()))?;
            if root::is_dir(&st) {
                return Err(FileError::Invalid(format!(
                    "{path} is a directory; list it with /directories/list"
                )));
            }
            if !root::is_file(&st) {
                return Err(FileError::Invalid(format!("{path} is not a regular file")));
            }
            let name = root::split(&path)
                .map_or("download", |(_, n)| n)
                .to_string();
            let size = (!generated_on_read(&file)).then_some(st.st_size as u64);
            Ok(Opened {
                file,
                size,
                etag: format!(
                    "\"{:x}-{:x}-{:x}.{:x}\"",
                    st.st_ino, st.st_size, st.st_mtime, st.st_mtime_nsec
                ),
                modified: Utc
                    .timestamp_opt(st.st_mtime, 0)
                    .single()
                    .unwrap_or_default(),
                name,
            })
        })
        .await?;
    if let Some(lines) = lines {
        return Ok(super::files_lines::respond(opened.file, lines));
    }
    Ok(respond(opened, &headers))
}

/// Whether the file's content is made by the kernel as it is read: its `st_size` is 0 (`/proc`)
/// or a page (`/sys`), never its length, so it is sent until its end without a declared length.
fn generated_on_read(file: &File) -> bool {
    use nix::sys::statfs::{
        BPF_FS_MAGIC, CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, DEBUGFS_MAGIC, PROC_SUPER_MAGIC,
        SECURITYFS_MAGIC, SYSFS_MAGIC, TRACEFS_MAGIC, fstatfs,
    };
    fstatfs(file).is_ok_and(|fs| {
        [
            PROC_SUPER_MAGIC,
            SYSFS_MAGIC,
            DEBUGFS_MAGIC,
            TRACEFS_MAGIC,
            SECURITYFS_MAGIC,
            CGROUP_SUPER_MAGIC,
            CGROUP2_SUPER_MAGIC,
            BPF_FS_MAGIC,
        ]
        .contains(&fs.filesystem_type())
    })
}

fn respond(opened: Opened, headers: &HeaderMap) -> Response {
    let Some(size) = opened.size else {
        // No length, so no ranges and no validators: the content as it reads now.
        let mut r = until_end(opened.file);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return r;
    };
    let last_modified = opened
        .modified
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let header_str = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let not_modified = match (
        header_str(header::IF_NONE_MATCH),
        header_str(header::IF_MODIFIED_SINCE),
    ) {
        (Some(tags), _) => tags
            .split(',')
            .any(|t| t.trim() == opened.etag || t.trim() == "*"),
        (None, Some(since)) => {
            DateTime::parse_from_rfc2822(since).is_ok_and(|since| opened.modified <= since)
        }
        (None, None) => false,
    };
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let range_applies = match header_str(header::IF_RANGE) {
            None => true,
            Some(v) => v == opened.etag || v == last_modified,
        };
        match header_str(header::RANGE).filter(|_| range_applies) {
            None => whole(opened.file, size),
            Some(range) => match parse_ranges(range, size) {
                Err(why) => {
                    return range_error(size, why);
                }
                Ok(ranges) if ranges.is_empty() => {
                    return range_error(
                        size,
                        format!("no range of {range:?} starts within the file's {size} bytes"),
                    );
                }
                Ok(ranges) if ranges.len() > MAX_RANGES => whole(opened.file, size),
                Ok(ranges) if ranges.len() == 1 => {
                    let (start, end) = ranges[0];
                    let mut r = stream(opened.file, vec![(Vec::new(), start, end)], Vec::new());
                    *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                    let h = r.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    h.insert(header::CONTENT_LENGTH, (end - start + 1).into());
                    h.insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
                            .expect("ascii"),
                    );
                    r
                }
                Ok(ranges) => multipart(opened.file, &ranges, size),
            },
        }
    };
    let h = response.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&opened.etag).expect("ascii"),
    );
    h.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_str(&last_modified).expect("ascii"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        content_disposition(&opened.name),
    );
    response
}

fn whole(file: File, size: u64) -> Response {
    let mut r = if size == 0 {
        Response::new(Body::empty())
    } else {
        stream(file, vec![(Vec::new(), 0, size - 1)], Vec::new())
    };
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, size.into());
    r
}

fn multipart(file: File, ranges: &[(u64, u64)], size: u64) -> Response {
    let parts: Vec<(Vec<u8>, u64, u64)> = ranges
        .iter()
        .map(|&(start, end)| {
            let head = format!(
                "\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {start}-{end}/{size}\r\n\r\n"
            );
            (head.into_bytes(), start, end)
        })
        .collect();
    let tail = format!("\r\n--{BOUNDARY}--\r\n").into_bytes();
    let length: u64 = parts
        .iter()
        .map(|(head, start, end)| head.len() as u64 + end - start + 1)
        .sum::<u64>()
        + tail.len() as u64;
    let mut r = stream(file, parts, tail);
    *r.status_mut() = StatusCode::PARTIAL_CONTENT;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&format!("multipart/byteranges; boundary={BOUNDARY}"))
            .expect("ascii"),
    );
    h.insert(header::CONTENT_LENGTH, length.into());
    r
}

/// A body of `(prefix, first byte, last byte)` pieces of `file`, then `tail`, read on a blocking
/// thread a few chunks ahead of the client (a slow client holds back the reads, not memory).
fn stream(file: File, pieces: Vec<(Vec<u8>, u64, u64)>, tail: Vec<u8>) -> Response {
    body_from(move |tx| {
        for (prefix, start, end) in pieces {
            if !prefix.is_empty() && tx.blocking_send(Ok(prefix.into())).is_err() {
                return;
            }
            let mut at = start;
            let read_at = |buf: &mut [u8]| {
                let n = file.read_at(buf, at)?;
                at += n as u64;
                Ok(n)
            };
            if !send_read(tx, read_at, Some(end - start + 1)) {
                return;
            }
        }
        if !tail.is_empty() {
            let _ = tx.blocking_send(Ok(tail.into()));
        }
    })
}

/// The file read from its current offset until a read returns nothing, chunked.
fn until_end(mut file: File) -> Response {
    body_from(move |tx| {
        send_read(tx, |buf| std::io::Read::read(&mut file, buf), None);
    })
}

pub(super) type Chunks = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A response whose body `produce` writes from a blocking thread, at most [`READ_AHEAD`] chunks
/// ahead of the client.
pub(super) fn body_from(produce: impl FnOnce(&Chunks) + Send + 'static) -> Response {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || produce(&tx));
    Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

/// Sends what `read` gives, a chunk at a time, until it has given `length` bytes (`None`: until
/// it gives nothing). False when the body ended early: the client went away, or a read failed
/// (the error then ends the body, so the client sees it cut short).
pub(super) fn send_read(
    tx: &Chunks,
    mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
    length: Option<u64>,
) -> bool {
    let mut left = length;
    loop {
        let want = left.map_or(CHUNK, |l| (l as usize).min(CHUNK));
        if want == 0 {
            return true;
        }
        let mut buf = vec![0u8; want];
        match read(&mut buf) {
            Ok(0) if left.is_none() => return true,
            Ok(0) => {
                // The file shrank under us: end the body short (the client sees a length
                // mismatch) rather than send bytes that are not the file's.
                let _ = tx.blocking_send(Err(std::io::Error::other(
                    "the file shrank while being sent",
                )));
                return false;
            }
            Ok(n) => {
                buf.truncate(n);
                left = left.map(|l| l - n as u64);
                if tx.blocking_send(Ok(buf.into())).is_err() {
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return false;
            }
        }
    }
}

fn range_error(size: u64, why: String) -> Response {
    let mut r = ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "UNKNOWN", why).into_response();
    r.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
    );
    r
}

/// The satisfiable ranges of a `Range: bytes=...` header as (first, last) byte, clamped to the
/// file; an error for bad syntax. Ranges starting at or past the end are dropped.
fn parse_ranges(header: &str, size: u64) -> Result<Vec<(u64, u64)>, String> {
    let bad = || format!("invalid Range header {header:?}");
    let specs = header.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    let mut ranges = Vec::new();
    for spec in specs.split(',').map(str::trim) {
        let (a, b) = spec.split_once('-').ok_or_else(bad)?;
        let number = |s: &str| s.parse::<u64>().map_err(|_| bad());
        let range = match (a.is_empty(), b.is_empty()) {
            (true, true) => return Err(bad()),
            (true, false) => {
                let n = number(b)?;
                if n == 0 {
                    None
                } else {
                    Some((size.saturating_sub(n), size.saturating_sub(1)))
                }
            }
            (false, true) => Some((number(a)?, size.saturating_sub(1))),
            (false, false) => {
                let (first, last) = (number(a)?, number(b)?);
                if last < first {
                    return Err(bad());
                }
                Some((first, last.min(size.saturating_sub(1))))
            }
        };
        if let Some((first, last)) = range
            && first < size
        {
            ranges.push((first, last));
        }
    }
    Ok(ranges)
}

/// `attachment; filename="<name>"`, with an RFC 5987 `filename*` for names that are not
/// plain ASCII.
fn content_disposition(name: &str) -> HeaderValue {
    let plain = name
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    let value = if plain {
        format!("attachment; filename=\"{name}\"")
    } else {
        let encoded: String = name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!("attachment; filename=\"{encoded}\"; filename*=UTF-8''{encoded}")
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_clamp_as_http_says() {
        assert_eq!(parse_ranges("bytes=0-9", 20), Ok(vec![(0, 9)]));
        assert_eq!(parse_ranges("bytes=-5", 10), Ok(vec![(5, 9)]));
        assert_eq!(parse_ranges("bytes=-50", 10), Ok(vec![(0, 9)]));
        assert_eq!(parse_ranges("bytes=5-", 10), Ok(vec![(5, 9)]));
        assert_eq!(parse_ranges("bytes=8-100", 10), Ok(vec![(8, 9)]));
        assert_eq!(parse_ranges("bytes=0-0, 4-5", 10), Ok(vec![(0, 0), (4, 5)]));
        assert_eq!(parse_ranges("bytes=10-", 10), Ok(vec![]));
        assert_eq!(parse_ranges("bytes=-0", 10), Ok(vec![]));
        for bad in ["bytes=foo", "items=0-1", "bytes=5-2", "bytes=-", "bytes=1"] {
            assert!(parse_ranges(bad, 10).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_quoted_or_encoded() {
        assert_eq!(
            content_disposition("a b.txt"),
            "attachment; filename=\"a b.txt\""
        );
        assert_eq!(
            content_disposition("é x.txt"),
            "attachment; filename=\"%C3%A9%20x.txt\"; filename*=UTF-8''%C3%A9%20x.txt"
        );
    }
}
