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

/// A raw connection to one of sandlet's APIs (`base` is `http://host:port`).
fn connect(base: &str) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    stream
}

/// Whether the server closes `conn` before the test's deadline; `between` runs between reads
/// (a client that keeps trickling bytes). What the server sends first is read and dropped.
fn closed_by_server(
    conn: &mut std::net::TcpStream,
    mut between: impl FnMut(&mut std::net::TcpStream) -> std::io::Result<()>,
) -> bool {
    use std::io::Read;
    let deadline = std::time::Instant::now() + common::DEADLINE;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
        if between(conn).is_err() {
            return true;
        }
    }
    false
}

/// Defect 8: a client sending its request head a byte at a time was never dropped, and an idle
/// keep-alive connection was never closed: each held a connection (and a descriptor) forever.
#[test]
fn slow_and_idle_clients_are_dropped() {
    use std::io::Write;
    let s = Sandlet::start(&["--http-header-timeout-seconds", "1"]);
    for base in [&s.base, &s.exec_base] {
        let mut trickling = connect(base);
        trickling
            .write_all(b"GET /ping HTTP/1.1\r\nHost: sandlet\r\n")
            .unwrap();
        assert!(
            closed_by_server(&mut trickling, |c| c.write_all(b"X")),
            "{base}: a head that never ends is cut off"
        );
        let mut idle = connect(base);
        idle.write_all(b"GET /ping HTTP/1.1\r\nHost: sandlet\r\n\r\n")
            .unwrap();
        assert!(
            closed_by_server(&mut idle, |_| Ok(())),
            "{base}: an idle keep-alive connection is closed"
        );
    }
}

/// Defect 8: a request declaring a body over the limit got no 413 until the bytes arrived.
#[test]
fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    use std::io::{Read, Write};
    let s = Sandlet::start(&["--exec-max-upload-bytes", "1000"]);
    let cases = [
        (&s.base, "/setTasks", "PayloadTooLarge"),
        (&s.exec_base, "/command", "LIMIT_EXCEEDED"),
        (&s.exec_base, "/files/upload", "LIMIT_EXCEEDED"),
    ];
    for (base, path, code) in cases {
        let mut conn = connect(base);
        write!(
            conn,
            "POST {path} HTTP/1.1\r\nHost: sandlet\r\nContent-Type: application/json\r\n\
             Content-Length: 10000000000\r\n\r\n"
        )
        .unwrap();
        let mut answer = Vec::new();
        let deadline = std::time::Instant::now() + common::DEADLINE;
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains(code) {
            assert!(std::time::Instant::now() < deadline, "{path}: no answer");
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 413") && answer.contains(code),
            "{path}: {answer}"
        );
    }
}

/// Defect 9: the same bad input got a 500 on one route, a 200 with an error event on another,
/// and a 200 then `StartFailed` on a third. A NUL byte where the kernel needs a C string is a
/// 400 with `{"code","message"}` everywhere, and nothing is applied.
#[test]
fn a_nul_byte_is_a_400_on_every_route() {
    let s = Sandlet::start(&[]);
    let session = s.exec("POST", "/session", None, &[]).json()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let run = format!("/session/{session}/run");
    let bodies = [
        ("/command", json!({"command": "echo a\u{0}b"})),
        ("/command", json!({"command": "true", "cwd": "/tm\u{0}p"})),
        (run.as_str(), json!({"command": "echo a\u{0}b"})),
        (run.as_str(), json!({"command": "true", "cwd": "/tm\u{0}p"})),
        ("/session", json!({"cwd": "/tm\u{0}p"})),
        ("/pty", json!({"cwd": "/tm\u{0}p"})),
    ];
    for (path, body) in bodies {
        s.exec("POST", path, Some(&body), &[])
            .assert_error(400, "INVALID_REQUEST_BODY");
    }
    s.exec("GET", "/files/search?path=/tmp&pattern=a%00", None, &[])
        .assert_error(400, "INVALID_REQUEST_BODY");
    // Likewise (uid_t)-1, which the kernel reads as "no user" (it was a 200 with an error event).
    s.exec(
        "POST",
        "/command",
        Some(&json!({"command": "id", "uid": u32::MAX})),
        &[],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");

    let before = s.snapshot();
    let r = s.set_tasks(
        json!([{"name": "w", "process": {"command": ["true"], "workingDir": "/tm\u{0}p"}}]),
    );
    r.assert_error(400, "InvalidTask");
    s.assert_nothing_lost(&before, "a workingDir with NUL");
}

/// Defect 9: with a token set, the task API answered unknown routes and wrong methods without
/// asking for it (the exec API asks): a caller without the token learns nothing.
#[test]
fn the_task_api_asks_for_its_token_on_unknown_routes_and_methods_too() {
    let s = Sandlet::start_with(&[], Some("secret-token"));
    for (method, path) in [
        ("GET", "/no-such-route"),
        ("DELETE", "/setTasks"),
        ("PUT", "/tasks/x"),
    ] {
        s.call_with_token(method, path, Some("wrong"))
            .assert_error(401, "Unauthorized");
    }
    // With the token, they are what they are.
    s.call("GET", "/no-such-route", None)
        .assert_error(404, "NotFound");
    s.call("DELETE", "/setTasks", None)
        .assert_error(405, "MethodNotAllowed");
    // The probes stay open.
    assert_eq!(
        s.call_with_token("GET", "/health", Some("wrong")).status,
        200
    );
}

/// Defect 9: a download of a kernel pseudo-file declared its `st_size` (0 for /proc) as
/// Content-Length and then sent something else (here: nothing). It is sent whole, as read.
#[test]
fn a_pseudo_file_downloads_whole() {
    let s = Sandlet::start(&[]);
    let r = s.exec("GET", "/files/download?path=/proc/version", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = std::fs::read("/proc/version").unwrap();
    assert!(!expected.is_empty());
    assert_eq!(r.body, expected);
    assert_eq!(
        r.header("content-length"),
        None,
        "its length is not known in advance"
    );
}
