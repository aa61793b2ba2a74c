//! The exec API's files and directories over plain HTTP: execd's wire shapes, bad input with
//! exact codes, ranges, atomic uploads, constant memory for 1 GiB, and, in a simulated pod,
//! confinement to the main container's root.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use common::form::{BOUNDARY, Part, multipart};
use common::pod::{MAIN_UID, Pod, SIDECAR_CAPABILITIES};
use common::{Reply, Sandlet, scratch, wait_until};
use serde_json::{Value, json};

/// `?path=` with the value percent-encoded.
fn q(path: &str) -> String {
    let mut out = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn upload(s: &Sandlet, parts: &[Part]) -> Reply {
    s.exec_bytes(
        "POST",
        "/files/upload",
        Some(multipart(parts)),
        &[("Content-Type", &common::form::content_type())],
    )
}

fn download(s: &Sandlet, path: &str, headers: &[(&str, &str)]) -> Reply {
    s.exec_bytes(
        "GET",
        &format!("/files/download?path={}", q(path)),
        None,
        headers,
    )
}

fn paths(listing: &Value) -> Vec<String> {
    listing
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn files_and_directories_answer_with_execds_shapes() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let base = dir.path().join("tree");
    let base = base.to_str().unwrap();

    let r = s.exec(
        "POST",
        "/directories",
        Some(&json!({format!("{base}/alpha"): {"mode": 0}, format!("{base}/mode"): {"mode": 700}})),
        &[],
    );
    assert_eq!((r.status, r.body.len()), (200, 0), "{}", r.text());
    assert_eq!(
        std::fs::metadata(format!("{base}/mode"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // Metadata as a file part or a plain value, before or after its file: paired by index.
    let r = upload(
        &s,
        &[
            Part::MetaFile(json!({"path": format!("{base}/alpha/x.txt"), "mode": 644})),
            Part::File(b"x\n"),
            Part::File(b"charlie\n"),
            Part::MetaValue(json!({"path": format!("{base}/charlie.txt")})),
            Part::MetaFile(
                json!({"path": format!("{base}/bravo.txt"), "owner": null, "group": null}),
            ),
            Part::File(b"bravo\n"),
            Part::MetaFile(json!({"path": format!("{base}/alpha/y.txt")})),
            Part::File(b""),
        ],
    );
    assert_eq!((r.status, r.body.len()), (200, 0), "{}", r.text());
    assert_eq!(
        std::fs::read(format!("{base}/charlie.txt")).unwrap(),
        b"charlie\n"
    );
    assert_eq!(
        std::fs::read(format!("{base}/bravo.txt")).unwrap(),
        b"bravo\n"
    );
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&format!("{base}/alpha/x.txt")), 0o644);
    assert_eq!(
        mode(&format!("{base}/bravo.txt")),
        0o644,
        "new files default to 0644"
    );
    symlink("alpha", format!("{base}/link")).unwrap();

    // Pre-order, entries by name, symlinks listed and never followed.
    let r = s.exec(
        "GET",
        &format!("/directories/list?path={}&depth=2", q(base)),
        None,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let listing = r.json();
    assert_eq!(
        paths(&listing),
        [
            "alpha",
            "alpha/x.txt",
            "alpha/y.txt",
            "bravo.txt",
            "charlie.txt",
            "link",
            "mode"
        ]
        .map(|n| format!("{base}/{n}"))
    );
    let x = &listing[1];
    assert_eq!(
        (x["type"].as_str(), x["size"].as_i64(), x["mode"].as_u64()),
        (Some("file"), Some(2), Some(644))
    );
    assert_eq!(x["owner"], "root");
    assert!(x["modified_at"].as_str().unwrap().contains('T'));
    assert_eq!(listing[5]["type"], "symlink");
    let r = s.exec(
        "GET",
        &format!("/directories/list?path={}", q(base)),
        None,
        &[],
    );
    assert_eq!(paths(&r.json()).len(), 5, "depth defaults to 1");
    let r = s.exec(
        "GET",
        &format!("/directories/list?path={}&depth=0", q(base)),
        None,
        &[],
    );
    assert_eq!(r.json(), json!([]));

    // Info keys are the paths as sent; lstat.
    let r = s.exec(
        "GET",
        &format!(
            "/files/info?path={}&path={}",
            q(&format!("{base}/link")),
            q(&format!("{base}/alpha/../bravo.txt"))
        ),
        None,
        &[],
    );
    let info = r.json();
    assert_eq!(info[format!("{base}/link")]["type"], "symlink");
    assert_eq!(
        info[format!("{base}/alpha/../bravo.txt")]["path"],
        format!("{base}/bravo.txt")
    );
    assert_eq!(s.exec("GET", "/files/info", None, &[]).json(), json!({}));

    // Search: base names, doublestar, directories never returned.
    let search = |pattern: &str| {
        paths(
            &s.exec(
                "GET",
                &format!("/files/search?path={}&pattern={}", q(base), q(pattern)),
                None,
                &[],
            )
            .json(),
        )
    };
    assert_eq!(
        search("*.txt"),
        ["alpha/x.txt", "alpha/y.txt", "bravo.txt", "charlie.txt"].map(|n| format!("{base}/{n}"))
    );
    assert_eq!(
        search("**/{b,c}*"),
        ["bravo.txt", "charlie.txt"].map(|n| format!("{base}/{n}"))
    );
    assert_eq!(search("!(*.txt)"), [format!("{base}/link")]);

    // Replace: verbose counts, otherwise an empty 200; the mode is kept.
    let bravo = format!("{base}/bravo.txt");
    std::fs::set_permissions(&bravo, std::fs::Permissions::from_mode(0o640)).unwrap();
    let r = s.exec(
        "POST",
        "/files/replace?verbose=true",
        Some(&json!({&bravo: {"old": "a", "new": "A"}})),
        &[],
    );
    assert_eq!(r.json(), json!({&bravo: {"replacedCount": 1}}));
    let r = s.exec(
        "POST",
        "/files/replace",
        Some(&json!({&bravo: {"old": "r", "new": ""}})),
        &[],
    );
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(std::fs::read(&bravo).unwrap(), b"bAvo\n");
    assert_eq!(mode(&bravo), 0o640);

    // Writes through a symlink replace its target; the link stays a link.
    let via = format!("{base}/via-link");
    symlink("charlie.txt", &via).unwrap();
    let r = upload(
        &s,
        &[
            Part::MetaFile(json!({"path": &via})),
            Part::File(b"new charlie\n"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        std::fs::symlink_metadata(&via)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read(format!("{base}/charlie.txt")).unwrap(),
        b"new charlie\n"
    );
    let r = s.exec(
        "POST",
        "/files/replace",
        Some(&json!({&via: {"old": "new ", "new": ""}})),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        std::fs::symlink_metadata(&via)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::fs::remove_file(&via).unwrap();

    // Permissions, then mv (refusing an existing destination), then delete.
    let r = s.exec(
        "POST",
        "/files/permissions",
        Some(&json!({&bravo: {"mode": 600}})),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mode(&bravo), 0o600);
    let moved = format!("{base}/deep/er/bravo.txt");
    let r = s.exec(
        "POST",
        "/files/mv",
        Some(&json!([{"src": &bravo, "dest": &moved}])),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let charlie = format!("{base}/charlie.txt");
    s.exec(
        "POST",
        "/files/mv",
        Some(&json!([{"src": &moved, "dest": &charlie}])),
        &[],
    )
    .assert_error(409, "CONFLICT");
    assert_eq!(std::fs::read(&charlie).unwrap(), b"charlie\n");
    let r = s.exec(
        "DELETE",
        &format!(
            "/files?path={}&path={}&path={}",
            q(&moved),
            q(&format!("{base}/link")),
            q(&format!("{base}/missing"))
        ),
        None,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!Path::new(&moved).exists());
    assert!(
        Path::new(&format!("{base}/alpha/x.txt")).exists(),
        "a symlink is removed, not its target"
    );
    let r = s.exec(
        "DELETE",
        &format!("/directories?path={}", q(base)),
        None,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!Path::new(base).exists());
}

#[test]
fn bad_input_gets_exact_codes_and_changes_nothing() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let d = dir.path().to_str().unwrap();
    let file = format!("{d}/keep.txt");
    std::fs::write(&file, "keep\n").unwrap();
    symlink(d, format!("{d}/dirlink")).unwrap();

    let get = |p: &str| s.exec("GET", p, None, &[]);
    get("/files/search").assert_error(400, "MISSING_QUERY");
    get("/files/download").assert_error(400, "MISSING_QUERY");
    get("/directories/list").assert_error(400, "MISSING_QUERY");
    get(&format!("/directories/list?path={}&depth=-1", q(d)))
        .assert_error(400, "INVALID_REQUEST_BODY");
    get(&format!("/directories/list?path={}&depth=x", q(d)))
        .assert_error(400, "INVALID_REQUEST_BODY");
    get(&format!("/directories/list?path={}/dirlink", q(d)))
        .assert_error(400, "INVALID_REQUEST_BODY");
    get(&format!("/directories/list?path={}", q(&file))).assert_error(400, "INVALID_REQUEST_BODY");
    get(&format!("/directories/list?path={}/nope", q(d))).assert_error(404, "FILE_NOT_FOUND");
    get(&format!("/files/info?path={}/nope", q(d))).assert_error(404, "FILE_NOT_FOUND");
    get(&format!("/files/search?path={}/nope", q(d))).assert_error(404, "FILE_NOT_FOUND");
    get(&format!("/files/search?path={}&pattern=%5Babc", q(d)))
        .assert_error(400, "INVALID_REQUEST_BODY");
    get(&format!(
        "/files/info?path={}",
        q("$SANDLET_SURELY_UNDEFINED/x")
    ))
    .assert_error(400, "INVALID_REQUEST_BODY");
    get(&format!("/files/download?path={}", q(d))).assert_error(400, "INVALID_REQUEST_BODY");

    let post = |p: &str, body: Value| s.exec("POST", p, Some(&body), &[]);
    post("/files/permissions", json!({&file: {"mode": 758}}))
        .assert_error(400, "INVALID_REQUEST_BODY");
    post("/files/permissions", json!({&file: {"mode": "755"}}))
        .assert_error(400, "INVALID_REQUEST_BODY");
    post(
        "/files/permissions",
        json!({&file: {"owner": "no-such-user-here"}}),
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    post(
        "/files/permissions",
        json!({format!("{d}/nope"): {"mode": 644}}),
    )
    .assert_error(404, "FILE_NOT_FOUND");
    post(
        "/files/mv",
        json!([{"src": format!("{d}/nope"), "dest": format!("{d}/x")}]),
    )
    .assert_error(404, "FILE_NOT_FOUND");
    post("/files/mv", json!({"src": "a"})).assert_error(400, "INVALID_REQUEST_BODY");
    // A move that fails after making the destination's directories leaves none: across
    // filesystems (from /dev/shm) the rename itself fails.
    let shm = tempfile::Builder::new()
        .prefix("sandlet-shm-")
        .tempdir_in("/dev/shm");
    match shm {
        Ok(shm)
            if std::fs::metadata(shm.path()).unwrap().dev()
                != std::fs::metadata(d).unwrap().dev() =>
        {
            let src = shm.path().join("f");
            std::fs::write(&src, "x").unwrap();
            post(
                "/files/mv",
                json!([{"src": src, "dest": format!("{d}/made/for/it")}]),
            )
            .assert_error(409, "CONFLICT");
            assert!(
                !Path::new(d).join("made").exists(),
                "its directories stayed"
            );
            assert!(src.exists());
        }
        _ => eprintln!("skipped the cross-filesystem move: /dev/shm is not another filesystem"),
    }
    // Every file is checked before any changes: the first entry stays as it was.
    post("/files/replace", json!({&file: {"old": "keep", "new": "gone"}, format!("{d}/nope"): {"old": "a", "new": "b"}}))
        .assert_error(404, "FILE_NOT_FOUND");
    post("/files/replace", json!({&file: {"old": "keep", "new": "gone"}, format!("{d}/other"): {"old": "", "new": "b"}}))
        .assert_error(400, "INVALID_REQUEST_BODY");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep\n");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o644
    );
    post("/directories", json!({&file: {}})).assert_error(409, "CONFLICT");
    s.exec_bytes(
        "POST",
        "/files/mv",
        Some(b"".to_vec()),
        &[("Content-Type", "application/json")],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");

    s.exec("DELETE", &format!("/files?path={}", q(d)), None, &[])
        .assert_error(409, "CONFLICT");
    s.exec("DELETE", "/directories?path=/", None, &[])
        .assert_error(409, "CONFLICT");
    s.exec(
        "DELETE",
        &format!("/directories?path={}&path=/", q(d)),
        None,
        &[],
    )
    .assert_error(409, "CONFLICT");
    assert!(
        Path::new(&file).exists(),
        "a refused request removes nothing"
    );
    // /proc is a mount point of this (local) sandbox.
    s.exec("DELETE", "/directories?path=/proc", None, &[])
        .assert_error(409, "CONFLICT");

    // Uploads: form problems, each with execd's code; nothing is written.
    let target = format!("{d}/up.txt");
    let meta = json!({"path": &target});
    upload(&s, &[Part::File(b"x")]).assert_error(400, "INVALID_FILE_METADATA");
    upload(&s, &[Part::MetaFile(meta.clone())]).assert_error(400, "INVALID_FILE_CONTENT");
    upload(
        &s,
        &[
            Part::MetaFile(meta.clone()),
            Part::File(b"x"),
            Part::File(b"y"),
        ],
    )
    .assert_error(400, "INVALID_FILE");
    upload(&s, &[Part::MetaFile(json!({"path": ""})), Part::File(b"x")])
        .assert_error(400, "INVALID_FILE_METADATA");
    upload(
        &s,
        &[Part::MetaFile(json!("not an object")), Part::File(b"x")],
    )
    .assert_error(400, "INVALID_FILE_METADATA");
    upload(
        &s,
        &[
            Part::MetaFile(json!({"path": &target, "mode": 999})),
            Part::File(b"x"),
        ],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    s.exec_bytes(
        "POST",
        "/files/upload",
        Some(b"{}".to_vec()),
        &[("Content-Type", "application/json")],
    )
    .assert_error(400, "INVALID_FILE");
    // A valid first pair with a bad second one: the first is not put in place either.
    upload(
        &s,
        &[
            Part::MetaFile(meta.clone()),
            Part::File(b"x"),
            Part::MetaFile(json!({"path": ""})),
            Part::File(b"y"),
        ],
    )
    .assert_error(400, "INVALID_FILE_METADATA");
    assert!(!Path::new(&target).exists());
    assert_eq!(
        names_in(dir.path()),
        ["dirlink", "keep.txt"],
        "no temporary file is left behind"
    );

    let limited = Sandlet::start(&["--exec-max-upload-bytes", "1000"]);
    upload(&limited, &[Part::MetaFile(meta), Part::File(&[b'z'; 2000])])
        .assert_error(413, "LIMIT_EXCEEDED");
    assert!(!Path::new(&target).exists());
}

#[test]
fn downloads_serve_ranges_conditions_and_names() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let content: Vec<u8> = (0..20u8).collect();
    let name = format!("{}/naïve file.bin", dir.path().display());
    std::fs::write(&name, &content).unwrap();

    let r = download(&s, &name, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, content);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        r.header("content-disposition"),
        Some(
            "attachment; filename=\"na%C3%AFve%20file.bin\"; filename*=UTF-8''na%C3%AFve%20file.bin"
        )
    );
    let etag = r.header("etag").unwrap().to_string();

    let r = download(&s, &name, &[("Range", "bytes=0-9")]);
    assert_eq!(
        (r.status, r.header("content-range")),
        (206, Some("bytes 0-9/20"))
    );
    assert_eq!(r.body, &content[..10]);
    let r = download(&s, &name, &[("Range", "bytes=-5")]);
    assert_eq!((r.status, r.body.as_slice()), (206, &content[15..]));
    let r = download(&s, &name, &[("Range", "bytes=18-100")]);
    assert_eq!(
        (r.header("content-range"), r.body.as_slice()),
        (Some("bytes 18-19/20"), &content[18..])
    );

    // Several ranges: multipart/byteranges, each part with its Content-Range.
    let r = download(&s, &name, &[("Range", "bytes=0-1, 10-11")]);
    assert_eq!(r.status, 206);
    let ct = r.header("content-type").unwrap();
    let boundary = ct.strip_prefix("multipart/byteranges; boundary=").unwrap();
    assert_eq!(
        r.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap(),
        r.body.len()
    );
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        text.contains("Content-Range: bytes 0-1/20\r\n\r\n\u{0}\u{1}\r\n"),
        "{text:?}"
    );
    assert!(
        text.contains("Content-Range: bytes 10-11/20\r\n\r\n\n\u{b}\r\n"),
        "{text:?}"
    );
    assert!(text.ends_with(&format!("--{boundary}--\r\n")));

    let r = download(&s, &name, &[("Range", "bytes=20-")]);
    r.assert_error(416, "UNKNOWN");
    assert_eq!(r.header("content-range"), Some("bytes */20"));
    download(&s, &name, &[("Range", "bytes=foo")]).assert_error(416, "UNKNOWN");
    download(&s, &name, &[("Range", "bytes=5-2")]).assert_error(416, "UNKNOWN");

    // Conditions: an unchanged file is 304; a stale If-Range gets the whole file.
    assert_eq!(download(&s, &name, &[("If-None-Match", &etag)]).status, 304);
    let r = download(
        &s,
        &name,
        &[("Range", "bytes=0-0"), ("If-Range", "\"stale\"")],
    );
    assert_eq!((r.status, r.body.len()), (200, 20));
    let r = download(&s, &name, &[("Range", "bytes=0-0"), ("If-Range", &etag)]);
    assert_eq!((r.status, r.body.len()), (206, 1));

    download(&s, &format!("{}/missing", dir.path().display()), &[])
        .assert_error(404, "FILE_NOT_FOUND");
    let empty = format!("{}/empty", dir.path().display());
    std::fs::write(&empty, "").unwrap();
    let r = download(&s, &empty, &[]);
    assert_eq!(
        (r.status, r.body.len(), r.header("content-length")),
        (200, 0, Some("0"))
    );
}

/// Sends an upload's headers and the first half of its body, then waits for `check` with the
/// connection still open, then hangs up.
#[test]
fn an_upload_cut_off_halfway_leaves_the_previous_content() {
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let target = dir.path().join("config.txt");
    std::fs::write(&target, "previous\n").unwrap();
    let body = multipart(&[
        Part::MetaFile(json!({"path": target.to_str().unwrap()})),
        Part::File(&vec![b'n'; 4 << 20]),
    ]);
    let conn = send_half(&s, &body);
    // Half of it is on disk by now (in a file with no name), the old content still in place.
    wait_until("the first half is written", || {
        std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
            .unwrap()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| {
                    l.to_string_lossy().contains("(deleted)") && l.starts_with(dir.path())
                })
            })
    });
    assert_eq!(
        download(&s, target.to_str().unwrap(), &[]).body,
        b"previous\n"
    );
    drop(conn);
    wait_until("sandlet lets go of the cut-off upload", || {
        !std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
            .unwrap()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.starts_with(dir.path())))
    });
    assert_eq!(std::fs::read(&target).unwrap(), b"previous\n");
    assert_eq!(names_in(dir.path()), ["config.txt"]);

    // The same upload whole replaces it, atomically: a reader holding the old file keeps it.
    let mut reader = std::fs::File::open(&target).unwrap();
    let r = s.exec_bytes(
        "POST",
        "/files/upload",
        Some(body),
        &[("Content-Type", &common::form::content_type())],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut old = String::new();
    reader.read_to_string(&mut old).unwrap();
    assert_eq!(old, "previous\n");
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 4 << 20);
    assert_eq!(names_in(dir.path()), ["config.txt"]);

    // The directories made for a cut-off upload go with it.
    let nested = dir.path().join("new/deeper/file.txt");
    let nested_body = multipart(&[
        Part::MetaFile(json!({"path": nested.to_str().unwrap()})),
        Part::File(&vec![b'n'; 4 << 20]),
    ]);
    let conn = send_half(&s, &nested_body);
    wait_until("the upload's directories are made", || {
        dir.path().join("new/deeper").is_dir()
    });
    drop(conn);
    wait_until("the directories made for it are removed", || {
        names_in(dir.path()) == ["config.txt"]
    });

    // Whole, it makes them (as execd's `mkdir -p`) and stays.
    let r = s.exec_bytes(
        "POST",
        "/files/upload",
        Some(nested_body),
        &[("Content-Type", &common::form::content_type())],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::metadata(&nested).unwrap().len(), 4 << 20);
}

/// An upload that replaces a file drops the old content's page cache before it writes the new:
/// the rename would free it anyway, and this way the two are never cached side by side.
#[test]
fn replacing_a_file_drops_the_old_contents_cache() {
    let s = Sandlet::start(&[]);
    // On the target directory's disk: a tmpfs (a common /tmp) keeps its pages whatever advice.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target = dir.path().join("cached.bin");
    std::fs::write(&target, vec![7u8; 8 << 20]).unwrap();
    let old = std::fs::File::open(&target).unwrap();
    old.sync_all().unwrap();
    assert_eq!(std::fs::read(&target).unwrap().len(), 8 << 20);
    assert_eq!(
        cached_pages(&old, 8 << 20),
        2048,
        "read back, the old content is cached"
    );
    let r = upload(
        &s,
        &[
            Part::MetaFile(json!({"path": target.to_str().unwrap()})),
            Part::File(b"new"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
    // `old` still holds the replaced file: its pages would stay cached as long as it does.
    assert_eq!(cached_pages(&old, 8 << 20), 0);
}

/// How many of the first `len` bytes' pages of `file` are in the page cache (`mincore`).
fn cached_pages(file: &std::fs::File, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let page = 4096;
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of an open file, only passed to mincore (it does not
    // fault pages in) and unmapped before returning.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
        libc::munmap(map, len);
    }
    resident.iter().filter(|r| **r & 1 == 1).count()
}

/// A 1 GiB upload and download through sandlet grows its peak RSS by less than 32 MiB.
#[test]
fn a_gibibyte_goes_up_and_down_in_constant_memory() {
    const SIZE: u64 = 1 << 30;
    let s = Sandlet::start(&[]);
    let dir = scratch();
    let target = dir.path().join("big.bin");
    let before = common::status_kib(s.pid(), "VmRSS:");
    // The upload's dirty page cache is written out as it arrives, not left for the final
    // fsync: the system's dirty memory grows by a few steps of 8 MiB, not by the file.
    let dirty_before = dirty_kib();
    let uploading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let dirty_peak = {
        let uploading = std::sync::Arc::clone(&uploading);
        std::thread::spawn(move || {
            let mut peak = 0;
            while uploading.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(dirty_kib());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak
        })
    };

    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"metadata\"; filename=\"metadata\"\r\n\r\n{}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big\"\r\n\r\n",
        json!({"path": target.to_str().unwrap()})
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let addr = s.exec_base.trim_start_matches("http://");
    let mut conn = upload_request(&s, head.len() as u64 + SIZE + tail.len() as u64);
    conn.write_all(head.as_bytes()).unwrap();
    // A pattern that tells offsets apart, 1 MiB at a time.
    let block: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    for _ in 0..(SIZE >> 20) {
        conn.write_all(&block).unwrap();
    }
    conn.write_all(tail.as_bytes()).unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(std::fs::metadata(&target).unwrap().len(), SIZE);
    uploading.store(false, std::sync::atomic::Ordering::Relaxed);
    let dirty_growth_mib = dirty_peak.join().unwrap().saturating_sub(dirty_before) / 1024;
    eprintln!("dirty page cache grew by at most {dirty_growth_mib} MiB during the upload");
    assert!(
        dirty_growth_mib < 256,
        "the upload left {dirty_growth_mib} MiB dirty for the final fsync"
    );

    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET /files/download?path={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        q(target.to_str().unwrap())
    )
    .unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut header = Vec::new();
    // Skip the response head, then compare the body with the pattern as it streams.
    loop {
        let n = conn.read(&mut buf[..1]).unwrap();
        assert_eq!(n, 1, "the response ended in its head");
        header.push(buf[0]);
        if header.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    assert!(
        header.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&header)
    );
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            let at = got + i as u64;
            assert_eq!(*b, ((at % (1 << 20)) % 251) as u8, "byte {at}");
        }
        got += n as u64;
    }
    assert_eq!(got, SIZE);
    let peak = common::status_kib(s.pid(), "VmHWM:");
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "RSS before {before} KiB, peak {peak} KiB: growth {growth_mib} MiB for 1 GiB up and down"
    );
    assert!(growth_mib < 32, "peak RSS grew by {growth_mib} MiB");
}

/// A connection that has sent the head of a multipart upload of `content_length` bytes; the
/// caller writes the body (or part of it).
fn upload_request(s: &Sandlet, content_length: u64) -> TcpStream {
    let mut conn = TcpStream::connect(s.exec_base.trim_start_matches("http://")).unwrap();
    write!(
        conn,
        "POST /files/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {content_length}\r\n\r\n"
    )
    .unwrap();
    conn
}

/// Sends a multipart upload's head and the first half of `body`; the rest never comes.
fn send_half(s: &Sandlet, body: &[u8]) -> TcpStream {
    let mut conn = upload_request(s, body.len() as u64);
    conn.write_all(&body[..body.len() / 2]).unwrap();
    conn
}

/// The system's dirty page cache (`Dirty:` in /proc/meminfo), in KiB.
fn dirty_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Dirty:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// In a simulated pod, sidecar mode: every path resolves inside the main container's root, as
/// the main container's user.
#[test]
fn sidecar_paths_stay_inside_the_main_containers_root() {
    let Some(pod) = Pod::start() else { return };
    let s = pod.sidecar_sandlet("", SIDECAR_CAPABILITIES, &[]);
    wait_until("the sidecar finds the main container", || {
        s.get("/ready").status == 200
    });
    // Files only the sidecar's (the host's) filesystem has.
    let host = scratch();
    let secret = host.path().join("sidecar-only");
    std::fs::write(&secret, "sidecar secret").unwrap();
    let secret = secret.to_str().unwrap().to_string();
    let home = pod.rootfs.join("home/sandbox");
    symlink("/", home.join("to-root")).unwrap();
    symlink("../../../../../../..", home.join("up")).unwrap();
    symlink(&secret, home.join("abs")).unwrap();

    for path in [
        secret.clone(),
        format!("/home/sandbox/to-root{secret}"),
        format!("/home/sandbox/up{secret}"),
        "/home/sandbox/abs".to_string(),
        format!("~/up/../..{secret}"),
    ] {
        let r = download(&s, &path, &[]);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(!r.text().contains("sidecar secret"));
    }
    // The container's own files, through the same links.
    let r = download(&s, "/home/sandbox/to-root/etc/sandbox-rootfs", &[]);
    assert_eq!(r.body, b"busybox-rootfs\n");
    let r = download(&s, "/home/sandbox/up/etc/sandbox-rootfs", &[]);
    assert_eq!(r.body, b"busybox-rootfs\n");
    s.exec(
        "GET",
        "/directories/list?path=/home/sandbox/to-root",
        None,
        &[],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    let r = s.exec(
        "GET",
        "/directories/list?path=/home/sandbox/to-root/etc",
        None,
        &[],
    );
    assert_eq!(
        paths(&r.json()),
        ["group", "passwd", "sandbox-rootfs"].map(|n| format!("/home/sandbox/to-root/etc/{n}"))
    );

    // Relative paths and ~ are the container's: its working directory and its user's HOME.
    let r = upload(
        &s,
        &[
            Part::MetaFile(json!({"path": "rel.txt"})),
            Part::File(b"rel\n"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        std::fs::read(pod.rootfs.join("work/rel.txt")).unwrap(),
        b"rel\n"
    );
    // Writes through a link to a link land inside the container; new files are its user's.
    let r = upload(
        &s,
        &[
            Part::MetaFile(json!({"path": "~/up/tmp/through-link.txt"})),
            Part::File(b"in\n"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let written = pod.rootfs.join("tmp/through-link.txt");
    assert_eq!(std::fs::read(&written).unwrap(), b"in\n");
    assert_eq!(std::fs::metadata(&written).unwrap().uid(), MAIN_UID);
    let r = s.exec(
        "POST",
        "/directories",
        Some(&json!({"~/made/deeper": {}})),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        std::fs::metadata(home.join("made/deeper")).unwrap().uid(),
        MAIN_UID
    );
    let info = s.exec("GET", "/files/info?path=~/made", None, &[]).json();
    assert_eq!(
        (
            info["~/made"]["owner"].as_str(),
            info["~/made"]["group"].as_str()
        ),
        (Some("sandbox"), Some("sandbox"))
    );

    // The rest of the routes, on the container's files.
    let r = s.exec(
        "POST",
        "/files/permissions",
        Some(&json!({"~/made": {"mode": 700, "group": "extra"}})),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let made = std::fs::metadata(home.join("made")).unwrap();
    assert_eq!(
        (made.mode() & 0o777, made.gid()),
        (0o700, 2000),
        "a group of the container's user"
    );
    let r = s.exec(
        "POST",
        "/files/mv",
        Some(&json!([{"src": "/tmp/through-link.txt", "dest": "~/made/moved.txt"}])),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.exec(
        "POST",
        "/files/replace?verbose=true",
        Some(&json!({"~/made/moved.txt": {"old": "in", "new": "out"}})),
        &[],
    );
    assert_eq!(r.json(), json!({"~/made/moved.txt": {"replacedCount": 1}}));
    assert_eq!(
        std::fs::read(home.join("made/moved.txt")).unwrap(),
        b"out\n"
    );
    let found = s
        .exec("GET", "/files/search?path=/home&pattern=*.txt", None, &[])
        .json();
    assert_eq!(paths(&found), ["/home/sandbox/made/moved.txt"]);
    let r = s.exec("DELETE", "/files?path=~/made/moved.txt", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!home.join("made/moved.txt").exists());

    // The container's user's rights: its root-owned files are not its to change.
    upload(
        &s,
        &[
            Part::MetaFile(json!({"path": "/etc/sandbox-rootfs"})),
            Part::File(b"x"),
        ],
    )
    .assert_error(403, "PERMISSION_DENIED");
    assert_eq!(
        std::fs::read(pod.rootfs.join("etc/sandbox-rootfs")).unwrap(),
        b"busybox-rootfs\n"
    );
    // Its root and its mount points are not removed, and a refusal removes nothing.
    s.exec("DELETE", "/directories?path=/", None, &[])
        .assert_error(409, "CONFLICT");
    s.exec("DELETE", "/directories?path=/proc", None, &[])
        .assert_error(409, "CONFLICT");
    // A link to the root is removed as a link.
    let r = s.exec("DELETE", "/directories?path=/home/sandbox/up", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(pod.rootfs.join("etc/passwd").exists() && !home.join("up").exists());
    // Removing the link to the root removes the link only.
    let r = s.exec("DELETE", "/files?path=/home/sandbox/to-root", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(pod.rootfs.join("etc/passwd").exists() && !home.join("to-root").exists());
    assert!(Path::new(&secret).exists());
}
