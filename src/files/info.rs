//! execd's `FileInfo`: what every listing says of a file.

use chrono::{Local, SecondsFormat, TimeZone};
use nix::sys::stat::{FileStat, SFlag};
use serde::Serialize;

use crate::container::UserDb;

#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    /// Absolute and cleaned, inside the sandbox.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: i64,
    pub modified_at: String,
    /// The inode change time, as execd reports it.
    pub created_at: String,
    pub owner: String,
    pub group: String,
    /// Permission bits as octal digits read as a decimal number (0o755 is 755).
    pub mode: u32,
}

impl FileInfo {
    pub fn new(path: String, st: &FileStat, users: &UserDb) -> FileInfo {
        let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFREG => "file",
            SFlag::S_IFDIR => "directory",
            SFlag::S_IFLNK => "symlink",
            _ => "other",
        };
        FileInfo {
            path,
            kind,
            size: st.st_size,
            modified_at: rfc3339(st.st_mtime, st.st_mtime_nsec),
            created_at: rfc3339(st.st_ctime, st.st_ctime_nsec),
            owner: users
                .by_uid(st.st_uid)
                .map(|a| a.name.clone())
                .unwrap_or_else(|| st.st_uid.to_string()),
            group: users
                .group_name(st.st_gid)
                .map(str::to_string)
                .unwrap_or_else(|| st.st_gid.to_string()),
            mode: format!("{:o}", st.st_mode & 0o777)
                .parse()
                .expect("octal digits"),
        }
    }
}

/// RFC 3339 in sandlet's zone, as execd's Go `time.Time` marshals.
fn rfc3339(secs: i64, nanos: i64) -> String {
    Local
        .timestamp_opt(secs, nanos as u32)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}
