//! Locating the main container from the sidecar's place in a simulated pod, with
//! `sandlet target` (the same code sidecar mode uses).

mod common;

use std::os::unix::fs::MetadataExt;

use common::pod::{MAIN_UID, Pod, pod_pid};
use serde_json::Value;

const SANDLET: &str = env!("CARGO_BIN_EXE_sandlet");

fn located(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn the_marker_finds_the_main_container_and_never_sandlets_own_descendants() {
    let Some(pod) = Pod::start() else { return };
    // A decoy with the marker, started by the shell that then becomes sandlet: a descendant of
    // sandlet, as its tasks (which inherit the main container's environment) would be.
    let out = pod.sidecar_sh(&format!(
        "SANDBOX_MAIN_CONTAINER=main sleep 1000 >/dev/null 2>&1 & exec {SANDLET} target --main-container-name main"
    ));
    let target = located(&out);
    assert_eq!(target["process"]["pid"], pod_pid(pod.main_pid), "{target}");
    assert_eq!(target["uid"], MAIN_UID);
    let mnt = std::fs::metadata(format!("/proc/{}/ns/mnt", pod.main_pid))
        .unwrap()
        .ino();
    assert_eq!(target["mountNamespace"], mnt);

    // With the main container gone, only the decoy carries the marker: still not a target.
    assert_eq!(unsafe { kill(pod.main_pid, 9) }, 0);
    common::wait_until("the main container is gone", || {
        common::pod::uid_of(pod.main_pid).is_none()
    });
    // The first decoy outlived that sandlet (orphaned to the pause, in its own mount namespace):
    // to the locator it is indistinguishable from a container, so it goes first.
    let pod_ns = std::fs::metadata(format!("/proc/{}/ns/pid", pod.pid1))
        .unwrap()
        .ino();
    for pid in common::pod::pids() {
        let in_pod =
            std::fs::metadata(format!("/proc/{pid}/ns/pid")).is_ok_and(|m| m.ino() == pod_ns);
        if in_pod
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c == b"sleep\x001000\x00")
        {
            unsafe { kill(pid, 9) };
        }
    }
    let out = pod
        .sidecar("sh")
        .args([
            "-c",
            &format!(
                "SANDBOX_MAIN_CONTAINER=main sleep 1000 >/dev/null 2>&1 & exec {SANDLET} target"
            ),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no process carries"),
        "the decoy was taken: {:?} {stderr} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn a_missing_marker_is_a_clear_error() {
    let Some(pod) = Pod::start() else { return };
    let out = pod
        .sidecar(SANDLET)
        .args(["target", "--main-container-name", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SANDBOX_MAIN_CONTAINER=nope"), "{stderr}");
}

#[test]
fn without_a_marker_the_one_other_container_is_found_and_two_are_ambiguous() {
    let Some(pod) = Pod::start() else { return };
    let out = pod
        .sidecar(SANDLET)
        .args(["target", "--other-container"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        located(&String::from_utf8_lossy(&out.stdout))["process"]["pid"],
        pod_pid(pod.main_pid)
    );

    // A third container (its own mount namespace) makes the choice ambiguous.
    let mut third = pod.sidecar("sleep").arg("1000").spawn().unwrap();
    common::wait_until("a third container runs", || {
        pod.sidecar_sh("ls -d /proc/[0-9]* | wc -l")
            .trim()
            .parse::<usize>()
            .unwrap_or(0)
            >= 4
    });
    let out = pod
        .sidecar(SANDLET)
        .args(["target", "--other-container"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("other containers were found"),
        "{stderr}"
    );
    drop(pod);
    third.wait().unwrap();
}

#[test]
fn a_previous_sandlets_orphaned_task_is_never_taken_for_the_main_container() {
    let Some(pod) = Pod::start() else { return };
    let data = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut serving = pod
        .sidecar(SANDLET)
        .args(["serve", "--listen-addr", &format!("127.0.0.1:{port}")])
        // Not the default 0.0.0.0:44772, which another test's sandlet may hold.
        .args([
            "--exec-listen-addr",
            &format!("127.0.0.1:{}", common::free_port()),
        ])
        .arg("--data-dir")
        .arg(data.path().join("tasks"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_until("sandlet serves from the sidecar's place", || {
        ureq::get(format!("{base}/health")).call().is_ok()
    });
    // A task carrying the marker, as every task will once it inherits the main container's env.
    let task = serde_json::json!([{"name": "t", "process": {"command": ["sleep", "1000"],
        "env": [{"name": "SANDBOX_MAIN_CONTAINER", "value": "main"}]}}]);
    let mut resp = ureq::post(format!("{base}/setTasks"))
        .send(task.to_string())
        .unwrap();
    let tasks: Value = resp.body_mut().read_json().unwrap();
    assert!(tasks[0]["processStatus"]["running"].is_object(), "{tasks}");

    // sandlet dies: its shim and task are orphaned to the pause. Then the main container goes.
    pod.sidecar_sh("pkill -9 -f 'sandlet serv[e]'; true");
    serving.wait().unwrap();
    assert_eq!(unsafe { kill(pod.main_pid, 9) }, 0);
    common::wait_until("the main container is gone", || {
        common::pod::uid_of(pod.main_pid).is_none()
    });

    let out = pod.sidecar(SANDLET).arg("target").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no process carries"),
        "the orphaned task was taken for the main container: {stderr} {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
