//! `cargo bench --bench code`: code interpreting next to its floor, measured in the same run.
//! Needs the Jupyter venv `./test` makes (`.ci/jupytervenv`). Prints numbers; asserts only
//! that every run gave the right answer.
//!
//! - warm `1+1`: `POST /code` in a context whose kernel is warm, until `execution_complete`
//!   (keep-alive client), interleaved with the floor: a client sending the same
//!   `execute_request` straight to the same kernel's WebSocket until the kernel is idle again;
//! - context creation: `POST /code/context` (kernel started, channels connected) beside the
//!   floor of the same Jupyter calls made directly (`POST /api/sessions`, then the kernel's
//!   WebSocket);
//! - the first context of a sandbox whose Jupyter sandlet starts on demand (server + kernel).

use std::net::TcpStream;
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

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

const SAMPLES: usize = 300;
const CONTEXTS: usize = 10;
const JUPYTER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.ci/jupytervenv/bin/jupyter-server"
);
const TOKEN: &str = "sandlet-bench";

fn main() {
    if !std::path::Path::new(JUPYTER).exists() {
        eprintln!("no Jupyter at {JUPYTER}: run ./test (its .ci/setup makes it) first");
        std::process::exit(1);
    }
    let samples = stats::samples(SAMPLES);
    println!(
        "sandlet code interpreting benchmark: {samples} samples, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // One Jupyter for sandlet (as JUPYTER_HOST) and for the direct client, so both reach the
    // same server and kernel.
    let jupyter_port = common::free_port();
    let host = format!("http://127.0.0.1:{jupyter_port}");
    let s = common::Sandlet::start_as(&["--log-level", "warn"], {
        let host = host.clone();
        move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandlet"));
            cmd.env("JUPYTER_HOST", &host).env("JUPYTER_TOKEN", TOKEN);
            cmd
        }
    });
    let _jupyter = common::jupyter::External::start(JUPYTER, jupyter_port, TOKEN, &s.data_dir());
    let exec_port: u16 = s.exec_base.rsplit(':').next().unwrap().parse().unwrap();
    let mut client = Http::connect(exec_port);

    // Context creation, interleaved with the same Jupyter calls made directly: the session,
    // then the kernel's channels (their handshake completes once the kernel answers).
    let (mut create, mut create_floor) = (Vec::new(), Vec::new());
    for i in 0..CONTEXTS {
        let t = Instant::now();
        let session = rest(
            &host,
            "POST",
            "/api/sessions",
            Some(
                json!({"path": format!("bench-{i}.ipynb"), "name": format!("bench-{i}"), "type": "notebook", "kernel": {"name": "python3"}}),
            ),
        );
        let channels = connect_kernel(jupyter_port, session["kernel"]["id"].as_str().unwrap());
        create_floor.push(t.elapsed());
        drop(channels);
        rest(
            &host,
            "DELETE",
            &format!("/api/sessions/{}", session["id"].as_str().unwrap()),
            None,
        );
        let t = Instant::now();
        let id = create_context(&mut client);
        create.push(t.elapsed());
        sandlet_json(
            &mut client,
            "DELETE",
            &format!("/code/contexts/{id}"),
            &Value::Null,
        );
    }

    // Warm `1+1`: the same kernel, through sandlet and directly.
    let context = create_context(&mut client);
    let body = json!({"code": "1+1", "context": {"language": "python", "id": context}});
    let sessions = rest(&host, "GET", "/api/sessions", None);
    let kernel = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == context.as_str())
        .expect("sandlet's session")["kernel"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut direct = connect_kernel(jupyter_port, &kernel);
    let (mut warm, mut floor) = (Vec::new(), Vec::new());
    for i in 0..samples + 5 {
        let t = Instant::now();
        let events = client.events("/code", &body);
        let took = t.elapsed();
        let result = events
            .iter()
            .find(|e| e["type"] == "result")
            .map(|e| e["results"]["text"].clone());
        assert_eq!(result, Some(json!("2")), "{events:?}");
        assert_eq!(events.last().unwrap()["type"], "execution_complete");
        let t = Instant::now();
        assert_eq!(execute_directly(&mut direct, "1+1"), "2");
        let took_floor = t.elapsed();
        // The first few warm the kernel and the connections.
        if i >= 5 {
            warm.push(took);
            floor.push(took_floor);
        }
    }
    drop(direct);

    // The first context where sandlet starts Jupyter itself.
    let managed_port = common::free_port().to_string();
    let managed = common::Sandlet::start(&[
        "--log-level",
        "warn",
        "--jupyter-command",
        JUPYTER,
        "--jupyter-port",
        &managed_port,
    ]);
    let managed_exec: u16 = managed
        .exec_base
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let first = time(|| {
        sandlet_json(
            &mut Http::connect(managed_exec),
            "POST",
            "/code/context",
            &json!({"language": "python"}),
        );
    });

    let (warm, floor, create, create_floor) = (
        sorted(warm),
        sorted(floor),
        sorted(create),
        sorted(create_floor),
    );
    println!();
    println!("{:<60} {:>10} {:>10}", "what", "p50", "p99");
    row(
        "floor: execute_request 1+1 straight to the kernel's WebSocket",
        &floor,
    );
    row("warm 1+1: POST /code -> execution_complete", &warm);
    println!(
        "warm 1+1 over the floor: p50 +{:.3} ms, p99 +{:.3} ms",
        ms(p(&warm, 50)) - ms(p(&floor, 50)),
        ms(p(&warm, 99)) - ms(p(&floor, 99))
    );
    println!();
    println!(
        "{:<60} {:>10} {:>10}",
        format!("({CONTEXTS} samples)"),
        "p50",
        "max"
    );
    println!(
        "{:<60} {:>8.1}ms {:>8.1}ms",
        "floor: POST /api/sessions + channels, straight to Jupyter",
        ms(p(&create_floor, 50)),
        ms(*create_floor.last().unwrap())
    );
    println!(
        "{:<60} {:>8.1}ms {:>8.1}ms",
        "POST /code/context (kernel started, channels connected)",
        ms(p(&create, 50)),
        ms(*create.last().unwrap())
    );
    println!();
    println!(
        "first context, Jupyter started on demand by sandlet: {:.0} ms",
        ms(first)
    );
}

fn rest(host: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{host}{path}"))
        .header("Authorization", format!("Token {TOKEN}"))
        .header("Content-Type", "application/json")
        .body(body.map(|b| b.to_string()).unwrap_or_default())
        .unwrap();
    let mut response = ureq::run(request).unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    }
}

/// `POST /code/context` for python: the context's id.
fn create_context(client: &mut Http) -> String {
    let answer = sandlet_json(
        client,
        "POST",
        "/code/context",
        &json!({"language": "python"}),
    );
    answer["id"].as_str().unwrap().to_string()
}

/// A JSON request to sandlet's exec API on the keep-alive connection.
fn sandlet_json(client: &mut Http, method: &str, path: &str, body: &Value) -> Value {
    use std::io::Read;
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let head = client.send(&format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let mut answer = vec![0u8; head.content_length.unwrap_or(0) as usize];
    client.stream.read_exact(&mut answer).unwrap();
    assert_eq!(head.status, 200, "{}", String::from_utf8_lossy(&answer));
    serde_json::from_slice(&answer).unwrap_or(Value::Null)
}

fn connect_kernel(port: u16, kernel: &str) -> WebSocket<TcpStream> {
    let mut request =
        format!("ws://127.0.0.1:{port}/api/kernels/{kernel}/channels?session_id=bench-direct")
            .into_client_request()
            .unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Token {TOKEN}").parse().unwrap());
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    tungstenite::client::client(request, stream).unwrap().0
}

/// The execute_request sandlet sends, straight to the kernel; the `text/plain` result once the
/// kernel is idle again.
fn execute_directly(ws: &mut WebSocket<TcpStream>, code: &str) -> String {
    let msg_id = format!("{:032x}", next_id());
    let request = json!({
        "header": {"msg_id": msg_id, "username": "bench", "session": "bench-direct", "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": false, "store_history": true, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true},
        "channel": "shell", "buffers": [],
    });
    ws.send(Message::text(request.to_string())).unwrap();
    let mut result = String::new();
    loop {
        let Message::Text(text) = ws.read().unwrap() else {
            continue;
        };
        let message: Value = serde_json::from_str(&text).unwrap();
        if message["parent_header"]["msg_id"] != msg_id.as_str() {
            continue;
        }
        match message["header"]["msg_type"].as_str() {
            Some("execute_result") => {
                result = message["content"]["data"]["text/plain"]
                    .as_str()
                    .unwrap()
                    .to_string();
            }
            Some("status") if message["content"]["execution_state"] == "idle" => return result,
            _ => {}
        }
    }
}

/// Distinct message ids.
fn next_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    (u128::from(std::process::id()) << 64) | u128::from(COUNTER.fetch_add(1, Ordering::Relaxed))
}
