//! Sidecar mode in a simulated pod: sandlet shares only the pod's PID namespace, holds only the
//! documented capability set, and starts tasks inside the main container.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::pod::{MAIN_HOSTNAME, MAIN_UID, Pod, SIDECAR_CAPABILITIES, WORKER_UID, pod_pid};
use common::{Sandlet, wait_until};
use serde_json::{Value, json};

const CAP_SYS_PTRACE: u32 = 19;

fn sidecar(pod: &Pod, setup: &'static str, capabilities: &'static str) -> Sandlet {
    pod.sidecar_sandlet(setup, capabilities, &[])
}

fn wait_ready(s: &Sandlet) -> Value {
    let mut last = String::new();
    let mut ready = Value::Null;
    wait_until("sidecar sandlet is ready", || {
        let r = s.get("/ready");
        last = r.text();
        if r.status == 200 {
            ready = r.json();
        }
        r.status == 200
    });
    assert_eq!(ready["ready"], true, "{last}");
    ready
}

fn stdout(s: &Sandlet, name: &str) -> String {
    s.get(&format!("/tasks/{name}/logs")).text()
}

fn terminated(s: &Sandlet, name: &str) -> Value {
    s.wait_state(name, "terminated")["processStatus"]["terminated"].clone()
}

fn mnt_ns(pid: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .unwrap()
        .ino()
}

/// Host pids of the pod's processes whose command line is exactly `cmdline` (NUL-separated).
fn pod_processes(pod: &Pod, cmdline: &[u8]) -> Vec<i32> {
    let pod_ns = std::fs::metadata(format!("/proc/{}/ns/pid", pod.pid1))
        .unwrap()
        .ino();
    common::pod::pids()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == cmdline)
                && std::fs::metadata(format!("/proc/{p}/ns/pid")).is_ok_and(|m| m.ino() == pod_ns)
                && common::pid_alive(*p)
        })
        .collect()
}

#[test]
fn a_task_runs_inside_the_main_container_as_its_user_with_its_environment() {
    let Some(pod) = Pod::start() else { return };
    let s = sidecar(&pod, "", SIDECAR_CAPABILITIES);
    let ready = wait_ready(&s);
    assert_eq!(ready["target"]["pid"], pod_pid(pod.main_pid), "{ready}");
    assert_eq!(ready["target"]["uid"], MAIN_UID);

    let script = "cat /etc/sandbox-rootfs; hostname; echo MAIN_VAR=$MAIN_VAR TASK_VAR=$TASK_VAR; \
                  id -u; id -G; pwd; echo HOME=$HOME USER=$USER; \
                  test -e /usr/bin && echo host-usr-visible; \
                  grep CapBnd /proc/self/status; exit 7";
    let task = |name: &str, extra: Value| {
        let mut process = json!({
            "command": ["sh", "-c", script],
            "env": [{"name": "TASK_VAR", "value": "from-task"}, {"name": "MAIN_VAR", "value": "overridden"}],
        });
        process
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"name": name, "process": process})
    };
    let r = s.set_tasks(json!([
        task("default-user", json!({})),
        task(
            "worker",
            json!({"user": "worker", "workingDir": "/home/worker"})
        ),
        task("root", json!({"user": "0"})),
    ]));
    assert_eq!(r.status, 200, "{}", r.text());

    let t = terminated(&s, "default-user");
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(7), Some("Failed")),
        "{t}"
    );
    let out = stdout(&s, "default-user");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "busybox-rootfs",
        "the rootfs's files, not the host's: {out}"
    );
    assert_eq!(lines[1], MAIN_HOSTNAME, "{out}");
    assert_eq!(
        lines[2], "MAIN_VAR=overridden TASK_VAR=from-task",
        "the main container's environment under the task's: {out}"
    );
    assert_eq!(
        lines[3],
        MAIN_UID.to_string(),
        "the main container's user: {out}"
    );
    assert_eq!(lines[4], "1000 2000", "and its supplementary groups: {out}");
    assert_eq!(
        lines[5], "/work",
        "the main container's working directory: {out}"
    );
    assert_eq!(lines[6], "HOME=/home/sandbox USER=sandbox", "{out}");
    assert!(!out.contains("host-usr-visible"), "{out}");

    terminated(&s, "worker");
    let out = stdout(&s, "worker");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        (lines[3], lines[4], lines[5], lines[6]),
        (
            WORKER_UID.to_string().as_str(),
            "1001 2000",
            "/home/worker",
            "HOME=/home/worker USER=worker"
        ),
        "a user only the rootfs's passwd knows: {out}"
    );

    // A root task holds no capability the main container's bounding set lacks, although
    // sandlet holds CAP_SYS_PTRACE.
    terminated(&s, "root");
    let out = stdout(&s, "root");
    assert_eq!(out.lines().nth(3), Some("0"), "{out}");
    let task_bounding = u64::from_str_radix(
        out.lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .unwrap()
            .trim(),
        16,
    )
    .unwrap();
    let sandlet_bounding = capability_set(s.pid(), "CapBnd:");
    let main_bounding = capability_set(pod.main_pid, "CapBnd:");
    assert_ne!(sandlet_bounding & (1 << CAP_SYS_PTRACE), 0);
    assert_eq!(task_bounding, sandlet_bounding & main_bounding, "{out}");

    // An unknown user and a missing working directory fail the start, saying why.
    let r = s.set_tasks(json!([
        {"name": "nobody", "process": {"command": ["true"], "user": "ghost"}},
        {"name": "nodir", "process": {"command": ["true"], "workingDir": "/usr/bin"}},
    ]));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = terminated(&s, "nobody");
    assert_eq!(t["reason"], "StartFailed", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("/etc/passwd"),
        "{t}"
    );
    let t = terminated(&s, "nodir");
    assert_eq!(t["reason"], "StartFailed", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("/usr/bin"),
        "a directory of the sidecar's filesystem is not the container's: {t}"
    );
}

#[test]
fn stops_and_timeouts_kill_the_whole_tree_and_a_restarted_sandlet_finds_its_tasks() {
    let Some(pod) = Pod::start() else { return };
    let mut s = sidecar(&pod, "", SIDECAR_CAPABILITIES);
    wait_ready(&s);
    let go = pod.rootfs.join("tmp/go");
    let r = s.set_tasks(json!([
        {"name": "timed", "process": {"command": ["sh", "-c", "sleep 1001 & sleep 1002; wait"], "timeoutSeconds": 3}},
        {"name": "waits", "process": {"command": ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.02; done; exit 42"]}},
        {"name": "removed", "process": {"command": ["sh", "-c", "sleep 1003 & sleep 1004; wait"]}},
    ]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_state("timed", "running");
    s.wait_state("removed", "running");
    wait_until("the grandchildren run", || {
        [&b"sleep\x001001\x00"[..], b"sleep\x001003\x00"]
            .iter()
            .all(|c| pod_processes(&pod, c).len() == 1)
    });
    let grandchild = pod_processes(&pod, b"sleep\x001001\x00")[0];
    assert_eq!(
        mnt_ns(grandchild),
        mnt_ns(pod.main_pid),
        "tasks run in the main container"
    );

    s.kill9();
    s.boot();
    wait_ready(&s);
    assert!(s.task("waits").unwrap()["processStatus"]["running"].is_object());

    // Removal stops the whole tree, grandchild included.
    let r = s.set_tasks(json!([
        {"name": "timed", "process": {"command": ["sh", "-c", "sleep 1001 & sleep 1002; wait"], "timeoutSeconds": 3}},
        {"name": "waits", "process": {"command": ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.02; done; exit 42"]}},
    ]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_gone("removed");
    assert!(pod_processes(&pod, b"sleep\x001003\x00").is_empty());

    // The timeout still holds after the restart and takes the grandchild too.
    let t = terminated(&s, "timed");
    assert_eq!(t["reason"], "TaskTimeout", "{t}");
    wait_until("the timed-out task's grandchild is gone", || {
        pod_processes(&pod, b"sleep\x001001\x00").is_empty()
    });

    // An adopted task's exit code is still exact.
    std::fs::write(&go, "").unwrap();
    let t = terminated(&s, "waits");
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(42), Some("Failed")),
        "{t}"
    );
}

#[test]
fn a_main_container_restart_fails_its_tasks_and_the_next_task_runs_in_the_new_one() {
    let Some(mut pod) = Pod::start() else { return };
    // Located without the marker, so re-resolution needs none either.
    let s = pod.sidecar_sandlet("", SIDECAR_CAPABILITIES, &["--other-container"]);
    wait_ready(&s);
    let r = s.set_tasks(json!([{"name": "old", "process": {"command": ["sleep", "1005"]}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    s.wait_state("old", "running");
    let old_main = pod_pid(pod.main_pid);

    pod.restart_main();
    let t = terminated(&s, "old");
    assert_eq!(t["reason"], "MainContainerRestarted", "{t}");
    assert_ne!(t["exitCode"], 0, "{t}");
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .contains(&format!("process {old_main} ended")),
        "{t}"
    );
    assert!(pod_processes(&pod, b"sleep\x001005\x00").is_empty());

    wait_until("/ready names the new incarnation", || {
        s.get("/ready").json()["target"]["pid"] == pod_pid(pod.main_pid)
    });
    let r = s.set_tasks(json!([
        {"name": "new", "process": {"command": ["readlink", "/proc/self/ns/mnt"]}},
    ]));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = terminated(&s, "new");
    assert_eq!(t["exitCode"], 0, "{t}");
    assert_eq!(
        stdout(&s, "new").trim(),
        format!("mnt:[{}]", mnt_ns(pod.main_pid)),
        "the new task runs in the new incarnation"
    );
    assert_ne!(mnt_ns(pod.main_pid), 0);
}

#[test]
fn tasks_join_the_main_containers_cgroups_v1_and_v2_when_writable_and_say_so_when_not() {
    let Some(mut pod) = Pod::start() else { return };
    let mut trees = Vec::new();
    for (kind, root) in [
        ("v2", "/sys/fs/cgroup/unified"),
        ("v2", "/sys/fs/cgroup"),
        ("v1", "/sys/fs/cgroup/pids"),
    ] {
        let fstype = if kind == "v2" { "cgroup2" } else { "cgroup" };
        if trees.iter().any(|(k, _)| *k == kind) || !is_mount_of(root, fstype) {
            continue;
        }
        let dir = Path::new(root)
            .join(format!("sandlet-{}", pod.mark()))
            .join("main");
        pod.put_main_in(&dir);
        trees.push((kind, dir));
    }
    if trees.is_empty() {
        eprintln!("skipped: no cgroup v1 pids or cgroup v2 mount on this machine");
        return;
    }
    for kind in ["v1", "v2"] {
        if !trees.iter().any(|(k, _)| *k == kind) {
            eprintln!("note: no cgroup {kind} tree here; only the other one is tested");
        }
    }
    let s = sidecar(&pod, "", SIDECAR_CAPABILITIES);
    let ready = wait_ready(&s);
    let joined: Vec<&str> = ready["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["procs"].is_string())
        .map(|c| c["hierarchy"].as_str().unwrap())
        .collect();
    for (kind, _) in &trees {
        let hierarchy = if *kind == "v2" { "unified" } else { "pids" };
        assert!(joined.contains(&hierarchy), "{kind}: {ready}");
    }
    let r = s.set_tasks(
        json!([{"name": "where", "process": {"command": ["cat", "/proc/self/cgroup"]}}]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    terminated(&s, "where");
    let out = stdout(&s, "where");
    let main_cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", pod.main_pid)).unwrap();
    for (_, dir) in &trees {
        let path = format!("/sandlet-{}/main", pod.mark());
        assert!(
            out.contains(&path),
            "{dir:?}: task in {out}, main in {main_cgroups}"
        );
    }
    drop(s);

    // The same trees mounted read-only in the sidecar: tasks stay in sandlet's cgroups, and
    // /health says so.
    let s = sidecar(
        &pod,
        "for m in /sys/fs/cgroup/unified /sys/fs/cgroup/pids /sys/fs/cgroup; do mount -o remount,bind,ro $m 2>/dev/null; done;",
        SIDECAR_CAPABILITIES,
    );
    wait_ready(&s);
    let health = s.get("/health").json();
    let cgroups = health["sidecar"]["cgroups"].as_array().unwrap();
    for (kind, _) in &trees {
        let hierarchy = if *kind == "v2" { "unified" } else { "pids" };
        let c = cgroups
            .iter()
            .find(|c| c["hierarchy"] == hierarchy)
            .unwrap();
        assert!(c["procs"].is_null(), "{c}");
        assert!(c["note"].as_str().unwrap().contains("not writable"), "{c}");
    }
    let r = s.set_tasks(
        json!([{"name": "where", "process": {"command": ["cat", "/proc/self/cgroup"]}}]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    terminated(&s, "where");
    let out = stdout(&s, "where");
    assert!(!out.contains(&format!("sandlet-{}", pod.mark())), "{out}");
}

#[test]
fn without_the_capabilities_to_enter_sandlet_is_not_ready_and_says_which() {
    let Some(pod) = Pod::start() else { return };
    let s = sidecar(
        &pod,
        "",
        "-all,+sys_ptrace,+dac_read_search,+setuid,+setgid,+setpcap,+kill",
    );
    let mut body = Value::Null;
    wait_until("/ready explains itself", || {
        let r = s.get("/ready");
        body = r.json();
        r.status == 503
            && body["reason"]
                .as_str()
                .is_some_and(|m| m.contains("CAP_SYS_CHROOT"))
    });
    assert_eq!(body["ready"], false);
    let r = s.set_tasks(json!([{"name": "t", "process": {"command": ["true"]}}]));
    assert_eq!(r.status, 200);
    let t = terminated(&s, "t");
    assert_eq!(t["reason"], "StartFailed", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("CAP_SYS_CHROOT"),
        "{t}"
    );
    // /health stays 200: restarting sandlet would not help.
    assert_eq!(s.get("/health").status, 200);
}

fn capability_set(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let value = status.lines().find_map(|l| l.strip_prefix(field)).unwrap();
    u64::from_str_radix(value.trim(), 16).unwrap()
}

fn is_mount_of(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| {
            let mut halves = l.split(" - ");
            let left: Vec<&str> = halves.next().unwrap_or("").split(' ').collect();
            let right = halves.next().unwrap_or("");
            left.get(4) == Some(&path) && right.split(' ').next() == Some(fstype)
        })
}

#[test]
fn exec_api_commands_and_sessions_run_in_the_main_container() {
    let Some(pod) = Pod::start() else { return };
    let s = sidecar(&pod, "", SIDECAR_CAPABILITIES);
    wait_ready(&s);
    let events = s.exec_events(
        "/command",
        &json!({"command": "hostname; id -u; cat /etc/sandbox-rootfs; echo $MAIN_VAR $HOME; pwd; echo token=$EXECD_ACCESS_TOKEN"}),
    );
    assert_eq!(
        common::stream_lines(&events, "stdout"),
        [
            MAIN_HOSTNAME,
            "1000",
            "busybox-rootfs",
            "from-main /home/sandbox",
            "/work",
            // The container's environment, without execd's token variable: an execd token
            // is sandlet's credential, never a command's.
            "token="
        ],
        "{events:?}"
    );
    let events = s.exec_events(
        "/command",
        &json!({"command": "id -u; id -G; echo $HOME; pwd", "uid": WORKER_UID, "cwd": "/home/worker"}),
    );
    assert_eq!(
        common::stream_lines(&events, "stdout"),
        ["1001", "1001 2000", "/home/worker", "/home/worker"],
        "a uid resolved in the rootfs's passwd: {events:?}"
    );
    // A directory of the sidecar's filesystem is not the container's.
    let r = s.exec(
        "POST",
        "/command",
        Some(&json!({"command": "true", "cwd": "/usr/bin"})),
        &[],
    );
    r.assert_error(400, "INVALID_REQUEST_BODY");

    let sid = s.exec("POST", "/session", None, &[]).json()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/session/{sid}/run");
    s.exec_events(&path, &json!({"command": "export Z=zz; cd /tmp"}));
    let events = s.exec_events(
        &path,
        &json!({"command": "echo $Z $MAIN_VAR; pwd; hostname"}),
    );
    assert_eq!(
        common::stream_lines(&events, "stdout"),
        ["zz from-main", "/tmp", MAIN_HOSTNAME],
        "{events:?}"
    );
    let metrics = s.exec("GET", "/metrics", None, &[]).json();
    assert!(metrics["mem_used_mib"].as_f64().unwrap() > 0.0, "{metrics}");
}

/// A container runtime's default capabilities (containerd's, as of 2.x) plus the one the
/// OpenSandbox Pool template adds.
const RUNTIME_DEFAULTS_AND_SYS_PTRACE: &str = "-all,+chown,+dac_override,+fsetid,+fowner,+mknod,\
     +net_raw,+setgid,+setuid,+setfcap,+setpcap,+net_bind_service,+sys_chroot,+kill,\
     +audit_write,+sys_ptrace";

#[test]
fn the_template_users_have_works_as_it_is_no_flags_and_only_sys_ptrace_added() {
    let Some(pod) = Pod::start() else { return };
    // No flag, no environment: sandlet sees it shares the pod's PID namespace, finds the main
    // container, and enters it by chroot, the only way the capabilities allow.
    let s = pod.sidecar_sandlet_unconfigured(RUNTIME_DEFAULTS_AND_SYS_PTRACE);
    let ready = wait_ready(&s);
    assert_eq!(ready["target"]["pid"], pod_pid(pod.main_pid), "{ready}");
    let health = s.get("/health").json();
    assert_eq!(health["sidecar"]["method"], "chroot", "{health}");
    let not_joined = health["sidecar"]["namespacesNotJoined"].as_array().unwrap();
    assert!(
        not_joined.iter().any(|n| n == "mnt"),
        "/health says what chroot leaves out: {health}"
    );

    let r = s.set_tasks(json!([{"name": "t", "process": {"command": ["sh", "-c",
        "cat /etc/sandbox-rootfs; id -u; echo $MAIN_VAR; pwd; test -e /usr/bin || echo no-host-usr; exit 5"]}}]));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = terminated(&s, "t");
    assert_eq!(t["exitCode"], 5, "{t}");
    assert_eq!(
        stdout(&s, "t").lines().collect::<Vec<_>>(),
        [
            "busybox-rootfs",
            "1000",
            "from-main",
            "/work",
            "no-host-usr"
        ],
        "the main container's files, user, environment and directory"
    );
    let events = s.exec_events(
        "/command",
        &json!({"command": "cat /etc/sandbox-rootfs; id -u"}),
    );
    assert_eq!(
        common::stream_lines(&events, "stdout"),
        ["busybox-rootfs", "1000"],
        "{events:?}"
    );
}
