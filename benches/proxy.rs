//! `cargo bench --bench proxy`: `/proxy/{port}/` next to its floor, the same upstream reached
//! directly over loopback, measured in the same run. Prints numbers; asserts only that every
//! byte arrived.
//!
//! - latency: keep-alive GETs of a 2-byte body, direct and proxied interleaved, with sandlet's
//!   own `/ping` as a second floor (its HTTP stack without the upstream hop);
//! - throughput: a 1 GiB download, direct and proxied, alternating, best of the runs.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "support/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "support/stats.rs"]
mod stats;

use http::Http;
use stats::{mb_per_s, ms, p, row, sorted};

const SAMPLES: usize = 2000;
const DOWNLOAD: u64 = 1 << 30;
const DOWNLOAD_RUNS: usize = 3;

fn main() {
    let samples = stats::samples(SAMPLES);
    println!(
        "sandlet proxy benchmark: {samples} samples, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let upstream = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let listener = listener.tap_io(move |tcp| {
        counter.fetch_add(1, Ordering::Relaxed);
        // As sandlet's own listener does, so both paths answer without Nagle delays.
        tcp.set_nodelay(true).unwrap();
    });
    let app = Router::new().route("/small", get(|| async { "ok" })).route(
        "/bytes/{n}",
        get(|Path(n): Path<u64>| async move { bytes(n) }),
    );
    rt.spawn(async move { axum::serve(listener, app).await });

    let s = common::Sandlet::start(&["--log-level", "warn"]);
    let exec: u16 = s.exec_base.rsplit(':').next().unwrap().parse().unwrap();
    let mut direct = Http::connect(upstream);
    let mut proxied = Http::connect(exec);
    let mut ping = Http::connect(exec);
    let via = format!("/proxy/{upstream}");

    // Warm both paths (the proxy's pooled connection, the page cache of the binary).
    for _ in 0..50 {
        direct.get("/small", &mut std::io::sink());
        proxied.get(&format!("{via}/small"), &mut std::io::sink());
    }
    let before = accepted.load(Ordering::Relaxed);
    let (mut floor, mut sandlet, mut through) = (vec![], vec![], vec![]);
    for _ in 0..samples {
        let mut body = Vec::new();
        let t = Instant::now();
        ping.get("/ping", &mut body);
        sandlet.push(t.elapsed());
        let t = Instant::now();
        direct.get("/small", &mut body);
        floor.push(t.elapsed());
        assert_eq!(body, b"ok");
        body.clear();
        let t = Instant::now();
        proxied.get(&format!("{via}/small"), &mut body);
        through.push(t.elapsed());
        assert_eq!(body, b"ok");
    }
    let upstream_connections = accepted.load(Ordering::Relaxed) - before;

    let (mut floor_mbs, mut through_mbs) = (0f64, 0f64);
    for _ in 0..DOWNLOAD_RUNS {
        let mut sink = Counter(0);
        let t = Instant::now();
        direct.get(&format!("/bytes/{DOWNLOAD}"), &mut sink);
        floor_mbs = floor_mbs.max(mb_per_s(sink.0, t.elapsed()));
        assert_eq!(sink.0, DOWNLOAD);
        let mut sink = Counter(0);
        let t = Instant::now();
        proxied.get(&format!("{via}/bytes/{DOWNLOAD}"), &mut sink);
        through_mbs = through_mbs.max(mb_per_s(sink.0, t.elapsed()));
        assert_eq!(sink.0, DOWNLOAD);
    }

    let (floor, sandlet, through) = (sorted(floor), sorted(sandlet), sorted(through));
    println!();
    println!(
        "{:<52} {:>10} {:>10}",
        "GET, 2-byte body, keep-alive", "p50", "p99"
    );
    row("floor: upstream directly over loopback", &floor);
    row("floor: sandlet's own GET /ping (no upstream hop)", &sandlet);
    row("through /proxy/{port}/", &through);
    println!(
        "proxy adds {:.3} ms at p50, {:.3} ms at p99",
        ms(p(&through, 50)) - ms(p(&floor, 50)),
        ms(p(&through, 99)) - ms(p(&floor, 99))
    );
    println!(
        "new upstream connections opened by the proxy over {samples} requests: {upstream_connections}"
    );
    println!();
    println!("download, {} MiB, best of {DOWNLOAD_RUNS}", DOWNLOAD >> 20);
    println!("floor: upstream directly over loopback   {floor_mbs:>8.0} MB/s");
    println!("through /proxy/{{port}}/                  {through_mbs:>8.0} MB/s");
}

/// `n` bytes, with a Content-Length so both paths read the same framing.
fn bytes(n: u64) -> Response {
    (
        [("content-length", n.to_string())],
        common::upstream::x_bytes(n),
    )
        .into_response()
}

impl Http {
    /// `GET path`, its Content-Length body copied into `body`.
    fn get(&mut self, path: &str, body: &mut impl Write) {
        let head = self.send(&format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n"));
        assert_eq!(head.status, 200);
        let length = head.content_length.expect("a Content-Length");
        let copied = std::io::copy(&mut (&mut self.stream).take(length), body).unwrap();
        assert_eq!(copied, length);
    }
}

struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
