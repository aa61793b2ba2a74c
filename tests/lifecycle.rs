//! A task's life through the real binary: exit codes, signals, output, environment, working
//! directory, timeouts and stops that take the whole tree.

mod common;

use common::{Sandlet, pid_alive, read_pid, scratch, wait_until};
use serde_json::{Value, json};

fn task(name: &str, command: &[&str]) -> Value {
    json!({"name": name, "process": {"command": command}})
}

fn terminated(t: &Value) -> &Value {
    &t["processStatus"]["terminated"]
}

#[test]
fn exit_codes_and_signals_are_reported_exactly() {
    let s = Sandlet::start(&[]);
    let r = s.set_tasks(json!([
        task("ok", &["true"]),
        task("three", &["sh", "-c", "exit 3"]),
        task("killed", &["sh", "-c", "kill -9 $$"]),
        task("termed", &["sh", "-c", "kill -TERM $$"]),
        task("missing", &["/no/such/program"]),
    ]));
    assert_eq!(r.status, 200, "{}", r.text());

    let ok = s.wait_state("ok", "terminated");
    assert_eq!(terminated(&ok)["exitCode"], 0);
    assert_eq!(terminated(&ok)["reason"], "Succeeded");
    assert!(terminated(&ok).get("signal").is_none());

    let three = s.wait_state("three", "terminated");
    assert_eq!(
        (
            terminated(&three)["exitCode"].as_i64(),
            terminated(&three)["reason"].as_str()
        ),
        (Some(3), Some("Failed"))
    );

    for (name, signal) in [("killed", 9), ("termed", 15)] {
        let t = s.wait_state(name, "terminated");
        let term = terminated(&t);
        assert_eq!(term["signal"], signal, "{t}");
        assert_eq!(term["exitCode"], 128 + signal, "{t}");
        assert_eq!(term["reason"], "Killed", "{t}");
    }

    let missing = s.wait_state("missing", "terminated");
    assert_eq!(terminated(&missing)["exitCode"], -1);
    assert_eq!(terminated(&missing)["reason"], "StartFailed");
    assert!(
        terminated(&missing)["message"]
            .as_str()
            .unwrap()
            .contains("/no/such/program"),
        "{missing}"
    );
    for t in [&ok, &three] {
        assert!(
            terminated(t)["startedAt"].is_string() && terminated(t)["finishedAt"].is_string(),
            "{t}"
        );
    }
}

#[test]
fn output_env_and_working_dir() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let script = "echo out:$TASK_VAR:$SANDLET_TEST_INHERITED; echo err >&2; pwd";
    let r = s.set_tasks(json!([{
        "name": "env",
        "process": {
            "command": ["sh", "-c"], "args": [script],
            "env": [{"name": "TASK_VAR", "value": "from-task"}],
            "workingDir": dir.path(),
        }
    }]));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = s.wait_state("env", "terminated");
    assert_eq!(terminated(&t)["exitCode"], 0, "{t}");
    let out = s.get("/tasks/env/logs");
    assert_eq!(out.status, 200);
    // SANDLET_TEST_INHERITED is not set for sandlet, so it expands empty: env is sandlet's + the task's.
    assert_eq!(
        out.text(),
        format!("out:from-task:\n{}\n", dir.path().display())
    );
    assert_eq!(out.header("x-log-complete"), Some("true"));
    let err = s.get("/tasks/env/logs?stream=stderr");
    assert_eq!(err.text(), "err\n");
}

#[test]
fn a_requested_user_is_resolved_in_local_mode_too() {
    if !common::root_or_skip("a task as another user") {
        return;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let Some(nobody) = passwd.lines().find(|l| l.starts_with("nobody:")) else {
        eprintln!("skipped: no user nobody in /etc/passwd");
        return;
    };
    let fields: Vec<&str> = nobody.split(':').collect();
    let s = Sandlet::start(&[]);
    let r = s.set_tasks(json!([
        {"name": "nobody", "process": {"command": ["sh", "-c", "id -u; id -g; echo $HOME $USER"], "user": "nobody"}},
        {"name": "ghost", "process": {"command": ["true"], "user": "no-such-user-here"}},
    ]));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = s.wait_state("nobody", "terminated");
    assert_eq!(terminated(&t)["exitCode"], 0, "{t}");
    assert_eq!(
        s.get("/tasks/nobody/logs").text(),
        format!("{}\n{}\n{} nobody\n", fields[2], fields[3], fields[5])
    );
    let t = s.wait_state("ghost", "terminated");
    assert_eq!(terminated(&t)["reason"], "StartFailed", "{t}");
    assert!(
        terminated(&t)["message"]
            .as_str()
            .unwrap()
            .contains("no-such-user-here"),
        "{t}"
    );
}

#[test]
fn timeout_kills_the_whole_tree_including_a_grandchild_that_ignores_term() {
    let s = Sandlet::start(&["--stop-grace-seconds", "1"]);
    let dir = scratch();
    let grandchild = dir.path().join("grandchild.pid");
    let escaped = dir.path().join("escaped.pid");
    // A grandchild that ignores TERM, and one that left the process group with setsid.
    let script = format!(
        "trap '' TERM; (trap '' TERM; echo $(sh -c 'echo $PPID') > {g}; exec sleep 300) & setsid sh -c 'echo $$ > {e}; exec sleep 300' & wait",
        g = grandchild.display(),
        e = escaped.display()
    );
    let r = s.set_tasks(json!([{"name": "slow", "process": {"command": ["sh", "-c", script], "timeoutSeconds": 1}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    let (g, e) = (read_pid(&grandchild), read_pid(&escaped));
    assert!(pid_alive(g) && pid_alive(e));
    let t = s.wait_state("slow", "terminated");
    let term = terminated(&t);
    assert_eq!(term["reason"], "TaskTimeout", "{t}");
    assert_eq!(term["signal"], 9, "TERM was ignored, so KILL ended it: {t}");
    assert!(
        term["message"]
            .as_str()
            .unwrap()
            .contains("timeout of 1 seconds"),
        "{t}"
    );
    wait_until("grandchildren killed", || !pid_alive(g) && !pid_alive(e));
}

#[test]
fn removing_a_task_stops_its_tree_then_forgets_it() {
    let s = Sandlet::start(&["--stop-grace-seconds", "5"]);
    let dir = scratch();
    let child = dir.path().join("child.pid");
    let script = format!("sleep 300 & echo $! > {}; wait", child.display());
    assert_eq!(
        s.set_tasks(json!([{"name": "long", "process": {"command": ["sh", "-c", script]}}]))
            .status,
        200
    );
    s.wait_state("long", "running");
    let c = read_pid(&child);
    let r = s.set_tasks(json!([]));
    assert_eq!(r.status, 200);
    // Still listed while it stops, marked for deletion, as the Go controller expects.
    if let Some(t) = r.json().as_array().unwrap().first() {
        assert!(t["deletionTimestamp"].is_string(), "{t}");
    }
    s.wait_gone("long");
    assert!(!pid_alive(c), "the task's child was killed with it");
    assert!(
        !s.data_dir().join("long").exists(),
        "its directory is removed once forgotten"
    );
    assert!(s.tasks().is_empty());
}

#[test]
fn a_spare_shim_killed_while_idle_does_not_fail_the_next_task() {
    let s = Sandlet::start(&[]);
    // The first start leaves a spare shim waiting for the next task.
    assert_eq!(s.set_tasks(json!([task("first", &["true"])])).status, 200);
    s.wait_state("first", "terminated");
    let idle_shims = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let parent = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
                let child_of_sandlet = parent.is_some_and(|st| {
                    st.rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().nth(1))
                        == Some(&s.pid().to_string())
                });
                let is_shim = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.starts_with(b"sandlet-shim"));
                child_of_sandlet && is_shim && !has_children(*pid)
            })
            .collect::<Vec<_>>()
    };
    wait_until("a spare shim is waiting", || !idle_shims().is_empty());
    let killed = idle_shims();
    for &pid in &killed {
        unsafe { kill(pid, 9) };
    }
    // Dead, not dying: a shim that still holds its spec pipe would accept the next spec.
    wait_until("the killed shims are dead", || {
        killed.iter().all(|&p| !pid_alive(p))
    });
    assert_eq!(
        s.set_tasks(json!([
            task("first", &["true"]),
            task("second", &["sh", "-c", "exit 6"])
        ]))
        .status,
        200
    );
    let t = s.wait_state("second", "terminated");
    assert_eq!(
        terminated(&t)["exitCode"],
        6,
        "started by a fresh shim: {t}"
    );
}

/// Whether a process has children (its main thread's `children` list is not empty).
fn has_children(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .is_ok_and(|c| !c.trim().is_empty())
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn a_client_that_hangs_up_mid_request_does_not_leave_a_start_half_done() {
    use std::io::Write;
    let s = Sandlet::start(&[]);
    let addr = s.base.trim_start_matches("http://").to_string();
    for i in 0..40 {
        let body = task(&format!("t{i}"), &["sh", "-c", "exit 5"]).to_string();
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            conn,
            "POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Gone before the answer: the request may be dropped whole, or applied whole.
        if i % 2 == 0 {
            std::thread::sleep(std::time::Duration::from_micros(300));
        }
        drop(conn);
    }
    // Whatever was created runs to its real end; nothing stays half started.
    wait_until("every created task ended", || {
        s.tasks().iter().all(|t| terminated(t)["exitCode"] == 5)
    });
    assert!(
        !s.tasks().is_empty(),
        "some requests were applied, or the test proves nothing"
    );
}
