//! The stream events of `POST /command`, `POST /session/{id}/run` and `POST /code`, execd's
//! `ServerStreamEvent`, framed as standard SSE (`data: <json>` and a blank line), which every
//! OpenSandbox SDK parses; and the splitting of output into line events, each with its line
//! ending (execd 1.1).

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

/// Splits a byte stream into output events, one line per event, each with its line ending as
/// written (`\n`, `\r` or `\r\n`): concatenating a stream's events gives back its output, as
/// execd 1.1 specifies. An empty line is just its ending; a last line without one is sent at the
/// end. Every event but the last ends a line, so a client that strips one line ending per event
/// and joins with `\n` (the 1.0 SDKs) gets the lines as execd 1.0 sent them (see
/// `docs/execd-compatibility.md`). A `\r\n` split across reads is sent as `\r`, then `\n`:
/// holding a final `\r` back would hold back a progress bar's every update. Bytes that are not
/// UTF-8 are replaced (the event text is a JSON string).
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    after_cr: bool,
}

impl LineSplitter {
    /// Feeds bytes; calls `line` for each complete line.
    pub fn feed(&mut self, mut data: &[u8], mut line: impl FnMut(&str)) {
        if self.after_cr && data.first() == Some(&b'\n') {
            line("\n");
            data = &data[1..];
        }
        self.after_cr = false;
        // Validated once for the whole read rather than line by line.
        let valid = std::str::from_utf8(data).is_ok();
        while let Some(at) = memchr::memchr2(b'\n', b'\r', data) {
            let crlf = data[at] == b'\r' && data.get(at + 1) == Some(&b'\n');
            let end = at + 1 + usize::from(crlf);
            if self.partial.is_empty() && valid {
                // SAFETY: a prefix of valid UTF-8 ending after an ASCII byte is valid.
                line(unsafe { std::str::from_utf8_unchecked(&data[..end]) });
            } else {
                self.partial.extend_from_slice(&data[..end]);
                let whole = std::mem::take(&mut self.partial);
                emit(&whole, &mut line);
            }
            self.after_cr = data[at] == b'\r' && !crlf && end == data.len();
            data = &data[end..];
        }
        self.partial.extend_from_slice(data);
        while self.partial.len() >= MAX_LINE_BYTES {
            let rest = self.partial.split_off(MAX_LINE_BYTES);
            let piece = std::mem::replace(&mut self.partial, rest);
            emit(&piece, &mut line);
        }
    }

    /// The last line, if output ended without a line ending.
    pub fn finish(&mut self, mut line: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            emit(&last, &mut line);
        }
    }
}

fn emit(bytes: &[u8], line: &mut impl FnMut(&str)) {
    line(&String::from_utf8_lossy(bytes));
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
    // Most lines need no escaping but their line ending: then the text is copied as it is and
    // the ending written escaped. The scan has no early exit, so it runs over whole words.
    let body = text.trim_end_matches(['\n', '\r']);
    if body
        .bytes()
        .fold(false, |any, b| any | NEEDS_ESCAPE[b as usize])
    {
        serde_json::to_writer(&mut *out, text).expect("a string serialises");
    } else {
        out.push(b'"');
        out.extend_from_slice(body.as_bytes());
        for b in text[body.len()..].bytes() {
            out.extend_from_slice(if b == b'\n' { b"\\n" } else { b"\\r" });
        }
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
        frames.feed(b"a \"q\"\n\tplain\nok\r\n", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("}\n\n"));
        let events: Vec<serde_json::Value> = text
            .split("\n\n")
            .filter(|f| !f.is_empty())
            .map(|f| serde_json::from_str(f.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0]["type"], "stderr");
        assert_eq!(events[0]["text"], "a \"q\"\n");
        assert_eq!(events[1]["text"], "\tplain\n");
        assert_eq!(
            events[2]["text"], "ok\r\n",
            "a plain line's ending is escaped"
        );
        assert!(events[1]["timestamp"].as_i64().unwrap() > 0);
    }

    #[test]
    fn lines_keep_their_endings() {
        assert_eq!(
            split(&[b"a\n\nb\n\n\nc\n"]),
            ["a\n", "\n", "b\n", "\n", "\n", "c\n"]
        );
        assert_eq!(
            split(&[b"prog 10%\rprog 20%\r"]),
            ["prog 10%\r", "prog 20%\r"]
        );
        assert_eq!(split(&[b"x\r\ny\r\n"]), ["x\r\n", "y\r\n"]);
        assert_eq!(
            split(&[b"x\r", b"\ny\r\n"]),
            ["x\r", "\n", "y\r\n"],
            "a split CRLF loses nothing and holds nothing back"
        );
        assert_eq!(split(&[b"par", b"tial"]), ["partial"]);
        assert_eq!(split(&[b"\xff\n"]), ["\u{fffd}\n"]);
        assert_eq!(
            split(&[b"\xc3", b"\xa9\n"]),
            ["\u{e9}\n"],
            "a character split across reads"
        );
    }

    #[test]
    fn the_events_concatenate_to_the_output_and_strip_to_execd_1_0_lines() {
        let output: &[u8] = b"one\n\ntwo\r\nthree\rlast";
        let events = split(&[&output[..6], &output[6..13], &output[13..]]);
        assert_eq!(events.concat().as_bytes(), output);
        // What a 1.0 SDK shows: each event without one trailing newline, joined with newlines.
        let shown: Vec<&str> = events.iter().map(|e| e.trim_end_matches('\n')).collect();
        assert_eq!(shown.join("\n"), "one\n\ntwo\r\nthree\r\nlast");
    }

    #[test]
    fn long_lines_come_in_bounded_pieces_with_nothing_lost() {
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 5];
        let lines = split(&[&long, b"\n"]);
        assert_eq!(
            lines.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE_BYTES, MAX_LINE_BYTES, 6]
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
