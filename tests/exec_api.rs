//! The exec API (execd's protocol on its own port) in local mode, over plain HTTP: commands,
//! background commands, interrupts, bash sessions, metrics, the token and bad input.

mod common;

use std::time::{Duration, Instant};

use common::{Sandlet, pid_alive, read_pid, scratch, stream_lines, wait_until};
use serde_json::{Value, json};

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn texts<'a>(events: &'a [Value], kind: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

fn run(s: &Sandlet, body: Value) -> Vec<Value> {
    s.exec_events("/command", &body)
}

/// Runs a background command and returns its id (from `init`).
fn background(s: &Sandlet, command: &str) -> String {
    let events = run(s, json!({"command": command, "background": true}));
    assert_eq!(kinds(&events), ["init", "execution_complete"], "{events:?}");
    events[0]["text"].as_str().unwrap().to_string()
}

fn status(s: &Sandlet, id: &str) -> Value {
    let r = s.exec("GET", &format!("/command/status/{id}"), None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn wait_finished(s: &Sandlet, id: &str) -> Value {
    let mut last = Value::Null;
    wait_until("the command finishes", || {
        last = status(s, id);
        last["running"] == false
    });
    last
}

#[test]
fn foreground_commands_stream_lines_and_end_with_their_exit_code() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let events = run(
        &s,
        json!({
            "command": "echo out; echo err >&2; printf 'a\\n\\nb\\rc'; echo \"$FOO\"; pwd; exit 3",
            "envs": {"FOO": "bar"},
            "cwd": dir.path(),
        }),
    );
    let k = kinds(&events);
    assert_eq!(&k[..2], ["init", "ping"]);
    assert_eq!(*k.last().unwrap(), "error", "{events:?}");
    assert!(
        !k.contains(&"execution_complete"),
        "no complete after an error"
    );
    // Each event is one line with its line ending as written (execd 1.1), an empty line just
    // its ending, a last line without one as it is.
    let cwd_line = format!("{}\n", dir.path().to_string_lossy());
    assert_eq!(
        texts(&events, "stdout"),
        ["out\n", "a\n", "\n", "b\r", "cbar\n", &cwd_line]
    );
    assert_eq!(texts(&events, "stderr"), ["err\n"]);
    let error = &events.last().unwrap()["error"];
    assert_eq!(
        (error["ename"].as_str(), error["evalue"].as_str()),
        (Some("CommandExecError"), Some("3"))
    );
    assert!(events.iter().all(|e| e["timestamp"].as_i64().unwrap() > 0));
    let id = events[0]["text"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    let st = status(&s, id);
    assert_eq!(
        (st["running"].as_bool(), st["exit_code"].as_i64()),
        (Some(false), Some(3))
    );
    assert_eq!(st["error"], "exit status 3");

    let ok = run(&s, json!({"command": "true"}));
    assert_eq!(kinds(&ok), ["init", "ping", "execution_complete"]);

    // A plain command line runs without a shell, found on PATH by sandlet, and is still
    // called by the name it was given (argv[0]), as a shell would call it.
    let argv = run(&s, json!({"command": "cat /proc/self/cmdline"}));
    assert_eq!(stream_lines(&argv, "stdout"), ["cat\0/proc/self/cmdline\0"]);
}

#[test]
fn the_end_is_sent_when_the_command_exits_not_when_a_grandchild_lets_go_of_the_pipe() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let pid_file = dir.path().join("pid");
    let started = Instant::now();
    let events = run(
        &s,
        json!({"command": format!("sleep 1009 & echo $! > {}; echo done", pid_file.display())}),
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the stream waited for the grandchild"
    );
    assert_eq!(*kinds(&events).last().unwrap(), "execution_complete");
    assert_eq!(stream_lines(&events, "stdout"), ["done"]);
    let grandchild = read_pid(&pid_file);
    assert!(
        pid_alive(grandchild),
        "it is not killed either: only timeouts and interrupts kill"
    );
    unsafe { kill(grandchild, 9) };

    // A leftover that writes after the end (more than a pipe holds) is neither blocked nor
    // killed by SIGPIPE: its output is dropped.
    let marker = dir.path().join("written");
    let events = run(
        &s,
        json!({"command": format!(
            "(sleep 0.3; head -c 4000000 /dev/zero; echo ok > {}) & echo started",
            marker.display()
        )}),
    );
    assert_eq!(stream_lines(&events, "stdout"), ["started"]);
    wait_until("the leftover finishes writing", || marker.exists());
}

#[test]
fn a_timeout_kills_the_whole_tree() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let pid_file = dir.path().join("pid");
    let events = run(
        &s,
        json!({
            "command": format!("sh -c 'trap \"\" TERM; sleep 1007' & echo $! > {}; sleep 1008", pid_file.display()),
            "timeout": 300,
        }),
    );
    let error = &events.last().unwrap()["error"];
    assert_eq!(error["evalue"], "-1", "{events:?}");
    assert!(
        error["traceback"][0].as_str().unwrap().contains("killed"),
        "{error}"
    );
    let grandchild = read_pid(&pid_file);
    wait_until("the grandchild is gone", || !pid_alive(grandchild));
}

#[test]
fn background_commands_answer_status_and_logs_from_init_on() {
    let s = Sandlet::start(&[]);
    // Status right after init: registered before init was sent, never a 404.
    let id = background(&s, "echo one; echo two >&2; sleep 0.3; printf three");
    let first = status(&s, &id);
    assert_eq!(first["running"], true, "{first}");
    assert!(first.get("exit_code").is_none() && first.get("finished_at").is_none());
    let done = wait_finished(&s, &id);
    assert_eq!(done["exit_code"], 0, "{done}");
    assert!(done["finished_at"].is_string());

    let logs = s.exec("GET", &format!("/command/{id}/logs?cursor=0"), None, &[]);
    assert_eq!(logs.status, 200);
    assert_eq!(
        logs.text(),
        "one\ntwo\nthree",
        "stdout and stderr in write order"
    );
    let cursor: u64 = logs
        .header("EXECD-COMMANDS-TAIL-CURSOR")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(cursor, 13);
    let again = s.exec(
        "GET",
        &format!("/command/{id}/logs?cursor={cursor}"),
        None,
        &[],
    );
    assert_eq!(again.text(), "");
    assert_eq!(again.header("EXECD-COMMANDS-TAIL-CURSOR"), Some("13"));
    let part = s.exec("GET", &format!("/command/{id}/logs?cursor=4"), None, &[]);
    assert_eq!(part.text(), "two\nthree");
}

#[test]
fn interrupt_stops_the_tree_and_a_client_leaving_does_not() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let pid_file = dir.path().join("pid");
    let id = background(
        &s,
        &format!("sleep 1011 & echo $! > {}; wait", pid_file.display()),
    );
    // The stream of the background command has ended (the client is gone): it still runs.
    let grandchild = read_pid(&pid_file);
    assert_eq!(status(&s, &id)["running"], true);
    let r = s.exec("DELETE", &format!("/command?id={id}"), None, &[]);
    assert_eq!((r.status, r.text()), (200, String::new()));
    let done = wait_finished(&s, &id);
    assert_eq!(done["exit_code"], -1, "{done}");
    assert_eq!(done["error"], "signal: terminated");
    wait_until("the grandchild is gone", || !pid_alive(grandchild));
    let again = s.exec("DELETE", &format!("/command?id={id}"), None, &[]);
    again.assert_error(409, "RUNTIME_ERROR");
}

#[test]
fn sessions_keep_exported_variables_and_the_directory_and_survive_a_runs_children() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let r = s.exec("POST", "/session", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["session_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    let path = format!("/session/{id}/run");
    let cwd = dir.path().to_string_lossy().into_owned();
    let first = s.exec_events(
        &path,
        &json!({"command": format!("export A=\"it's \\$HOME\"; B=not-exported; export C=gone; cd {cwd}; sleep 1012 >/dev/null & echo started")}),
    );
    assert_eq!(first[0]["text"], id.as_str(), "init carries the session id");
    assert_eq!(stream_lines(&first, "stdout"), ["started"]);
    assert_eq!(*kinds(&first).last().unwrap(), "execution_complete");
    let second = s.exec_events(
        &path,
        &json!({"command": "echo \"$A|$B|$C\"; pwd; unset C; echo oops >&2; false; echo EXIT:$?"}),
    );
    assert_eq!(
        stream_lines(&second, "stdout"),
        ["it's $HOME||gone", &cwd, "EXIT:1"]
    );
    assert_eq!(stream_lines(&second, "stderr"), ["oops"]);
    let third = s.exec_events(&path, &json!({"command": "echo \"[$C]\"; exit 7"}));
    assert_eq!(stream_lines(&third, "stdout"), ["[]"], "unset sticks");
    assert_eq!(third.last().unwrap()["error"]["evalue"], "7");
    // A marker line printed by the user is just output.
    let spoof = s.exec_events(
        &path,
        &json!({"command": "printf '\\n__SANDLET_0__\\nX=1\\0\\n/\\n'; echo \"$A\""}),
    );
    assert!(stream_lines(&spoof, "stdout").contains(&"__SANDLET_0__"));
    let after = s.exec_events(&path, &json!({"command": "pwd; echo ${X:-unset}"}));
    assert_eq!(stream_lines(&after, "stdout"), [cwd.as_str(), "unset"]);

    // A run's timeout kills its whole tree.
    let timed = s.exec_events(
        &path,
        &json!({"command": "sleep 1013 & sleep 1014", "timeout": 300}),
    );
    assert_eq!(timed.last().unwrap()["error"]["evalue"], "-1", "{timed:?}");
    wait_until("the run's children are gone", || {
        common::pod::pids().into_iter().all(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).map_or(true, |c| {
                c != b"sleep\x001013\x00" && c != b"sleep\x001014\x00" || !pid_alive(p)
            })
        })
    });

    assert_eq!(
        s.exec("DELETE", &format!("/session/{id}"), None, &[])
            .status,
        200
    );
    s.exec("DELETE", &format!("/session/{id}"), None, &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
    s.exec("POST", &path, Some(&json!({"command": "true"})), &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
}

/// (That a call never waits for a sampling window is the unit tests' `metrics::tests`.)
#[test]
fn metrics_come_from_the_sandboxs_cgroup() {
    let s = Sandlet::start(&[]);
    let r = s.exec("GET", "/metrics", None, &[]);
    let m = r.json();
    assert!(m["cpu_count"].as_f64().unwrap() >= 1.0);
    let pct = m["cpu_used_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{m}");
    let (used, total) = (
        m["mem_used_mib"].as_f64().unwrap(),
        m["mem_total_mib"].as_f64().unwrap(),
    );
    assert!(used > 0.0 && used <= total, "{m}");
    assert!(m["timestamp"].as_i64().unwrap() > 0);
}

#[test]
fn every_route_needs_the_token_when_one_is_set() {
    let dir = scratch();
    let token_file = dir.path().join("exec-token");
    std::fs::write(&token_file, "exec-secret\n").unwrap();
    let s = Sandlet::start(&["--exec-token-file", token_file.to_str().unwrap()]);
    for (method, path) in [("GET", "/ping"), ("GET", "/metrics"), ("GET", "/nope")] {
        let r = s.exec(method, path, None, &[]);
        assert_eq!(r.status, 401, "{path}");
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("X-EXECD-ACCESS-TOKEN")
        );
        let wrong = s.exec(
            method,
            path,
            None,
            &[("X-EXECD-ACCESS-TOKEN", "exec-secre")],
        );
        assert_eq!(wrong.status, 401);
    }
    let ok = s.exec(
        "GET",
        "/ping",
        None,
        &[("x-execd-access-token", "exec-secret")],
    );
    assert_eq!(ok.status, 200);
    assert!(
        !s.stderr().contains("exec-secret"),
        "the token is never logged"
    );
}

#[test]
fn bad_input_gets_execds_codes_and_changes_nothing() {
    let s = Sandlet::start(&["--exec-max-sessions", "1"]);
    let post = |path: &str, body: Value| s.exec("POST", path, Some(&body), &[]);
    post("/command", json!({})).assert_error(400, "INVALID_REQUEST_BODY");
    post("/command", json!({"command": "true", "gid": 5}))
        .assert_error(400, "INVALID_REQUEST_BODY");
    post("/command", json!({"command": "true", "timeout": -1}))
        .assert_error(400, "INVALID_REQUEST_BODY");
    post(
        "/command",
        json!({"command": "true", "cwd": "/no/such/dir"}),
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    post("/command", json!({"command": "true", "cwd": "/etc/passwd"}))
        .assert_error(400, "INVALID_REQUEST_BODY");
    post(
        "/command",
        json!({"command": "true", "cwd": "/$SANDLET_NO_SUCH_VAR"}),
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    post("/command", json!({"command": 5})).assert_error(400, "INVALID_REQUEST_BODY");
    let raw = s.exec("POST", "/command", None, &[]);
    raw.assert_error(400, "INVALID_REQUEST_BODY");
    s.exec("DELETE", "/command", None, &[])
        .assert_error(400, "MISSING_QUERY");
    s.exec("DELETE", "/command?id=nope", None, &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
    s.exec("GET", "/command/status/nope", None, &[])
        .assert_error(404, "INVALID_REQUEST_BODY");
    s.exec("GET", "/command/nope/logs", None, &[])
        .assert_error(404, "INVALID_REQUEST_BODY");
    let fg = run(&s, json!({"command": "true"}));
    let fg_id = fg[0]["text"].as_str().unwrap();
    s.exec("GET", &format!("/command/{fg_id}/logs"), None, &[])
        .assert_error(400, "INVALID_REQUEST_BODY");
    let bg = background(&s, "true");
    s.exec("GET", &format!("/command/{bg}/logs?cursor=-1"), None, &[])
        .assert_error(400, "INVALID_REQUEST_BODY");
    assert_eq!(s.exec("POST", "/session", None, &[]).status, 200);
    s.exec("POST", "/session", None, &[])
        .assert_error(429, "LIMIT_EXCEEDED");
    post("/session", json!({"cwd": 1})).assert_error(400, "INVALID_REQUEST_BODY");
    post("/session/nope/run", json!({"command": "true"})).assert_error(404, "CONTEXT_NOT_FOUND");
    s.exec("DELETE", "/session/nope", None, &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
}

#[test]
fn finished_commands_are_kept_by_count_and_their_output_removed() {
    let s = Sandlet::start(&["--exec-keep-finished", "2"]);
    let exec_dir = {
        let mut d = s.data_dir().into_os_string();
        d.push("-exec");
        std::path::PathBuf::from(d).join("commands")
    };
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let id = background(&s, &format!("echo {i}"));
            wait_finished(&s, &id);
            id
        })
        .collect();
    // The third insert let go of the oldest finished one.
    let gone = s.exec("GET", &format!("/command/status/{}", ids[0]), None, &[]);
    assert_eq!(gone.status, 404);
    assert!(
        !exec_dir.join(&ids[0]).exists(),
        "its output is removed too"
    );
    for id in &ids[1..] {
        assert_eq!(status(&s, id)["exit_code"], 0);
        assert!(exec_dir.join(id).exists());
    }
}

#[test]
#[ignore = "needs the OpenSandbox SDK from PyPI: `./test` installs it and runs every test"]
fn the_real_opensandbox_sdk_drives_the_exec_api() {
    let s = Sandlet::start(&["--exec-token-file", &write_token("sdk-token")]);
    let dir = scratch();
    let cwd = std::fs::canonicalize(dir.path()).unwrap();
    common::run_sdk_checks(
        "sdk_checks.py",
        &s.exec_base,
        &[
            ("SANDLET_EXEC_TOKEN", "sdk-token".into()),
            ("SANDLET_SDK_CWD", cwd.display().to_string()),
        ],
    );
}

fn write_token(token: &str) -> String {
    let dir = std::env::temp_dir().join(format!("sandlet-sdk-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, token).unwrap();
    path.to_string_lossy().into_owned()
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn uid_and_gid_are_applied_with_the_users_home() {
    if !common::root_or_skip("a command as another user") {
        return;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let Some(nobody) = passwd.lines().find(|l| l.starts_with("nobody:")) else {
        eprintln!("skipped: no user nobody in /etc/passwd");
        return;
    };
    let f: Vec<&str> = nobody.split(':').collect();
    let s = Sandlet::start(&[]);
    let events = run(
        &s,
        json!({"command": "id -u; id -g; echo $HOME", "uid": f[2].parse::<u32>().unwrap()}),
    );
    assert_eq!(
        stream_lines(&events, "stdout"),
        [f[2], f[3], f[5]],
        "{events:?}"
    );
    let events = run(
        &s,
        json!({"command": "id -g", "uid": f[2].parse::<u32>().unwrap(), "gid": 4242}),
    );
    assert_eq!(stream_lines(&events, "stdout"), ["4242"]);
}

/// `PPid`, `SigBlk` and `SigIgn` of a command run without a shell, from its own status.
fn parent_and_signal_state(s: &Sandlet) -> (i32, String) {
    let events = run(s, json!({"command": "cat /proc/self/status"}));
    assert_eq!(
        *kinds(&events).last().unwrap(),
        "execution_complete",
        "{events:?}"
    );
    let field = |name: &str| {
        stream_lines(&events, "stdout")
            .into_iter()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {events:?}"))
            .trim()
            .to_string()
    };
    let state = format!("blocked {} ignored {}", field("SigBlk:"), field("SigIgn:"));
    (field("PPid:").parse().unwrap(), state)
}

#[test]
fn shims_serve_command_after_command_cleanly_and_only_once_their_tree_is_gone() {
    let s = Sandlet::start(&[]);
    let clean = "blocked 0000000000000000 ignored 0000000000000000";
    // Sequential commands share a few shims instead of forking one each, and every command
    // starts with the signal state of a fresh process, whatever the shim did for the last one.
    let mut shims = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (shim, state) = parent_and_signal_state(&s);
        assert_eq!(state, clean);
        shims.insert(shim);
    }
    // Up to 4 are kept idle; a command that comes before the last one's shim is back may take
    // another.
    assert!(shims.len() <= 5, "shims were not reused: {shims:?}");
    // Nor does it inherit descriptors: only its standard streams (and `ls`'s own directory).
    let listed = run(&s, json!({"command": "ls /proc/self/fd"}));
    assert_eq!(
        stream_lines(&listed, "stdout"),
        ["0", "1", "2", "3"],
        "{listed:?}"
    );

    // A shim whose command left a grandchild behind serves nothing else until it is gone.
    let dir = scratch();
    let pid_file = dir.path().join("pid");
    let events = run(
        &s,
        json!({"command": format!("sleep 1011 & echo $! > {}; echo $PPID", pid_file.display())}),
    );
    let busy: i32 = stream_lines(&events, "stdout")[0].parse().unwrap();
    let grandchild = read_pid(&pid_file);
    for _ in 0..8 {
        assert_ne!(parent_and_signal_state(&s).0, busy);
    }
    unsafe { kill(grandchild, 9) };
    // Then it goes back to the idle shims, or away if enough are idle: never left behind.
    wait_until("the shim serves again or exits", || {
        parent_and_signal_state(&s).0 == busy || !pid_alive(busy)
    });

    // Idle shims killed from outside cost nothing but a fresh start.
    let sandlet = s.pid();
    let idle = children_of(sandlet);
    for shim in &idle {
        unsafe { kill(*shim, 9) };
    }
    // Dead, not merely signalled: a shim that SIGKILL reaches as it is handed a command may
    // take the command with it (it fails with a message), which is not what is tested here.
    wait_until("the killed shims are gone", || {
        idle.iter().all(|p| !pid_alive(*p))
    });
    let (shim, state) = parent_and_signal_state(&s);
    assert_eq!(state, clean);
    assert!(pid_alive(shim));
    assert!(
        children_of(sandlet).len() <= 5,
        "idle shims are bounded: {:?}",
        children_of(sandlet)
    );
}

fn children_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: i32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == parent && pid_alive(pid)).then_some(pid)
        })
        .collect()
}

/// A command does not outlive the sandlet that ran it, even one killed with SIGKILL: each
/// command's shim sees sandlet's end of its report socket close and kills the whole tree, a
/// grandchild that left the process group included. A restarted sandlet removes the logs.
#[test]
fn commands_do_not_outlive_a_crashed_sandlet() {
    use std::io::Write;
    let mut s = Sandlet::start(&[]);
    let commands = {
        let mut d = s.data_dir().into_os_string();
        d.push("-exec");
        std::path::PathBuf::from(d).join("commands")
    };
    let dir = scratch();
    let file = |name: &str| dir.path().join(name).display().to_string();
    let id = background(
        &s,
        &format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 1000' & echo $$ > {}; exec sleep 1000",
            file("escaped"),
            file("background")
        ),
    );
    // A foreground command whose client is still reading its stream.
    let addr = s.exec_base.trim_start_matches("http://").to_string();
    let body = json!({"command": format!("echo $$ > {}; exec sleep 1000", file("foreground"))})
        .to_string();
    let mut client = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        client,
        "POST /command HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let pids: Vec<i32> = ["background", "escaped", "foreground"]
        .iter()
        .map(|name| read_pid(&dir.path().join(name)))
        .collect();
    assert!(
        commands.join(&id).exists(),
        "a background command has its log"
    );

    s.kill9();
    wait_until("the crashed sandlet's commands are killed", || {
        pids.iter().all(|pid| !pid_alive(*pid))
    });
    s.boot();
    assert!(
        !commands.join(&id).exists(),
        "the restarted sandlet removes the earlier commands' logs"
    );
}
