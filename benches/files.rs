//! `cargo bench --bench files`: upload and download throughput of the file API next to the
//! floors measured in the same run, `cat` through loopback: the same file read from disk and
//! copied into a loopback TCP connection whose reader drains it (the download's work without
//! HTTP) or writes it over the previous round's copy (truncating it, as `cat > file` does) and
//! syncs it (the upload's work without HTTP). Prints numbers; asserts only that every byte
//! arrived.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

const SIZE: u64 = 512 << 20;
const ROUNDS: usize = 4;
const BOUNDARY: &str = "sandlet-bench-boundary";

fn main() {
    println!(
        "sandlet file API benchmark: {} MiB, best of {ROUNDS}, {} cores",
        SIZE >> 20,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let s = common::Sandlet::start(&["--log-level", "warn"]);
    let addr = s.exec_base.trim_start_matches("http://").to_string();
    let dir = common::scratch();
    let source = dir.path().join("source.bin");
    {
        let block: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut f = std::fs::File::create(&source).unwrap();
        for _ in 0..(SIZE >> 20) {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let target = dir.path().join("uploaded.bin");
    let copy = dir.path().join("copied.bin");
    let (mut floor, mut floor_to_file, mut up, mut down) = (vec![], vec![], vec![], vec![]);
    // Interleaved, so floors and measurements see the same machine; each starts on a settled
    // disk. The two that write 512 MiB take turns at going first: on this VM (ext4 with
    // `discard`) whichever writes right after the other can lose half its speed, which
    // `sync` does not prevent.
    for round in 0..ROUNDS {
        settle();
        floor.push(cat_through_loopback(&source, None));
        for upload_now in [round % 2 == 1, round % 2 == 0] {
            settle();
            if upload_now {
                up.push(upload(&addr, &source, &target));
                assert_eq!(std::fs::metadata(&target).unwrap().len(), SIZE);
            } else {
                floor_to_file.push(cat_through_loopback(&source, Some(&copy)));
            }
        }
        settle();
        down.push(download(&addr, &target));
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap();
    let mbps = |d: Duration| SIZE as f64 / d.as_secs_f64() / 1e6;
    let drained = mbps(best(&floor));
    let to_file = mbps(best(&floor_to_file));
    println!("floor: cat through loopback, drained          {drained:8.0} MB/s");
    println!("floor: cat through loopback, to a synced file {to_file:8.0} MB/s");
    for (what, v, floor) in [
        ("upload (multipart, atomic, synced)", &up, to_file),
        ("download", &down, drained),
    ] {
        let rate = mbps(best(v));
        println!(
            "{what:<46} {rate:8.0} MB/s  ({:.0} % of its floor; target >= 80 %)",
            rate / floor * 100.0
        );
    }
    // Every round of the two that write, so the turn-taking above hides nothing.
    let rounds = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.0}", mbps(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "each round (the upload went first in rounds 2 and 4): to a synced file {} MB/s; upload {} MB/s",
        rounds(&floor_to_file),
        rounds(&up)
    );
}

/// Waits until every filesystem has written out its dirty data and committed its journal.
fn settle() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// The file read from disk and copied into a loopback connection, as `cat file | nc` would; the
/// other end drains it, or writes it to `to` and syncs it.
fn cat_through_loopback(source: &std::path::Path, to: Option<&std::path::Path>) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let to = to.map(std::path::Path::to_path_buf);
    let reader = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        match to {
            None => drain(&mut conn),
            Some(path) => {
                let mut file = std::fs::File::create(path).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    match conn.read(&mut buf).unwrap() {
                        0 => break,
                        n => {
                            file.write_all(&buf[..n]).unwrap();
                            total += n as u64;
                        }
                    }
                }
                file.sync_all().unwrap();
                total
            }
        }
    });
    let t = Instant::now();
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    send_file(source, &mut conn);
    drop(conn);
    assert_eq!(reader.join().unwrap(), SIZE);
    t.elapsed()
}

fn upload(addr: &str, source: &std::path::Path, target: &std::path::Path) -> Duration {
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"metadata\"; filename=\"metadata\"\r\n\r\n{{\"path\":\"{}\"}}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n",
        target.display()
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let t = Instant::now();
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_nodelay(true).unwrap();
    write!(
        conn,
        "POST /files/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n{head}",
        head.len() as u64 + SIZE + tail.len() as u64
    )
    .unwrap();
    send_file(source, &mut conn);
    conn.write_all(tail.as_bytes()).unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    t.elapsed()
}

fn download(addr: &str, target: &std::path::Path) -> Duration {
    let t = Instant::now();
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET /files/download?path={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        target.display()
    )
    .unwrap();
    let total = drain(&mut conn);
    assert!(total > SIZE && total < SIZE + 1024, "{total} bytes");
    t.elapsed()
}

/// The file into the connection 1 MiB at a time, as `cat` with a large buffer would.
fn send_file(source: &std::path::Path, conn: &mut TcpStream) {
    let mut file = std::fs::File::open(source).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).unwrap() {
            0 => return,
            n => conn.write_all(&buf[..n]).unwrap(),
        }
    }
}

fn drain(conn: &mut TcpStream) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf).unwrap() {
            0 => return total,
            n => total += n as u64,
        }
    }
}
