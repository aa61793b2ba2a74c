//! sandlet killed with SIGKILL and started again on the same data dir: every task is still
//! listed, live processes are re-adopted and later report their real exit, exits that happened
//! while sandlet was down are kept, lost processes are failed with a reason, nothing is re-run.

mod common;

use std::path::Path;

use common::{Sandlet, pid_alive, recv_until, scratch, wait_until};
use serde_json::{Value, json};

fn path_in(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

fn kill(pid: i64) {
    assert_eq!(unsafe { libc_kill(pid as i32, 9) }, 0, "kill {pid}");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn sigkill_and_restart_loses_nothing_and_reruns_nothing() {
    let mut s = Sandlet::start(&[]);
    let dir = scratch();
    let counter = path_in(dir.path(), "starts");
    let release_runs = path_in(dir.path(), "release-runs");
    let release_down = path_in(dir.path(), "release-down");
    let wait_for = |file: &str, code: i32| {
        format!("echo start >> {counter}; while [ ! -e {file} ]; do sleep 0.01; done; exit {code}")
    };
    let r = s.set_tasks(json!([
        {"name": "done", "process": {"command": ["true"]}},
        {"name": "runs", "process": {"command": ["sh", "-c", wait_for(&release_runs, 5)]}},
        {"name": "ends-while-down", "process": {"command": ["sh", "-c", wait_for(&release_down, 7)]}},
        {"name": "lost", "process": {"command": ["sleep", "300"]}},
    ]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_state("done", "terminated");
    let runs_before = s.wait_state("runs", "running");
    s.wait_state("ends-while-down", "running");
    s.wait_state("lost", "running");
    let order_before: Vec<Value> = s.tasks().iter().map(|t| t["name"].clone()).collect();

    s.kill9();
    // While sandlet is down: one task ends normally, one loses its process and its shim.
    std::fs::write(&release_down, "").unwrap();
    let down = s.run_record("ends-while-down");
    wait_until("task ended while sandlet was down", || {
        !pid_alive(down["task"]["pid"].as_i64().unwrap() as i32)
    });
    wait_until("its shim recorded the exit", || {
        s.data_dir().join("ends-while-down/exit.json").exists()
    });
    let lost = s.run_record("lost");
    for process in ["shim", "task"] {
        let pid = lost[process]["pid"].as_i64().unwrap();
        kill(pid);
        wait_until("the killed process is gone", || !pid_alive(pid as i32));
    }
    s.boot();

    let tasks = s.tasks();
    let order_after: Vec<Value> = tasks.iter().map(|t| t["name"].clone()).collect();
    assert_eq!(
        order_after, order_before,
        "every task still listed, in creation order"
    );
    assert_eq!(
        s.task("done").unwrap()["processStatus"]["terminated"]["exitCode"],
        0
    );
    let down = s.task("ends-while-down").unwrap();
    assert_eq!(
        down["processStatus"]["terminated"]["exitCode"], 7,
        "the real exit, recorded while sandlet was down: {down}"
    );
    let lost = s.task("lost").unwrap();
    let lost_term = &lost["processStatus"]["terminated"];
    assert_eq!(lost_term["reason"], "ProcessLost", "{lost}");
    assert_eq!(
        lost_term["exitCode"], -1,
        "never a made-up exit code: {lost}"
    );
    let runs = s.task("runs").unwrap();
    assert_eq!(
        runs["processStatus"]["running"], runs_before["processStatus"]["running"],
        "re-adopted, not restarted"
    );

    // The re-adopted task's real exit is reported when it happens, on the feed too.
    let feed = s.watch();
    recv_until(&feed, |e, _| e == "snapshot");
    std::fs::write(&release_runs, "").unwrap();
    let (_, data) = recv_until(&feed, |e, d| {
        e == "task"
            && d["task"]["name"] == "runs"
            && d["task"]["processStatus"]["terminated"].is_object()
    });
    assert_eq!(
        data["task"]["processStatus"]["terminated"]["exitCode"], 5,
        "{data}"
    );
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().lines().count(),
        2,
        "runs and ends-while-down each started once"
    );

    // Re-adopted trees can still be removed.
    assert_eq!(s.set_tasks(json!([])).status, 200);
    wait_until("all forgotten", || s.tasks().is_empty());
}

#[test]
fn timeout_is_still_enforced_after_a_restart() {
    let mut s = Sandlet::start(&["--stop-grace-seconds", "1"]);
    let r = s.set_tasks(
        json!([{"name": "t", "process": {"command": ["sleep", "300"], "timeoutSeconds": 2}}]),
    );
    assert_eq!(r.status, 200);
    s.wait_state("t", "running");
    let task_pid = s.run_record("t")["task"]["pid"].as_i64().unwrap() as i32;
    s.kill9();
    s.boot();
    let t = s.wait_state("t", "terminated");
    assert_eq!(
        t["processStatus"]["terminated"]["reason"], "TaskTimeout",
        "{t}"
    );
    assert_eq!(t["processStatus"]["terminated"]["signal"], 15, "{t}");
    assert!(!pid_alive(task_pid));
}

#[test]
fn a_task_that_never_reached_a_shim_is_started_by_the_next_sandlet_once() {
    let mut s = Sandlet::start(&[]);
    let dir = scratch();
    let runs = path_in(dir.path(), "runs");
    let r = s.set_tasks(
        json!([{"name": "t", "process": {"command": ["sh", "-c", format!("echo run >> {runs}")]}}]),
    );
    assert_eq!(r.status, 200);
    s.wait_state("t", "terminated");
    s.kill9();
    // As if sandlet had died between writing the record and handing the task to a shim: no
    // launch record, so the task provably never ran.
    for f in ["launch.json", "claim", "run.json", "exit.json"] {
        std::fs::remove_file(s.data_dir().join("t").join(f)).unwrap();
    }
    std::fs::remove_file(&runs).unwrap();
    s.boot();
    let t = s.wait_state("t", "terminated");
    assert_eq!(t["processStatus"]["terminated"]["exitCode"], 0, "{t}");
    s.kill9();
    s.boot();
    assert_eq!(s.task("t").unwrap()["processStatus"], t["processStatus"]);
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "run\n",
        "started by the restarted sandlet, and only once"
    );
}

#[test]
fn a_task_whose_shim_vanished_before_recording_a_start_is_failed_not_run_again() {
    let mut s = Sandlet::start(&[]);
    let dir = scratch();
    let marker = dir.path().join("ran");
    let r = s.set_tasks(json!([{"name": "t", "process": {"command": ["touch", marker]}}]));
    assert_eq!(r.status, 200);
    s.wait_state("t", "terminated");
    s.kill9();
    // As if the shim sandlet handed the task to had died before it recorded anything: the
    // launch record names a shim that is gone.
    for f in ["run.json", "exit.json"] {
        std::fs::remove_file(s.data_dir().join("t").join(f)).unwrap();
    }
    std::fs::remove_file(&marker).unwrap();
    s.boot();
    let t = s.wait_state("t", "terminated");
    assert_eq!(
        t["processStatus"]["terminated"]["reason"], "ShimLost",
        "{t}"
    );
    assert_eq!(t["processStatus"]["terminated"]["exitCode"], -1);
    // The verdict is durable: it reads the same after another restart, and nothing ran.
    s.kill9();
    s.boot();
    assert_eq!(s.task("t").unwrap()["processStatus"], t["processStatus"]);
    assert!(
        !marker.exists(),
        "a task that may have run is never run again"
    );
}

#[test]
fn sigterm_shuts_down_cleanly_and_leaves_tasks_running() {
    let mut s = Sandlet::start(&[]);
    assert_eq!(
        s.set_tasks(json!([{"name": "t", "process": {"command": ["sleep", "300"]}}]))
            .status,
        200
    );
    s.wait_state("t", "running");
    let task_pid = s.run_record("t")["task"]["pid"].as_i64().unwrap() as i32;
    let feed = s.watch();
    recv_until(&feed, |e, _| e == "snapshot");
    let mut child = s.child.take().unwrap();
    assert_eq!(unsafe { libc_kill(child.id() as i32, 15) }, 0);
    let deadline = std::time::Instant::now() + common::DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sandlet did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(status.success(), "{status:?}");
    assert!(pid_alive(task_pid), "tasks outlive a sandlet shutdown");
    s.boot();
    assert!(s.task("t").unwrap()["processStatus"]["running"].is_object());
}
