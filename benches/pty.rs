//! `cargo bench --bench pty`: PTY echo round trip over the WebSocket. One byte goes in as a
//! stdin frame, through sandlet to the terminal, where a program reading it in raw mode
//! (`stty raw -echo; cat`, what a shell's line editor does) writes it back, and out again as an
//! output frame; the time until the client has it is one sample. Prints p50/p99.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "support/stats.rs"]
mod stats;

const SAMPLES: usize = 500;

fn main() {
    let samples = stats::samples(SAMPLES);
    println!(
        "sandlet PTY benchmark: {samples} samples, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let s = common::Sandlet::start(&["--log-level", "warn"]);
    let r = s.exec(
        "POST",
        "/pty",
        Some(&json!({"command": "stty raw -echo; echo ready; exec cat"})),
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["session_id"].as_str().unwrap().to_string();
    let addr = s.exec_base.trim_start_matches("http://").to_string();
    let request = format!("ws://{addr}/pty/{id}/ws")
        .into_client_request()
        .unwrap();
    let stream = TcpStream::connect(&addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut ws, _) = tungstenite::client::client(request, stream).unwrap();
    let mut seen = String::new();
    while !seen.contains("ready") {
        if let Some(out) = output(&mut ws) {
            seen.push_str(&out);
        }
    }

    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let byte = b'a' + (i % 26) as u8;
        let t = Instant::now();
        ws.send(Message::Binary(vec![0u8, byte].into())).unwrap();
        loop {
            if output(&mut ws).is_some_and(|o| o.as_bytes().contains(&byte)) {
                break;
            }
        }
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    times.sort();
    let pick = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "PTY echo round trip: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        pick(0.50).as_secs_f64() * 1e6,
        pick(0.99).as_secs_f64() * 1e6,
        times.last().unwrap().as_secs_f64() * 1e6
    );
}

/// The terminal output of the next frame, if it is output.
fn output(ws: &mut WebSocket<TcpStream>) -> Option<String> {
    match ws.read().expect("websocket") {
        Message::Binary(b) if b.first() == Some(&1) || b.first() == Some(&3) => {
            let skip = if b[0] == 1 { 1 } else { 9 };
            Some(String::from_utf8_lossy(&b[skip..]).into_owned())
        }
        _ => None,
    }
}
