//! `cargo bench --bench exec_api`: the exec API's speed next to the physical floors measured in
//! the same run. Prints numbers; asserts only that nothing was lost.
//!
//! - floors: fork+exec+wait of `/bin/true` and of `bash -c true`; raw pipe throughput of the
//!   same line output the streaming run produces, read by a parent from a child's stdout;
//! - foreground `true`: `POST /command` until the final event, keep-alive;
//! - streaming: MB/s of line output through SSE, every line checked;
//! - 200 concurrent streaming commands, every line of every one checked.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
use stats::{mb_per_s, ms, p, row, sorted, time};

const SAMPLES: usize = 300;
/// One line of the streaming run: 99 characters and a newline.
const LINE: &str = "sandlet-exec-api-throughput-line-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQRSTUVWXYZ-01";
const STREAM_BYTES: u64 = 256 << 20;

fn main() {
    let samples = stats::samples(SAMPLES);
    println!(
        "sandlet exec API benchmark: {samples} samples, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let s = common::Sandlet::start(&["--log-level", "warn"]);
    let port: u16 = s.exec_base.rsplit(':').next().unwrap().parse().unwrap();
    let mut http = Http::connect(port);

    // Interleaved, so floor and measurement see the same machine.
    let (mut floor, mut floor_bash, mut fg) = (vec![], vec![], vec![]);
    for _ in 0..samples {
        floor.push(time(|| {
            Command::new("/bin/true").status().unwrap();
        }));
        floor_bash.push(time(|| {
            Command::new("bash").args(["-c", "true"]).status().unwrap();
        }));
        let t = Instant::now();
        let events = http.events("/command", &json!({"command": "true"}));
        fg.push(t.elapsed());
        assert_eq!(events.last().unwrap()["type"], "execution_complete");
        std::thread::sleep(Duration::from_millis(5));
    }

    let script = format!("yes '{LINE}' | head -c {STREAM_BYTES}");
    let lines = STREAM_BYTES / (LINE.len() as u64 + 1);
    let pipe_floor = {
        let t = Instant::now();
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        child.wait().unwrap();
        assert_eq!(total, STREAM_BYTES);
        mb_per_s(total, t.elapsed())
    };
    // "5" resets sandlet's peak RSS (VmHWM) to its current RSS: the peak below is the stream's.
    let pid = s.pid();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let rss_before_kib = common::status_kib(pid, "VmRSS:");
    let (streamed, stream_time) = {
        let t = Instant::now();
        let mut seen = 0u64;
        let mut bytes = 0u64;
        let mut end = Value::Null;
        // The client checks each line without a JSON parse, so it does not limit the rate.
        // Each line arrives with its line ending, escaped in the JSON text (execd 1.1).
        let expected = format!("{{\"type\":\"stdout\",\"text\":\"{LINE}\\n\",\"timestamp\":");
        http.stream_raw("/command", &json!({"command": script}), |frame| {
            if frame.starts_with(expected.as_bytes()) {
                seen += 1;
                bytes += LINE.len() as u64 + 1;
                return;
            }
            let event: Value = serde_json::from_slice(frame).unwrap();
            if event["type"] == "stdout" {
                let text = event["text"].as_str().unwrap();
                assert!(
                    seen == lines && LINE.starts_with(text),
                    "line {seen} is not the expected line: {text:.40}"
                );
                seen += 1;
                bytes += text.len() as u64;
            } else if event["type"] != "ping" && event["type"] != "init" {
                end = event;
            }
        });
        assert_eq!(end["type"], "execution_complete", "{end}");
        assert_eq!(seen, lines + 1, "a line was lost or added");
        (bytes, t.elapsed())
    };
    let stream_peak_kib = common::status_kib(pid, "VmHWM:");

    let concurrent = 200;
    let per = 2000;
    let t = Instant::now();
    let threads: Vec<_> = (0..concurrent)
        .map(|_| {
            std::thread::spawn(move || {
                let mut http = Http::connect(port);
                let events = http.events("/command", &json!({"command": format!("seq 1 {per}")}));
                let out: Vec<&str> = events
                    .iter()
                    .filter(|e| e["type"] == "stdout")
                    .map(|e| e["text"].as_str().unwrap())
                    .collect();
                let expected: Vec<String> = (1..=per).map(|i| format!("{i}\n")).collect();
                assert_eq!(out, expected, "lost or reordered output");
                assert_eq!(events.last().unwrap()["type"], "execution_complete");
            })
        })
        .collect();
    let mut failed = 0;
    for th in threads {
        if th.join().is_err() {
            failed += 1;
        }
    }
    let concurrent_time = t.elapsed();

    let (floor, floor_bash, fg) = (sorted(floor), sorted(floor_bash), sorted(fg));
    println!();
    println!("{:<60} {:>10} {:>10}", "what", "p50", "p99");
    row("floor: fork+exec+wait /bin/true", &floor);
    row("floor: fork+exec+wait bash -c true", &floor_bash);
    row("foreground `true`: POST /command -> final event", &fg);
    let target = ms(p(&floor, 50)) * 1.5 + 0.3;
    println!(
        "foreground p50 {:.3} ms; target 1.5 x floor + 0.3 ms = {target:.3} ms ({})",
        ms(p(&fg, 50)),
        if ms(p(&fg, 50)) <= target {
            "met"
        } else {
            "not met"
        }
    );
    println!(
        "foreground p50 {:.2} x the /bin/true floor (performance goal <= 1.4 x)",
        ms(p(&fg, 50)) / ms(p(&floor, 50))
    );
    println!();
    println!("floor: raw pipe, the same line output read by a parent   {pipe_floor:>8.0} MB/s");
    println!(
        "SSE stdout, {} MiB of {}-byte lines, each a JSON event  {:>8.0} MB/s (target >= 300)",
        STREAM_BYTES >> 20,
        LINE.len() + 1,
        mb_per_s(streamed, stream_time)
    );
    println!(
        "SSE stdout: {:.0} % of the pipe floor (goal >= 60 %); sandlet's peak RSS while streaming {:.1} MiB (before it {:.1} MiB; goal <= 24 MiB)",
        mb_per_s(streamed, stream_time) / pipe_floor * 100.0,
        stream_peak_kib as f64 / 1024.0,
        rss_before_kib as f64 / 1024.0,
    );
    println!();
    println!(
        "{concurrent} concurrent commands x {per} lines: {:.2} s, {} failed (every line checked)",
        concurrent_time.as_secs_f64(),
        failed
    );
    assert_eq!(failed, 0);
}
