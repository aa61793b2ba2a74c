//! Task output over HTTP: byte offsets, follow mode, and the size limit's rotation policy.

mod common;

use std::io::Read;

use common::Sandlet;
use serde_json::json;

#[test]
fn follow_streams_output_until_the_task_ends() {
    let s = Sandlet::start(&[]);
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.02; done";
    assert_eq!(
        s.set_tasks(json!([{"name": "t", "process": {"command": ["sh", "-c", script]}}]))
            .status,
        200
    );
    s.wait_state("t", "running");
    let mut resp = ureq::get(format!("{}/tasks/t/logs?follow=true", s.base))
        .call()
        .unwrap();
    let mut body = String::new();
    resp.body_mut()
        .as_reader()
        .read_to_string(&mut body)
        .unwrap();
    let expected: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        body, expected,
        "the stream ends when the task has ended, with nothing missing"
    );
    assert!(s.task("t").unwrap()["processStatus"]["terminated"].is_object());
}

#[test]
fn offsets_address_the_stream_exactly() {
    let s = Sandlet::start(&[]);
    assert_eq!(
        s.set_tasks(json!([{"name": "t", "process": {"command": ["seq", "1", "1000"]}}]))
            .status,
        200
    );
    s.wait_state("t", "terminated");
    let expected: String = (1..=1000).map(|i| format!("{i}\n")).collect();
    let mut offset = 0u64;
    let mut got = Vec::new();
    loop {
        let r = s.get(&format!("/tasks/t/logs?offset={offset}&limit=333"));
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-log-offset").unwrap().parse::<u64>().unwrap(),
            offset
        );
        got.extend(&r.body);
        offset = r.header("x-log-next").unwrap().parse().unwrap();
        if r.header("x-log-complete") == Some("true") {
            break;
        }
        assert_eq!(r.body.len(), 333);
    }
    assert_eq!(String::from_utf8(got).unwrap(), expected);
    // Past the end: nothing, and complete.
    let r = s.get(&format!("/tasks/t/logs?offset={}", offset + 100));
    assert!(r.body.is_empty());
    assert_eq!(r.header("x-log-complete"), Some("true"));
}

#[test]
fn output_beyond_the_limit_keeps_the_newest_bytes_with_stable_offsets() {
    let limit = 64 * 1024;
    let s = Sandlet::start(&["--task-log-limit-bytes", &limit.to_string()]);
    assert_eq!(
        s.set_tasks(json!([{"name": "t", "process": {"command": ["seq", "1", "200000"]}}]))
            .status,
        200
    );
    s.wait_state("t", "terminated");
    let expected: String = (1..=200000).map(|i| format!("{i}\n")).collect();
    let r = s.get("/tasks/t/logs?limit=4194304");
    let start: usize = r.header("x-log-start").unwrap().parse().unwrap();
    assert!(start > 0, "old output was rotated away");
    assert_eq!(
        r.header("x-log-offset").unwrap().parse::<usize>().unwrap(),
        start,
        "asked for 0, got the oldest kept"
    );
    assert!(
        r.body.len() >= limit / 2 && r.body.len() <= limit + 64 * 1024,
        "kept {} bytes",
        r.body.len()
    );
    assert_eq!(
        r.body,
        expected.as_bytes()[start..],
        "kept bytes are the stream's tail at their offsets"
    );
    let on_disk: u64 = std::fs::read_dir(s.data_dir().join("t"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stdout."))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        on_disk <= (limit + 64 * 1024) as u64,
        "{on_disk} bytes on disk"
    );
}
