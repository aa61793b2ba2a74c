//! Isolated sessions (`/v1/isolated/*`, execd 1.1) in local mode, over plain HTTP, as root:
//! real namespaces and overlays, checked from inside the session (what its processes see) and
//! from outside (what stays untouched, what is cleaned up). The SDK's view of them is in
//! `tests/sdk/sdk11_checks.py`; sidecar placement in `tests/sidecar_isolation.rs`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::{Reply, Sandlet, isolated_out, pid_alive, scratch, stream_lines, wait_until};
use serde_json::{Value, json};

fn create(s: &Sandlet, body: Value) -> Value {
    let r = s.exec("POST", "/v1/isolated/session", Some(&body), &[]);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

fn id(session: &Value) -> String {
    session["session_id"].as_str().unwrap().to_string()
}

fn run(s: &Sandlet, session: &str, code: &str) -> Vec<Value> {
    s.exec_events(
        &format!("/v1/isolated/session/{session}/run"),
        &json!({"code": code}),
    )
}

fn exit_code(events: &[Value]) -> i64 {
    let last = events.last().unwrap();
    match last["type"].as_str() {
        Some("execution_complete") => 0,
        _ => last["error"]["evalue"].as_str().unwrap().parse().unwrap(),
    }
}

fn files(s: &Sandlet, session: &str, route: &str, path: &Path) -> Reply {
    s.exec(
        "GET",
        &format!(
            "/v1/isolated/session/{session}{route}?path={}",
            q(&path.to_string_lossy())
        ),
        None,
        &[],
    )
}

fn q(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// sandlet with its persistent layers in `layers` (a directory overlayfs takes as upper).
fn start(layers: &Path, extra: &[&str]) -> Sandlet {
    let mut args = vec![
        "--exec-isolation-dir",
        layers.to_str().unwrap(),
        "--exec-envs-file",
        "off",
    ];
    args.extend_from_slice(extra);
    Sandlet::start(&args)
}

fn pid1_of(s: &Sandlet, session: &str) -> i32 {
    // The holder's first line says it; from outside, the session's PID 1 is the process whose
    // PID namespace differs and whose cmdline names the role.
    let events = run(s, session, "readlink /proc/1/ns/pid");
    let ns = stream_lines(&events, "stdout")[0].to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .is_ok_and(|l| l.to_string_lossy() == ns)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("isolate"))
        })
        .expect("the session's PID 1")
}

#[test]
fn a_session_has_its_own_processes_tmp_and_root_and_its_overlay_spares_the_workspace() {
    if !common::root_or_skip("isolated sessions") {
        return;
    }
    let dir = scratch();
    let (layers, ws) = (dir.path().join("layers"), dir.path().join("ws"));
    std::fs::create_dir_all(&layers).unwrap();
    std::fs::create_dir_all(ws.join("sub")).unwrap();
    std::fs::write(ws.join("kept.txt"), "lower\n").unwrap();
    std::fs::write(ws.join("doomed.txt"), "delete me\n").unwrap();
    let s = start(&layers, &[]);
    let caps = s.exec("GET", "/v1/isolated/capabilities", None, &[]).json();
    assert_eq!(caps["available"], true, "{caps}");
    assert_eq!(caps["diff_supported"], true, "{caps}");
    let wsp = ws.to_string_lossy().to_string();
    let session = create(&s, json!({"workspace": {"path": wsp}}));
    assert_eq!(session["profile"], "strict");
    assert_eq!(session["overlays"][0]["mode"], "overlay");
    assert_eq!(session["workspace"]["path"], wsp.as_str());
    let sid = id(&session);
    assert_eq!(sid.len(), 36, "a UUID, as the SDK parses it");

    // Its own PID namespace: PID 1 and the run itself, nothing of the sandbox.
    let ps = isolated_out(&s, &sid, "ls /proc | grep -c '^[0-9]'; echo $$; pwd");
    assert!(ps[0].parse::<u32>().unwrap() <= 4, "{ps:?}");
    assert_eq!(ps[2], wsp, "runs start in the workspace");
    // A read-only root, its own /tmp.
    let events = run(&s, &sid, "touch /usr/sandlet-was-here");
    assert_ne!(exit_code(&events), 0, "{events:?}");
    assert!(!Path::new("/usr/sandlet-was-here").exists());
    isolated_out(&s, &sid, "echo private > /tmp/only-here");
    assert!(!Path::new("/tmp/only-here").exists());
    // The overlay: the session changes its workspace, the sandbox's stays as it was.
    isolated_out(
        &s,
        &sid,
        "cat kept.txt; echo changed > kept.txt; echo new > sub/new.txt; rm doomed.txt; ln -s kept.txt link",
    );
    assert_eq!(
        isolated_out(&s, &sid, "cat kept.txt sub/new.txt"),
        ["changed", "new"]
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("kept.txt")).unwrap(),
        "lower\n"
    );
    assert!(ws.join("doomed.txt").exists() && !ws.join("sub/new.txt").exists());

    // Its files, through the API: what its processes see, nothing outside its mounts.
    let r = files(&s, &sid, "/files/download", &ws.join("kept.txt"));
    assert_eq!(r.text(), "changed\n");
    let r = common::upload_one(
        &s,
        &format!("/v1/isolated/session/{sid}"),
        &ws.join("up.txt").to_string_lossy(),
        b"uploaded\n",
        644,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(isolated_out(&s, &sid, "cat up.txt"), ["uploaded"]);
    assert!(!ws.join("up.txt").exists());
    let listed = files(&s, &sid, "/directories/list", &ws);
    assert_eq!(listed.status, 200, "{}", listed.text());
    for outside in [
        Path::new("/etc/hostname").to_path_buf(),
        ws.join("../escape"),
        layers.clone(),
    ] {
        files(&s, &sid, "/files/info", &outside).assert_error(400, "INVALID_REQUEST_BODY");
    }

    // diff: the changes as a tar.gz, deletions as whiteouts; commit writes them below.
    let diff = s.exec(
        "GET",
        &format!("/v1/isolated/session/{sid}/diff"),
        None,
        &[],
    );
    assert_eq!(diff.status, 200);
    assert_eq!(diff.header("content-type"), Some("application/gzip"));
    let tar = dir.path().join("diff.tar.gz");
    std::fs::write(&tar, &diff.body).unwrap();
    let listing = std::process::Command::new("tar")
        .arg("tzf")
        .arg(&tar)
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listing.stdout);
    let rel = wsp.trim_start_matches('/');
    for want in [
        "kept.txt",
        "sub/new.txt",
        ".wh.doomed.txt",
        "link",
        "up.txt",
    ] {
        assert!(
            names.lines().any(|l| l == format!("{rel}/{want}")),
            "{want} not in the diff:\n{names}"
        );
    }
    let r = s.exec(
        "POST",
        &format!("/v1/isolated/session/{sid}/commit"),
        None,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        std::fs::read_to_string(ws.join("kept.txt")).unwrap(),
        "changed\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("sub/new.txt")).unwrap(),
        "new\n"
    );
    assert!(!ws.join("doomed.txt").exists(), "the whiteout deleted it");
    assert_eq!(
        std::fs::read_link(ws.join("link")).unwrap(),
        Path::new("kept.txt")
    );
    assert_eq!(
        isolated_out(&s, &sid, "cat kept.txt"),
        ["changed"],
        "the session sees the same"
    );

    // State, list, and the end: every process gone, the layers removed, the id unknown.
    let state = s
        .exec("GET", &format!("/v1/isolated/session/{sid}"), None, &[])
        .json();
    assert_eq!(state["status"], "active");
    assert!(state["idle_remaining_seconds"].as_u64().unwrap() <= 1800);
    assert!(state["last_run_at"].as_str().unwrap() >= state["created_at"].as_str().unwrap());
    let list = s.exec("GET", "/v1/isolated/sessions", None, &[]).json();
    assert_eq!(list["sessions"][0]["session_id"], sid.as_str());
    let pid1 = pid1_of(&s, &sid);
    isolated_out(&s, &sid, "sleep 1013 >/dev/null 2>&1 &");
    let r = s.exec("DELETE", &format!("/v1/isolated/session/{sid}"), None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!pid_alive(pid1), "the session's PID 1 outlived its delete");
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| c == b"sleep\x001013\x00");
    assert!(!left, "a process the session left behind outlived it");
    wait_until("the layers are removed", || {
        std::fs::read_dir(layers.join("sandlet")).is_ok_and(|mut d| d.next().is_none())
    });
    s.exec("GET", &format!("/v1/isolated/session/{sid}"), None, &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
}

#[test]
fn background_runs_report_status_and_logs_and_foreground_timeouts_kill() {
    if !common::root_or_skip("isolated sessions") {
        return;
    }
    let dir = scratch();
    let layers = dir.path().join("layers");
    std::fs::create_dir_all(&layers).unwrap();
    let s = start(&layers, &[]);
    let ws = dir.path().join("ws");
    let sid = id(&create(
        &s,
        json!({"overlays": [{"path": ws.to_string_lossy(), "persist": false}], "profile": "balanced"}),
    ));
    assert!(ws.is_dir(), "a missing workspace is made");
    let r = s.exec(
        "POST",
        &format!("/v1/isolated/session/{sid}/run"),
        Some(&json!({"code": "echo one; sleep 0.3; echo two >&2; exit 3", "background": true, "envs": {"X": "y"}})),
        &[],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let started = r.json();
    assert_eq!(started["session_id"], sid.as_str());
    let run_id = started["run_id"].as_str().unwrap().to_string();
    let status_path = format!("/v1/isolated/session/{sid}/runs/{run_id}");
    let first = s.exec("GET", &status_path, None, &[]).json();
    assert_eq!(first["run_id"], run_id.as_str());
    let mut last = Value::Null;
    wait_until("the background run ends", || {
        last = s.exec("GET", &status_path, None, &[]).json();
        last["running"] == false
    });
    assert_eq!(last["exit_code"], 3, "{last}");
    assert!(last["finished_at"].is_string());
    let logs = s.exec("GET", &format!("{status_path}/logs"), None, &[]);
    assert_eq!(logs.text(), "one\ntwo\n");
    let cursor = logs
        .header("execd-isolated-tail-cursor")
        .unwrap()
        .to_string();
    assert_eq!(cursor, "8");
    let more = s.exec(
        "GET",
        &format!("{status_path}/logs?cursor={cursor}"),
        None,
        &[],
    );
    assert_eq!(more.text(), "");
    s.exec(
        "GET",
        &format!("/v1/isolated/session/{sid}/runs/no-such-run"),
        None,
        &[],
    )
    .assert_error(404, "CONTEXT_NOT_FOUND");

    // A foreground run's timeout kills it (and what it started).
    let t = std::time::Instant::now();
    let events = s.exec_events(
        &format!("/v1/isolated/session/{sid}/run"),
        &json!({"code": "sleep 30 & sleep 31", "timeout_seconds": 1, "envs": {"A": "b"}}),
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(exit_code(&events), -1, "{events:?}");
    // The run's own variables on top of the session's.
    assert_eq!(
        stream_lines(
            &s.exec_events(
                &format!("/v1/isolated/session/{sid}/run"),
                &json!({"code": "echo $A", "envs": {"A": "b"}})
            ),
            "stdout"
        ),
        ["b"]
    );
    // No diff without a persistent overlay.
    s.exec(
        "GET",
        &format!("/v1/isolated/session/{sid}/diff"),
        None,
        &[],
    )
    .assert_error(404, "CONTEXT_NOT_FOUND");
    // An idle session ends by itself and says so.
    let quick = id(&create(
        &s,
        json!({"overlays": [{"path": ws.to_string_lossy(), "mode": "ro"}], "idle_timeout_seconds": 1}),
    ));
    assert_eq!(
        isolated_out(&s, &quick, "touch x 2>/dev/null || echo read-only"),
        ["read-only"]
    );
    wait_until("the idle session is destroyed", || {
        s.exec("GET", &format!("/v1/isolated/session/{quick}"), None, &[])
            .json()["status"]
            == "destroyed"
    });
    s.exec(
        "POST",
        &format!("/v1/isolated/session/{quick}/run"),
        Some(&json!({"code": "true"})),
        &[],
    )
    .assert_error(409, "CONFLICT");
    assert_eq!(
        s.exec(
            "DELETE",
            &format!("/v1/isolated/session/{quick}"),
            None,
            &[]
        )
        .status,
        200
    );
}

#[test]
fn identities_user_namespaces_networks_and_environments_are_as_asked() {
    if !common::root_or_skip("isolated sessions") {
        return;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let Some(nobody) = passwd.lines().find(|l| l.starts_with("nobody:")) else {
        eprintln!("skipped: no user nobody in /etc/passwd");
        return;
    };
    let uid: u32 = nobody.split(':').nth(2).unwrap().parse().unwrap();
    let dir = scratch();
    let layers = dir.path().join("layers");
    std::fs::create_dir_all(&layers).unwrap();
    let s = Sandlet::start_prepared(
        &[
            "--exec-isolation-dir",
            layers.to_str().unwrap(),
            "--exec-envs-file",
            "off",
        ],
        None,
        |_| {},
    );
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(uid), Some(uid)).unwrap();
    let wsp = ws.to_string_lossy().to_string();

    let setpriv = id(&create(
        &s,
        json!({"workspace": {"path": wsp}, "uid": uid, "gid": uid, "share_net": false}),
    ));
    assert_eq!(
        isolated_out(
            &s,
            &setpriv,
            "id -u; id -g; echo made > mine; stat -c %u mine; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '"
        ),
        [
            uid.to_string(),
            uid.to_string(),
            uid.to_string(),
            "lo".into()
        ]
    );
    // Its files are acted on as its user: what it may not read is a 403.
    let r = files(&s, &setpriv, "/files/info", &ws.join("mine"));
    assert_eq!(
        r.json()[&ws.join("mine").to_string_lossy().to_string()]["owner"],
        "nobody"
    );
    let upper = common::upload_one(
        &s,
        &format!("/v1/isolated/session/{setpriv}"),
        &ws.join("by-api").to_string_lossy(),
        b"x",
        600,
    );
    assert_eq!(upper.status, 200, "{}", upper.text());
    assert_eq!(
        isolated_out(&s, &setpriv, "stat -c %u by-api"),
        [uid.to_string()]
    );

    let userns = id(&create(
        &s,
        json!({"workspace": {"path": wsp, "mode": "rw"}, "uid": uid, "gid": uid, "uid_mode": "userns"}),
    ));
    let lines = isolated_out(
        &s,
        &userns,
        "id -u; cat /proc/self/uid_map; echo direct > direct",
    );
    assert_eq!(lines[0], uid.to_string());
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map, [uid.to_string(), uid.to_string(), "1".into()]);
    assert_eq!(
        std::fs::metadata(ws.join("direct")).unwrap().uid(),
        uid,
        "an rw workspace is the sandbox's, written as the same uid outside"
    );

    // The strict profile keeps secrets-looking variables out; allow passes only what it names.
    let strict = id(&create(
        &s,
        json!({"workspace": {"path": wsp, "mode": "ro"}}),
    ));
    let env = isolated_out(&s, &strict, "env");
    assert!(env.iter().any(|l| l.starts_with("PATH=")), "{env:?}");
    assert!(!env.iter().any(|l| l.contains("_TOKEN=")), "{env:?}");
    let allow = id(&create(
        &s,
        json!({"workspace": {"path": wsp, "mode": "ro"}, "env_passthrough": {"mode": "allow", "keys": ["PATH"]}}),
    ));
    let env = isolated_out(&s, &allow, "env | cut -d= -f1 | sort | tr '\\n' ' '");
    assert_eq!(env[0].trim(), "HOME PATH PWD SHLVL USER _", "{env:?}");

    // A uid the sandbox's passwd does not know runs as itself with gid 0, as commands do
    // (execd 1.1 would take gid = uid; see docs/execd-compatibility.md).
    let stranger = (4_000_000u32..)
        .find(|u| {
            !passwd
                .lines()
                .any(|l| l.split(':').nth(2) == Some(&u.to_string()))
        })
        .unwrap();
    let unknown = id(&create(
        &s,
        json!({"workspace": {"path": wsp, "mode": "ro"}, "uid": stranger}),
    ));
    assert_eq!(
        isolated_out(&s, &unknown, "id -u; id -g"),
        [stranger.to_string(), "0".to_string()]
    );
}

#[test]
fn bad_requests_unknown_sessions_and_limits_are_the_clients_errors() {
    if !common::root_or_skip("isolated sessions") {
        return;
    }
    let dir = scratch();
    let (layers, allowed) = (dir.path().join("layers"), dir.path().join("allowed"));
    std::fs::create_dir_all(&layers).unwrap();
    std::fs::create_dir_all(&allowed).unwrap();
    let s = start(
        &layers,
        &[
            "--exec-isolation-max-sessions",
            "1",
            "--exec-isolation-writable",
            allowed.to_str().unwrap(),
        ],
    );
    let ws = dir.path().join("ws").to_string_lossy().to_string();
    for (body, says) in [
        (json!({}), "workspace or overlays"),
        (json!({"workspace": {"path": "relative"}}), "clean absolute"),
        (
            json!({"overlays": [{"path": format!("{ws}/../x")}]}),
            "clean absolute",
        ),
        (
            json!({"workspace": {"path": ws}, "binds": [{"source": "/etc"}]}),
            "outside",
        ),
        (
            json!({"workspace": {"path": ws}, "binds": [{"source": format!("{}/missing", allowed.display())}]}),
            "cannot be used",
        ),
        (
            json!({"workspace": {"path": ws}, "overlays": [{"path": "/dev/x"}]}),
            "own /dev",
        ),
        (
            json!({"workspace": {"path": ws}, "uid_mode": "root"}),
            "setpriv or userns",
        ),
        (
            json!({"workspace": "not an object"}),
            "error parsing request",
        ),
    ] {
        let r = s.exec("POST", "/v1/isolated/session", Some(&body), &[]);
        r.assert_error(400, "INVALID_REQUEST_BODY");
        assert!(r.text().contains(says), "{body}: {}", r.text());
    }
    // Persistent layers where overlayfs cannot keep them: said so, and nothing is left.
    let elsewhere = start(&dir.path().join("no-such-dir"), &[]);
    let r = elsewhere.exec(
        "POST",
        "/v1/isolated/session",
        Some(&json!({"workspace": {"path": ws}})),
        &[],
    );
    r.assert_error(400, "INVALID_REQUEST_BODY");
    assert!(r.text().contains("persist: false"), "{}", r.text());
    assert_eq!(
        elsewhere
            .exec("GET", "/v1/isolated/sessions", None, &[])
            .json()["sessions"],
        json!([])
    );

    // A bind from the allowed directory, read-only.
    std::fs::write(allowed.join("data.txt"), "allowed\n").unwrap();
    let sid = id(&create(
        &s,
        json!({"workspace": {"path": ws}, "binds": [{"source": allowed, "dest": "/mnt/in", "readonly": true}]}),
    ));
    assert_eq!(
        isolated_out(
            &s,
            &sid,
            "cat /mnt/in/data.txt; touch /mnt/in/x 2>/dev/null || echo ro"
        ),
        ["allowed", "ro"]
    );
    // One session at most here.
    s.exec(
        "POST",
        "/v1/isolated/session",
        Some(&json!({"workspace": {"path": ws}})),
        &[],
    )
    .assert_error(429, "LIMIT_EXCEEDED");
    // Unknown sessions, on every route.
    let unknown = "00000000-0000-4000-8000-000000000000";
    for (method, route) in [
        ("GET", ""),
        ("DELETE", ""),
        ("GET", "/runs/x"),
        ("GET", "/runs/x/logs"),
        ("GET", "/diff"),
        ("POST", "/commit"),
        ("GET", "/files/info?path=/x"),
        ("GET", "/directories/list?path=/x"),
    ] {
        s.exec(
            method,
            &format!("/v1/isolated/session/{unknown}{route}"),
            None,
            &[],
        )
        .assert_error(404, "CONTEXT_NOT_FOUND");
    }
    s.exec(
        "POST",
        &format!("/v1/isolated/session/{unknown}/run"),
        Some(&json!({"code": "true"})),
        &[],
    )
    .assert_error(404, "CONTEXT_NOT_FOUND");
    s.exec(
        "POST",
        &format!("/v1/isolated/session/{sid}/run"),
        Some(&json!({"code": ""})),
        &[],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
}

#[test]
fn sessions_end_with_sandlet_and_their_layers_go_at_the_next_start() {
    if !common::root_or_skip("isolated sessions") {
        return;
    }
    let dir = scratch();
    let layers = dir.path().join("layers");
    std::fs::create_dir_all(&layers).unwrap();
    let mut s = start(&layers, &[]);
    let ws = dir.path().join("ws").to_string_lossy().to_string();
    let sid = id(&create(&s, json!({"workspace": {"path": ws}})));
    let pid1 = pid1_of(&s, &sid);
    assert!(layers.join("sandlet").join(&sid).is_dir());
    s.kill9();
    wait_until("the session dies with sandlet", || !pid_alive(pid1));
    s.boot();
    let next = id(&create(&s, json!({"workspace": {"path": ws}})));
    assert!(
        !layers.join("sandlet").join(&sid).exists(),
        "the dead session's layers are removed"
    );
    assert!(layers.join("sandlet").join(&next).is_dir());
}
