//! The benchmarks' HTTP/1.1 client: keep-alive, one write per request, TCP_NODELAY, so the
//! numbers are sandlet's and not a client library's. Each benchmark reads its own bodies from
//! `stream` after the head.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

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
