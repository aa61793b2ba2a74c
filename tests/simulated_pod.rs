//! The simulated pod itself: later tests rely on it being a faithful stand-in for a pod with
//! `shareProcessNamespace: true`, so its properties are checked here.

mod common;

use std::os::unix::fs::MetadataExt;

use common::pod::{MAIN_HOSTNAME, MAIN_UID, Pod, wait_gone};

fn ns(pid: impl std::fmt::Display, kind: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .ino()
}

#[test]
fn the_main_container_is_isolated_like_a_container() {
    let Some(pod) = Pod::start() else { return };
    let main = pod.main_pid;
    // Its own filesystem, hostname and users; the host's are not visible.
    let root = format!("/proc/{main}/root");
    assert_eq!(
        std::fs::read_to_string(format!("{root}/etc/sandbox-rootfs")).unwrap(),
        "busybox-rootfs\n"
    );
    assert!(
        std::fs::read_to_string(format!("{root}/etc/passwd"))
            .unwrap()
            .contains("sandbox:x:1000:1000")
    );
    assert!(
        !std::path::Path::new(&format!("{root}/usr/bin")).exists(),
        "the host's /usr is not in the main container"
    );
    let hostname = std::process::Command::new("nsenter")
        .args(["-t", &main.to_string(), "-u", "hostname"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&hostname.stdout).trim(),
        MAIN_HOSTNAME
    );
    assert_eq!(common::pod::uid_of(main), Some(MAIN_UID));
    let environ = std::fs::read(format!("/proc/{main}/environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|e| e == b"SANDBOX_MAIN_CONTAINER=main")
    );
    // Namespaces: its own mount, UTS, IPC and PID; the host's network (one per pod, shared).
    for kind in ["mnt", "uts", "ipc", "pid"] {
        assert_ne!(ns(main, kind), ns("self", kind), "{kind} namespace");
    }
    assert_eq!(ns(main, "net"), ns("self", "net"));
}

#[test]
fn the_sidecar_shares_only_the_pid_namespace() {
    let Some(pod) = Pod::start() else { return };
    // From the sidecar's place: the pod's processes in /proc, the host's filesystem.
    let found = pod.sidecar_sh("for e in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $e 2>/dev/null | grep -qx SANDBOX_MAIN_CONTAINER=main && echo ${e%/environ}; done");
    let in_pod: Vec<&str> = found.lines().collect();
    assert_eq!(
        in_pod.len(),
        1,
        "exactly the main container carries the marker: {found}"
    );
    let pod_pid = common::pod::pod_pid(pod.main_pid);
    assert_eq!(
        in_pod[0],
        format!("/proc/{pod_pid}"),
        "the sidecar sees the main container under its pod pid"
    );
    assert!(
        !pod.sidecar_sh("ls /usr/bin | head -1").trim().is_empty(),
        "the sidecar has the host's filesystem"
    );
    assert_eq!(
        pod.sidecar_sh("cat /proc/1/comm").trim(),
        "sleep",
        "PID 1 is the pause"
    );
}

#[test]
fn dropping_the_pod_leaves_nothing_behind() {
    let Some(pod) = Pod::start() else { return };
    let pids = vec![pod.pid1, pod.main_pid];
    let rootfs = pod.rootfs.clone();
    let mut sidecar = pod.sidecar("sleep").arg("1000").spawn().unwrap();
    // The sidecar's process, once it runs inside the pod.
    let pod_ns = ns(pod.pid1, "pid");
    let mut in_pod = 0;
    common::wait_until("the sidecar runs in the pod", || {
        in_pod = common::pod::pids()
            .into_iter()
            .find(|&p| {
                std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == b"sleep\x001000\x00")
                    && std::fs::metadata(format!("/proc/{p}/ns/pid"))
                        .is_ok_and(|m| m.ino() == pod_ns)
            })
            .unwrap_or(0);
        in_pod != 0
    });
    drop(pod);
    wait_gone(&[pids.clone(), vec![in_pod]].concat());
    sidecar.wait().unwrap();
    assert!(!rootfs.exists(), "the rootfs is removed");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&rootfs.to_string_lossy().into_owned()),
        "no mount of the pod is left on the host"
    );
}
