//! Every bad request gets its exact status and `{"code","message"}` code, and nothing is applied:
//! after each refusal the task list is byte-for-byte what it was and no task directory appeared.

mod common;

use std::collections::BTreeSet;

use common::{Sandlet, Snapshot, scratch};
use serde_json::{Value, json};

fn sleeper(name: &str) -> Value {
    json!({"name": name, "process": {"command": ["sleep", "300"]}})
}

/// A sandlet with one task already running, so that "nothing changed" covers an existing task
/// too (a running task's JSON is stable: its `startedAt` does not move).
fn with_base(flags: &[&str]) -> (Sandlet, Snapshot) {
    let s = Sandlet::start(flags);
    let r = s.set_tasks(json!([sleeper("base")]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_state("base", "running");
    let before = s.snapshot();
    assert_eq!(before.dirs, BTreeSet::from(["base".to_string()]));
    (s, before)
}

#[test]
fn malformed_json_is_invalid_json() {
    let (s, before) = with_base(&[]);
    let cases: &[(&str, &[u8])] = &[
        ("/setTasks", b"[{\"name\":"),
        ("/setTasks", b"not json"),
        ("/setTasks", b""),
        ("/setTasks", b"null"),
        (
            "/setTasks",
            br#"{"name":"x","process":{"command":["true"]}}"#,
        ),
        ("/tasks", b"{\"name\":\"x\",\"process\":"),
        ("/tasks", b"null"),
    ];
    for (path, body) in cases {
        let r = s.call("POST", path, Some(body));
        let what = format!("POST {path} {}", String::from_utf8_lossy(body));
        assert!(
            r.status == 400 && r.json()["code"] == "InvalidJSON",
            "{what}: {} {}",
            r.status,
            r.text()
        );
        r.assert_error(400, "InvalidJSON");
        s.assert_nothing_lost(&before, &what);
    }
}

#[test]
fn unsafe_or_oversized_names_in_bodies_are_refused() {
    let (s, before) = with_base(&[]);
    let long = "x".repeat(254);
    for name in ["../x", "a/b", "/etc", ".hidden", "..", "", long.as_str()] {
        // The whole desired list, as a controller sends it: the existing task plus the bad one.
        let r = s.set_tasks(json!([sleeper("base"), sleeper(name)]));
        r.assert_error(400, "InvalidTask");
        s.assert_nothing_lost(&before, &format!("setTasks with name {name:?}"));
        let r = s.post_json("/tasks", &sleeper(name));
        r.assert_error(400, "InvalidTask");
        s.assert_nothing_lost(&before, &format!("POST /tasks with name {name:?}"));
    }
    // A task without a name member at all is the same as an empty name.
    let r = s.set_tasks(json!([{"process": {"command": ["true"]}}]));
    r.assert_error(400, "InvalidTask");
    s.assert_nothing_lost(&before, "setTasks with no name");
    // Nothing was created next to the data dir either ("../x" resolved against it).
    assert!(!s.data_dir().parent().unwrap().join("x").exists());
}

#[test]
fn a_253_byte_name_is_accepted_and_runs() {
    let s = Sandlet::start(&[]);
    let name = "n".repeat(253);
    let r = s.set_tasks(json!([{"name": name, "process": {"command": ["true"]}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()[0]["name"], name.as_str());
    let t = s.wait_state(&name, "terminated");
    assert_eq!(t["processStatus"]["terminated"]["exitCode"], 0, "{t}");
    assert!(s.data_dir().join(&name).is_dir());
}

#[test]
fn unsafe_names_in_paths_are_invalid_task_name() {
    let (s, before) = with_base(&[]);
    for (method, path) in [
        ("GET", "/tasks/..%2Fx"),
        ("GET", "/tasks/a%2Fb"),
        ("DELETE", "/tasks/.hidden"),
        ("DELETE", "/tasks/..%2Fbase"),
        ("DELETE", "/tasks/..%2F..%2Ftasks"),
        ("GET", "/tasks/..%2Fbase/logs"),
    ] {
        let r = s.call(method, path, None);
        r.assert_error(400, "InvalidTaskName");
        s.assert_nothing_lost(&before, &format!("{method} {path}"));
    }
}

#[test]
fn invalid_processes_are_invalid_task() {
    let (s, before) = with_base(&[]);
    let dir = scratch();
    let cases = [
        (
            "empty command",
            json!({"name": "t", "process": {"command": []}}),
        ),
        (
            "null command",
            json!({"name": "t", "process": {"command": null}}),
        ),
        (
            "empty program",
            json!({"name": "t", "process": {"command": [""]}}),
        ),
        (
            "command missing, args only",
            json!({"name": "t", "process": {"args": ["x"]}}),
        ),
        ("no process", json!({"name": "t"})),
        (
            "podTemplateSpec only",
            json!({"name": "t", "podTemplateSpec": {"spec": {}}}),
        ),
        (
            "env valueFrom",
            json!({"name": "t", "process": {"command": ["true"],
                "env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}}),
        ),
        (
            "relative workingDir",
            json!({"name": "t", "process": {"command": ["true"], "workingDir": "rel/dir"}}),
        ),
        (
            "negative timeoutSeconds",
            json!({"name": "t", "process": {"command": ["true"], "timeoutSeconds": -1}}),
        ),
    ];
    for (what, task) in &cases {
        let r = s.set_tasks(json!([sleeper("base"), task]));
        r.assert_error(400, "InvalidTask");
        s.assert_nothing_lost(&before, &format!("setTasks: {what}"));
        let r = s.post_json("/tasks", task);
        r.assert_error(400, "InvalidTask");
        s.assert_nothing_lost(&before, &format!("POST /tasks: {what}"));
    }

    // The same name twice in one list, even with identical specs.
    let marker = dir.path().join("ran");
    let touch = json!({"name": "dup", "process": {"command": ["touch", marker]}});
    let r = s.set_tasks(json!([sleeper("base"), touch, touch]));
    r.assert_error(400, "InvalidTask");
    assert!(r.json()["message"].as_str().unwrap().contains("dup"));
    s.assert_nothing_lost(&before, "setTasks with a duplicate name");

    // One good new task and one bad one: refused whole, the good one is not created.
    let good = json!({"name": "good", "process": {"command": ["touch", marker]}});
    let bad = json!({"name": "bad", "process": {"command": ["true"], "timeoutSeconds": -5}});
    for list in [
        json!([sleeper("base"), good, bad]),
        json!([sleeper("base"), bad, good]),
    ] {
        let r = s.set_tasks(list.clone());
        r.assert_error(400, "InvalidTask");
        s.assert_nothing_lost(&before, &format!("setTasks {list}"));
    }
    // The refused lists also left out "base": it was not removed either (checked by the snapshot),
    // and the good task's command never ran.
    let r = s.set_tasks(json!([good, bad]));
    r.assert_error(400, "InvalidTask");
    s.assert_nothing_lost(&before, "setTasks without base, with a bad task");
    assert!(!marker.exists(), "a refused task's command ran");
}

/// The Go executor decodes with `encoding/json`, which refuses a JSON array where an object is
/// expected. serde's derived structs accept the positional form `["name", null, {...}]`, so
/// without care such a body would create a task.
#[test]
fn arrays_in_place_of_objects_are_invalid_json() {
    let (s, before) = with_base(&[]);
    let dir = scratch();
    let marker = dir.path().join("ran");
    let touch = json!({"command": ["touch", marker]});
    let cases = [
        ("/tasks", json!([])),
        ("/tasks", json!(["arr0", null, touch])),
        ("/setTasks", json!([sleeper("base"), ["arr1", null, touch]])),
        (
            "/setTasks",
            json!([sleeper("base"), {"name": "arr2", "process": [["touch", marker]]}]),
        ),
        (
            "/setTasks",
            json!([sleeper("base"), {"name": "arr3", "process": {"command": ["true"], "env": [["A", "1"]]}}]),
        ),
    ];
    // Every case is tried before anything is asserted, so a failure lists them all.
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(path, body)| {
            let r = s.post_json(path, body);
            let ok = r.status == 400
                && r.json()["code"] == "InvalidJSON"
                && r.json()["message"].as_str().is_some_and(|m| !m.is_empty());
            (!ok).then(|| format!("POST {path} {body} -> {} {}", r.status, r.text()))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "not refused as InvalidJSON:\n{}",
        wrong.join("\n")
    );
    s.assert_nothing_lost(&before, "bodies with arrays in place of objects");
    assert!(!marker.exists(), "a task sent as an array ran");
}

/// Sends a request over a plain socket, writing the body on another thread and ignoring write
/// errors: a server that refuses an oversized body answers (and may close) before reading it
/// all, which an ordinary client reports as a broken connection instead of the answer.
fn post_raw(s: &Sandlet, path: &str, body: Vec<u8>) -> common::Reply {
    use std::io::{Read, Write};
    let addr = s.base.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&body);
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let (status, body_start, length) = loop {
        match stream.read(&mut buf) {
            Ok(0) => panic!("connection closed before a full answer: {raw:?}"),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the answer: {e}; got {raw:?}"),
        }
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .expect("content-length")
            .trim()
            .parse()
            .unwrap();
        break (status, end + 4, length);
    };
    while raw.len() < body_start + length {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the answer's body: {e}"),
        }
    }
    drop(stream);
    sender.join().unwrap();
    common::Reply {
        status,
        headers: vec![],
        body: raw[body_start..body_start + length].to_vec(),
    }
}

/// A 2 MiB valid task list.
fn huge_list() -> Vec<u8> {
    let big = "x".repeat(2 << 20);
    serde_json::to_vec(&json!([{"name": "big", "process": {"command": ["echo", big]}}])).unwrap()
}

#[test]
fn oversized_bodies_are_payload_too_large() {
    let (s, before) = with_base(&[]);
    let body = huge_list();
    assert!(body.len() > 2 << 20);
    for path in ["/setTasks", "/tasks"] {
        let r = post_raw(&s, path, body.clone());
        r.assert_error(413, "PayloadTooLarge");
        s.assert_nothing_lost(&before, &format!("2 MiB POST {path}"));
    }
    // Just under the default limit (1 MiB) is fine.
    let arg = "y".repeat((1 << 20) - 200);
    let r = s.set_tasks(
        json!([sleeper("base"), {"name": "fits", "process": {"command": ["echo", arg]}}]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(s.task("fits").is_some());
}

#[test]
fn a_small_body_limit_applies_to_small_lists() {
    let s = Sandlet::start(&["--max-body-bytes", "100"]);
    let before = s.snapshot();
    let list = json!([{"name": "small", "process": {"command": ["sh", "-c", "echo a small task body, just over the limit"], "timeoutSeconds": 30}}]);
    let body = list.to_string();
    assert!(body.len() > 100 && body.len() < 200, "{}", body.len());
    let r = post_raw(&s, "/setTasks", body.into_bytes());
    r.assert_error(413, "PayloadTooLarge");
    s.assert_nothing_lost(&before, "a 1xx-byte setTasks with --max-body-bytes 100");
    // Under the limit still works: the limit is a limit, not a refusal of everything.
    let r = s.set_tasks(json!([{"name": "s", "process": {"command": ["true"]}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.tasks().len(), 1);
}

#[test]
fn wrong_methods_and_unknown_routes() {
    let (s, before) = with_base(&[]);
    for (method, path) in [
        ("GET", "/setTasks"),
        ("PUT", "/setTasks"),
        ("PUT", "/tasks/x"),
        ("POST", "/tasks/base"),
        ("POST", "/getTasks"),
        ("DELETE", "/getTasks"),
        ("GET", "/tasks"),
        ("POST", "/health"),
    ] {
        let r = s.call(method, path, None);
        r.assert_error(405, "MethodNotAllowed");
        s.assert_nothing_lost(&before, &format!("{method} {path}"));
    }
    for (method, path) in [
        ("GET", "/nope"),
        ("POST", "/settasks"),
        ("GET", "/tasks/base/nope"),
        ("GET", "/"),
    ] {
        let r = s.call(method, path, None);
        r.assert_error(404, "NotFound");
        s.assert_nothing_lost(&before, &format!("{method} {path}"));
    }
    for path in ["/tasks/nope", "/tasks/nope/logs"] {
        let r = s.get(path);
        r.assert_error(404, "TaskNotFound");
        assert!(r.json()["message"].as_str().unwrap().contains("nope"));
        s.assert_nothing_lost(&before, &format!("GET {path}"));
    }
    // Deleting an unknown task is idempotent, as with the Go executor.
    let r = s.call("DELETE", "/tasks/nope", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    s.assert_nothing_lost(&before, "DELETE /tasks/nope");
}

#[test]
fn bad_log_queries_are_invalid_query() {
    let (s, before) = with_base(&[]);
    for query in [
        "stream=stdin",
        "stream=",
        "offset=abc",
        "offset=-1",
        "limit=0",
        "limit=abc",
        "limit=4194305",
        "follow=maybe",
        "bogus=1",
    ] {
        let path = format!("/tasks/base/logs?{query}");
        let r = s.get(&path);
        r.assert_error(400, "InvalidQuery");
        s.assert_nothing_lost(&before, &format!("GET {path}"));
    }
    // The good forms of the same parameters work.
    let r = s.get("/tasks/base/logs?stream=stderr&offset=0&limit=1");
    assert_eq!(r.status, 200, "{}", r.text());
}
