//! What `POST /setTasks` and `POST /tasks` do with lists they have seen before: an identical
//! re-post changes nothing, a changed spec is a conflict, limits refuse whole requests, the list
//! keeps creation order, and a task being removed cannot be re-added until it is gone.

mod common;

use std::path::Path;
use std::sync::mpsc;

use common::{DEADLINE, Sandlet, pid_alive, read_pid, recv_until, scratch};
use serde_json::{Value, json};

fn sleeper(name: &str) -> Value {
    json!({"name": name, "process": {"command": ["sleep", "300"]}})
}

fn names(list: &[Value]) -> Vec<&str> {
    list.iter().map(|t| t["name"].as_str().unwrap()).collect()
}

fn started_at(t: &Value) -> &Value {
    &t["processStatus"]["running"]["startedAt"]
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn first_event(rx: &mpsc::Receiver<(String, Value)>) -> (String, Value) {
    rx.recv_timeout(DEADLINE)
        .expect("a feed event before the deadline")
}

#[test]
fn reposting_the_same_list_is_a_no_op() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let counter = dir.path().join("starts");
    // Each start of the task appends its pid to the counter file, then sleeps.
    let once = json!({"name": "once", "process": {
        "command": ["sh", "-c", format!("echo $$ >> {}; exec sleep 300", counter.display())],
        "env": [{"name": "A", "value": "1"}],
        "timeoutSeconds": 600,
    }});
    let first = s.set_tasks(json!([once]));
    assert_eq!(first.status, 200, "{}", first.text());
    let running = s.wait_state("once", "running");
    common::wait_until("the task wrote its pid", || lines(&counter).len() == 1);
    let pid: i32 = lines(&counter)[0].parse().unwrap();

    let feed = s.watch();
    let (_, snap) = recv_until(&feed, |e, _| e == "snapshot");
    assert_eq!(snap["tasks"][0], running);

    let mut replies = Vec::new();
    for _ in 0..3 {
        let r = s.set_tasks(json!([once]));
        assert_eq!(r.status, 200, "{}", r.text());
        replies.push(r.json());
    }
    // What the Go controller may also send: the task as it read it back (status members are
    // ignored on requests) and Go's encoding of empty members.
    let mut echoed = running.clone();
    echoed["process"]["args"] = Value::Null;
    echoed["podTemplateSpec"] = Value::Null;
    echoed["podStatus"] = Value::Null;
    for body in [json!([echoed]), json!([running])] {
        let r = s.set_tasks(body);
        assert_eq!(r.status, 200, "{}", r.text());
        replies.push(r.json());
    }
    for r in &replies {
        assert_eq!(r, &json!([running]), "a re-post changed the task");
    }

    // A barrier: a new task whose creation is the next change the feed reports. Had any re-post
    // changed "once" (restarted, re-recorded), its event would come first.
    let barrier_file = dir.path().join("barrier");
    let barrier = json!({"name": "barrier", "process": {"command": ["touch", barrier_file]}});
    assert_eq!(s.set_tasks(json!([once, barrier])).status, 200);
    let (event, data) = first_event(&feed);
    assert_eq!(
        (event.as_str(), &data["task"]["name"]),
        ("task", &json!("barrier")),
        "{data}"
    );
    s.wait_state("barrier", "terminated");
    assert!(barrier_file.exists());

    assert_eq!(lines(&counter), [pid.to_string()], "started exactly once");
    assert!(pid_alive(pid));
    let now = s.task("once").unwrap();
    assert_eq!(started_at(&now), started_at(&running));
    assert_eq!(now, running);
}

#[test]
fn a_changed_spec_under_an_existing_name_is_a_conflict() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let pid_file = dir.path().join("pid");
    let process = json!({"command": ["sh", "-c", format!("echo $$ > {}; exec sleep 300", pid_file.display())]});
    let orig = json!({"name": "keeper", "process": process});
    assert_eq!(s.set_tasks(json!([orig])).status, 200);
    let running = s.wait_state("keeper", "running");
    let pid = read_pid(&pid_file);
    let before = s.snapshot();

    let mut changes = Vec::new();
    for (what, change) in [
        (
            "command",
            json!({"command": ["sh", "-c", "exec sleep 301"]}),
        ),
        ("args", json!({"args": ["extra"]})),
        ("env", json!({"env": [{"name": "A", "value": "1"}]})),
        ("workingDir", json!({"workingDir": "/"})),
        ("timeoutSeconds", json!({"timeoutSeconds": 5})),
    ] {
        let mut p = process.clone();
        for (k, v) in change.as_object().unwrap() {
            p[k] = v.clone();
        }
        changes.push((what, json!({"name": "keeper", "process": p})));
    }
    for (what, changed) in &changes {
        // In the same request, a new task: it must not be created.
        for list in [
            json!([changed, sleeper("newcomer")]),
            json!([sleeper("newcomer"), changed]),
        ] {
            let r = s.set_tasks(list);
            r.assert_error(409, "TaskConflict");
            let message = r.json()["message"].as_str().unwrap().to_string();
            assert!(message.contains("keeper"), "{what}: {message}");
            s.assert_nothing_lost(&before, &format!("setTasks changing {what}"));
        }
        let r = s.post_json("/tasks", changed);
        r.assert_error(409, "TaskConflict");
        assert!(r.json()["message"].as_str().unwrap().contains("keeper"));
        s.assert_nothing_lost(&before, &format!("POST /tasks changing {what}"));
    }
    assert!(pid_alive(pid), "the old task keeps running");
    assert_eq!(s.task("keeper").unwrap(), running);
    assert_eq!(read_pid(&pid_file), pid, "and was not restarted");
}

#[test]
fn create_task_is_201_then_200_when_identical_then_409() {
    let s = Sandlet::start(&[]);
    let task = sleeper("single");
    let r = s.post_json("/tasks", &task);
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    assert_eq!(created["name"], "single");
    assert_eq!(created["process"], task["process"]);
    assert!(created["processStatus"].is_object(), "{created}");
    let running = s.wait_state("single", "running");

    let r = s.post_json("/tasks", &task);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), running, "the same task, untouched");
    assert_eq!(s.tasks(), vec![running.clone()]);

    let before = s.snapshot();
    let r = s.post_json(
        "/tasks",
        &json!({"name": "single", "process": {"command": ["sleep", "301"]}}),
    );
    r.assert_error(409, "TaskConflict");
    assert!(r.json()["message"].as_str().unwrap().contains("single"));
    s.assert_nothing_lost(&before, "POST /tasks with a different spec");
}

#[test]
fn max_active_tasks_refuses_whole_requests_until_one_is_gone() {
    let s = Sandlet::start(&["--max-active-tasks", "3"]);
    let three = json!([sleeper("a"), sleeper("b"), sleeper("c")]);
    let r = s.set_tasks(three.clone());
    assert_eq!(r.status, 200, "{}", r.text());
    for n in ["a", "b", "c"] {
        s.wait_state(n, "running");
    }
    let all = s.tasks();
    assert_eq!(names(&all), ["a", "b", "c"]);
    assert!(
        all.iter().all(|t| started_at(t).is_string()),
        "all three run at once: {all:?}"
    );

    let before = s.snapshot();
    let r = s.set_tasks(json!([
        sleeper("a"),
        sleeper("b"),
        sleeper("c"),
        sleeper("d")
    ]));
    r.assert_error(429, "TooManyTasks");
    s.assert_nothing_lost(&before, "setTasks with a 4th task");
    let r = s.post_json("/tasks", &sleeper("d"));
    r.assert_error(429, "TooManyTasks");
    s.assert_nothing_lost(&before, "POST /tasks with a 4th task");

    // Removing one: while it is still being stopped it still counts.
    let r = s.set_tasks(json!([sleeper("a"), sleeper("b")]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_gone("c");
    let r = s.set_tasks(json!([sleeper("a"), sleeper("b"), sleeper("d")]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_state("d", "running");
    assert_eq!(names(&s.tasks()), ["a", "b", "d"]);
}

#[test]
fn max_tasks_counts_finished_tasks_too() {
    let s = Sandlet::start(&["--max-active-tasks", "2", "--max-tasks", "3"]);
    let done = |n: &str| json!({"name": n, "process": {"command": ["true"]}});
    assert_eq!(s.set_tasks(json!([done("f1"), done("f2")])).status, 200);
    s.wait_state("f1", "terminated");
    s.wait_state("f2", "terminated");
    // Finished tasks are not active: a third fits under --max-active-tasks 2.
    let r = s.set_tasks(json!([done("f1"), done("f2"), done("f3")]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_state("f3", "terminated");

    let before = s.snapshot();
    let r = s.set_tasks(json!([done("f1"), done("f2"), done("f3"), done("f4")]));
    r.assert_error(429, "TooManyTasks");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("--max-tasks")
    );
    s.assert_nothing_lost(&before, "setTasks with a 4th kept task");
    let r = s.post_json("/tasks", &done("f4"));
    r.assert_error(429, "TooManyTasks");
    s.assert_nothing_lost(&before, "POST /tasks with a 4th kept task");

    assert_eq!(s.call("DELETE", "/tasks/f1", None).status, 204);
    s.wait_gone("f1");
    let r = s.set_tasks(json!([done("f2"), done("f3"), done("f4")]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        names(&r.json().as_array().unwrap().clone()),
        ["f2", "f3", "f4"]
    );
    // At the limit, one request may replace a finished task: the one it forgets does not count.
    s.wait_state("f4", "terminated");
    let r = s.set_tasks(json!([done("f3"), done("f4"), done("f5")]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        names(&r.json().as_array().unwrap().clone()),
        ["f3", "f4", "f5"]
    );
}

#[test]
fn the_list_keeps_creation_order() {
    let mut s = Sandlet::start(&[]);
    let t = |n: &str| json!({"name": n, "process": {"command": ["true"]}});
    // Neither alphabetical nor any hash order.
    let r = s.set_tasks(json!([t("c"), t("a"), t("b")]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(names(r.json().as_array().unwrap()), ["c", "a", "b"]);
    assert_eq!(names(&s.tasks()), ["c", "a", "b"]);

    // Known tasks keep their place wherever the new list puts them; new ones go after.
    let r = s.set_tasks(json!([t("z"), t("b"), t("a"), t("y"), t("c")]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        names(r.json().as_array().unwrap()),
        ["c", "a", "b", "z", "y"]
    );
    assert_eq!(names(&s.tasks()), ["c", "a", "b", "z", "y"]);

    assert_eq!(s.post_json("/tasks", &t("m")).status, 201);
    assert_eq!(names(&s.tasks()), ["c", "a", "b", "z", "y", "m"]);
    for n in ["c", "a", "b", "z", "y", "m"] {
        s.wait_state(n, "terminated");
    }

    // Removing one from the middle leaves the others in order; so does a restart.
    assert_eq!(s.call("DELETE", "/tasks/b", None).status, 204);
    s.wait_gone("b");
    assert_eq!(names(&s.tasks()), ["c", "a", "z", "y", "m"]);
    s.kill9();
    s.boot();
    assert_eq!(names(&s.tasks()), ["c", "a", "z", "y", "m"]);
    assert_eq!(s.post_json("/tasks", &t("b")).status, 201);
    assert_eq!(names(&s.tasks()), ["c", "a", "z", "y", "m", "b"]);
}

#[test]
fn a_task_being_removed_cannot_be_added_again_until_it_is_gone() {
    let s = Sandlet::start(&["--stop-grace-seconds", "5"]);
    let dir = scratch();
    let pid_file = dir.path().join("pid");
    // Ignores SIGTERM, so its removal takes the whole grace period.
    let stubborn = json!({"name": "stubborn", "process": {"command": ["sh", "-c",
        format!("trap '' TERM; echo $$ > {}; exec sleep 300", pid_file.display())]}});
    assert_eq!(s.set_tasks(json!([stubborn])).status, 200);
    s.wait_state("stubborn", "running");
    let old_pid = read_pid(&pid_file);

    let r = s.set_tasks(json!([]));
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json();
    assert_eq!(names(listed.as_array().unwrap()), ["stubborn"]);
    assert!(listed[0]["deletionTimestamp"].is_string(), "{listed}");

    let before = s.snapshot();
    let r = s.set_tasks(json!([stubborn]));
    r.assert_error(409, "TaskConflict");
    assert!(r.json()["message"].as_str().unwrap().contains("stubborn"));
    s.assert_nothing_lost(&before, "setTasks re-adding a task being removed");
    let r = s.post_json("/tasks", &stubborn);
    r.assert_error(409, "TaskConflict");
    s.assert_nothing_lost(&before, "POST /tasks re-adding a task being removed");
    assert!(pid_alive(old_pid), "still in its grace period");

    s.wait_gone("stubborn");
    assert!(!pid_alive(old_pid));
    std::fs::remove_file(&pid_file).unwrap();
    let r = s.set_tasks(json!([stubborn]));
    assert_eq!(r.status, 200, "{}", r.text());
    let fresh = s.wait_state("stubborn", "running");
    assert!(fresh.get("deletionTimestamp").is_none(), "{fresh}");
    let new_pid = read_pid(&pid_file);
    assert_ne!(new_pid, old_pid);
    assert!(pid_alive(new_pid));
}
