//! Starting sandlet: the Go executor's environment variables, JSON logs, and clear refusals of
//! configurations it cannot honour.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, wait_until};

fn sandlet() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandlet"));
    cmd.env("SANDLET_EXEC_LISTEN_ADDR", "127.0.0.1:0");
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

/// Runs a sandlet that is expected to refuse to start; returns its output.
fn refused(cmd: &mut Command) -> Output {
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + common::DEADLINE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("sandlet kept running with a configuration it should refuse");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn go_environment_variables_and_json_logs() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    // Exactly as a Go executor's Pool template would set it: env only, no subcommand.
    let child = sandlet()
        .env("DATA_DIR", data.path().join("tasks"))
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("SANDLET_LOG_FORMAT", "json")
        .spawn()
        .unwrap();
    wait_until("sandlet answers", || {
        ureq::get(format!("http://127.0.0.1:{port}/health"))
            .call()
            .is_ok()
    });
    assert!(data.path().join("tasks").is_dir());
    unsafe { kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    assert!(
        lines.iter().any(|l| l["message"] == "task API ready"),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN"
                && l["message"].as_str().unwrap().contains("no token file")),
        "{stderr}"
    );
}

#[test]
fn configurations_it_cannot_honour_are_refused_with_a_reason() {
    let data = tempfile::tempdir().unwrap();
    // Every one of these is refused before sandlet binds its port.
    let base = |cmd: &mut Command| {
        cmd.arg("--data-dir").arg(data.path().join("tasks"));
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--other-container".into(),
                "--enable-sidecar-mode=false".into(),
            ],
            "--enable-sidecar-mode",
        ),
        (
            vec!["--token-file".into(), "/nonexistent/token".into()],
            "token file",
        ),
        (
            vec!["--max-active-tasks".into(), "0".into()],
            "--max-active-tasks",
        ),
        (
            vec![
                "--max-tasks".into(),
                "2".into(),
                "--max-active-tasks".into(),
                "3".into(),
            ],
            "--max-tasks",
        ),
        (
            vec!["--listen-addr".into(), "not-an-address".into()],
            "not-an-address",
        ),
    ];
    // Durations from flags are added to the clock somewhere; one past what it can represent
    // panicked at the first use (a huge --stop-grace-seconds at the first stop).
    let durations = [
        "--stop-grace-seconds",
        "--exec-keep-seconds",
        "--exec-session-idle-seconds",
        "--exec-pty-idle-seconds",
        "--exec-proxy-idle-seconds",
        "--exec-proxy-header-timeout-seconds",
    ]
    .map(|flag| (vec![flag.to_string(), u64::MAX.to_string()], "ten years"));
    for (args, expected) in cases.into_iter().chain(durations) {
        let mut cmd = sandlet();
        base(&mut cmd);
        cmd.args(&args);
        let out = refused(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(expected),
            "{args:?}: the reason should mention {expected:?}: {stderr}"
        );
    }
    let mut cmd = sandlet();
    cmd.env("SANDLET_OTHER_CONTAINER", "true")
        .env("ENABLE_SIDECAR_MODE", "false")
        .arg("--data-dir")
        .arg(data.path().join("tasks"));
    assert!(
        !refused(&mut cmd).status.success(),
        "SANDLET_OTHER_CONTAINER=true with sidecar mode switched off is refused too"
    );
}

#[test]
fn a_data_dir_that_cannot_be_written_is_refused() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = sandlet();
    cmd.arg("--data-dir")
        .arg(file.path().join("tasks"))
        .arg("--listen-addr")
        .arg(format!("127.0.0.1:{}", free_port()));
    let out = refused(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot open the data dir"), "{stderr}");
}

/// A setup error after the main container's watch has started (sidecar mode) ends sandlet
/// with its message and exit status 1. The watch once ran its search in place on a runtime
/// thread and carried on into a timer while the runtime shut down: a panic, about one start
/// in three.
#[test]
fn a_setup_error_in_sidecar_mode_ends_sandlet_without_a_panic() {
    let data = tempfile::tempdir().unwrap();
    for round in 0..10 {
        let mut cmd = sandlet();
        cmd.arg("--data-dir")
            .arg(data.path().join(format!("tasks-{round}")))
            .args([
                "--listen-addr",
                "127.0.0.1:0",
                "--enable-sidecar-mode",
                "true",
            ])
            .args(["--exec-data-dir", "/proc/not-a-dir"]);
        let out = refused(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cannot create the exec data dir"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn install_copies_the_static_binary_for_an_init_container() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("sandlet");
    let out = Command::new(env!("CARGO_BIN_EXE_sandlet"))
        .arg("install")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_sandlet")).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // A destination whose directory is missing is an error that names it.
    let out = Command::new(env!("CARGO_BIN_EXE_sandlet"))
        .arg("install")
        .arg(dir.path().join("missing/sandlet"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing/sandlet"));
}

#[test]
fn either_api_can_be_switched_off() {
    // Only the task API: nothing listens where the exec API would.
    let s = common::Sandlet::start(&["--exec-listen-addr", "off"]);
    assert_eq!(s.get("/getTasks").status, 200);
    let exec = s.exec_base.trim_start_matches("http://").to_string();
    assert!(
        std::net::TcpStream::connect(&exec).is_err(),
        "{exec} answers"
    );

    // Only the exec API (execd's place): the task API's data dir is not even created.
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = sandlet()
        .args(["--listen-addr", "off", "--data-dir"])
        .arg(data.path().join("tasks"))
        .env("SANDLET_EXEC_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    wait_until("the exec API answers", || {
        ureq::get(format!("http://127.0.0.1:{port}/ping"))
            .call()
            .is_ok()
    });
    assert!(!data.path().join("tasks").exists());
    child.kill().unwrap();
    child.wait().unwrap();

    // Both off is a configuration error, not a process that serves nothing.
    let out = refused(sandlet().args(["--listen-addr", "off", "--exec-listen-addr", "off"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("both off"));
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let s = common::Sandlet::start(&[]);
    assert_eq!(s.get("/getTasks").status, 200);
    let log = s.stderr();
    assert!(log.contains("task API ready"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file: {log:?}"
    );
}
