//! The bearer token guards every route but `/health`, is never logged, and sandlet keeps its
//! memory (where the token lives) away from same-uid processes by being non-dumpable.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Sandlet, free_port, wait_until};
use serde_json::{Value, json};

const TOKEN: &str = "s3cret-token";

/// Status and (JSON, when there is one) body of a request with exactly the given
/// `Authorization` header. The change feed never ends, so its body is not read.
fn send(
    s: &Sandlet,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{}", s.base, path));
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    let mut resp = match body {
        Some(b) => agent.run(
            req.header("Content-Type", "application/json")
                .body(b.to_string().into_bytes())
                .unwrap(),
        ),
        None => agent.run(req.body(()).unwrap()),
    }
    .expect("request");
    let status = resp.status().as_u16();
    let is_json = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json {
        return (status, Value::Null);
    }
    let bytes = resp.body_mut().read_to_vec().unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn task(name: &str) -> Value {
    json!({"name": name, "process": {"command": ["sleep", "300"]}})
}

/// Every protected route with a request that succeeds when the token is right, and its status.
fn routes() -> Vec<(&'static str, &'static str, Option<Value>, u16)> {
    vec![
        ("POST", "/setTasks", Some(json!([task("t")])), 200),
        ("GET", "/getTasks", None, 200),
        ("POST", "/tasks", Some(task("u")), 201),
        ("GET", "/tasks/t", None, 200),
        ("GET", "/tasks/t/logs", None, 200),
        ("GET", "/watchTasks", None, 200),
        ("DELETE", "/tasks/u", None, 204),
    ]
}

fn wrong_headers() -> Vec<Option<String>> {
    vec![
        None,
        Some("Bearer wrong".into()),
        Some("Bearer ".into()),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer  {TOKEN}")),
        Some(TOKEN.into()),
        Some(format!("Basic {TOKEN}")),
        Some(format!("Token {TOKEN}")),
    ]
}

fn state(s: &Sandlet) -> (Value, BTreeSet<String>) {
    let (status, list) = send(
        s,
        "GET",
        "/getTasks",
        Some(&format!("Bearer {TOKEN}")),
        None,
    );
    assert_eq!(status, 200);
    let dirs = s.task_dirs();
    (list, dirs)
}

fn assert_all_refused(s: &Sandlet) {
    let before = state(s);
    for (method, path, body, _) in routes() {
        for header in wrong_headers() {
            let (status, body) = send(s, method, path, header.as_deref(), body.as_ref());
            let what = format!("{method} {path} with Authorization {header:?}");
            assert_eq!(status, 401, "{what}: {body}");
            assert_eq!(body["code"], "Unauthorized", "{what}: {body}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(state(s), before, "{what} changed something");
        }
    }
}

#[test]
fn every_route_but_health_needs_the_token() {
    let s = Sandlet::start_with(&[], Some(TOKEN));
    for header in wrong_headers() {
        let (status, body) = send(&s, "GET", "/health", header.as_deref(), None);
        assert_eq!((status, &body["status"]), (200, &json!("healthy")));
    }
    assert_all_refused(&s);
    assert_eq!(state(&s), (json!([]), BTreeSet::new()));

    let good = format!("Bearer {TOKEN}");
    for (method, path, body, expected) in routes() {
        let (status, body) = send(&s, method, path, Some(&good), body.as_ref());
        assert_eq!(status, expected, "{method} {path} with the token: {body}");
        if path == "/setTasks" {
            s.wait_state("t", "running");
        }
    }
    s.wait_gone("u");
    // Now that "t" exists, reading or deleting it without the token is still refused.
    assert_all_refused(&s);
    assert!(s.task("t").is_some());

    // The token is in no log line, though sandlet logs at debug level (which includes every
    // refused request).
    let log = s.stderr();
    assert!(log.contains("request refused"), "debug log missing:\n{log}");
    assert!(log.contains("Unauthorized"), "{log}");
    assert!(!log.contains(TOKEN), "the token is in the log:\n{log}");
}

/// Kills and reaps the processes it holds when dropped.
struct Reaped(Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const NOBODY: u32 = 65534;

fn proc_uid_line(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string()
}

#[test]
fn sandlet_is_not_dumpable() {
    if !common::root_or_skip("sandlet started as another user") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("sandlet-dumpable-")
        .tempdir()
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    // A copy of the binary that the other user can surely execute.
    let bin = dir.path().join("sandlet");
    std::fs::copy(env!("CARGO_BIN_EXE_sandlet"), &bin).unwrap();
    let log = dir.path().join("stderr.log");
    let port = free_port();
    let mut children = Reaped(Vec::new());

    // Control: an ordinary process of that user has /proc files owned by that user.
    children.0.push(
        Command::new("sleep")
            .arg("300")
            .uid(NOBODY)
            .gid(NOBODY)
            .spawn()
            .unwrap(),
    );
    let control = children.0[0].id();
    wait_until("the control process runs as nobody", || {
        proc_uid_line(control).split_whitespace().nth(1) == Some("65534")
    });
    let owner = std::fs::metadata(format!("/proc/{control}/environ"))
        .unwrap()
        .uid();
    assert_eq!(owner, NOBODY, "control: a dumpable process's /proc files");

    children.0.push(
        Command::new(&bin)
            .arg("serve")
            .arg("--listen-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.path().join("tasks"))
            // Not needed here; left on, it would take the default port 44772.
            .args(["--exec-listen-addr", "off"])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = children.0[1].id();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let url = format!("http://127.0.0.1:{port}/health");
    let mut exited = None;
    wait_until("sandlet (as nobody) answers /health", || {
        if let Ok(Some(status)) = children.0[1].try_wait() {
            exited = Some(status);
            return true;
        }
        agent.get(&url).call().is_ok_and(|r| r.status() == 200)
    });
    assert!(
        exited.is_none(),
        "sandlet exited with {exited:?}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let uids = proc_uid_line(pid);
    assert_eq!(
        uids.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "sandlet runs as nobody: {uids}"
    );
    let owner = std::fs::metadata(format!("/proc/{pid}/environ"))
        .unwrap()
        .uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid}/environ is owned by {owner}: sandlet is dumpable"
    );
}

#[test]
fn a_rotated_token_file_takes_effect_without_a_restart() {
    let s = Sandlet::start_with(&[], Some("first-token"));
    assert_eq!(
        s.call_with_token("GET", "/getTasks", Some("first-token"))
            .status,
        200
    );
    // A Secret update rewrites the mounted file.
    std::fs::write(s.data.path().join("token"), "second-token\n").unwrap();
    common::wait_until("the new token is accepted", || {
        s.call_with_token("GET", "/getTasks", Some("second-token"))
            .status
            == 200
    });
    s.call_with_token("GET", "/getTasks", Some("first-token"))
        .assert_error(401, "Unauthorized");
    assert!(
        !s.stderr().contains("second-token"),
        "the token is never logged"
    );
}
