//! The stream events of `POST /command`, `POST /session/{id}/run` and `POST /code`, execd's
//! `ServerStreamEvent`, framed as standard SSE (`data: <json>` and a blank line), which every
//! OpenSandbox SDK parses; and the splitting of output into line events.

use axum::body::Bytes;
use serde::Serialize;

/// Lines longer than this are sent in pieces of this size (execd sent them whole, unbounded).
pub const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub text: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub execution_count: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub execution_time: i64,
    pub timestamp: i64,
    /// A result's MIME bundle, `text/plain` named `text` (as execd names it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDetail {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Event {
    fn new(kind: &'static str, text: String) -> Event {
        Event {
            kind,
            text,
            execution_count: 0,
            execution_time: 0,
            timestamp: now_ms(),
            results: None,
            error: None,
        }
    }

    /// A chunk of a stream, sent as it came (code output is not split into lines).
    pub fn output(stderr: bool, text: String) -> Event {
        Event::new(if stderr { "stderr" } else { "stdout" }, text)
    }

    pub fn status(text: &str) -> Event {
        Event::new("status", text.to_string())
    }

    pub fn execution_count(count: i64) -> Event {
        let mut e = Event::new("execution_count", String::new());
        e.execution_count = count;
        e
    }

    /// A result or a displayed value: its MIME bundle, `text/plain` renamed `text`.
    pub fn result(mut bundle: serde_json::Map<String, serde_json::Value>) -> Event {
        if let Some(plain) = bundle.remove("text/plain") {
            bundle.insert("text".into(), plain);
        }
        let mut e = Event::new("result", String::new());
        e.results = Some(bundle);
        e
    }

    /// The first event: its text is the id of what runs.
    pub fn init(id: &str) -> Event {
        Event::new("init", id.to_string())
    }

    pub fn ping() -> Event {
        Event::new("ping", "pong".into())
    }

    pub fn complete(execution_ms: i64) -> Event {
        let mut e = Event::new("execution_complete", String::new());
        e.execution_time = execution_ms;
        e
    }

    /// A failed run. `evalue` is the decimal exit code (`-1` for a signal), which the SDKs turn
    /// into the exit code.
    pub fn error(ename: &str, evalue: String, traceback: String) -> Event {
        Event::error_with(ename, evalue, vec![traceback])
    }

    /// An error with a traceback of several lines (a kernel's).
    pub fn error_with(ename: &str, evalue: String, traceback: Vec<String>) -> Event {
        let mut e = Event::new("error", String::new());
        e.error = Some(ErrorDetail {
            ename: ename.into(),
            evalue,
            traceback,
        });
        e
    }

    /// `data: <json>\n\n`.
    pub fn frame(&self) -> Bytes {
        let mut out = b"data: ".to_vec();
        serde_json::to_writer(&mut out, self).expect("an event serialises");
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

/// Splits a byte stream into execd's line events: lines end at `\n`, `\r` or `\r\n` (also when
/// the pair is split across reads); a line is sent without its terminator, an empty line as
/// `"\n"`; a last line without terminator is sent at the end. Bytes that are not UTF-8 are
/// replaced (the event text is a JSON string).
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    after_cr: bool,
}

impl LineSplitter {
    /// Feeds bytes; calls `line` for each complete line.
    pub fn feed(&mut self, mut data: &[u8], mut line: impl FnMut(&str)) {
        if self.after_cr && data.first() == Some(&b'\n') {
            data = &data[1..];
        }
        self.after_cr = false;
        // Validated once for the whole read rather than line by line.
        let valid = std::str::from_utf8(data).is_ok();
        while let Some(end) = memchr::memchr2(b'\n', b'\r', data) {
            if self.partial.is_empty() {
                if valid {
                    // SAFETY: a prefix of valid UTF-8 ending before an ASCII byte is valid.
                    line(if end == 0 {
                        "\n"
                    } else {
                        unsafe { std::str::from_utf8_unchecked(&data[..end]) }
                    });
                } else {
                    emit(&data[..end], &mut line);
                }
            } else {
                self.partial.extend_from_slice(&data[..end]);
                let whole = std::mem::take(&mut self.partial);
                emit(&whole, &mut line);
            }
            let cr = data[end] == b'\r';
            data = &data[end + 1..];
            if cr {
                if data.first() == Some(&b'\n') {
                    data = &data[1..];
                } else if data.is_empty() {
                    self.after_cr = true;
                }
            }
        }
        self.partial.extend_from_slice(data);
        while self.partial.len() >= MAX_LINE_BYTES {
            let rest = self.partial.split_off(MAX_LINE_BYTES);
            let piece = std::mem::replace(&mut self.partial, rest);
            emit(&piece, &mut line);
        }
    }

    /// The last line, if output ended without a terminator.
    pub fn finish(&mut self, mut line: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            emit(&last, &mut line);
        }
    }
}

fn emit(bytes: &[u8], line: &mut impl FnMut(&str)) {
    if bytes.is_empty() {
        line("\n");
    } else {
        line(&String::from_utf8_lossy(bytes));
    }
}

/// One output stream's lines, written as SSE frames into the caller's buffer, so that a whole
/// read of output goes to the client as one write rather than one per line.
#[derive(Debug, Default)]
pub struct LineFrames {
    lines: LineSplitter,
    stderr: bool,
}

impl LineFrames {
    pub fn new(stderr: bool) -> LineFrames {
        LineFrames {
            lines: LineSplitter::default(),
            stderr,
        }
    }

    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let (head, tail) = self.frame_parts();
        self.lines
            .feed(data, |line| write_line(out, head, line, &tail));
    }

    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let (head, tail) = self.frame_parts();
        self.lines.finish(|line| write_line(out, head, line, &tail));
    }

    /// What comes before and after the text in every frame of one read (one timestamp).
    fn frame_parts(&self) -> (&'static [u8], Vec<u8>) {
        let head: &[u8] = if self.stderr {
            b"data: {\"type\":\"stderr\",\"text\":"
        } else {
            b"data: {\"type\":\"stdout\",\"text\":"
        };
        (
            head,
            format!(",\"timestamp\":{}}}\n\n", now_ms()).into_bytes(),
        )
    }
}

/// The frame of an output event (`type`, `text`, `timestamp`), written in place.
fn write_line(out: &mut Vec<u8>, head: &[u8], text: &str, tail: &[u8]) {
    out.extend_from_slice(head);
    // Most lines need no escaping: then the text is copied as it is. The scan has no early
    // exit, so it runs over whole words.
    if text
        .bytes()
        .fold(false, |any, b| any | NEEDS_ESCAPE[b as usize])
    {
        serde_json::to_writer(&mut *out, text).expect("a string serialises");
    } else {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(tail);
}

/// Bytes a JSON string cannot hold as they are.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |l| out.push(l.to_string()));
        }
        s.finish(|l| out.push(l.to_string()));
        out
    }

    #[test]
    fn written_line_frames_are_the_events_frames() {
        let mut out = Vec::new();
        let mut frames = LineFrames::new(true);
        frames.feed(b"a \"q\"\n\tplain\n", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("}\n\n"));
        let events: Vec<serde_json::Value> = text
            .split("\n\n")
            .filter(|f| !f.is_empty())
            .map(|f| serde_json::from_str(f.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["type"], "stderr");
        assert_eq!(events[0]["text"], "a \"q\"");
        assert_eq!(events[1]["text"], "\tplain");
        assert!(events[1]["timestamp"].as_i64().unwrap() > 0);
    }

    #[test]
    fn lines_split_like_execd() {
        assert_eq!(
            split(&[b"a\n\nb\n\n\nc\n"]),
            ["a", "\n", "b", "\n", "\n", "c"]
        );
        assert_eq!(split(&[b"prog 10%\rprog 20%\r"]), ["prog 10%", "prog 20%"]);
        assert_eq!(
            split(&[b"x\r", b"\ny\r\n"]),
            ["x", "y"],
            "a split CRLF is one end"
        );
        assert_eq!(split(&[b"par", b"tial"]), ["partial"]);
        assert_eq!(split(&[b"\xff\n"]), ["\u{fffd}"]);
        assert_eq!(
            split(&[b"\xc3", b"\xa9\n"]),
            ["\u{e9}"],
            "a character split across reads"
        );
    }

    #[test]
    fn long_lines_come_in_bounded_pieces_with_nothing_lost() {
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 5];
        let lines = split(&[&long, b"\n"]);
        assert_eq!(
            lines.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE_BYTES, MAX_LINE_BYTES, 5]
        );
    }

    #[test]
    fn frames_are_standard_sse_with_a_timestamp() {
        let frame = Event::error("CommandExecError", "3".into(), "exit status 3".into()).frame();
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(text.starts_with("data: {\"type\":\"error\""), "{text}");
        assert!(text.ends_with("}\n\n"));
        let json: serde_json::Value = serde_json::from_str(&text[6..text.len() - 2]).unwrap();
        assert!(json["timestamp"].as_i64().unwrap() > 0);
        assert_eq!(json["error"]["evalue"], "3");
        assert!(json.get("text").is_none());
    }

    #[test]
    fn results_carry_their_mime_bundle_with_text_plain_named_text() {
        let bundle = serde_json::json!({"text/plain": "2", "image/png": "iVBOR"});
        let event = Event::result(bundle.as_object().unwrap().clone());
        let frame = event.frame();
        let text = std::str::from_utf8(&frame).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text[6..text.len() - 2]).unwrap();
        assert_eq!(
            json["results"],
            serde_json::json!({"text": "2", "image/png": "iVBOR"})
        );
        assert!(json.get("execution_count").is_none());
        let count = Event::execution_count(3).frame();
        assert!(
            std::str::from_utf8(&count)
                .unwrap()
                .contains("\"execution_count\":3")
        );
    }
}
