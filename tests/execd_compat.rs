//! The exec API against its contract in `proto-json/exec-api`: the fixtures validate (and the
//! invalid ones do not), and every kind of answer sandlet gives matches its schema.

mod common;

use std::path::{Path, PathBuf};

use common::schemas::Schemas;
use common::{Sandlet, sse_events, wait_until};
use serde_json::{Value, json};

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-json/exec-api")
}

/// The schema a fixture is for: the longest schema name its file name starts with.
fn schema_of<'a>(file: &str, schemas: &'a Schemas) -> &'a str {
    schemas
        .names()
        .filter(|n| file.starts_with(n.as_str()))
        .max_by_key(|n| n.len())
        .unwrap_or_else(|| panic!("no schema for fixture {file}"))
}

fn fixtures(sub: &str) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(proto_dir().join(sub))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (
                name,
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn fixtures_validate_and_invalid_ones_do_not() {
    let schemas = Schemas::load(&proto_dir());
    let valid = fixtures("fixtures");
    assert!(valid.len() >= 10);
    for (file, doc) in &valid {
        schemas.check(schema_of(file, &schemas), doc);
    }
    for (file, doc) in fixtures("fixtures/invalid") {
        let schema = schema_of(&file, &schemas);
        assert!(
            !schemas.errors(schema, &doc).is_empty(),
            "invalid/{file} passes {schema}"
        );
    }
}

#[test]
fn every_answer_matches_its_schema() {
    let schemas = Schemas::load(&proto_dir());
    let dir = common::scratch();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let s = Sandlet::start(&["--exec-token-file", token.to_str().unwrap()]);
    let auth = [("X-EXECD-ACCESS-TOKEN", "t")];
    let post = |path: &str, body: &Value| s.exec("POST", path, Some(body), &auth);
    let events = |path: &str, body: &Value| {
        let r = post(path, body);
        assert_eq!(r.status, 200, "{}", r.text());
        let events = sse_events(&r.text());
        for e in &events {
            schemas.check("event", e);
        }
        events
    };

    let request = json!({"command": "echo out; echo err >&2; echo; exit 3", "envs": {"A": "1"}, "timeout": 5000});
    schemas.check("run-command-request", &request);
    let fg = events("/command", &request);
    let ok = events("/command", &json!({"command": "true"}));
    let bg = events(
        "/command",
        &json!({"command": "sleep 0.2", "background": true}),
    );
    for id in [&fg[0]["text"], &ok[0]["text"], &bg[0]["text"]] {
        let id = id.as_str().unwrap();
        let status = s.exec("GET", &format!("/command/status/{id}"), None, &auth);
        schemas.check("command-status", &status.json());
    }
    let id = bg[0]["text"].as_str().unwrap();
    wait_until("the background command ends", || {
        let status = s
            .exec("GET", &format!("/command/status/{id}"), None, &auth)
            .json();
        schemas.check("command-status", &status);
        status["running"] == false
    });

    let session = post("/session", &json!({}));
    schemas.check("session-created", &session.json());
    let sid = session.json()["session_id"].as_str().unwrap().to_string();
    events(
        &format!("/session/{sid}/run"),
        &json!({"command": "echo hi; false"}),
    );

    schemas.check("metrics", &s.exec("GET", "/metrics", None, &auth).json());

    for r in [
        s.exec("GET", "/ping", None, &[]),
        post("/command", &json!({})),
        s.exec("DELETE", "/command", None, &auth),
        s.exec("GET", "/command/status/nope", None, &auth),
        s.exec("DELETE", "/session/nope", None, &auth),
        post("/session/nope/run", &json!({"command": "true"})),
    ] {
        assert!(r.status >= 400, "{}", r.text());
        schemas.check("error", &r.json());
    }
}

#[test]
fn metrics_watch_streams_a_sample_a_second() {
    use std::io::{BufRead, BufReader, Write};
    let schemas = Schemas::load(&proto_dir());
    let s = Sandlet::start(&[]);
    let addr = s.exec_base.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /metrics/watch HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let started = std::time::Instant::now();
    let mut samples = Vec::new();
    let mut line = String::new();
    while samples.len() < 2 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        if let Some(json) = line.trim_end().strip_prefix("data: ") {
            let sample: Value = serde_json::from_str(json).unwrap();
            schemas.check("metrics", &sample);
            samples.push(sample);
        }
    }
    // The first at once, the next a second later: about 1 s for two, not execd's 4.
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    assert!(samples[1]["timestamp"].as_i64() > samples[0]["timestamp"].as_i64());
}
