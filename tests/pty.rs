//! PTY sessions over WebSocket (execd's `/pty`), against a real sandlet and real shells, in
//! local mode and in the simulated pod (sidecar mode).

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::pod::{MAIN_HOSTNAME, MAIN_UID, Pod, SIDECAR_CAPABILITIES};
use common::{DEADLINE, Sandlet, pid_alive, wait_until};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

enum Frame {
    Binary(Vec<u8>),
    Text(Value),
    Close(Option<(u16, String)>),
}

struct Ws {
    ws: WebSocket<TcpStream>,
    /// Terminal (or stdout) output seen so far, replay included.
    out: String,
    err: String,
}

fn connect(s: &Sandlet, path: &str, token: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let addr = s.exec_base.trim_start_matches("http://").to_string();
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("X-EXECD-ACCESS-TOKEN", token.parse().unwrap());
    }
    let stream = TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (ws, _) = tungstenite::client::client(request, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => panic!("handshake interrupted"),
    })?;
    Ok(Ws {
        ws,
        out: String::new(),
        err: String::new(),
    })
}

fn attach(s: &Sandlet, id: &str, query: &str) -> Ws {
    connect(s, &format!("/pty/{id}/ws{query}"), None).expect("websocket connects")
}

impl Ws {
    /// The next frame, within the deadline; output is also collected in `out` and `err`.
    fn next(&mut self) -> Frame {
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < deadline, "no frame within {DEADLINE:?}");
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    let b = b.to_vec();
                    match b.first() {
                        Some(1) => self.out.push_str(&String::from_utf8_lossy(&b[1..])),
                        Some(2) => self.err.push_str(&String::from_utf8_lossy(&b[1..])),
                        Some(3) => self.out.push_str(&String::from_utf8_lossy(&b[9..])),
                        _ => {}
                    }
                    return Frame::Binary(b);
                }
                Ok(Message::Text(t)) => return Frame::Text(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(c)) => {
                    return Frame::Close(c.map(|c| (u16::from(c.code), c.reason.to_string())));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Frame::Close(None);
                }
                Err(e) => panic!("websocket: {e}"),
            }
        }
    }

    fn text(&mut self) -> Value {
        loop {
            match self.next() {
                Frame::Text(v) => return v,
                Frame::Binary(_) => {}
                Frame::Close(c) => panic!("closed ({c:?}) while waiting for a text frame"),
            }
        }
    }

    fn connected(&mut self) -> Value {
        let v = self.text();
        assert_eq!(v["type"], "connected", "{v}");
        v
    }

    fn send(&mut self, input: &str) {
        let mut frame = vec![0u8];
        frame.extend_from_slice(input.as_bytes());
        self.ws.send(Message::Binary(frame.into())).unwrap();
    }

    fn send_json(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).unwrap();
    }

    /// Reads until the collected output matches; returns it.
    fn until(&mut self, what: &str, done: impl Fn(&str, &str) -> bool) -> String {
        while !done(&self.out, &self.err) {
            if let Frame::Close(c) = self.next() {
                panic!(
                    "closed ({c:?}) waiting for {what}; out {:?} err {:?}",
                    self.out, self.err
                );
            }
        }
        self.out.clone()
    }

    fn until_out(&mut self, needle: &str) -> String {
        self.until(needle, |out, _| out.contains(needle))
    }

    /// Expects the exit frame (skipping output), then close 1000 "process exited".
    fn expect_exit(&mut self, code: i64) {
        let v = self.text();
        assert_eq!(v, json!({"type": "exit", "exit_code": code}));
        match self.next() {
            Frame::Close(Some((1000, reason))) => assert_eq!(reason, "process exited"),
            Frame::Close(other) => panic!("close {other:?}"),
            _ => panic!("a frame after exit"),
        }
    }
}

/// The first line printed after `marker=`, from `echo marker=...` (the echoed command line
/// itself has the `$`).
fn value_after(out: &str, marker: &str) -> String {
    out.split(marker)
        .skip(1)
        .find(|rest| !rest.starts_with('$'))
        .map(|rest| {
            rest.chars()
                .take_while(|c| !c.is_whitespace())
                .collect::<String>()
        })
        .unwrap_or_default()
}

fn create(s: &Sandlet, body: Option<Value>) -> String {
    let r = s.exec("POST", "/pty", body.as_ref(), &[]);
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["session_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(&id[14..15], "4");
    id
}

fn http_error(e: tungstenite::Error) -> (u16, Value) {
    match e {
        tungstenite::Error::Http(r) => {
            let status = r.status().as_u16();
            let body = r.body().clone().unwrap_or_default();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        other => panic!("expected an HTTP error, got {other}"),
    }
}

#[test]
fn sessions_are_created_looked_up_and_deleted() {
    let s = Sandlet::start(&["--exec-max-pty-sessions", "2"]);
    let id = create(&s, None);
    let status = s.exec("GET", &format!("/pty/{id}"), None, &[]).json();
    assert_eq!(
        status,
        json!({"session_id": id, "running": false, "output_offset": 0})
    );
    let unknown = "00000000-0000-4000-8000-000000000000";
    s.exec("GET", &format!("/pty/{unknown}"), None, &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
    let (status, body) = http_error(
        connect(&s, &format!("/pty/{unknown}/ws"), None)
            .err()
            .unwrap(),
    );
    assert_eq!(status, 404);
    assert_eq!(body["code"], "CONTEXT_NOT_FOUND");
    s.exec("POST", "/pty", Some(&json!({"cwd": "/no/such/dir"})), &[])
        .assert_error(400, "INVALID_REQUEST_BODY");
    s.exec("POST", "/pty", Some(&json!({"cwd": 3})), &[])
        .assert_error(400, "INVALID_REQUEST_BODY");
    let second = create(&s, Some(json!({"cwd": "/tmp"})));
    s.exec("POST", "/pty", None, &[])
        .assert_error(429, "LIMIT_EXCEEDED");
    let mut ws = attach(&s, &second, "");
    ws.connected();
    ws.send("pwd\n");
    ws.until_out("/tmp\r\n");

    let r = s.exec("DELETE", &format!("/pty/{id}"), None, &[]);
    assert_eq!((r.status, r.body.len()), (200, 0));
    s.exec("DELETE", &format!("/pty/{id}"), None, &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
}

#[test]
fn a_terminal_shell_echoes_resizes_takes_signals_and_reports_its_exit() {
    let s = Sandlet::start(&[]);
    let id = create(&s, None);
    let mut ws = attach(&s, &id, "");
    assert_eq!(
        ws.connected(),
        json!({"type": "connected", "session_id": id, "mode": "pty"})
    );
    let status = s.exec("GET", &format!("/pty/{id}"), None, &[]).json();
    assert_eq!(status["running"], true);

    ws.send("echo hi-$((6*7))\n");
    ws.until_out("hi-42");
    ws.send("echo term=$TERM tty=$(tty)\n");
    let out = ws.until_out("tty=/dev/pts/");
    assert!(!value_after(&out, "term=").is_empty(), "{out}");

    ws.send_json(json!({"type": "ping"}));
    assert_eq!(ws.text(), json!({"type": "pong"}));

    ws.send_json(json!({"type": "resize", "cols": 120, "rows": 40}));
    ws.send("stty size\n");
    ws.until_out("40 120");

    ws.send("echo sh=$$\n");
    let shell = value_after(
        &ws.until("pid", |o, _| !value_after(o, "sh=").is_empty()),
        "sh=",
    );
    ws.send("sleep 100; echo slept-$?\n");
    // The sleep is the terminal's foreground job once this shell has forked it.
    wait_until("sleep runs", || {
        std::process::Command::new("pgrep")
            .args(["-x", "-P", &shell, "sleep"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    ws.send_json(json!({"type": "signal", "signal": "SIGINT"}));
    ws.send_json(json!({"type": "signal", "signal": "SIGNOPE"}));
    ws.send("echo after-$((1+1))\n");
    ws.until_out("after-2");

    ws.send("exit 42\n");
    ws.expect_exit(42);
    let status = s.exec("GET", &format!("/pty/{id}"), None, &[]).json();
    assert_eq!(status["running"], false);
    assert!(status["output_offset"].as_u64().unwrap() > 0);
}

#[test]
fn a_reconnect_replays_from_since_and_sees_every_byte_once() {
    let s = Sandlet::start(&[]);
    let id = create(&s, None);
    let mut ws = attach(&s, &id, "");
    ws.connected();
    ws.send("echo first-$((1+1))\n");
    ws.until_out("first-2");
    ws.ws.close(None).unwrap();
    drop(ws);
    let offset = |s: &Sandlet| {
        s.exec("GET", &format!("/pty/{id}"), None, &[]).json()["output_offset"]
            .as_u64()
            .unwrap()
    };
    let mid = offset(&s);
    assert!(mid > 0);

    // Free again once the first client is gone.
    let mut ws = loop {
        match connect(&s, &format!("/pty/{id}/ws?since=0"), None) {
            Ok(ws) => break ws,
            Err(e) => assert_eq!(http_error(e).0, 409),
        }
    };
    let Frame::Binary(replay) = ws.next() else {
        panic!("the replay frame comes first")
    };
    assert_eq!(replay[0], 3);
    assert_eq!(u64::from_be_bytes(replay[1..9].try_into().unwrap()), 0);
    assert!(ws.out.contains("first-2"), "{}", ws.out);
    ws.connected();
    ws.send("echo second-$((2+1))\n");
    ws.until_out("second-3");
    ws.ws.close(None).unwrap();
    drop(ws);

    let mut ws = loop {
        match connect(&s, &format!("/pty/{id}/ws?since={mid}"), None) {
            Ok(ws) => break ws,
            Err(e) => assert_eq!(http_error(e).0, 409),
        }
    };
    let Frame::Binary(replay) = ws.next() else {
        panic!("the replay frame comes first")
    };
    assert_eq!(u64::from_be_bytes(replay[1..9].try_into().unwrap()), mid);
    assert!(
        ws.out.contains("second-3") && !ws.out.contains("first-2"),
        "{}",
        ws.out
    );
    ws.connected();
    ws.ws.close(None).unwrap();
    drop(ws);

    // Nothing to replay past the end: `connected` comes first.
    let end = offset(&s);
    let mut ws = loop {
        match connect(&s, &format!("/pty/{id}/ws?since={end}"), None) {
            Ok(ws) => break ws,
            Err(e) => assert_eq!(http_error(e).0, 409),
        }
    };
    let Frame::Text(v) = ws.next() else {
        panic!("no replay expected")
    };
    assert_eq!(v["type"], "connected");
}

#[test]
fn a_second_client_is_refused_unless_it_takes_over_the_same_shell() {
    let s = Sandlet::start(&[]);
    let id = create(&s, None);
    let mut first = attach(&s, &id, "");
    first.connected();
    first.send("echo pid=$$\n");
    let shell = value_after(
        &first.until(" pid", |o, _| !value_after(o, "pid=").is_empty()),
        "pid=",
    );

    let (status, body) = http_error(connect(&s, &format!("/pty/{id}/ws"), None).err().unwrap());
    assert_eq!(status, 409);
    assert_eq!(body["code"], "ALREADY_CONNECTED", "{body}");
    assert!(body["message"].as_str().unwrap().contains(&id));
    // A plain GET cannot take over.
    s.exec("GET", &format!("/pty/{id}/ws?takeover=1"), None, &[])
        .assert_error(409, "ALREADY_CONNECTED");

    let mut second = attach(&s, &id, "?takeover=1");
    second.connected();
    loop {
        match first.next() {
            Frame::Close(Some((code, reason))) => {
                assert_eq!((code, reason.as_str()), (4001, "TAKEN_OVER"));
                break;
            }
            Frame::Close(None) => panic!("closed without 4001"),
            _ => {}
        }
    }
    second.out.clear();
    second.send("echo again=$$\n");
    let out = second.until("again", |o, _| !value_after(o, "again=").is_empty());
    assert_eq!(value_after(&out, "again="), shell);
}

#[test]
fn pipe_mode_keeps_stdout_and_stderr_apart() {
    let s = Sandlet::start(&[]);
    let id = create(&s, None);
    let mut ws = attach(&s, &id, "?pty=0");
    assert_eq!(ws.connected()["mode"], "pipe");
    ws.send("echo to-out; echo to-err >&2\n");
    ws.until("both streams", |o, e| {
        o.contains("to-out") && e.contains("to-err")
    });
    assert!(!ws.out.contains("to-err") && !ws.err.contains("to-out"));
    ws.send("exit 3\n");
    ws.expect_exit(3);
}

#[test]
fn delete_kills_the_whole_tree_and_the_client_gets_exit_minus_one() {
    let s = Sandlet::start(&[]);
    let id = create(&s, None);
    let mut ws = attach(&s, &id, "");
    ws.connected();
    ws.send("sleep 1000 & echo bg=$! sh=$$\n");
    let out = ws.until("pids", |o, _| !value_after(o, "sh=").is_empty());
    let pids: Vec<i32> = ["bg=", "sh="]
        .iter()
        .map(|m| value_after(&out, m).parse().unwrap())
        .collect();
    assert!(pids.iter().all(|p| pid_alive(*p)));
    let r = s.exec("DELETE", &format!("/pty/{id}"), None, &[]);
    assert_eq!(r.status, 200);
    ws.expect_exit(-1);
    wait_until("the shell and its background job are gone", || {
        pids.iter().all(|p| !pid_alive(*p))
    });
}

#[test]
fn oversized_messages_bad_json_and_unknown_frames() {
    let s = Sandlet::start(&["--exec-pty-max-message-bytes", "65536"]);
    let id = create(&s, None);
    let mut ws = attach(&s, &id, "");
    ws.connected();
    ws.ws.send(Message::Text("{not json".into())).unwrap();
    ws.send_json(json!({"type": "bogus"}));
    let v = ws.text();
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], "INVALID_FRAME");
    assert_eq!(v["error"], "unknown frame type \"bogus\"");
    ws.send_json(json!({"type": "ping"}));
    assert_eq!(ws.text(), json!({"type": "pong"}));

    // Past the limit the connection is dropped; the session stays for the next client.
    let mut big = vec![0u8];
    big.resize(128 << 10, b'x');
    let _ = ws.ws.send(Message::Binary(big.into()));
    loop {
        match ws.ws.read() {
            Ok(Message::Close(_))
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                break;
            }
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
            Ok(_) => {}
        }
    }
    let mut again = loop {
        match connect(&s, &format!("/pty/{id}/ws"), None) {
            Ok(ws) => break ws,
            Err(e) => assert_eq!(http_error(e).0, 409),
        }
    };
    again.connected();
    again.send("echo still-$((3+3))\n");
    again.until_out("still-6");
    assert!(!again.out.contains("xxxxxxxx"));
}

#[test]
fn an_exited_session_replays_and_reports_its_exit_on_every_connection() {
    let s = Sandlet::start(&[]);
    let id = create(&s, Some(json!({"command": "echo done-$((5+5)); exit 7"})));
    let mut ws = attach(&s, &id, "");
    ws.connected();
    ws.until_out("done-10");
    ws.expect_exit(7);
    let mut again = attach(&s, &id, "");
    again.connected();
    assert!(again.out.contains("done-10"), "{}", again.out);
    again.expect_exit(7);
    let status = s.exec("GET", &format!("/pty/{id}"), None, &[]).json();
    assert_eq!(status["running"], false);
}

#[test]
fn the_websocket_needs_the_token() {
    let dir = common::scratch();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "pty-secret").unwrap();
    let s = Sandlet::start(&["--exec-token-file", token_file.to_str().unwrap()]);
    s.exec("POST", "/pty", None, &[])
        .assert_error(401, "UNAUTHORIZED");
    let r = s.exec(
        "POST",
        "/pty",
        None,
        &[("X-EXECD-ACCESS-TOKEN", "pty-secret")],
    );
    assert_eq!(r.status, 201);
    let id = r.json()["session_id"].as_str().unwrap().to_string();
    let (status, _) = http_error(connect(&s, &format!("/pty/{id}/ws"), None).err().unwrap());
    assert_eq!(status, 401);
    let (status, _) = http_error(
        connect(&s, &format!("/pty/{id}/ws"), Some("wrong"))
            .err()
            .unwrap(),
    );
    assert_eq!(status, 401);
    let mut ws = connect(&s, &format!("/pty/{id}/ws"), Some("pty-secret")).unwrap();
    ws.connected();
    ws.send("exit 0\n");
    ws.expect_exit(0);
}

#[test]
fn in_sidecar_mode_the_shell_runs_inside_the_main_container() {
    let Some(pod) = Pod::start() else { return };
    let s = pod.sidecar_sandlet("", SIDECAR_CAPABILITIES, &[]);
    wait_until("sidecar sandlet is ready", || s.get("/ready").status == 200);
    let id = create(&s, None);
    let mut ws = attach(&s, &id, "");
    ws.connected();
    ws.send("echo host=$(hostname) uid=$(id -u) tty=$(tty) term=$TERM\n");
    let out = ws.until("the answers", |o, _| !value_after(o, "term=").is_empty());
    assert_eq!(value_after(&out, "host="), MAIN_HOSTNAME, "{out}");
    assert_eq!(value_after(&out, "uid="), MAIN_UID.to_string(), "{out}");
    assert!(value_after(&out, "tty=").starts_with("/dev/pts/"), "{out}");
    assert_eq!(value_after(&out, "term="), "xterm-256color", "{out}");
    ws.send_json(json!({"type": "resize", "cols": 100, "rows": 30}));
    ws.send("exit 5\n");
    ws.expect_exit(5);

    let id = create(&s, None);
    let mut ws = attach(&s, &id, "?pty=0");
    ws.connected();
    ws.send("hostname; id -u >&2\n");
    ws.until("both", |o, e| {
        o.contains(MAIN_HOSTNAME) && e.contains(&MAIN_UID.to_string())
    });
    let r = s.exec("DELETE", &format!("/pty/{id}"), None, &[]);
    assert_eq!(r.status, 200);
    ws.expect_exit(-1);
}

#[test]
fn a_client_that_does_not_read_holds_the_shell_back_and_loses_nothing() {
    const BYTES: u64 = 16 << 20;
    let s = Sandlet::start(&[]);
    let id = create(&s, None);
    let mut ws = attach(&s, &id, "?pty=0");
    ws.connected();
    ws.send(&format!(
        "head -c {BYTES} /dev/zero; echo; echo END-$((1+1))\n"
    ));
    // Not reading: the output counter stops short of the whole (held back by the client's
    // buffers, then by the shell's pipe), instead of running through the 1 MiB ring.
    let offset = || {
        s.exec("GET", &format!("/pty/{id}"), None, &[]).json()["output_offset"]
            .as_u64()
            .unwrap()
    };
    let mut last = u64::MAX;
    let mut stable = 0;
    wait_until("the output counter stops", || {
        let now = offset();
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
        std::thread::sleep(Duration::from_millis(50));
        stable >= 10
    });
    assert!(last < BYTES, "the shell ran ahead of the client: {last}");
    // Every byte arrives, in order, although 16 times the ring went through.
    let mut zeros = 0u64;
    loop {
        if let Frame::Binary(b) = ws.next() {
            assert_eq!(b[0], 1);
            zeros += b[1..].iter().filter(|&&c| c == 0).count() as u64;
            ws.out.truncate(0);
            let text = String::from_utf8_lossy(&b[1..]).into_owned();
            if text.contains("END-2") {
                break;
            }
        }
    }
    assert_eq!(zeros, BYTES);
}

#[test]
fn an_idle_session_is_reaped_with_its_whole_tree() {
    let s = Sandlet::start(&["--exec-pty-idle-seconds", "1"]);
    let id = create(&s, None);
    let mut ws = attach(&s, &id, "");
    ws.connected();
    ws.send("sleep 1000 & echo bg=$!\n");
    let out = ws.until("pid", |o, _| !value_after(o, "bg=").is_empty());
    let background: i32 = value_after(&out, "bg=").parse().unwrap();
    // Never connected: it goes too.
    let other = create(&s, None);
    ws.ws.close(None).unwrap();
    drop(ws);
    // Sessions are reaped by a sweep every 30 s and whenever one is created.
    wait_until("the idle session is reaped", || {
        std::thread::sleep(Duration::from_millis(200));
        s.exec("POST", "/pty", None, &[]).status == 201
            && s.exec("GET", &format!("/pty/{id}"), None, &[]).status == 404
    });
    s.exec("GET", &format!("/pty/{other}"), None, &[])
        .assert_error(404, "CONTEXT_NOT_FOUND");
    wait_until("its background job is gone", || !pid_alive(background));
}
