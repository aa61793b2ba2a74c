//! What a hostile or careless client, a bad flag or a crash at the wrong moment must not cost:
//! a task, an exit code, the server, or its memory and descriptors. Each test here failed on the
//! sandlet it was written against (the defect it guards is named in its doc comment).

mod common;

use common::{Sandlet, pid_alive};
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
