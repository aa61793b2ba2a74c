//! What execd 1.1 added to the routes execd 1.0 had, in local mode over plain HTTP: `argv`
//! commands, line-ranged downloads, the upload framing of the 1.1 SDK, the `EXECD_ENVS` file and
//! the longer retention. (The SDK's own view of these is in `tests/sdk/sdk11_checks.py`.)

mod common;

use std::io::{Read, Write};

use common::{Sandlet, scratch, stream_lines};
use serde_json::{Value, json};

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn q(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[test]
fn argv_runs_without_a_shell_and_bad_argv_is_refused() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    // Nothing is expanded or split: each argument arrives as it was sent.
    let events = s.exec_events(
        "/command",
        &json!({"argv": ["sh", "-c", "printf '%s|' \"$0\" \"$1\"", "a b", "$HOME;*"]}),
    );
    assert_eq!(
        stream_lines(&events, "stdout"),
        ["a b|$HOME;*|"],
        "{events:?}"
    );
    assert_eq!(*kinds(&events).last().unwrap(), "execution_complete");
    let id = events[0]["text"].as_str().unwrap();
    let status = s.exec("GET", &format!("/command/status/{id}"), None, &[]);
    assert_eq!(
        status.json()["content"],
        "sh -c 'printf '\\''%s|'\\'' \"$0\" \"$1\"' 'a b' '$HOME;*'",
        "the status shows argv as shell words"
    );

    // A relative path is relative to cwd; a bare name is looked up on PATH.
    let script = dir.path().join("tool.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"ran $1 in $(pwd)\"\nexit 4\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let events = s.exec_events(
        "/command",
        &json!({"argv": ["./tool.sh", "x"], "cwd": dir.path()}),
    );
    let cwd = dir.path().to_string_lossy();
    assert_eq!(stream_lines(&events, "stdout"), [format!("ran x in {cwd}")]);
    assert_eq!(events.last().unwrap()["error"]["evalue"], "4");
    let events = s.exec_events(
        "/command",
        &json!({"argv": ["tool.sh"], "envs": {"PATH": format!("/usr/bin:/bin:{cwd}")}}),
    );
    assert_eq!(events.last().unwrap()["error"]["evalue"], "4", "{events:?}");

    // A name found nowhere is a start failure, as execd's: init, then an error naming it.
    let events = s.exec_events("/command", &json!({"argv": ["no-such-program-x9"]}));
    assert_eq!(kinds(&events), ["init", "error"], "{events:?}");
    let evalue = events[1]["error"]["evalue"].as_str().unwrap();
    assert!(evalue.contains("no-such-program-x9"), "{evalue}");

    for (body, why) in [
        (json!({"argv": []}), "no program"),
        (json!({"argv": [""]}), "an empty argv[0]"),
        (json!({"argv": ["echo", "a\u{0}b"]}), "NUL"),
        (json!({"argv": ["true"], "command": "true"}), "both forms"),
        (json!({}), "neither form"),
    ] {
        let r = s.exec("POST", "/command", Some(&body), &[]);
        assert_eq!(r.status, 400, "{why}: {}", r.text());
        r.assert_error(400, "INVALID_REQUEST_BODY");
    }
}

#[test]
fn downloads_read_line_ranges_as_text() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let file = dir.path().join("lines.txt");
    std::fs::write(&file, "l1\nl2\r\nl3\n\nl5").unwrap();
    let path = q(&file.to_string_lossy());
    let get = |query: &str, headers: &[(&str, &str)]| {
        s.exec(
            "GET",
            &format!("/files/download?path={path}{query}"),
            None,
            headers,
        )
    };
    for (query, want) in [
        ("&offset=2&limit=2", "l2\r\nl3\n"),
        ("&offset=4", "\nl5"),
        ("&limit=1", "l1\n"),
        ("&offset=5&limit=10", "l5"),
        ("&offset=6", ""),
    ] {
        let r = get(query, &[]);
        assert_eq!(r.status, 200, "{query}: {}", r.text());
        assert_eq!(r.text(), want, "{query}");
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{query}"
        );
    }
    // Bytes and lines are two ways to ask for part of a file: not both at once.
    get("&offset=2", &[("Range", "bytes=0-1")]).assert_error(400, "INVALID_REQUEST_BODY");
    for bad in ["&offset=0", "&limit=0", "&offset=-2", "&limit=many"] {
        get(bad, &[]).assert_error(400, "INVALID_REQUEST_BODY");
    }
    // Without them it is the file's bytes, as before.
    let whole = get("", &[]);
    assert_eq!(whole.body, b"l1\nl2\r\nl3\n\nl5");
    assert_eq!(
        whole.header("content-type"),
        Some("application/octet-stream")
    );
}

#[test]
fn a_chunked_upload_goes_where_its_metadata_says_not_where_the_file_name_says() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let target = dir.path().join("deep dir/real name.txt");
    let decoy = dir.path().join("decoy.txt");
    let boundary = "opensandbox_0123456789abcdef_1700000000";
    let metadata = json!({"path": target, "owner": null, "group": null, "mode": 640});
    // As the 1.1 SDK frames it: metadata first, the file part named by its base name only, and
    // the body in chunks without a Content-Length.
    let parts = [
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"; filename=\"metadata\"\r\nContent-Type: application/json\r\n\r\n{metadata}\r\n"
        ),
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"decoy.txt\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ),
        "chunked ".into(),
        "content\n".into(),
        format!("\r\n--{boundary}--\r\n"),
    ];
    let addr = s.exec_base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /files/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    )
    .unwrap();
    for part in &parts {
        write!(stream, "{:x}\r\n{part}\r\n", part.len()).unwrap();
        stream.flush().unwrap();
    }
    stream.write_all(b"0\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "chunked content\n"
    );
    assert!(!decoy.exists(), "the part's file name is not a destination");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&target).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);
}

#[test]
fn an_upload_refused_before_its_body_was_read_closes_the_connection_saying_so() {
    let s = Sandlet::start(&[]);
    let boundary = "opensandbox_refused";
    // A chunked upload (as the 1.1 SDK sends one) whose metadata is refused while its file is
    // still arriving: the answer must say the connection ends, or a client reusing it for its
    // next request would see that request dropped (the SDK did, on an isolated session's files).
    let start = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"; filename=\"metadata\"\r\nContent-Type: application/json\r\n\r\n{{\"path\": \"\"}}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nthe file goes on"
    );
    let addr = s.exec_base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /files/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\r\n{:x}\r\n{start}\r\n",
        start.len()
    )
    .unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push(line.trim_end().to_ascii_lowercase());
    }
    assert!(head[0].starts_with("http/1.1 400"), "{head:?}");
    assert!(head.contains(&"connection: close".to_string()), "{head:?}");
    let length: usize = head
        .iter()
        .find_map(|h| h.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "INVALID_FILE_METADATA", "{error}");

    // A refusal after the body was read keeps the connection.
    let r = s.exec(
        "POST",
        "/files/mv",
        Some(&json!([{"src": "/no/such", "dest": "/x"}])),
        &[],
    );
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.header("connection"), None);
}

#[test]
fn the_execd_envs_file_reaches_every_start_and_set_env_appends_to_it() {
    let dir = scratch();
    let env_file = dir.path().join("etc/sandbox.env");
    let s = Sandlet::start(&["--exec-envs-file", &env_file.to_string_lossy()]);
    // What the SDK's set_env runs: the entry single-quoted for the shell, appended.
    let set = |key: &str, entry: &str| {
        let quoted = format!("'{}'", entry.replace('\'', "'\\''"));
        let script = format!(
            "if [ -z \"${{EXECD_ENVS:-}}\" ]; then echo unset >&2; exit 1; fi\nmkdir -p \"$(dirname \"$EXECD_ENVS\")\"\nprintf '%s\\n' {quoted} >> \"$EXECD_ENVS\""
        );
        let events = s.exec_events("/command", &json!({"command": script}));
        assert_eq!(
            *kinds(&events).last().unwrap(),
            "execution_complete",
            "set_env {key}: {events:?}"
        );
    };
    set("A", "A='x y $HOME'");
    set("B", "B=\"it's \\\"q\\\"\"");
    let events = s.exec_events(
        "/command",
        &json!({"command": "printf '%s|%s|%s\\n' \"$A\" \"$B\" \"$EXECD_ENVS\""}),
    );
    assert_eq!(
        stream_lines(&events, "stdout"),
        [format!("x y $HOME|it's \"q\"|{}", env_file.display())]
    );
    // The request's own variables win over the file.
    let events = s.exec_events(
        "/command",
        &json!({"command": "echo \"$A\"", "envs": {"A": "mine"}}),
    );
    assert_eq!(stream_lines(&events, "stdout"), ["mine"]);
    // Bash sessions start from it too.
    let sid = s.exec("POST", "/session", None, &[]).json()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let events = s.exec_events(
        &format!("/session/{sid}/run"),
        &json!({"command": "echo \"$A\""}),
    );
    assert_eq!(stream_lines(&events, "stdout"), ["x y $HOME"]);

    // Off: no file, no variable.
    let off = Sandlet::start(&["--exec-envs-file", "off"]);
    let events = off.exec_events(
        "/command",
        &json!({"command": "echo \"[${EXECD_ENVS:-}]\""}),
    );
    assert_eq!(stream_lines(&events, "stdout"), ["[]"]);
}

#[test]
fn finished_commands_are_kept_a_day_by_default() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandlet"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let mut lines = help
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("--exec-keep-seconds "));
    lines.next();
    let description = lines.next().unwrap_or_default();
    assert!(
        description.contains("[default: 86400]"),
        "execd 1.1 keeps finished commands at least 24 h: {description}"
    );
}

#[test]
#[ignore = "needs the OpenSandbox SDK from PyPI: `./test` installs it and runs every test"]
fn the_real_sdk_uses_what_execd_1_1_added() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let env_file = dir.path().join("sandbox.env");
    let layers = dir.path().join("layers");
    std::fs::create_dir_all(&layers).unwrap();
    let s = Sandlet::start(&[
        "--exec-envs-file",
        &env_file.to_string_lossy(),
        "--exec-isolation-dir",
        &layers.to_string_lossy(),
    ]);
    let cwd = std::fs::canonicalize(dir.path()).unwrap();
    let mut envs = vec![("SANDLET_SDK_CWD", cwd.display().to_string())];
    if let Some((uid, gid, _)) = account("nobody")
        && common::root_or_skip("files_with_identity and isolated sessions")
    {
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root only\n").unwrap();
        std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
        let theirs = cwd.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(uid), Some(gid)).unwrap();
        envs.push((
            "SANDLET_SDK_IDENTITY",
            format!("{uid}:{gid}:{}:nobody", theirs.display()),
        ));
        envs.push((
            "SANDLET_SDK_ISOLATION_WS",
            cwd.join("isolated ws").display().to_string(),
        ));
    }
    common::run_sdk_checks("sdk11_checks.py", &s.exec_base, &envs);
}

/// The uid, gid and home of a user of this machine's /etc/passwd.
fn account(name: &str) -> Option<(u32, u32, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_string()))
}

#[test]
fn identity_routes_act_with_that_identitys_rights_and_the_kernel_decides() {
    if !common::root_or_skip("file operations as another user") {
        return;
    }
    let Some((uid, gid, home)) = account("nobody") else {
        eprintln!("skipped: no user nobody in /etc/passwd");
        return;
    };
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let s = Sandlet::start(&[]);
    let dir = scratch();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root only\n").unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(uid), Some(gid)).unwrap();
    let me = format!("/v1/filesystem/{uid}/{gid}");
    let get = |prefix: &str, route: &str, path: &std::path::Path| {
        s.exec(
            "GET",
            &format!("{prefix}{route}?path={}", q(&path.to_string_lossy())),
            None,
            &[],
        )
    };

    // What the identity may not read is a 403; sandlet itself (root) still reads it.
    get(&me, "/files/download", &secret).assert_error(403, "PERMISSION_DENIED");
    assert_eq!(get("", "/files/download", &secret).text(), "root only\n");
    // What it writes is its own, where it may write; elsewhere nothing is written.
    let mine = theirs.join("sub/mine.txt");
    let r = common::upload_one(&s, &me, &mine.to_string_lossy(), b"mine\n", 644);
    assert_eq!(r.status, 200, "{}", r.text());
    for made in [&mine, &theirs.join("sub")] {
        let m = std::fs::metadata(made).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{}", made.display());
    }
    let refused = dir.path().join("not-mine.txt");
    common::upload_one(&s, &me, &refused.to_string_lossy(), b"x", 644)
        .assert_error(403, "PERMISSION_DENIED");
    assert!(!refused.exists());
    let r = s.exec(
        "POST",
        &format!("{me}/directories"),
        Some(&json!({dir.path().join("d").to_string_lossy(): {"mode": 755}})),
        &[],
    );
    r.assert_error(403, "PERMISSION_DENIED");
    // Another gid than the user's own: what it creates has that group.
    let other_gid = gid.wrapping_add(7);
    let grouped = theirs.join("grouped.txt");
    let r = common::upload_one(
        &s,
        &format!("/v1/filesystem/{uid}/{other_gid}"),
        &grouped.to_string_lossy(),
        b"g",
        600,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::metadata(&grouped).unwrap().gid(), other_gid);
    // `~` is the identity's home.
    let r = s.exec("GET", &format!("{me}/files/info?path=~"), None, &[]);
    if std::path::Path::new(&home).exists() {
        assert_eq!(r.json()["~"]["path"], home.as_str(), "{}", r.text());
    } else {
        r.assert_error(404, "FILE_NOT_FOUND");
        assert!(r.text().contains(&home), "{}", r.text());
    }
    // Every file route is there under the prefix.
    let listed = get(&me, "/directories/list", &theirs);
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.json().as_array().unwrap().len(), 2);

    // A uid the sandbox does not know, or no uid at all, is the client's error.
    let unknown = (4_000_000u32..)
        .find(|u| {
            !std::fs::read_to_string("/etc/passwd")
                .unwrap()
                .contains(&format!(":{u}:"))
        })
        .unwrap();
    get(
        &format!("/v1/filesystem/{unknown}/{gid}"),
        "/files/info",
        &theirs,
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    for bad in ["4294967295/0", "0/4294967295", "-1/0", "root/0"] {
        get(&format!("/v1/filesystem/{bad}"), "/files/info", &theirs)
            .assert_error(400, "INVALID_REQUEST_BODY");
    }
    let r = s.exec("GET", "/v1/filesystem/0/0/nothing-here", None, &[]);
    assert_eq!(r.status, 404);
}
