//! The controller's side of the task API against its contract in `proto-json/task-api`: every
//! task it declares validates against the schemas, and every task state in the fixtures is
//! counted as the status counters should count it.

#[allow(dead_code)]
#[path = "../../tests/common/schemas.rs"]
mod schemas;

use std::path::Path;

use sandlet_controller::batch::task_spec;
use sandlet_controller::tasks::{TaskState, state_of};
use serde_json::{Value, json};

fn proto() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto-json/task-api")
}

fn fixture(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(proto().join("fixtures").join(name)).unwrap()).unwrap()
}

#[test]
fn declared_tasks_and_set_tasks_bodies_match_the_schemas() {
    let schemas = schemas::Schemas::load(&proto());
    let template = json!({"spec": {"process": {
        "command": ["sh", "-c"], "args": ["exit 0"], "workingDir": "/work",
        "env": [{"name": "A", "value": "1"}]
    }, "timeoutSeconds": 30}});
    let patch = json!({"spec": {"process": {"env": [{"name": "B", "value": "2"}]}}});
    for task in [
        task_spec("bsb-0", &template, None).unwrap(),
        task_spec("bsb-1", &template, Some(&patch)).unwrap(),
    ] {
        let errors = schemas.errors("task", &task);
        assert!(errors.is_empty(), "{task}: {errors:?}");
        // What POST /setTasks carries: the pod's whole set, one task or none.
        for body in [json!([task]), json!([])] {
            let errors = schemas.errors("task-list", &body);
            assert!(errors.is_empty(), "{body}: {errors:?}");
        }
    }
}

#[test]
fn every_task_state_in_the_fixtures_is_counted_as_it_should_be() {
    for (file, expected) in [
        ("task-waiting.json", TaskState::Pending),
        ("task-running.json", TaskState::Running),
        ("task-deleting.json", TaskState::Running),
        ("task-succeeded.json", TaskState::Succeed),
        ("task-failed-exit-1.json", TaskState::Failed),
        ("task-killed-by-signal.json", TaskState::Failed),
        ("task-timeout-go.json", TaskState::Failed),
        ("task-exit-status-lost.json", TaskState::Failed),
    ] {
        assert_eq!(state_of(&fixture(file)), expected, "{file}");
    }
    assert_eq!(
        state_of(&fixture("watch-task.json")["task"]),
        TaskState::Succeed
    );
    for task in fixture("get-tasks-response-one.json").as_array().unwrap() {
        assert_ne!(state_of(task), TaskState::Unknown);
    }
}
