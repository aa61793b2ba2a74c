//! `cargo bench --bench isolation`: what execd 1.1's identities and isolated sessions cost, next
//! to floors measured in the same run. Prints numbers; asserts only that every answer was right.
//!
//! - identity-scoped files: `GET /files/info` as sandlet and as an identity
//!   (`/v1/filesystem/{uid}/{gid}`: the thread takes the identity's filesystem ids for the
//!   operation); floors: `GET /ping` (the HTTP round trip), and fork+exec+wait of `/bin/true`,
//!   the least a helper process per operation (the alternative) would cost;
//! - isolated sessions (root only): creating one (an overlay workspace), a run of `true` in it,
//!   deleting it; floors: `unshare` of the same namespaces around `/bin/true`, a plain
//!   `POST /command` of `true`.

use std::io::Read;
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "support/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "support/stats.rs"]
mod stats;

use http::Http;
use stats::{ms, p, row, sorted, time};

const FILE_SAMPLES: usize = 2000;
const SESSION_SAMPLES: usize = 40;

/// A request with an optional JSON body; the status and the body (by its Content-Length).
fn request(http: &mut Http, method: &str, path: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = http.send(&format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let mut answer = vec![0u8; head.content_length.unwrap_or(0) as usize];
    http.stream.read_exact(&mut answer).unwrap();
    (head.status, answer)
}

fn main() {
    println!(
        "sandlet isolation benchmark: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let dir = common::scratch();
    let layers = dir.path().join("layers");
    std::fs::create_dir_all(&layers).unwrap();
    let s = common::Sandlet::start(&[
        "--log-level",
        "warn",
        "--exec-isolation-dir",
        layers.to_str().unwrap(),
        "--exec-envs-file",
        "off",
    ]);
    let port: u16 = s.exec_base.rsplit(':').next().unwrap().parse().unwrap();
    let mut http = Http::connect(port);
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let target = dir.path().to_string_lossy().to_string();
    let info = format!("/files/info?path={target}");
    let as_identity = format!("/v1/filesystem/{uid}/{gid}{info}");

    let samples = stats::samples(FILE_SAMPLES);
    let (mut ping, mut plain, mut identity, mut spawn) = (vec![], vec![], vec![], vec![]);
    for i in 0..samples {
        ping.push(time(|| {
            assert_eq!(request(&mut http, "GET", "/ping", None).0, 200)
        }));
        plain.push(time(|| {
            assert_eq!(request(&mut http, "GET", &info, None).0, 200)
        }));
        identity.push(time(|| {
            assert_eq!(request(&mut http, "GET", &as_identity, None).0, 200)
        }));
        if i % 10 == 0 {
            spawn.push(time(|| {
                Command::new("/bin/true").status().unwrap();
            }));
        }
    }
    let (ping, plain, identity, spawn) =
        (sorted(ping), sorted(plain), sorted(identity), sorted(spawn));
    println!();
    println!("{:<60} {:>10} {:>10}", "what", "p50", "p99");
    row("floor: GET /ping (the HTTP round trip)", &ping);
    row("floor: fork+exec+wait /bin/true (a helper process)", &spawn);
    row("GET /files/info as sandlet", &plain);
    row(
        "GET /v1/filesystem/{uid}/{gid}/files/info (as an identity)",
        &identity,
    );
    println!(
        "acting as an identity adds {:.3} ms at p50; a helper process per operation would add at least {:.3} ms",
        ms(p(&identity, 50)) - ms(p(&plain, 50)),
        ms(p(&spawn, 50))
    );

    if !nix::unistd::geteuid().is_root() {
        println!(
            "\nisolated sessions skipped: they need root (`sudo cargo bench --bench isolation`)"
        );
        return;
    }
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let samples = stats::samples(SESSION_SAMPLES);
    let (mut unshare, mut command, mut create, mut run, mut delete) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..samples {
        unshare.push(time(|| {
            assert!(
                Command::new("unshare")
                    .args(["--mount", "--pid", "--uts", "--ipc", "--fork", "/bin/true"])
                    .status()
                    .unwrap()
                    .success()
            );
        }));
        let t = Instant::now();
        let events = http.events("/command", &json!({"command": "true"}));
        command.push(t.elapsed());
        assert_eq!(events.last().unwrap()["type"], "execution_complete");
        let t = Instant::now();
        let (status, body) = request(
            &mut http,
            "POST",
            "/v1/isolated/session",
            Some(&json!({"workspace": {"path": ws}})),
        );
        create.push(t.elapsed());
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
        let id = serde_json::from_slice::<Value>(&body).unwrap()["session_id"]
            .as_str()
            .unwrap()
            .to_string();
        let t = Instant::now();
        let events = http.events(
            &format!("/v1/isolated/session/{id}/run"),
            &json!({"code": "true"}),
        );
        run.push(t.elapsed());
        assert_eq!(events.last().unwrap()["type"], "execution_complete");
        let t = Instant::now();
        let (status, _) = request(
            &mut http,
            "DELETE",
            &format!("/v1/isolated/session/{id}"),
            None,
        );
        delete.push(t.elapsed());
        assert_eq!(status, 200);
    }
    println!();
    row(
        "floor: unshare --mount --pid --uts --ipc --fork /bin/true",
        &sorted(unshare),
    );
    row(
        "floor: POST /command `true` (a plain command)",
        &sorted(command),
    );
    row(
        "create an isolated session (overlay workspace)",
        &sorted(create),
    );
    row("a run of `true` in it", &sorted(run));
    row(
        "delete it (its processes gone, its layers removed)",
        &sorted(delete),
    );
}
