//! The change feed (`GET /watchTasks`): a snapshot, then every change as it happens.

mod common;

use common::{Sandlet, recv_until};
use serde_json::json;

#[test]
fn feed_delivers_snapshot_then_every_change_in_version_order() {
    let s = Sandlet::start(&[]);
    assert_eq!(
        s.set_tasks(json!([{"name": "before", "process": {"command": ["true"]}}]))
            .status,
        200
    );
    s.wait_state("before", "terminated");

    let feed = s.watch();
    let (_, snapshot) = recv_until(&feed, |e, _| e == "snapshot");
    assert_eq!(snapshot["tasks"].as_array().unwrap().len(), 1, "{snapshot}");
    assert_eq!(snapshot["tasks"][0]["name"], "before");
    let mut version = snapshot["version"].as_u64().unwrap();

    assert_eq!(
        s.set_tasks(json!([{"name": "t", "process": {"command": ["sh", "-c", "exit 4"]}}]))
            .status,
        200
    );
    let mut seen = Vec::new();
    loop {
        let (event, data) = recv_until(&feed, |_, _| true);
        let v = data["version"].as_u64().unwrap();
        assert!(v > version, "versions only grow: {v} after {version}");
        version = v;
        match event.as_str() {
            "deleted" => {
                seen.push(format!("deleted:{}", data["name"].as_str().unwrap()));
            }
            "task" => {
                let status = data["task"]["processStatus"].as_object().unwrap();
                let state = status.keys().next().unwrap().clone();
                seen.push(format!(
                    "{}:{state}",
                    data["task"]["name"].as_str().unwrap()
                ));
                if data["task"]["name"] == "t" && state == "terminated" {
                    assert_eq!(data["task"]["processStatus"]["terminated"]["exitCode"], 4);
                    break;
                }
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert!(seen.contains(&"deleted:before".to_string()), "{seen:?}");
    assert!(seen.contains(&"t:running".to_string()), "{seen:?}");

    assert_eq!(s.call("DELETE", "/tasks/t", None).status, 204);
    recv_until(&feed, |e, d| e == "deleted" && d["name"] == "t");
}

#[test]
fn feed_subscribers_do_not_see_anything_twice_or_out_of_order_under_load() {
    let s = Sandlet::start(&["--max-active-tasks", "40", "--max-tasks", "40"]);
    let feed = s.watch();
    recv_until(&feed, |e, _| e == "snapshot");
    let tasks: Vec<_> = (0..20)
        .map(|i| json!({"name": format!("t{i}"), "process": {"command": ["true"]}}))
        .collect();
    assert_eq!(s.set_tasks(json!(tasks)).status, 200);
    let mut ended = std::collections::BTreeSet::new();
    let mut last = 0;
    while ended.len() < 20 {
        let (_, data) = recv_until(&feed, |e, _| e == "task");
        let v = data["version"].as_u64().unwrap();
        assert!(v > last);
        last = v;
        if data["task"]["processStatus"]["terminated"].is_object() {
            assert!(
                ended.insert(data["task"]["name"].as_str().unwrap().to_string()),
                "terminated twice: {data}"
            );
        }
    }
}
