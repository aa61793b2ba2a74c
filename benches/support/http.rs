//! The benchmarks' HTTP/1.1 client: keep-alive, one write per request, TCP_NODELAY, so the
//! numbers are sandlet's and not a client library's. Event streams are read here; other bodies
//! each benchmark reads from `stream` after the head.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use serde_json::Value;

pub struct Http {
    pub stream: BufReader<TcpStream>,
}

/// What a response head says that the benchmarks use.
pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
}

impl Http {
    pub fn connect(port: u16) -> Http {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        Http {
            stream: BufReader::with_capacity(256 << 10, stream),
        }
    }

    /// Sends `request` (head and body) in one write and reads the response's head.
    pub fn send(&mut self, request: &str) -> Head {
        self.stream.get_mut().write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).unwrap();
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
        let mut content_length = None;
        loop {
            line.clear();
            self.stream.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().ok();
            }
        }
        Head {
            status,
            content_length,
        }
    }
}

impl Http {
    pub fn events(&mut self, path: &str, body: &Value) -> Vec<Value> {
        let mut events = Vec::new();
        self.stream(path, body, |e| events.push(e.clone()));
        events
    }

    /// POSTs `body` and calls `event` for each SSE event until the response ends.
    pub fn stream(&mut self, path: &str, body: &Value, mut event: impl FnMut(&Value)) {
        self.stream_raw(path, body, |json| {
            event(&serde_json::from_slice(json).unwrap())
        });
    }

    /// Like `stream`, with each event's JSON unparsed.
    pub fn stream_raw(&mut self, path: &str, body: &Value, mut event: impl FnMut(&[u8])) {
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(self.send(&request).status, 200);
        let mut line = String::new();
        let mut pending = Vec::new();
        loop {
            line.clear();
            self.stream.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            let start = pending.len();
            pending.resize(start + size, 0);
            self.stream.read_exact(&mut pending[start..]).unwrap();
            let mut crlf = [0u8; 2];
            self.stream.read_exact(&mut crlf).unwrap();
            let mut consumed = 0;
            while let Some(end) = memchr::memmem::find(&pending[consumed..], b"\n\n") {
                let frame = &pending[consumed..consumed + end];
                event(frame.strip_prefix(b"data: ").expect("an SSE data frame"));
                consumed += end + 2;
            }
            pending.drain(..consumed);
            if size == 0 {
                assert!(pending.is_empty());
                return;
            }
        }
    }
}
