//! The one way sandlet and its shim write state files: a temporary sibling, then `rename`, so a
//! reader (or a sandlet restarted after SIGKILL) sees the old content or the new, never a mix.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Durability choice per file: `Durable` also fsyncs before the rename, so the content survives
/// a node crash. Used for results (exit statuses); records that a crash of the whole node makes
/// moot anyway skip the fsync to keep it off the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Atomic,
    Durable,
}

pub fn write(path: &Path, bytes: &[u8], durability: Durability) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    if durability == Durability::Durable {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(&tmp, path)
}

pub fn write_json<T: serde::Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write(path, &bytes, durability)
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        write_json(&path, &vec![1, 2, 3], Durability::Durable).unwrap();
        write_json(&path, &vec![4], Durability::Atomic).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), Some(vec![4]));
        assert!(!dir.path().join("r.tmp").exists());
        assert_eq!(
            read_json::<Vec<i32>>(&dir.path().join("missing.json")).unwrap(),
            None
        );
    }
}
