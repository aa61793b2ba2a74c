//! Adversarial resource use: what one client's requests make sandlet hold (memory, descriptors,
//! idle shims) stays bounded while they run and is given back after. Bounds are asserted with
//! margins, measured in `/proc/<pid>` of the sandlet under test.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::{Sandlet, shims_of, wait_until};
use serde_json::json;

/// `f` sampled every millisecond on another thread while `during` runs; the largest value seen.
fn peak_while<T>(f: impl Fn() -> usize + Send + 'static, during: impl FnOnce() -> T) -> (T, usize) {
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let running = Arc::clone(&running);
        thread::spawn(move || {
            let mut peak = f();
            while running.load(Ordering::Relaxed) {
                peak = peak.max(f());
                thread::sleep(Duration::from_millis(1));
            }
            peak.max(f())
        })
    };
    let result = during();
    running.store(false, Ordering::Relaxed);
    (result, sampler.join().unwrap())
}

/// 250 commands at once, three times: the spare pool never grows past its four idle shims, so
/// after each burst at most four are left, and during one no more shims run than commands and
/// spares (with a margin for shims on their way out). The commands keep the machine busy
/// forking, as a build would: before the pool was bounded, that slowed the spare shims' starts
/// enough that most bursts left dozens behind (a quiet machine rarely showed it).
#[test]
fn bursts_of_commands_leave_at_most_four_idle_shims() {
    const COMMANDS: usize = 250;
    const BUSY: &str =
        "end=$(($(date +%s)+2)); while [ $(date +%s) -lt $end ]; do :; done; echo done";
    let s = Sandlet::start(&[]);
    let pid = s.pid();
    let addr = s.exec_base.trim_start_matches("http://").to_string();
    for burst in 1..=3 {
        let (_, peak) = peak_while(
            move || shims_of(pid),
            || {
                // Connected first and sent together: the starts overlap as much as they can.
                let start = Arc::new(Barrier::new(COMMANDS));
                let commands: Vec<_> = (0..COMMANDS)
                    .map(|_| {
                        let mut conn = TcpStream::connect(&addr).unwrap();
                        let start = Arc::clone(&start);
                        thread::spawn(move || {
                            let body = json!({ "command": BUSY }).to_string();
                            let request = format!(
                                "POST /command HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            start.wait();
                            conn.write_all(request.as_bytes()).unwrap();
                            let mut reply = String::new();
                            conn.read_to_string(&mut reply).unwrap();
                            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
                            assert!(reply.contains("execution_complete"), "{reply}");
                        })
                    })
                    .collect();
                for command in commands {
                    command.join().unwrap();
                }
            },
        );
        eprintln!(
            "burst {burst}: {peak} shims at most, {} right after",
            shims_of(pid)
        );
        wait_until("at most four shims left (idle)", || shims_of(pid) <= 4);
        assert!(
            peak <= COMMANDS + 4 + 16,
            "{peak} shims ran at once for {COMMANDS} commands"
        );
    }
}
