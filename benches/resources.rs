//! `cargo bench --bench resources`: what a hostile or careless client's load costs sandlet, in
//! memory and descriptors, and whether it gives them back. Three loads, one after the other:
//! 250 concurrent commands, 32 concurrent searches over a tree of 150 000 entries, and one upload
//! form of 25 000 small files. For each: sandlet's peak RSS (`VmHWM`, reset before it), its
//! descriptors before, at the peak (sampled) and after, and what it took. Then its RSS for 30 s
//! after the last load, next to its idle RSS (the floor: sandlet started and every kind of
//! request served once). Targets (issue 15): RSS under 128 MiB throughout, back near idle
//! within 30 s; descriptors back to their baseline. Asserts only that every request succeeded.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "../tests/common/mod.rs"]
mod common;

use common::form::{Part, content_type, multipart};
use common::{open_fds, shims_of, sse_events, status_kib};

const COMMANDS: usize = 250;
const SEARCHES: usize = 32;
/// 150 directories of 999 files: 150 000 entries; half the files match the search.
const TREE_DIRS: usize = 150;
const TREE_FILES_PER_DIR: usize = 999;
const UPLOAD_FILES: usize = 25_000;
const SETTLE: Duration = Duration::from_secs(30);

fn main() {
    println!(
        "sandlet resource benchmark: {COMMANDS} concurrent commands, {SEARCHES} concurrent searches over {} entries, a {UPLOAD_FILES}-file upload; {} cores",
        TREE_DIRS * (TREE_FILES_PER_DIR + 1),
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    let s = common::Sandlet::start(&["--log-level", "warn"]);
    let pid = s.pid();
    let base = s.exec_base.clone();
    let work = common::scratch();
    let tree = work.path().join("tree");
    make_tree(&tree);

    // Idle: every kind of request served once (commands four at once: the spare shims the
    // pool keeps, two descriptors each, are part of the baseline), then left to settle.
    let client = Client::new(&base);
    let warm_up: Vec<_> = (0..4)
        .map(|_| {
            let client = Client::new(&base);
            thread::spawn(move || command(&client, "sleep 0.5"))
        })
        .collect();
    for t in warm_up {
        t.join().unwrap();
    }
    let small = work.path().join("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::write(small.join("a.txt"), "").unwrap();
    assert_eq!(search(&client, &small, "*.txt"), 1);
    upload(&client, &work.path().join("warm-up"), 2);
    let idle = settled_rss(pid);
    let baseline_fds = fd_targets(pid);
    println!(
        "idle (floor): RSS {} MiB, {} descriptors",
        mib(idle),
        baseline_fds.len()
    );
    println!();
    println!(
        "{:<44} {:>9} {:>22} {:>9}",
        "load", "peak RSS", "descriptors: before/peak/after", "time"
    );

    let commands = phase(pid, "250 concurrent commands (sleep 1; seq 2000)", || {
        let start = Arc::new(Barrier::new(COMMANDS));
        let threads: Vec<_> = (0..COMMANDS)
            .map(|_| {
                let client = Client::new(&base);
                let start = Arc::clone(&start);
                thread::spawn(move || {
                    start.wait();
                    let events = command(&client, "sleep 1; seq 1 2000");
                    let lines = events.iter().filter(|e| e["type"] == "stdout").count();
                    assert_eq!(lines, 2000, "lost output");
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });
    // The shims come back idle once their trees are gone; the pool keeps four.
    let deadline = Instant::now() + Duration::from_secs(10);
    while shims_of(pid) > 4 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    commands.print();
    println!("{:<44} {}", "  idle shims left (at most 4)", shims_of(pid));

    let matching = TREE_DIRS * TREE_FILES_PER_DIR.div_ceil(2);
    let searches = phase(
        pid,
        &format!("{SEARCHES} concurrent searches ({matching} found each)"),
        || {
            let threads: Vec<_> = (0..SEARCHES)
                .map(|_| {
                    let client = Client::new(&base);
                    let tree = tree.clone();
                    thread::spawn(move || assert_eq!(search(&client, &tree, "*.txt"), matching))
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        },
    );
    searches.print();

    let uploaded = work.path().join("uploaded");
    let uploads = phase(pid, &format!("one form of {UPLOAD_FILES} files"), || {
        upload(&client, &uploaded, UPLOAD_FILES)
    });
    uploads.print();
    println!();

    // After: RSS every 100 ms for 30 s.
    let t = Instant::now();
    let mut samples = Vec::new();
    while t.elapsed() < SETTLE {
        samples.push((t.elapsed(), status_kib(pid, "VmRSS:")));
        thread::sleep(Duration::from_millis(100));
    }
    let at = |secs: f64| {
        samples
            .iter()
            .find(|(when, _)| when.as_secs_f64() >= secs)
            .map_or(0, |(_, rss)| *rss)
    };
    let last = samples.last().unwrap().1;
    println!(
        "of which anonymous memory {} MiB, mapped files (the binary) {} MiB",
        mib(status_kib(pid, "RssAnon:")),
        mib(status_kib(pid, "RssFile:"))
    );
    let settled_at = samples
        .iter()
        .position(|(_, rss)| samples_after_stay_within(&samples, *rss))
        .map(|i| samples[i].0)
        .unwrap();
    let peak = [&commands, &searches, &uploads]
        .iter()
        .map(|f| f.peak_rss)
        .max()
        .unwrap();
    println!(
        "RSS after the loads: {} MiB at once, {} at 1 s, {} at 5 s, {} at 10 s, {} at 30 s (settled within 1 MiB after {:.1} s); idle {} MiB",
        mib(at(0.0)),
        mib(at(1.0)),
        mib(at(5.0)),
        mib(at(10.0)),
        mib(last),
        settled_at.as_secs_f64(),
        mib(idle)
    );
    let fds_after = fd_targets(pid);
    println!(
        "peak RSS {} MiB (target < 128 MiB: {}); RSS at 30 s {} MiB vs idle {} MiB ({}); descriptors {} vs baseline {} ({})",
        mib(peak),
        verdict(peak < 128 << 10),
        mib(last),
        mib(idle),
        verdict(last <= idle + (idle / 4).max(4 << 10)),
        fds_after.len(),
        baseline_fds.len(),
        verdict(fds_after.len() <= baseline_fds.len()),
    );
    let mut extra = fds_after;
    for fd in &baseline_fds {
        if let Some(i) = extra.iter().position(|f| f == fd) {
            extra.swap_remove(i);
        }
    }
    if !extra.is_empty() {
        println!("descriptors not in the baseline: {extra:?}");
    }
}

/// What each open descriptor of `pid` refers to (sockets and pipes by kind only: their
/// numbers differ between any two moments).
fn fd_targets(pid: i32) -> Vec<String> {
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| {
            let t = t.to_string_lossy().into_owned();
            t.split_once(":[")
                .map_or(t.clone(), |(kind, _)| kind.to_string())
        })
        .collect();
    targets.sort();
    targets
}

struct Figures {
    what: String,
    peak_rss: u64,
    fds: (usize, usize, usize),
    took: Duration,
}

impl Figures {
    fn print(&self) {
        println!(
            "{:<44} {:>5} MiB {:>22} {:>8.1}s",
            self.what,
            mib(self.peak_rss),
            format!("{}/{}/{}", self.fds.0, self.fds.1, self.fds.2),
            self.took.as_secs_f64()
        );
    }
}

/// Runs a load, with sandlet's peak RSS reset before it and its descriptors sampled meanwhile.
fn phase(pid: i32, what: &str, load: impl FnOnce()) -> Figures {
    let fds_before = open_fds(pid);
    // "5" resets the peak RSS (VmHWM) to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let running = Arc::new(AtomicBool::new(true));
    let fd_peak = Arc::new(AtomicUsize::new(fds_before));
    let sampler = {
        let (running, fd_peak) = (Arc::clone(&running), Arc::clone(&fd_peak));
        thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                fd_peak.fetch_max(open_fds(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let t = Instant::now();
    load();
    let took = t.elapsed();
    running.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_rss = status_kib(pid, "VmHWM:");
    // Connections close and spare shims settle: the count a moment later is the one left.
    thread::sleep(Duration::from_millis(500));
    Figures {
        what: what.to_string(),
        peak_rss,
        fds: (fds_before, fd_peak.load(Ordering::Relaxed), open_fds(pid)),
        took,
    }
}

/// RSS once it has stopped moving (within 256 KiB over a second).
fn settled_rss(pid: i32) -> u64 {
    let mut last = status_kib(pid, "VmRSS:");
    loop {
        thread::sleep(Duration::from_secs(1));
        let now = status_kib(pid, "VmRSS:");
        if now.abs_diff(last) < 256 {
            return now;
        }
        last = now;
    }
}

fn samples_after_stay_within(samples: &[(Duration, u64)], rss: u64) -> bool {
    let last = samples.last().unwrap().1;
    rss.abs_diff(last) <= 1024
        && samples
            .iter()
            .skip_while(|(_, r)| *r != rss)
            .all(|(_, r)| r.abs_diff(last) <= 1024)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn make_tree(tree: &Path) {
    for d in 0..TREE_DIRS {
        let dir = tree.join(format!("package-{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..TREE_FILES_PER_DIR {
            let ext = if f % 2 == 0 { "txt" } else { "rs" };
            std::fs::write(dir.join(format!("module-{f:04}.{ext}")), "").unwrap();
        }
    }
}

/// An exec API client without a timeout (the upload takes a while).
#[derive(Clone)]
struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(base: &str) -> Client {
        Client {
            base: base.to_string(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into(),
        }
    }

    fn request(&self, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> Vec<u8> {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("Content-Type", content_type)
            .body(body)
            .unwrap();
        let mut response = self.agent.run(request).unwrap();
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        body
    }
}

fn command(client: &Client, command: &str) -> Vec<Value> {
    let body = json!({ "command": command }).to_string().into_bytes();
    let events = client.request("POST", "/command", "application/json", body);
    let events = sse_events(&String::from_utf8(events).unwrap());
    assert_eq!(events.last().unwrap()["type"], "execution_complete");
    events
}

/// How many entries a search found (counted, not parsed: the client must not be the bottleneck).
fn search(client: &Client, dir: &Path, pattern: &str) -> usize {
    let body = client.request(
        "GET",
        &format!("/files/search?path={}&pattern={pattern}", dir.display()),
        "application/json",
        Vec::new(),
    );
    memchr::memmem::find_iter(&body, b"\"path\":").count()
}

/// One form of `files` small files under `dir`, in 50 directories.
fn upload(client: &Client, dir: &Path, files: usize) {
    let contents: Vec<Vec<u8>> = (0..files)
        .map(|i| format!("uploaded file {i}\n").into_bytes())
        .collect();
    let mut parts = Vec::with_capacity(2 * files);
    for (i, content) in contents.iter().enumerate() {
        let path = dir.join(format!("d{:02}/f{i:05}.txt", i % 50));
        parts.push(Part::MetaFile(json!({ "path": path })));
        parts.push(Part::File(content));
    }
    client.request("POST", "/files/upload", &content_type(), multipart(&parts));
    for i in [0, files / 2, files - 1] {
        let path = dir.join(format!("d{:02}/f{i:05}.txt", i % 50));
        assert_eq!(std::fs::read(&path).unwrap(), contents[i]);
    }
}
