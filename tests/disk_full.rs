//! A full data dir costs output, never a running task or its exit status.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Sandlet, wait_until};
use serde_json::json;

/// A small tmpfs, unmounted when dropped (after the sandlet using it, declared later).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs at {}", at.display());
        SmallDisk(at.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_costs_output_not_the_task_or_its_exit() {
    if !common::root_or_skip("a small tmpfs as the data dir") {
        return;
    }
    let mut disk = None;
    let s = Sandlet::start_prepared(&[], None, |dir| disk = Some(SmallDisk::mount(dir, "512k")));
    let _disk = disk.unwrap();
    let r = s.set_tasks(json!([{"name": "loud", "process": {"command": ["sh", "-c", "head -c 3000000 /dev/zero; exit 3"]}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = s.wait_state("loud", "terminated");
    let term = &t["processStatus"]["terminated"];
    assert_eq!(
        term["exitCode"], 3,
        "the real exit, though the disk filled up: {t}"
    );
    assert_eq!(term["reason"], "Failed", "{t}");
    let kept = s.get("/tasks/loud/logs?limit=4194304");
    assert!(
        !kept.body.is_empty() && kept.body.len() < 512 * 1024,
        "what fitted was kept: {} bytes",
        kept.body.len()
    );

    // The disk is full: a new task is refused whole, and the running state is untouched.
    let before = s.snapshot();
    let r = s.set_tasks(json!([
        {"name": "loud", "process": {"command": ["sh", "-c", "head -c 3000000 /dev/zero; exit 3"]}},
        {"name": "next", "process": {"command": ["true"]}},
    ]));
    if r.status != 200 {
        r.assert_error(500, "StorageFailed");
        s.assert_nothing_lost(&before, "a setTasks on a full disk");
    }
    // Removing tasks frees the disk, after which new tasks start again.
    assert_eq!(s.set_tasks(json!([])).status, 200);
    wait_until("all forgotten", || s.tasks().is_empty());
    let r = s.set_tasks(json!([{"name": "after", "process": {"command": ["true"]}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.wait_state("after", "terminated")["processStatus"]["terminated"]["exitCode"],
        0
    );
}
