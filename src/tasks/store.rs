//! Task records on disk: `<data dir>/<task name>/task.json`, written by sandlet, next to the
//! shim's `run.json`, `exit.json` and log segments in the same directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::state::{Outcome, StopCause};
use super::wire::Process;
use crate::atomic_file::{self, Durability};

pub const RECORD_FILE: &str = "task.json";
/// Bumped when the record's meaning changes; records of other formats are left alone.
const FORMAT: u32 = 1;
const TRASH_PREFIX: &str = ".deleted-";
/// A change to several records (a `setTasks`) under way; see [`SetIntent`].
const INTENT_FILE: &str = ".set-intent.json";

/// What sandlet itself knows about a task; what the shim knows lives in its own files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub sandlet_record: u32,
    /// Creation order, kept across restarts (the Go client reads the first task).
    pub seq: u64,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub process: Process,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_requested_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_cause: Option<StopCause>,
    /// An ending sandlet decided itself (start failure, lost process), so that it reads the same
    /// after every restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    pub outcome: Outcome,
}

/// A change to several task records, written before any of them is touched and removed once all
/// are written: a sandlet that dies in between finds it at the next start and undoes what was
/// done, so a declared set is applied whole or not at all. Nothing of the change has started or
/// stopped a process yet when the intent is removed (the caller acts only afterwards), so
/// undoing it loses nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetIntent {
    /// Tasks the change creates.
    pub created: Vec<String>,
    /// Tasks the change marks for removal.
    pub marked: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the data dir, creating it, and proves it writable.
    pub fn open(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root)?;
        // Directories of forgotten tasks whose deletion a restart interrupted.
        for entry in fs::read_dir(root)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(TRASH_PREFIX)
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let probe = root.join(".sandlet-write-probe");
        fs::write(&probe, b"")?;
        fs::remove_file(&probe)?;
        Ok(Store {
            root: root.to_owned(),
        })
    }

    pub fn task_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn create(&self, record: &TaskRecord) -> io::Result<()> {
        let dir = self.task_dir(&record.name);
        match fs::create_dir(&dir) {
            // Left over from something that is not a task of ours now (records that did not
            // load are logged at start): set aside, not reused.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.delete(&record.name)?;
                fs::create_dir(&dir)?;
            }
            created => created?,
        }
        let written = self.save(record, Durability::Atomic);
        if written.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        written
    }

    pub fn save(&self, record: &TaskRecord, durability: Durability) -> io::Result<()> {
        atomic_file::write_json(
            &self.task_dir(&record.name).join(RECORD_FILE),
            record,
            durability,
        )
    }

    /// Removes a task's directory: renamed aside at once (one syscall, so a new task of the same
    /// name can be created right away), deleted in the background.
    pub fn delete(&self, name: &str) -> io::Result<()> {
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let trash = self.root.join(format!("{TRASH_PREFIX}{name}-{nanos}"));
        match fs::rename(self.task_dir(name), &trash) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        let remove = move || {
            if let Err(e) = fs::remove_dir_all(&trash) {
                tracing::warn!(dir = %trash.display(), error = %e, "could not delete a forgotten task's directory");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
        Ok(())
    }

    /// Records `intent` before the records it names change.
    pub fn begin(&self, intent: &SetIntent) -> io::Result<()> {
        atomic_file::write_json(&self.root.join(INTENT_FILE), intent, Durability::Atomic)
    }

    /// The change is whole: its intent goes.
    pub fn commit(&self) -> io::Result<()> {
        fs::remove_file(self.root.join(INTENT_FILE))
    }

    /// Undoes a change whose intent is still recorded (a failed write, or a sandlet that died
    /// mid-change): its new tasks are deleted, its removal marks cleared, its intent removed.
    pub fn roll_back(&self) -> io::Result<()> {
        let Some(intent) = atomic_file::read_json::<SetIntent>(&self.root.join(INTENT_FILE))?
        else {
            return Ok(());
        };
        tracing::warn!(created = ?intent.created, marked = ?intent.marked, "undoing a setTasks that was not applied whole");
        for name in &intent.created {
            self.delete(name)?;
        }
        for name in &intent.marked {
            let path = self.task_dir(name).join(RECORD_FILE);
            let Some(mut record) = atomic_file::read_json::<TaskRecord>(&path)? else {
                continue;
            };
            record.removal_requested_at = None;
            if record.stop_cause == Some(StopCause::Removed) {
                record.stop_cause = None;
            }
            self.save(&record, Durability::Atomic)?;
        }
        self.commit()
    }

    /// Every readable sandlet record, in creation order. Anything else is logged and skipped.
    pub fn load_all(&self) -> io::Result<Vec<TaskRecord>> {
        let mut records = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            // Task names never start with '.': those are sandlet's own (probe, trash).
            if !entry.file_type()?.is_dir() || entry.file_name().to_string_lossy().starts_with('.')
            {
                continue;
            }
            let path = entry.path().join(RECORD_FILE);
            match atomic_file::read_json::<TaskRecord>(&path) {
                Ok(Some(r))
                    if r.sandlet_record == FORMAT
                        && entry.file_name().to_str() == Some(r.name.as_str()) =>
                {
                    records.push(r)
                }
                Ok(_) => {
                    tracing::warn!(path = %entry.path().display(), "not a sandlet task directory; left alone")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable task record; left alone")
                }
            }
        }
        records.sort_by_key(|r| r.seq);
        Ok(records)
    }
}

impl TaskRecord {
    pub fn new(seq: u64, name: String, process: Process) -> Self {
        TaskRecord {
            sandlet_record: FORMAT,
            seq,
            name,
            created_at: Utc::now(),
            process,
            removal_requested_at: None,
            stop_cause: None,
            verdict: None,
        }
    }
}
