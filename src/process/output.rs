//! Task output on disk: each stream (stdout, stderr) is a sequence of segment files named by the
//! byte offset they start at, `stdout.<offset as 16 hex digits>.log`. The writer (the shim) keeps
//! the newest two segments, so a stream holds at least `limit/2` and at most `limit` bytes of its
//! latest output, and readers address bytes by their offset in the whole stream, which never
//! changes: a follower that falls behind a rotation learns exactly which bytes it missed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct SegmentWriter {
    dir: PathBuf,
    stream: &'static str,
    segment_bytes: u64,
    base: u64,
    len: u64,
    file: File,
}

impl SegmentWriter {
    pub fn create(dir: &Path, stream: &'static str, limit: u64) -> io::Result<Self> {
        let file = open_segment(dir, stream, 0)?;
        Ok(SegmentWriter {
            dir: dir.to_owned(),
            stream,
            segment_bytes: (limit / 2).max(1),
            base: 0,
            len: 0,
            file,
        })
    }

    /// Appends `data`, split at segment boundaries, so no segment grows past its size however
    /// large a write is.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.len >= self.segment_bytes {
                self.rotate()?;
            }
            let room = (self.segment_bytes - self.len).min(data.len() as u64) as usize;
            self.file.write_all(&data[..room])?;
            self.len += room as u64;
            data = &data[room..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let next = self.base + self.len;
        self.file = open_segment(&self.dir, self.stream, next)?;
        // Only the segment before the new one is kept.
        for (base, path) in segments(&self.dir, self.stream)? {
            if base < self.base {
                fs::remove_file(path)?;
            }
        }
        self.base = next;
        self.len = 0;
        Ok(())
    }
}

fn segment_path(dir: &Path, stream: &str, base: u64) -> PathBuf {
    dir.join(format!("{stream}.{base:016x}.log"))
}

fn open_segment(dir: &Path, stream: &str, base: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, stream, base))
}

/// The stream's segments, oldest first.
fn segments(dir: &Path, stream: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(hex) = name
            .strip_prefix(stream)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".log"))
        else {
            continue;
        };
        if let Ok(base) = u64::from_str_radix(hex, 16) {
            found.push((base, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Bytes read from a stream, with where they sit in it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogChunk {
    /// The oldest offset still kept.
    pub start: u64,
    /// The offset of `data[0]`: the one asked for, or `start` if that was rotated away.
    pub offset: u64,
    pub data: Vec<u8>,
    /// The stream's length when read.
    pub end: u64,
}

/// Reads up to `max` bytes of `stream` from `offset`.
pub fn read_log(dir: &Path, stream: &str, offset: u64, max: usize) -> io::Result<LogChunk> {
    // A segment can be rotated away between listing and opening; listing again settles it.
    for _ in 0..3 {
        let segs = segments(dir, stream)?;
        let Some(&(first, _)) = segs.first() else {
            return Ok(LogChunk::default());
        };
        let (last_base, last_path) = segs.last().expect("non-empty");
        let end = last_base + fs::metadata(last_path)?.len();
        let offset = offset.max(first).min(end);
        let Some(first_seg) = segs.iter().rposition(|(base, _)| *base <= offset) else {
            continue;
        };
        let mut data = Vec::with_capacity(max.min((end - offset) as usize));
        let mut rotated_away = false;
        // The read continues into newer segments until `max` bytes or the end.
        for (base, path) in &segs[first_seg..] {
            let mut file = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    rotated_away = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            file.seek(SeekFrom::Start(
                (offset + data.len() as u64).saturating_sub(*base),
            ))?;
            file.take((max - data.len()) as u64)
                .read_to_end(&mut data)?;
            if data.len() >= max {
                break;
            }
        }
        if rotated_away {
            continue;
        }
        return Ok(LogChunk {
            start: first,
            offset,
            end: end.max(offset + data.len() as u64),
            data,
        });
    }
    Err(io::Error::other(
        "log segments kept rotating while being read",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_offsets_stable_and_size_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), "stdout", 20).unwrap();
        let all: Vec<u8> = (0..100u8).collect();
        for chunk in all.chunks(7) {
            w.write(chunk).unwrap();
        }
        let chunk = read_log(dir.path(), "stdout", 0, 1000).unwrap();
        assert_eq!(chunk.end, 100);
        assert!(
            chunk.start > 0 && chunk.start <= 100 - 10,
            "keeps at least limit/2: {chunk:?}"
        );
        assert_eq!(chunk.offset, chunk.start);
        // Reading on from any kept offset yields exactly the original bytes.
        let mut offset = chunk.start;
        let mut got: Vec<u8> = Vec::new();
        while offset < 100 {
            let c = read_log(dir.path(), "stdout", offset, 4).unwrap();
            got.extend(&c.data);
            offset = c.offset + c.data.len() as u64;
        }
        assert_eq!(got, &all[chunk.start as usize..]);
        let on_disk: u64 = segments(dir.path(), "stdout")
            .unwrap()
            .iter()
            .map(|(_, p)| fs::metadata(p).unwrap().len())
            .sum();
        assert!(
            on_disk <= 20 + 7,
            "bounded by limit plus one chunk: {on_disk}"
        );
    }

    #[test]
    fn empty_and_missing_streams_read_as_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read_log(dir.path(), "stderr", 5, 10).unwrap(),
            LogChunk::default()
        );
        SegmentWriter::create(dir.path(), "stderr", 10).unwrap();
        assert_eq!(
            read_log(dir.path(), "stderr", 5, 10).unwrap(),
            LogChunk::default()
        );
    }
}
