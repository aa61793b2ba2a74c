//! Code interpreting (`/code*`) on a real Jupyter server with real kernels (ipykernel,
//! bash_kernel, matplotlib from PyPI in `.ci/jupytervenv`, which `./test` makes), driven by the
//! real code-interpreter SDK and over plain HTTP: contexts, events, interrupts, deadlines,
//! limits, a Jupyter or a kernel that dies, Jupyter not installed, and an external
//! `JUPYTER_HOST`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::jupyter::{self, DEADLINE as JUPYTER_DEADLINE};
use common::{Sandlet, free_port, scratch, wait_until};
use serde_json::{Value, json};

/// sandlet managing a Jupyter of `jupyter` on a free port, which its commands see as
/// `JUPYTER_PORT` (so the SDK's health check looks there).
fn sandlet_with_jupyter(jupyter: &str, args: &[&str]) -> (Sandlet, u16) {
    let port = free_port();
    let mut all = vec!["--jupyter-command", jupyter];
    all.extend_from_slice(args);
    let s = Sandlet::start_as(&all, move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandlet"));
        cmd.env("JUPYTER_PORT", port.to_string());
        cmd
    });
    (s, port)
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn run(s: &Sandlet, body: Value) -> Vec<Value> {
    s.exec_events("/code", &body)
}

fn python(s: &Sandlet, code: &str, context: &str) -> Vec<Value> {
    run(
        s,
        json!({"code": code, "context": {"language": "python", "id": context}}),
    )
}

fn create_context(s: &Sandlet, language: &str) -> String {
    let r = s.exec(
        "POST",
        "/code/context",
        Some(&json!({"language": language})),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn result_text(events: &[Value]) -> Option<&str> {
    events
        .iter()
        .find(|e| e["type"] == "result")
        .and_then(|e| e["results"]["text"].as_str())
}

fn error_of(events: &[Value]) -> Option<&Value> {
    events
        .iter()
        .find(|e| e["type"] == "error")
        .map(|e| &e["error"])
}

/// Runs `code` until a run gives `want` as its result, up to the Jupyter deadline; returns
/// the runs that did not.
fn run_until_result(s: &Sandlet, body: &Value, want: &str) -> Vec<Vec<Value>> {
    let deadline = Instant::now() + JUPYTER_DEADLINE;
    let mut failed = Vec::new();
    loop {
        let events = run(s, body.clone());
        if result_text(&events) == Some(want) {
            return failed;
        }
        assert!(
            Instant::now() < deadline,
            "no run gave {want} within {JUPYTER_DEADLINE:?}; the runs: {failed:?} {events:?}"
        );
        failed.push(events);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pids_with_cmdline(part: &str) -> Vec<i32> {
    common::pod::pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(part)
            })
        })
        .collect()
}

#[test]
#[ignore = "needs Jupyter from PyPI: `./test` installs it and runs every test"]
fn the_code_interpreter_sdk_drives_contexts_runs_and_interrupts() {
    let jupyter = jupyter::server_program();
    let (s, _) = sandlet_with_jupyter(&jupyter, &[]);
    common::run_sdk_checks("code_checks.py", &s.exec_base, &[]);
}

#[test]
#[ignore = "needs Jupyter from PyPI: `./test` installs it and runs every test"]
fn a_jupyter_that_dies_is_an_error_event_and_the_next_runs_start_a_new_one() {
    let jupyter = jupyter::server_program();
    let (s, port) = sandlet_with_jupyter(&jupyter, &[]);
    let context = create_context(&s, "python");
    let events = python(&s, "x = 6\nx * 7", &context);
    assert_eq!(result_text(&events), Some("42"), "{events:?}");
    let server = pids_with_cmdline(&format!("--ServerApp.port={port}"));
    assert_eq!(server.len(), 1, "one managed Jupyter: {server:?}");
    let kernels_before = pids_with_cmdline("ipykernel_launcher");
    unsafe { kill(server[0], 9) };

    let failed = run_until_result(
        &s,
        &json!({"code": "1 + 1", "context": {"language": "python", "id": context}}),
        "2",
    );
    let first = failed
        .first()
        .expect("the first run after the death failed");
    assert_eq!(&kinds(first)[..2], ["init", "ping"]);
    let error = error_of(first).unwrap_or_else(|| panic!("an error event: {first:?}"));
    assert!(
        ["JupyterUnavailable", "KernelConnectionLost"].contains(&error["ename"].as_str().unwrap()),
        "{error}"
    );
    assert!(
        !error["evalue"].as_str().unwrap().is_empty(),
        "the error says what happened: {error}"
    );
    // A new kernel: the old state is gone, as the error said.
    let events = python(&s, "x", &context);
    assert_eq!(
        error_of(&events).unwrap()["ename"],
        "NameError",
        "{events:?}"
    );
    // The old kernel went with its server, not left behind as an orphan.
    for pid in kernels_before {
        wait_until("the dead server's kernel is gone", || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        });
    }
}

#[test]
#[ignore = "needs Jupyter from PyPI: `./test` installs it and runs every test"]
fn a_kernel_that_dies_is_an_error_event_and_the_next_run_gets_a_fresh_kernel() {
    let jupyter = jupyter::server_program();
    let (s, _) = sandlet_with_jupyter(&jupyter, &[]);
    let context = create_context(&s, "python");
    let events = python(&s, "import os\nos._exit(1)", &context);
    let error = error_of(&events).unwrap_or_else(|| panic!("an error event: {events:?}"));
    assert!(
        ["KernelDied", "KernelConnectionLost"].contains(&error["ename"].as_str().unwrap()),
        "{error}"
    );
    let events = python(&s, "y = 5\ny * 2", &context);
    assert_eq!(result_text(&events), Some("10"), "{events:?}");
    assert_eq!(
        kinds(&events).last(),
        Some(&"execution_complete"),
        "{events:?}"
    );
}

#[test]
#[ignore = "needs Jupyter from PyPI: `./test` installs it and runs every test"]
fn runs_have_deadlines_contexts_run_at_once_within_a_limit_and_idle_ones_go() {
    let jupyter = jupyter::server_program();
    let (s, _) = sandlet_with_jupyter(
        &jupyter,
        &[
            "--code-max-contexts",
            "2",
            "--code-context-idle-seconds",
            "5",
        ],
    );
    let a = create_context(&s, "python");
    let b = create_context(&s, "python");
    let refused = s.exec(
        "POST",
        "/code/context",
        Some(&json!({"language": "python"})),
        &[],
    );
    refused.assert_error(429, "LIMIT_EXCEEDED");

    // A waits for a file that only B creates: both end only if they run at once.
    let dir = scratch();
    let flag = dir.path().join("flag");
    let wait = format!(
        "import os, time\nwhile not os.path.exists({flag:?}): time.sleep(0.01)\n'seen'",
        flag = flag.display().to_string()
    );
    let exec_base = s.exec_base.clone();
    let a2 = a.clone();
    let waiter = std::thread::spawn(move || {
        let body =
            json!({"code": wait, "context": {"language": "python", "id": a2}, "timeout": 60000});
        ureq::post(format!("{exec_base}/code"))
            .send_json(&body)
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    });
    let events = python(
        &s,
        &format!("open({:?}, 'w').close()", flag.display().to_string()),
        &b,
    );
    assert_eq!(kinds(&events).last(), Some(&"execution_complete"));
    let waited = common::sse_events(&waiter.join().unwrap());
    assert_eq!(result_text(&waited), Some("'seen'"), "{waited:?}");

    // A run past its deadline is interrupted, and says so; the context goes on.
    let events = run(
        &s,
        json!({"code": "while True: pass", "context": {"language": "python", "id": a}, "timeout": 500}),
    );
    let error = error_of(&events).unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(error["ename"], "TimeoutError", "{error}");
    assert!(
        !kinds(&events).contains(&"execution_complete"),
        "{events:?}"
    );
    assert_eq!(result_text(&python(&s, "3 * 3", &a)), Some("9"));

    wait_until("idle contexts are removed", || {
        let r = s.exec("GET", "/code/contexts", None, &[]);
        r.json() == json!([])
    });
    let gone = s.exec("GET", &format!("/code/contexts/{a}"), None, &[]);
    gone.assert_error(404, "CONTEXT_NOT_FOUND");
}

#[test]
fn without_jupyter_installed_runs_end_with_an_error_event_saying_so() {
    let port = free_port();
    let s = Sandlet::start_as(
        &["--jupyter-command", "/nonexistent/jupyter-server"],
        move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandlet"));
            cmd.env("JUPYTER_PORT", port.to_string());
            cmd
        },
    );
    let events = run(
        &s,
        json!({"code": "1 + 1", "context": {"language": "python"}}),
    );
    assert_eq!(kinds(&events), ["init", "ping", "error"], "{events:?}");
    let error = &events[2]["error"];
    assert_eq!(error["ename"], "JupyterNotInstalled", "{error}");
    assert!(
        error["evalue"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/jupyter-server"),
        "{error}"
    );
    let r = s.exec(
        "POST",
        "/code/context",
        Some(&json!({"language": "bash"})),
        &[],
    );
    r.assert_error(503, "UNAVAILABLE");
    // Nothing pretends to be Jupyter on its port, so the SDK's health check tells the truth.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    // Bad input gets its answer without Jupyter too.
    let r = s.exec(
        "POST",
        "/code",
        Some(&json!({"code": "1", "context": {"language": "cobol"}})),
        &[],
    );
    r.assert_error(400, "INVALID_REQUEST_BODY");
    let r = s.exec(
        "POST",
        "/code",
        Some(&json!({"code": "1", "context": {"language": "python", "id": "nope"}})),
        &[],
    );
    r.assert_error(404, "CONTEXT_NOT_FOUND");
    let r = s.exec(
        "POST",
        "/code",
        Some(&json!({"context": {"language": "python"}})),
        &[],
    );
    r.assert_error(400, "INVALID_REQUEST_BODY");
    let r = s.exec("DELETE", "/code/contexts", None, &[]);
    r.assert_error(400, "MISSING_QUERY");
    let r = s.exec("GET", "/code/contexts?language=command", None, &[]);
    r.assert_error(400, "INVALID_REQUEST_BODY");
    s.exec("DELETE", "/code/contexts/nope", None, &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
    // An empty language is a shell command, as in execd (its lines keep their endings).
    let events = run(&s, json!({"code": "echo from-shell", "context": {}}));
    assert_eq!(
        events.iter().find(|e| e["type"] == "stdout").unwrap()["text"],
        "from-shell\n"
    );
}

#[test]
#[ignore = "needs Jupyter from PyPI: `./test` installs it and runs every test"]
fn an_external_jupyter_host_is_used_and_its_restart_is_an_error_event() {
    let jupyter = jupyter::server_program();
    let port = free_port();
    let token = "external-token";
    let host = format!("http://127.0.0.1:{port}");
    let s = Sandlet::start_as(&[], {
        let host = host.clone();
        move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandlet"));
            cmd.env("JUPYTER_HOST", &host).env("JUPYTER_TOKEN", token);
            cmd
        }
    });
    let marker = s.data_dir();
    let server = jupyter::External::start(&jupyter, port, token, &marker);
    let events = run(
        &s,
        json!({"code": "v = 20\nv + 1", "context": {"language": "python"}}),
    );
    assert_eq!(result_text(&events), Some("21"), "{events:?}");
    drop(server);

    let events = run(&s, json!({"code": "v", "context": {"language": "python"}}));
    let error = error_of(&events).unwrap_or_else(|| panic!("an error event: {events:?}"));
    assert!(
        ["JupyterUnavailable", "KernelConnectionLost"].contains(&error["ename"].as_str().unwrap()),
        "{error}"
    );
    let _server = jupyter::External::start(&jupyter, port, token, &marker);
    run_until_result(
        &s,
        &json!({"code": "v = 1\nv + 1", "context": {"language": "python"}}),
        "2",
    );
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// The main container's image for the sidecar test: busybox, plus the host's `/usr` (bash and
/// the libraries), the Python the test venv was made from and the venv itself, read-only at
/// the same paths, and `JUPYTER_PORT` in its environment (where the SDK's check looks).
fn python_image(port: u16) -> common::pod::Image {
    let cfg = std::fs::read_to_string(format!("{}/pyvenv.cfg", jupyter::VENV)).unwrap();
    let home = cfg
        .lines()
        .find_map(|l| l.strip_prefix("home = "))
        .expect("pyvenv.cfg names its Python");
    let prefix = std::path::Path::new(home.trim())
        .parent()
        .unwrap()
        .to_owned();
    let mut image = common::pod::Image {
        binds: vec!["/usr".into(), jupyter::VENV.into()],
        links: vec![("/bin/bash".into(), "/usr/bin/bash".into())],
        env: vec![("JUPYTER_PORT".into(), port.to_string())],
    };
    if !prefix.starts_with("/usr") {
        image.binds.push(prefix);
    }
    // Merged /usr: /lib and /lib64 are links into it, as on the host.
    for dir in ["/lib", "/lib64"] {
        match std::fs::read_link(dir) {
            Ok(target) => image.links.push((dir.into(), target)),
            Err(_) if std::path::Path::new(dir).is_dir() => image.binds.push(dir.into()),
            Err(_) => {}
        }
    }
    image
}

#[test]
#[ignore = "needs Jupyter from PyPI: `./test` installs it and runs every test"]
fn in_sidecar_mode_jupyter_and_its_kernels_run_inside_the_main_container() {
    let jupyter = jupyter::server_program();
    let port = free_port();
    let Some(pod) = common::pod::Pod::start_with(python_image(port)) else {
        return;
    };
    let port_arg = port.to_string();
    let s = pod.sidecar_sandlet(
        "",
        common::pod::SIDECAR_CAPABILITIES,
        &["--jupyter-command", &jupyter, "--jupyter-port", &port_arg],
    );
    let events = run(
        &s,
        json!({"code": "import os\nprint(open('/etc/sandbox-rootfs').read().strip(), os.getuid(), os.getcwd())", "context": {"language": "python"}}),
    );
    let out: String = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        out,
        format!("busybox-rootfs {} /work\n", common::pod::MAIN_UID),
        "{events:?}"
    );
    // The server too: a process of the main container's user in its mount namespace.
    let server = pids_with_cmdline(&format!("--ServerApp.port={port}"));
    assert_eq!(server.len(), 1, "{server:?}");
    assert_eq!(common::pod::uid_of(server[0]), Some(common::pod::MAIN_UID));
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_eq!(ns(server[0]), ns(pod.main_pid));

    // The SDK, its health check included (the main container's JUPYTER_PORT).
    common::run_sdk_checks("code_checks.py", &s.exec_base, &[]);
}

#[test]
#[ignore = "needs Jupyter from PyPI: `./test` installs it and runs every test"]
fn in_sidecar_mode_a_jupyter_host_in_the_main_containers_environment_is_used() {
    let jupyter = jupyter::server_program();
    let port = free_port();
    let token = "image-token";
    // As the code-interpreter image does: its environment names the server it starts itself.
    let image = common::pod::Image {
        env: vec![
            ("JUPYTER_HOST".into(), format!("http://127.0.0.1:{port}")),
            ("JUPYTER_TOKEN".into(), token.into()),
        ],
        ..Default::default()
    };
    let Some(pod) = common::pod::Pod::start_with(image) else {
        return;
    };
    let s = pod.sidecar_sandlet(
        "",
        common::pod::SIDECAR_CAPABILITIES,
        &["--jupyter-command", &jupyter],
    );
    let _server = jupyter::External::start(&jupyter, port, token, &s.data_dir());
    let events = run(
        &s,
        json!({"code": "import os\nos.environ['JUPYTER_TOKEN']", "context": {"language": "python"}}),
    );
    assert_eq!(result_text(&events), Some("'image-token'"), "{events:?}");
    // sandlet started no server of its own (it would log into its exec data dir).
    let mut exec_dir = s.data_dir().into_os_string();
    exec_dir.push("-exec/jupyter");
    assert!(!std::path::Path::new(&exec_dir).exists());
}

/// Output of a run's `stdout` or `stderr` events, joined.
fn output(events: &[Value], stream: &str) -> String {
    events
        .iter()
        .filter(|e| e["type"] == stream)
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

#[test]
#[ignore = "needs Jupyter from PyPI and tslab from npm: `./test` installs them and runs every test"]
fn javascript_and_typescript_run_in_tslab_kernels() {
    let jupyter = jupyter::server_program();
    let specs = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.ci/tslab/jupyter/share/jupyter"
    );
    assert!(
        std::path::Path::new(specs).join("kernels/jslab").exists(),
        "no tslab kernels in {specs}: `./test` installs tslab from npm (.ci/setup)"
    );
    let port = free_port();
    let s = Sandlet::start_as(&["--jupyter-command", &jupyter], move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandlet"));
        cmd.env("JUPYTER_PORT", port.to_string())
            .env("JUPYTER_PATH", specs);
        cmd
    });
    // tslab shows a cell's value on stdout.
    let js = |code: &str| {
        run(
            &s,
            json!({"code": code, "context": {"language": "javascript"}}),
        )
    };
    assert_eq!(output(&js("let n = 20;\nn + 1"), "stdout"), "21\n");
    assert_eq!(output(&js("n * 2"), "stdout"), "40\n", "state kept");
    let ts = |code: &str| {
        run(
            &s,
            json!({"code": code, "context": {"language": "typescript"}}),
        )
    };
    let events = ts("const t: string = 'typed';\nt.toUpperCase()");
    assert_eq!(output(&events, "stdout"), "TYPED\n", "{events:?}");
    let events = ts("const u: number = 'no';");
    assert!(
        output(&events, "stderr").contains("not assignable to type 'number'"),
        "{events:?}"
    );
}

#[test]
#[ignore = "needs Jupyter from PyPI: `./test` installs it and runs every test"]
fn a_run_that_ignores_interrupts_is_stopped_by_its_deadline_and_by_deleting_its_context() {
    let jupyter = jupyter::server_program();
    let (s, _) = sandlet_with_jupyter(&jupyter, &[]);
    let stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ignoring', flush=True)\ntime.sleep(1000)";
    let context = create_context(&s, "python");
    python(&s, "kept = 1", &context);

    // Past its deadline the kernel is interrupted; that does nothing, so it is shut down.
    let events = run(
        &s,
        json!({"code": stubborn, "context": {"language": "python", "id": context}, "timeout": 1000}),
    );
    let error = error_of(&events).unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(error["ename"], "TimeoutError", "{error}");
    assert!(
        error["evalue"].as_str().unwrap().contains("shut down"),
        "{error}"
    );
    let events = python(&s, "kept", &context);
    assert_eq!(
        error_of(&events).unwrap()["ename"],
        "NameError",
        "a fresh kernel, as the error said: {events:?}"
    );

    // Deleting the context stops such a run too: its kernel is shut down after the grace.
    let exec_base = s.exec_base.clone();
    let body = json!({"code": stubborn, "context": {"language": "python", "id": context}});
    let (started_tx, started) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut response = ureq::post(format!("{exec_base}/code"))
            .send_json(&body)
            .unwrap();
        let mut lines = std::io::BufReader::new(response.body_mut().as_reader()).lines();
        let mut events = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(json) = line.strip_prefix("data: ") {
                let event: Value = serde_json::from_str(json).unwrap();
                if event["text"] == "ignoring\n" {
                    started_tx.send(()).unwrap();
                }
                events.push(event);
            }
        }
        events
    });
    started
        .recv_timeout(JUPYTER_DEADLINE)
        .expect("the run started");
    let deleted = s.exec("DELETE", &format!("/code/contexts/{context}"), None, &[]);
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    let events = runner.join().unwrap();
    assert_eq!(
        kinds(&events).last(),
        Some(&"error"),
        "the run ended, saying why: {events:?}"
    );
}
