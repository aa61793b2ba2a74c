//! The API driven exactly as the Go BatchSandbox controller's client drives it (`Client.Set`
//! posts `[task]` or `[]`; `Client.Get` reads the first element of `GET /getTasks`; anything but
//! 200 is an error), with every response body checked against the `proto-json` schemas, and the
//! golden fixtures checked against sandlet's own wire types.

mod common;

use std::path::{Path, PathBuf};

use common::schemas::Schemas;
use common::{Reply, Sandlet, scratch, wait_until};
use sandlet::tasks::wire::Task;
use serde_json::{Value, json};

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-json/task-api")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What only the task API's tests check.
trait TaskApiChecks {
    fn list(&self, r: &Reply) -> Vec<Value>;
    fn error(&self, r: &Reply, status: u16, code: &str);
}

impl TaskApiChecks for Schemas {
    /// A 200 `task-list` answer.
    fn list(&self, r: &Reply) -> Vec<Value> {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body = r.json();
        self.check("task-list", &body);
        body.as_array().unwrap().clone()
    }

    /// An error answer: its status, its code and the `error` schema.
    fn error(&self, r: &Reply, status: u16, code: &str) {
        r.assert_error(status, code);
        self.check("error", &r.json());
    }
}

/// `Client.Set(task)`: posts `[task]` (or `[]` for `None`), non-200 is an error, and returns
/// the element of the answer with the task's name.
fn client_set(s: &Sandlet, schemas: &Schemas, task: Option<&Value>) -> Option<Value> {
    let body = match task {
        Some(t) => serde_json::to_vec(&json!([t])).unwrap(),
        // The release fixture: the literal `[]` the Go client sends.
        None => std::fs::read(proto_dir().join("fixtures/set-tasks-request-release.json")).unwrap(),
    };
    let r = s.call("POST", "/setTasks", Some(&body));
    let list = schemas.list(&r);
    let name = task?["name"].clone();
    let found = list.into_iter().find(|t| t["name"] == name);
    assert!(found.is_some(), "the answer lacks {name}: {}", r.text());
    found
}

/// `Client.Get()`: the first element of `GET /getTasks`, or none for `[]`.
fn client_get(s: &Sandlet, schemas: &Schemas) -> Option<Value> {
    schemas.list(&s.get("/getTasks")).into_iter().next()
}

/// The Go scheduler's `parseTaskState`.
fn go_task_state(t: &Value) -> &'static str {
    let ps = &t["processStatus"];
    if ps["running"].is_object() {
        "RUNNING"
    } else if ps["terminated"].is_object() {
        if ps["terminated"]["exitCode"] == 0 {
            "SUCCEED"
        } else {
            "FAILED"
        }
    } else {
        "UNKNOWN"
    }
}

/// Polls `Client.Get` until `pred` holds, checking every answer on the way.
fn get_until(
    s: &Sandlet,
    schemas: &Schemas,
    what: &str,
    mut pred: impl FnMut(Option<&Value>) -> bool,
) -> Option<Value> {
    let mut last = None;
    wait_until(what, || {
        last = client_get(s, schemas);
        pred(last.as_ref())
    });
    last
}

/// The request fixture, with a script that waits for `release` to exist and then exits with `code`.
fn fixture_task(name: &str, release: &Path, code: i32) -> Value {
    let mut list = read_json(&proto_dir().join("fixtures/set-tasks-request-one.json"));
    let mut task = list.as_array_mut().unwrap().remove(0);
    task["name"] = json!(name);
    task["process"]["args"] = json!([format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo hello $FOO; exit {code}",
        release.display()
    )]);
    task
}

#[test]
fn controller_flow_run_succeed_release() {
    let schemas = Schemas::load(&proto_dir());
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let release = dir.path().join("release");
    let task = fixture_task("bsb-0", &release, 0);

    let answered = client_set(&s, &schemas, Some(&task)).unwrap();
    assert_eq!(
        answered["process"], task["process"],
        "the spec comes back unchanged"
    );
    let got = get_until(&s, &schemas, "the task runs", |t| {
        t.is_some_and(|t| go_task_state(t) == "RUNNING")
    })
    .unwrap();
    assert_eq!(got["name"], "bsb-0");
    assert!(got["processStatus"]["running"]["startedAt"].is_string());

    // While RUNNING the scheduler re-posts the task on every cycle; that changes nothing.
    for _ in 0..3 {
        assert_eq!(client_set(&s, &schemas, Some(&task)).unwrap(), got);
    }

    std::fs::write(&release, b"").unwrap();
    let done = get_until(&s, &schemas, "the task ends", |t| {
        t.is_some_and(|t| t["processStatus"]["terminated"].is_object())
    })
    .unwrap();
    assert_eq!(go_task_state(&done), "SUCCEED", "{done}");
    assert_eq!(done["processStatus"]["terminated"]["exitCode"], 0);
    assert_eq!(done["processStatus"]["terminated"]["reason"], "Succeeded");
    let out = s.get("/tasks/bsb-0/logs");
    assert_eq!(
        out.text(),
        "hello bar\n",
        "the fixture's env reached the task"
    );

    // Release: `Set(nil)` every cycle until `Get` returns nothing.
    assert!(client_set(&s, &schemas, None).is_none());
    get_until(&s, &schemas, "getTasks becomes []", |t| {
        if t.is_some() {
            assert!(client_set(&s, &schemas, None).is_none());
        }
        t.is_none()
    });
    let r = s.get("/getTasks");
    assert_eq!(r.text().trim_end(), "[]", "an empty list is [], never null");
}

#[test]
fn controller_flow_failure_and_release_while_running() {
    let schemas = Schemas::load(&proto_dir());
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let release = dir.path().join("release");

    let failing = fixture_task("bsb-1", &release, 3);
    client_set(&s, &schemas, Some(&failing)).unwrap();
    get_until(&s, &schemas, "running", |t| {
        t.is_some_and(|t| go_task_state(t) == "RUNNING")
    });
    std::fs::write(&release, b"").unwrap();
    let done = get_until(&s, &schemas, "ended", |t| {
        t.is_some_and(|t| t["processStatus"]["terminated"].is_object())
    })
    .unwrap();
    assert_eq!(go_task_state(&done), "FAILED", "{done}");
    assert_eq!(done["processStatus"]["terminated"]["exitCode"], 3);

    // A task that cannot start at all is a failure too (exitCode -1 is non-zero).
    assert!(client_set(&s, &schemas, None).is_none());
    get_until(&s, &schemas, "released", |t| t.is_none());
    let missing = json!({"name": "bsb-2", "process": {"command": ["/no/such/program"]}});
    client_set(&s, &schemas, Some(&missing)).unwrap();
    let done = get_until(&s, &schemas, "start failure reported", |t| {
        t.is_some_and(|t| t["processStatus"]["terminated"].is_object())
    })
    .unwrap();
    assert_eq!(go_task_state(&done), "FAILED", "{done}");
    assert_eq!(done["processStatus"]["terminated"]["exitCode"], -1);

    // Releasing a running task: until it is gone the answers (marked for deletion) still
    // match the schema, and the Go client keeps seeing a task.
    assert!(client_set(&s, &schemas, None).is_none());
    get_until(&s, &schemas, "released", |t| t.is_none());
    let sleeper = json!({"name": "bsb-3", "process": {"command": ["sleep", "300"]}});
    client_set(&s, &schemas, Some(&sleeper)).unwrap();
    get_until(&s, &schemas, "running", |t| {
        t.is_some_and(|t| go_task_state(t) == "RUNNING")
    });
    let r = s.call("POST", "/setTasks", Some(b"[]"));
    let list = schemas.list(&r);
    for t in &list {
        assert!(t["deletionTimestamp"].is_string(), "{t}");
    }
    get_until(&s, &schemas, "released", |t| t.is_none());
}

#[test]
fn other_answers_match_their_schemas() {
    let schemas = Schemas::load(&proto_dir());
    let s = Sandlet::start(&[]);
    let r = s.get("/health");
    assert_eq!(r.status, 200);
    schemas.check("health", &r.json());

    let r = s.post_json(
        "/tasks",
        &json!({"name": "one", "process": {"command": ["true"]}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    schemas.check("task", &r.json());
    let t = s.wait_state("one", "terminated");
    schemas.check("task", &t);

    schemas.error(&s.call("POST", "/setTasks", Some(b"{")), 400, "InvalidJSON");
    schemas.error(
        &s.set_tasks(json!([{"name": "../x", "process": {"command": ["true"]}}])),
        400,
        "InvalidTask",
    );
    schemas.error(&s.get("/tasks/nope"), 404, "TaskNotFound");
    schemas.error(&s.get("/nope"), 404, "NotFound");
    schemas.error(
        &s.post_json(
            "/tasks",
            &json!({"name": "one", "process": {"command": ["false"]}}),
        ),
        409,
        "TaskConflict",
    );

    // The change feed's payloads.
    let feed = s.watch();
    let (_, snapshot) = common::recv_until(&feed, |e, _| e == "snapshot");
    schemas.check("watch-snapshot", &snapshot);
    assert_eq!(s.call("DELETE", "/tasks/one", None).status, 204);
    let (_, deleted) = common::recv_until(&feed, |e, _| e == "deleted");
    schemas.check("watch-deleted", &deleted);
    assert_eq!(
        s.post_json(
            "/tasks",
            &json!({"name": "two", "process": {"command": ["true"]}})
        )
        .status,
        201
    );
    let (_, task) = common::recv_until(&feed, |e, _| e == "task");
    schemas.check("watch-task", &task);
}

/// Which schema a fixture file is for (README: longest matching prefix for `invalid/`).
fn schema_of(file: &str, schemas: &Schemas) -> String {
    let stem = file.strip_suffix(".json").unwrap();
    if let Some(name) = [
        "watch-snapshot",
        "watch-task",
        "watch-deleted",
        "error",
        "health",
    ]
    .iter()
    .find(|n| stem == **n)
    {
        return name.to_string();
    }
    if stem.starts_with("set-tasks-") || stem.starts_with("get-tasks-") {
        return "task-list".into();
    }
    if stem.starts_with("task-") {
        return "task".into();
    }
    // invalid/<schema>-<defect>
    schemas
        .names()
        .filter(|k| stem.starts_with(&format!("{k}-")))
        .max_by_key(|k| k.len())
        .unwrap_or_else(|| panic!("no schema for fixture {file}"))
        .clone()
}

fn fixtures(sub: &str) -> Vec<(String, Vec<u8>)> {
    let dir = proto_dir().join(sub);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn golden_fixtures_validate_and_invalid_ones_do_not() {
    let schemas = Schemas::load(&proto_dir());
    let good = fixtures("fixtures");
    assert!(good.len() >= 15, "{}", good.len());
    for (file, bytes) in &good {
        let value: Value = serde_json::from_slice(bytes).unwrap();
        schemas.check(&schema_of(file, &schemas), &value);
    }
    let bad = fixtures("fixtures/invalid");
    assert!(bad.len() >= 10, "{}", bad.len());
    for (file, bytes) in &bad {
        let value: Value = serde_json::from_slice(bytes).unwrap();
        let schema = schema_of(file, &schemas);
        assert!(
            !schemas.errors(&schema, &value).is_empty(),
            "invalid/{file} passes {schema}.schema.json"
        );
    }
}

/// The tasks a fixture holds, for every fixture that holds tasks.
fn tasks_in(file: &str, value: &Value) -> Option<Vec<Value>> {
    match file {
        "error.json" | "health.json" | "watch-deleted.json" => None,
        "watch-task.json" => Some(vec![value["task"].clone()]),
        "watch-snapshot.json" => Some(value["tasks"].as_array().unwrap().clone()),
        f if f.starts_with("task-") => Some(vec![value.clone()]),
        f if f.starts_with("set-tasks-") || f.starts_with("get-tasks-") => {
            Some(value.as_array().unwrap().clone())
        }
        f => panic!("unclassified fixture {f}"),
    }
}

#[test]
fn golden_fixtures_round_trip_through_the_wire_types() {
    let mut mismatches = Vec::new();
    let mut seen = 0;
    for (file, bytes) in fixtures("fixtures") {
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        let Some(tasks) = tasks_in(&file, &value) else {
            continue;
        };
        // Lists decode as a whole, as the handlers decode them.
        if value.is_array() {
            let list: Vec<Task> = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{file} is not a Vec<Task>: {e}"));
            assert_eq!(list.len(), tasks.len(), "{file}");
        }
        for task in tasks {
            seen += 1;
            let decoded: Task = serde_json::from_value(task.clone())
                .unwrap_or_else(|e| panic!("{file} does not decode as a Task: {e}"));
            let again = serde_json::to_value(&decoded).unwrap();
            if again != task {
                mismatches.push(format!("{file}:\n  fixture: {task}\n  sandlet: {again}"));
            }
        }
    }
    assert!(seen >= 12, "{seen}");
    assert!(
        mismatches.is_empty(),
        "sandlet serialises these fixtures differently:\n{}",
        mismatches.join("\n")
    );
}

/// The byte-exact fixtures: sandlet's serialisation of a decoded Go response is the same bytes
/// (compact, members in Go order), apart from the trailing newline of `json.Encoder`.
#[test]
fn go_response_fixtures_are_reproduced_byte_for_byte() {
    for (file, bytes) in fixtures("fixtures") {
        let text = String::from_utf8(bytes).unwrap();
        let again = if file.starts_with("task-") {
            let t: Task = serde_json::from_str(&text).unwrap();
            serde_json::to_string(&t).unwrap()
        } else if file.starts_with("get-tasks-") || file.starts_with("set-tasks-") {
            let l: Vec<Task> = serde_json::from_str(&text).unwrap();
            serde_json::to_string(&l).unwrap()
        } else {
            continue;
        };
        assert_eq!(again, text.trim_end_matches('\n'), "{file}");
    }
}
