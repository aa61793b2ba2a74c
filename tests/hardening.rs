//! What a hostile or careless client, a bad flag or a crash at the wrong moment must not cost:
//! a task, an exit code, the server, or its memory and descriptors. Each test here failed on the
//! sandlet it was written against (the defect it guards is named in its doc comment).

mod common;

use common::{Sandlet, pid_alive, wait_until};
use serde_json::json;

/// Defect 1: a timeout near the largest 64-bit integer overflowed `Instant + Duration`, which
/// panicked and took both APIs down; the stored task made every restart panic again.
#[test]
fn a_timeout_beyond_the_clock_neither_crashes_sandlet_nor_its_restart() {
    let mut s = Sandlet::start(&[]);
    for timeout in [i64::MAX, i64::MAX - 1_000_000] {
        let name = format!("t{}", timeout % 7);
        let r = s.post_json(
            "/tasks",
            &json!({"name": name, "process": {"command": ["sleep", "300"], "timeoutSeconds": timeout}}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        s.wait_state(&name, "running");
    }
    // A command's timeout in milliseconds, the exec API's, as large as it gets.
    let events = s.exec_events(
        "/command",
        &json!({"command": "exit 0", "timeout": i64::MAX}),
    );
    assert!(
        events.iter().any(|e| e["type"] == "execution_complete"),
        "{events:?}"
    );
    let pid = s.pid();
    assert!(pid_alive(pid), "sandlet is still running");
    assert_eq!(s.get("/health").status, 200);

    s.kill9();
    s.boot();
    for task in s.tasks() {
        assert!(
            task["processStatus"]["running"].is_object(),
            "re-adopted after the restart, still running: {task}"
        );
    }
}

/// Defect 2: a task whose process ended while sandlet was down, and whose shim had not recorded
/// the exit yet (it was stopped), was failed as `ProcessLost`; the shim then wrote the real exit
/// code, which was never reported. A recovered task whose shim lives waits for its record.
#[test]
fn an_exit_recorded_late_by_a_stopped_shim_is_reported_after_a_restart() {
    let mut s = Sandlet::start(&[]);
    let dir = common::scratch();
    let release = dir.path().join("release");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.01; done; exit 42",
        release.display()
    );
    let r = s.set_tasks(json!([{"name": "t", "process": {"command": ["sh", "-c", script]}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_state("t", "running");
    let run = s.run_record("t");
    let (shim, task) = (pid_of(&run, "shim"), pid_of(&run, "task"));

    s.kill9();
    signal(shim, libc::SIGSTOP);
    std::fs::write(&release, "").unwrap();
    wait_until("the task exited (unreaped: its shim is stopped)", || {
        !pid_alive(task)
    });
    s.boot();
    let t = s.task("t").unwrap();
    assert!(
        t["processStatus"]["running"].is_object(),
        "while its shim lives, the task's ending is awaited, not guessed: {t}"
    );
    signal(shim, libc::SIGCONT);
    let t = s.wait_state("t", "terminated");
    assert_eq!(t["processStatus"]["terminated"]["exitCode"], 42, "{t}");
    assert_eq!(t["processStatus"]["terminated"]["reason"], "Failed", "{t}");
}

fn pid_of(run: &serde_json::Value, process: &str) -> i32 {
    run[process]["pid"].as_i64().unwrap() as i32
}

fn signal(pid: i32, signal: i32) {
    assert_eq!(
        unsafe { libc::kill(pid, signal) },
        0,
        "kill({pid}, {signal})"
    );
}

/// Defect 4: with the exec API's token in `EXECD_ACCESS_TOKEN`, every command and task saw it
/// in its environment. Neither of sandlet's tokens reaches a process it starts.
#[test]
fn no_process_sandlet_starts_sees_its_tokens() {
    const EXEC_TOKEN: &str = "exec-secret-4c1f";
    const TASK_TOKEN: &str = "task-secret-9b2e";
    let secrets = common::scratch();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, format!("{TASK_TOKEN}\n")).unwrap();
    let token_file_arg = token_file.to_string_lossy().into_owned();
    let mut s = Sandlet::start_as(&["--token-file", &token_file_arg], || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sandlet"));
        command.env("EXECD_ACCESS_TOKEN", EXEC_TOKEN);
        command
    });
    s.token = Some(TASK_TOKEN.into());
    let exec_auth = [("X-EXECD-ACCESS-TOKEN", EXEC_TOKEN)];
    let leaks = |what: &str, output: &str| {
        for secret in [EXEC_TOKEN, TASK_TOKEN] {
            assert!(!output.contains(secret), "{what} sees a token: {output}");
        }
        assert!(
            output.contains("PATH="),
            "{what} printed its environment: {output}"
        );
    };

    let r = s.set_tasks(json!([{"name": "t", "process": {"command": ["env"]}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_state("t", "terminated");
    leaks("a task", &s.get("/tasks/t/logs").text());

    let r = s.exec(
        "POST",
        "/command",
        Some(&json!({"command": "env"})),
        &exec_auth,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    leaks("a command", &r.text());

    let session = s.exec("POST", "/session", None, &exec_auth).json()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s.exec(
        "POST",
        &format!("/session/{session}/run"),
        Some(&json!({"command": "env"})),
        &exec_auth,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    leaks("a bash session", &r.text());
    // The token still works where it is meant to.
    assert_eq!(s.exec("GET", "/ping", None, &exec_auth).status, 200);
    assert_eq!(s.exec("GET", "/ping", None, &[]).status, 401);
}
