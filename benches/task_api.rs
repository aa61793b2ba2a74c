//! `cargo bench --bench task_api`: the task executor's speed next to the physical floors
//! measured in the same run on the same machine. Prints numbers; asserts nothing.
//!
//! - floor: fork+exec+wait of `/bin/true` (std `Command`), and a FIFO-woken `sh` reaped
//!   directly by its parent (the fastest anyone can learn of an exit);
//! - start latency: `POST /setTasks` with one new task until the response shows it started;
//! - exit-to-visible: the task is woken through a FIFO to exit; time until its `terminated`
//!   state arrives on the change feed, and until `GET /tasks/{name}` shows it;
//! - sandlet's RSS when idle, after starting and after the workload;
//! - sidecar mode (as root, in a simulated pod): task start in the main container next to a
//!   local start and fork+exec of the same binary, interleaved, and `nsenter` for comparison.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
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

const SAMPLES: usize = 300;

fn main() {
    let samples = stats::samples(SAMPLES);
    let work = tempfile::Builder::new()
        .prefix("sandlet-bench-")
        .tempdir()
        .unwrap();
    println!(
        "sandlet task API benchmark: {samples} samples each, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let floor_spawn = measure(samples, spawn_true);
    let fifo = work.path().join("wake");
    make_fifo(&fifo);
    let floor_exit = measure(samples / 3, || {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read _ < {}", fifo.display()))
            .spawn()
            .unwrap();
        let t = wake(&fifo);
        child.wait().unwrap();
        t.elapsed()
    });

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sandlet = Command::new(env!("CARGO_BIN_EXE_sandlet"))
        .args(["serve", "--listen-addr", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(work.path().join("tasks"))
        .args([
            "--max-tasks",
            "100000",
            "--max-active-tasks",
            "64",
            "--log-level",
            "warn",
        ])
        .env("SANDLET_EXEC_LISTEN_ADDR", "127.0.0.1:0")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sandlet did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut http = Http::connect(port);
    std::thread::sleep(Duration::from_millis(200));
    let rss_idle = rss_kib(sandlet.id());

    let health = measure(samples, || {
        let t = Instant::now();
        http.request("GET", "/health", "");
        t.elapsed()
    });
    let refused = measure(samples, || {
        let t = Instant::now();
        let (status, _) = http.request(
            "POST",
            "/setTasks",
            r#"[{"name":"../x","process":{"command":["true"]}}]"#,
        );
        assert_eq!(status, 400);
        t.elapsed()
    });

    // Paced, as a controller starts tasks: one at a time, the previous one finished, a short
    // pause between. The floor is sampled interleaved, so both see the same machine.
    let mut floor_paced = Vec::new();
    let mut start_paced = Vec::new();
    for n in 0..samples {
        floor_paced.push(spawn_true());
        let name = format!("paced-{n}");
        start_paced.push(start_task(&mut http, &name));
        loop {
            let (_, task) = http.request("GET", &format!("/tasks/{name}"), "");
            if task["processStatus"]["terminated"].is_object() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Back to back: each start races the previous task's shim and the spare shim's refill.
    let mut n = 0;
    let start = measure(samples, || {
        n += 1;
        start_task(&mut http, &format!("start-{n}"))
    });
    http.request("POST", "/setTasks", "[]");

    let feed = open_feed(&base);
    let mut feed_lat = Vec::new();
    let mut get_lat = Vec::new();
    for i in 0..samples / 3 {
        let name = format!("exit-{i}");
        http.request("POST", "/setTasks", &waiting_task(&name, &fifo));
        let t = wake(&fifo);
        loop {
            let event: Value = feed
                .recv_timeout(Duration::from_secs(10))
                .expect("feed event");
            if event["task"]["name"] == name.as_str()
                && event["task"]["processStatus"]["terminated"].is_object()
            {
                feed_lat.push(t.elapsed());
                break;
            }
        }
        // GET visibility, of a fresh exit, polling GET only.
        let name = format!("exit-get-{i}");
        http.request("POST", "/setTasks", &waiting_task(&name, &fifo));
        let t = wake(&fifo);
        loop {
            let (_, task) = http.request("GET", &format!("/tasks/{name}"), "");
            if task["processStatus"]["terminated"].is_object() {
                get_lat.push(t.elapsed());
                break;
            }
        }
    }
    http.request("POST", "/setTasks", "[]");
    std::thread::sleep(Duration::from_millis(200));
    let rss_after = rss_kib(sandlet.id());

    println!();
    println!("{:<52} {:>10} {:>10}", "what", "p50", "p99");
    row("floor: fork+exec+wait /bin/true", &floor_spawn);
    row("floor: FIFO wake -> exit seen by waitpid (sh)", &floor_exit);
    row("HTTP GET /health (keep-alive, client included)", &health);
    row("HTTP POST /setTasks refused as invalid (400)", &refused);
    row(
        "floor, sampled between the paced starts",
        &sorted(floor_paced.clone()),
    );
    row(
        "start, paced: POST /setTasks -> task started",
        &sorted(start_paced.clone()),
    );
    row("start, back to back", &start);
    row(
        "exit -> terminated event on /watchTasks",
        &sorted(feed_lat.clone()),
    );
    row(
        "exit -> terminated on GET /tasks/{name} (polling)",
        &sorted(get_lat.clone()),
    );
    println!();
    let paced =
        p(&sorted(start_paced), 50).as_secs_f64() / p(&sorted(floor_paced), 50).as_secs_f64();
    let back = p(&start, 50).as_secs_f64() / p(&floor_spawn, 50).as_secs_f64();
    println!(
        "start p50 / fork+exec floor p50: paced {paced:.2}x, back to back {back:.2}x (target <= 2x)"
    );
    println!(
        "exit visible on the feed, p50: {:.3} ms (target < 5 ms; the Go executor polls every 500 ms)",
        ms(p(&sorted(feed_lat), 50))
    );
    println!(
        "sandlet RSS: idle {:.1} MiB, after the runs {:.1} MiB (target idle < 10 MiB)",
        rss_idle as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    let _ = sandlet.kill();
    let _ = sandlet.wait();
    sidecar_comparison(samples);
}

impl Http {
    fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let head = self.send(&format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        let mut body = vec![0; head.content_length.unwrap_or(0) as usize];
        self.stream.read_exact(&mut body).unwrap();
        (
            head.status,
            if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&body).unwrap()
            },
        )
    }
}

/// Sidecar start against local start and the floor, one sample of each in turn so all three
/// see the same machine. The program is the pod rootfs's busybox `true` in every case.
fn sidecar_comparison(samples: usize) {
    use common::pod::{Pod, SIDECAR_CAPABILITIES};
    println!();
    let Some(pod) = Pod::start() else {
        println!("sidecar comparison skipped (see above)");
        return;
    };
    let quiet = ["--log-level", "warn", "--max-tasks", "100000"];
    let local = common::Sandlet::start(&quiet);
    let sidecar = pod.sidecar_sandlet("", SIDECAR_CAPABILITIES, &quiet);
    common::wait_until("the sidecar is ready", || {
        sidecar.get("/ready").status == 200
    });
    let port = |s: &common::Sandlet| s.base.rsplit(':').next().unwrap().parse().unwrap();
    let (mut local_http, mut sidecar_http) =
        (Http::connect(port(&local)), Http::connect(port(&sidecar)));
    let busybox_true = pod.rootfs.join("bin/true");
    let nsenter_args = [
        "-t".to_string(),
        pod.main_pid.to_string(),
        "-m".into(),
        "-u".into(),
        "-i".into(),
        "--".into(),
        "/bin/true".into(),
    ];
    let (mut floor, mut local_start, mut sidecar_start, mut nsenter) =
        (vec![], vec![], vec![], vec![]);
    for n in 0..samples {
        let t = Instant::now();
        Command::new(&busybox_true).status().unwrap();
        floor.push(t.elapsed());
        let name = format!("l-{n}");
        local_start.push(start_program(
            &mut local_http,
            &name,
            &busybox_true.to_string_lossy(),
        ));
        wait_terminated(&mut local_http, &name);
        let name = format!("s-{n}");
        sidecar_start.push(start_program(&mut sidecar_http, &name, "/bin/true"));
        wait_terminated(&mut sidecar_http, &name);
        if n % 3 == 0 {
            let t = Instant::now();
            let ok = Command::new("nsenter")
                .args(&nsenter_args)
                .status()
                .unwrap();
            assert!(ok.success());
            nsenter.push(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (floor, local_start, sidecar_start, nsenter) = (
        sorted(floor),
        sorted(local_start),
        sorted(sidecar_start),
        sorted(nsenter),
    );
    println!("sidecar mode, paced starts, interleaved (sandlet with its minimal capability set)");
    println!("{:<52} {:>10} {:>10}", "what", "p50", "p99");
    row("floor: fork+exec+wait busybox true", &floor);
    row("floor: nsenter -m -u -i into the main container", &nsenter);
    row("start, local mode: POST /setTasks -> started", &local_start);
    row(
        "start, sidecar mode: POST /setTasks -> started",
        &sidecar_start,
    );
    let added = ms(p(&sidecar_start, 50)) - ms(p(&local_start, 50));
    let nsenter_added = ms(p(&nsenter, 50)) - ms(p(&floor, 50));
    println!(
        "entering the main container adds {added:.3} ms at p50 (target < 0.3 ms); nsenter adds {nsenter_added:.3} ms"
    );
}

/// `POST /setTasks` with one new task running `program`; the time until the answer shows it
/// started.
fn start_program(http: &mut Http, name: &str, program: &str) -> Duration {
    let body = json!([{"name": name, "process": {"command": [program]}}]).to_string();
    let t = Instant::now();
    let (status, tasks) = http.request("POST", "/setTasks", &body);
    let elapsed = t.elapsed();
    assert_eq!(status, 200, "{tasks}");
    let state = &tasks.as_array().unwrap().last().unwrap()["processStatus"];
    assert!(
        state["running"].is_object() || state["terminated"]["exitCode"] == 0,
        "{tasks}"
    );
    elapsed
}

fn wait_terminated(http: &mut Http, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, task) = http.request("GET", &format!("/tasks/{name}"), "");
        if task["processStatus"]["terminated"].is_object() {
            assert_eq!(task["processStatus"]["terminated"]["exitCode"], 0, "{task}");
            return;
        }
        assert!(Instant::now() < deadline, "{name} did not end: {task}");
    }
}

/// The floor: fork+exec+wait of `/bin/true`.
fn spawn_true() -> Duration {
    let t = Instant::now();
    Command::new("/bin/true").status().unwrap();
    t.elapsed()
}

/// `POST /setTasks` with one new `/bin/true` task; the time until the answer shows it started.
fn start_task(http: &mut Http, name: &str) -> Duration {
    start_program(http, name, "/bin/true")
}

/// A task that exits as soon as the bench writes a line to `fifo`.
fn waiting_task(name: &str, fifo: &Path) -> String {
    json!([{"name": name, "process": {"command": ["sh", "-c", format!("read _ < {}", fifo.display())]}}]).to_string()
}

fn make_fifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

/// Opens the FIFO for writing (this waits until the task has it open for reading), then
/// writes a line and closes it: the reader's `read` returns and it exits.
fn wake(fifo: &Path) -> Instant {
    let mut f = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    let t = Instant::now();
    f.write_all(b"\n").unwrap();
    drop(f);
    t
}

fn open_feed(base: &str) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    let url = format!("{base}/watchTasks");
    std::thread::spawn(move || {
        let resp = ureq::get(&url).call().unwrap();
        for line in BufReader::new(resp.into_body().into_reader()).lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data:")
                && tx.send(serde_json::from_str(data.trim()).unwrap()).is_err()
            {
                return;
            }
        }
    });
    rx
}

fn measure(n: usize, mut f: impl FnMut() -> Duration) -> Vec<Duration> {
    for _ in 0..(n / 10).max(3) {
        f();
    }
    sorted((0..n).map(|_| f()).collect())
}

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

fn p(sorted: &[Duration], pct: usize) -> Duration {
    sorted[((sorted.len() - 1) * pct) / 100]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(what: &str, sorted: &[Duration]) {
    println!(
        "{what:<52} {:>8.3}ms {:>8.3}ms",
        ms(p(sorted, 50)),
        ms(p(sorted, 99))
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
