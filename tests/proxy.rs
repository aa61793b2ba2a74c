//! `/proxy/{port}/...` on the exec API: a real sandlet forwarding to real upstream servers run by
//! this test process on loopback (an axum app and a WebSocket echo server).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::serve::ListenerExt;
use common::{Sandlet, free_port, wait_until};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "proxy-test-token";

/// An HTTP server on a loopback port, run by its own runtime, that counts the connections it
/// accepts. Routes:
/// - `/status/{code}`: that status;
/// - `/sse`: one event, then a second once the test calls `release`, then the end;
/// - `/bytes/{n}`: `n` bytes, streamed in 64 KiB chunks;
/// - `/count`: the size of the request body, read as a stream;
/// - `/hang`: never answers;
/// - anything else: JSON of the method, the request target as received, headers and body.
struct Upstream {
    port: u16,
    accepted: Arc<AtomicUsize>,
    release: Arc<Notify>,
    rt: tokio::runtime::Runtime,
}

impl Upstream {
    fn start() -> Upstream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let counter = Arc::clone(&accepted);
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let gate = Arc::clone(&release);
        let app = Router::new()
            .route(
                "/status/{code}",
                any(|Path(code): Path<u16>| async move {
                    (
                        StatusCode::from_u16(code).unwrap(),
                        format!("upstream {code}"),
                    )
                }),
            )
            .route("/sse", get(move || sse(Arc::clone(&gate))))
            .route(
                "/bytes/{n}",
                get(|Path(n): Path<u64>| async move { bytes(n) }),
            )
            .route("/count", any(count))
            .route("/hang", any(std::future::pending::<()>))
            .fallback(echo);
        rt.spawn(async move { axum::serve(listener, app).await });
        Upstream {
            port,
            accepted,
            release,
            rt,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn echo(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap())))
        .collect();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    axum::Json(json!({
        "method": parts.method.as_str(),
        "target": parts.uri.to_string(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

async fn sse(release: Arc<Notify>) -> Response {
    let stream = futures_util::stream::unfold(0, move |step| {
        let release = Arc::clone(&release);
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(Bytes::from("data: first\n\n")), 1)),
                1 => {
                    release.notified().await;
                    Some((Ok(Bytes::from("data: second\n\n")), 2))
                }
                _ => None,
            }
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    response
}

fn bytes(n: u64) -> Response {
    common::upstream::x_bytes(n).into_response()
}

async fn count(request: Request) -> String {
    let mut body = request.into_body().into_data_stream();
    let mut total = 0usize;
    while let Some(chunk) = body.next().await {
        total += chunk.unwrap().len();
    }
    total.to_string()
}

const WITH_TOKEN: &[(&str, &str)] = &[("X-EXECD-ACCESS-TOKEN", TOKEN)];

/// A sandlet whose exec API wants `TOKEN`.
fn sandlet_with_token(extra: &[&str]) -> (Sandlet, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("exec-token");
    std::fs::write(&file, TOKEN).unwrap();
    let mut args = vec!["--exec-token-file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Sandlet::start(&args), dir)
}

#[test]
fn requests_reach_the_upstream_as_sent_and_answers_come_back() {
    let up = Upstream::start();
    let s = Sandlet::start(&[]);
    let p = up.port;

    let r = s.exec("GET", &format!("/proxy/{p}/a%2Fb/c?x=%2F&y=1"), None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["method"], "GET");
    assert_eq!(
        seen["target"], "/a%2Fb/c?x=%2F&y=1",
        "path and query verbatim"
    );
    let host = s.exec_base.strip_prefix("http://").unwrap();
    assert_eq!(seen["headers"]["host"], host, "Host as the client sent it");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");

    for (path, target) in [
        (format!("/proxy/{p}"), "/"),
        (format!("/proxy/{p}/"), "/"),
        (format!("/proxy/{p}?q=1"), "/?q=1"),
    ] {
        let r = s.exec("GET", &path, None, &[]);
        assert_eq!(r.json()["target"], target, "{path}");
    }

    let body = json!({"hello": "world", "n": 1});
    let r = s.exec("POST", &format!("/proxy/{p}/submit"), Some(&body), &[]);
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["headers"]["content-type"], "application/json");
    let sent: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent, body);

    for code in [403, 404, 500] {
        let r = s.exec("DELETE", &format!("/proxy/{p}/status/{code}"), None, &[]);
        assert_eq!(r.status, code);
        assert_eq!(r.text(), format!("upstream {code}"));
    }
}

#[test]
fn the_token_guards_the_proxy_and_stays_with_sandlet() {
    let up = Upstream::start();
    let (s, _dir) = sandlet_with_token(&[]);
    let path = format!("/proxy/{}/whoami", up.port);

    let r = s.exec("GET", &path, None, &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        up.accepted(),
        0,
        "a refused request never reaches the upstream"
    );

    let r = s.exec("GET", &path, None, WITH_TOKEN);
    assert_eq!(r.status, 200, "{}", r.text());
    let headers = &r.json()["headers"];
    assert!(
        headers.get("x-execd-access-token").is_none(),
        "the token leaked upstream: {headers}"
    );
}

#[test]
fn forwarding_headers_are_sandlet_s_own() {
    let up = Upstream::start();
    let s = Sandlet::start(&[]);
    let r = s.exec(
        "GET",
        &format!("/proxy/{}/", up.port),
        None,
        &[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "per-hop"),
            ("X-Kept", "end-to-end"),
        ],
    );
    let headers = &r.json()["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(headers.get("x-forwarded-host").is_none(), "{headers}");
    assert!(headers.get("x-hop").is_none(), "{headers}");
    assert_eq!(headers["x-kept"], "end-to-end");
}

#[test]
fn bad_ports_are_400_and_a_dead_port_is_502() {
    let s = Sandlet::start(&[]);
    for path in [
        "/proxy/",
        "/proxy/abc/",
        "/proxy/0/",
        "/proxy/70000/",
        "/proxy/-1/",
        "/proxy//x",
    ] {
        let r = s.exec("GET", path, None, &[]);
        r.assert_error(400, "INVALID_REQUEST_BODY");
    }
    let dead = free_port();
    let r = s.exec("GET", &format!("/proxy/{dead}/x"), None, &[]);
    r.assert_error(502, "BAD_GATEWAY");
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains(&format!("127.0.0.1:{dead}")), "{message}");
    assert!(message.contains("refused"), "names the error: {message}");
}

#[test]
fn an_upstream_without_an_answer_is_504_after_the_header_timeout_but_uploads_take_their_time() {
    let up = Upstream::start();
    let s = Sandlet::start(&["--exec-proxy-header-timeout-seconds", "1"]);
    let r = s.exec("GET", &format!("/proxy/{}/hang", up.port), None, &[]);
    r.assert_error(504, "GATEWAY_TIMEOUT");

    // 2 s of upload: the clock starts when the body is all sent, not before.
    let chunks = 20;
    let mut resp = ureq::post(format!("{}/proxy/{}/count", s.exec_base, up.port))
        .send(ureq::SendBody::from_owned_reader(Paced { chunks }))
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.body_mut().read_to_string().unwrap(),
        (chunks * PACED_CHUNK).to_string()
    );
}

const PACED_CHUNK: usize = 16 << 10;

/// An upload that trickles: one chunk every 100 ms.
struct Paced {
    chunks: usize,
}

impl Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.chunks == 0 {
            return Ok(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        self.chunks -= 1;
        let n = PACED_CHUNK.min(buf.len());
        buf[..n].fill(b'z');
        // A short buffer would shrink the chunk; the count check below catches that.
        Ok(n)
    }
}

#[test]
fn server_sent_events_flow_through_as_they_come() {
    let up = Upstream::start();
    let s = Sandlet::start(&[]);
    let resp = ureq::get(format!("{}/proxy/{}/sse", s.exec_base, up.port))
        .call()
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    // The upstream has not finished: it waits for `release`, which happens only after this.
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "data: first\n");
    up.release.notify_one();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "\ndata: second\n\n");
}

#[test]
fn big_bodies_stream_both_ways_without_being_held() {
    const SIZE: u64 = 256 << 20;
    let up = Upstream::start();
    let s = Sandlet::start(&[]);
    let base = format!("{}/proxy/{}", s.exec_base, up.port);

    let resp = ureq::get(format!("{base}/bytes/{SIZE}")).call().unwrap();
    let got = std::io::copy(&mut resp.into_body().into_reader(), &mut std::io::sink()).unwrap();
    assert_eq!(got, SIZE);

    let mut upload = std::io::repeat(b'y').take(SIZE);
    let mut resp = ureq::post(format!("{base}/count"))
        .send(ureq::SendBody::from_reader(&mut upload))
        .unwrap();
    assert_eq!(resp.body_mut().read_to_string().unwrap(), SIZE.to_string());

    let peak_kib = common::status_kib(s.pid(), "VmHWM:");
    assert!(
        peak_kib < 64 << 10,
        "sandlet's peak RSS {peak_kib} KiB after moving 2 x {} MiB",
        SIZE >> 20
    );
}

#[test]
fn upstream_connections_are_reused() {
    const REQUESTS: usize = 20;
    let up = Upstream::start();
    let s = Sandlet::start(&[]);
    for i in 0..REQUESTS {
        let r = s.exec("GET", &format!("/proxy/{}/n/{i}", up.port), None, &[]);
        assert_eq!(r.status, 200);
    }
    let accepted = up.accepted();
    assert!(
        accepted <= REQUESTS / 4,
        "{REQUESTS} sequential requests took {accepted} upstream connections"
    );
}

#[test]
fn websockets_are_tunnelled() {
    let up = Upstream::start();
    let (s, _dir) = sandlet_with_token(&[]);
    let echo = up
        .rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    let upgraded = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&upgraded);
    up.rt.spawn(async move {
        while let Ok((tcp, _)) = echo.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        ws.send(message).await.unwrap();
                    }
                }
            });
        }
    });

    let exec_port: u16 = s.exec_base.rsplit(':').next().unwrap().parse().unwrap();
    let url = format!("ws://127.0.0.1:{exec_port}/proxy/{echo_port}/ws?x=1");
    up.rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", exec_port))
            .await
            .unwrap();
        let refused = tokio_tungstenite::client_async(url.as_str(), tcp).await;
        assert!(refused.is_err(), "no token, no upgrade");

        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("X-EXECD-ACCESS-TOKEN", TOKEN.parse().unwrap());
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", exec_port))
            .await
            .unwrap();
        let (mut ws, response) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
        assert_eq!(response.status(), 101);
        for i in 0..3 {
            ws.send(Message::text(format!("hello {i}"))).await.unwrap();
            let back = ws.next().await.unwrap().unwrap();
            assert_eq!(back, Message::text(format!("hello {i}")));
        }
        let blob = vec![7u8; 200_000];
        ws.send(Message::binary(blob.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    });
    wait_until("the echo server saw one upgrade", || {
        upgraded.load(Ordering::SeqCst) == 1
    });
    // The proxy keeps serving plain requests after a tunnel.
    let r = s.exec(
        "GET",
        &format!("/proxy/{}/after", up.port),
        None,
        WITH_TOKEN,
    );
    assert_eq!(r.status, 200);
}
