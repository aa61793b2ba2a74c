//! execd 1.1 in sidecar placement, in the simulated pod (`tests/common/pod.rs`): isolated
//! sessions are made inside the main container (its files, users and hostname; their layers in
//! its layers directory), identity-scoped file routes resolve the uid in the container's
//! `/etc/passwd`, and the real SDK's 1.1 checks pass there as they do in local mode.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::pod::{MAIN_HOSTNAME, MAIN_UID, Pod, WORKER_UID};
use common::{Sandlet, isolated_out, wait_until};
use serde_json::{Value, json};

/// The sidecar's capabilities (`common::pod::SIDECAR_CAPABILITIES`), and what overlayfs needs of
/// whoever mounts it: CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID (a runtime's defaults).
const ISOLATING_SIDECAR: &str = "-all,+sys_ptrace,+dac_read_search,+sys_admin,+sys_chroot,+setuid,+setgid,+setpcap,+kill,+chown,+dac_override,+fowner,+fsetid";

/// The layers directory of the main container (an emptyDir the OpenSandbox server mounts there
/// with `bootstrap.execd.isolation=enable`; here a directory of the rootfs, on the host's disk).
const LAYERS: &str = "var/lib/execd/isolation";

fn sidecar(pod: &Pod, args: &[&str]) -> Sandlet {
    std::fs::create_dir_all(pod.rootfs.join(LAYERS)).unwrap();
    let s = pod.sidecar_sandlet("", ISOLATING_SIDECAR, args);
    wait_until("sidecar sandlet is ready", || s.get("/ready").status == 200);
    s
}

/// A directory of the rootfs, owned by `uid`.
fn owned_dir(pod: &Pod, path: &str, uid: u32) {
    let dir = pod.rootfs.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
}

#[test]
fn isolated_sessions_are_made_inside_the_main_container() {
    let Some(pod) = Pod::start() else { return };
    owned_dir(&pod, "/work/ws", MAIN_UID);
    std::fs::write(pod.rootfs.join("work/ws/kept.txt"), "lower\n").unwrap();
    let s = sidecar(&pod, &[]);
    let caps = s.exec("GET", "/v1/isolated/capabilities", None, &[]).json();
    assert_eq!(caps["available"], true, "{caps}");
    assert_eq!(caps["hardening"]["cap_drop"]["state"], "active", "{caps}");
    let r = s.exec(
        "POST",
        "/v1/isolated/session",
        Some(&json!({"workspace": {"path": "/work/ws"}})),
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let session: Value = r.json();
    assert_eq!(
        session["uid"], MAIN_UID,
        "the main container's user by default"
    );
    let sid = session["session_id"].as_str().unwrap().to_string();
    let seen = isolated_out(
        &s,
        &sid,
        "id -u; hostname; cat /etc/sandbox-rootfs; cat kept.txt; echo new > new.txt; ls /proc | grep -c '^[0-9]'",
    );
    assert_eq!(
        seen[..4],
        [
            MAIN_UID.to_string(),
            MAIN_HOSTNAME.to_string(),
            "busybox-rootfs".to_string(),
            "lower".to_string()
        ]
    );
    assert!(seen[4].parse::<u32>().unwrap() <= 4, "{seen:?}");
    assert!(
        !pod.rootfs.join("work/ws/new.txt").exists(),
        "the overlay wrote through"
    );
    let upper = pod
        .rootfs
        .join(LAYERS)
        .join("sandlet")
        .join(&sid)
        .join("0/upper");
    assert_eq!(
        std::fs::metadata(upper.join("new.txt")).unwrap().uid(),
        MAIN_UID,
        "the layer is in the main container's layers directory"
    );
    let r = s.exec(
        "GET",
        &format!("/v1/isolated/session/{sid}/files/download?path=/work/ws/new.txt"),
        None,
        &[],
    );
    assert_eq!(r.text(), "new\n");
    let diff = s.exec(
        "GET",
        &format!("/v1/isolated/session/{sid}/diff"),
        None,
        &[],
    );
    assert_eq!(diff.status, 200);
    let r = s.exec(
        "POST",
        &format!("/v1/isolated/session/{sid}/commit"),
        None,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        std::fs::read_to_string(pod.rootfs.join("work/ws/new.txt")).unwrap(),
        "new\n"
    );
    assert_eq!(
        s.exec("DELETE", &format!("/v1/isolated/session/{sid}"), None, &[])
            .status,
        200
    );
    wait_until("the layers are removed", || !upper.exists());

    // Identity-scoped files: the uid is the container's (known only to its passwd), and what
    // it writes is its own; a uid only the sidecar's host knows is not a user there.
    owned_dir(&pod, "/home/worker", WORKER_UID);
    let r = common::upload_one(
        &s,
        &format!("/v1/filesystem/{WORKER_UID}/{WORKER_UID}"),
        "/home/worker/note.txt",
        b"worker\n",
        600,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let note = pod.rootfs.join("home/worker/note.txt");
    assert_eq!(std::fs::metadata(&note).unwrap().uid(), WORKER_UID);
    let host_only = std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse::<u32>().ok())
        .find(|uid| ![0, MAIN_UID, WORKER_UID].contains(uid))
        .expect("a user of the host");
    s.exec(
        "GET",
        &format!("/v1/filesystem/{host_only}/0/files/info?path=/work"),
        None,
        &[],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    s.exec(
        "GET",
        &format!("/v1/filesystem/{MAIN_UID}/{MAIN_UID}/files/download?path=/home/worker/note.txt"),
        None,
        &[],
    )
    .assert_error(403, "PERMISSION_DENIED");
    assert!(Path::new(&note).exists());
}

#[test]
#[ignore = "needs the OpenSandbox SDK from PyPI: `./test` installs it and runs every test"]
fn the_real_sdk_drives_execd_in_sidecar_placement() {
    let Some(pod) = Pod::start() else { return };
    owned_dir(&pod, "/work/sdk", MAIN_UID);
    owned_dir(&pod, "/work/sdk/theirs", WORKER_UID);
    owned_dir(&pod, "/work/sdk/isolated ws", MAIN_UID);
    // Readable by the main container's user (the plain file routes act as it), not the worker.
    let secret = pod.rootfs.join("work/sdk/secret");
    std::fs::write(&secret, "root only\n").unwrap();
    std::os::unix::fs::chown(&secret, Some(MAIN_UID), Some(MAIN_UID)).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let token = pod.rootfs.parent().unwrap().join("sdk-token");
    std::fs::write(&token, "sdk-token").unwrap();
    let s = sidecar(
        &pod,
        &[
            "--exec-envs-file",
            "/tmp/sandbox.env",
            "--exec-token-file",
            &token.to_string_lossy(),
        ],
    );
    let token = ("SANDLET_EXEC_TOKEN", "sdk-token".to_string());
    // execd 1.0's calls, as the SDK makes them, then what 1.1 added.
    common::run_sdk_checks(
        "sdk_checks.py",
        &s.exec_base,
        &[token.clone(), ("SANDLET_SDK_CWD", "/work/sdk".into())],
    );
    common::run_sdk_checks(
        "sdk11_checks.py",
        &s.exec_base,
        &[
            token,
            ("SANDLET_SDK_CWD", "/work/sdk".into()),
            (
                "SANDLET_SDK_IDENTITY",
                format!("{WORKER_UID}:{WORKER_UID}:/work/sdk/theirs:worker"),
            ),
            ("SANDLET_SDK_ISOLATION_WS", "/work/sdk/isolated ws".into()),
        ],
    );
}

#[test]
fn without_the_capabilities_overlays_need_sessions_are_unavailable_and_say_why() {
    let Some(pod) = Pod::start() else { return };
    std::fs::create_dir_all(pod.rootfs.join(LAYERS)).unwrap();
    let s = pod.sidecar_sandlet("", common::pod::SIDECAR_CAPABILITIES, &[]);
    wait_until("sidecar sandlet is ready", || s.get("/ready").status == 200);
    let caps = s.exec("GET", "/v1/isolated/capabilities", None, &[]).json();
    assert_eq!(caps["available"], false, "{caps}");
    assert!(
        caps["message"]
            .as_str()
            .unwrap()
            .contains("CAP_DAC_OVERRIDE"),
        "{caps}"
    );
    let r = s.exec(
        "POST",
        "/v1/isolated/session",
        Some(&json!({"workspace": {"path": "/work"}})),
        &[],
    );
    r.assert_error(503, "NOT_SUPPORTED");
    assert!(r.text().contains("CAP_DAC_OVERRIDE"), "{}", r.text());
}
