//! `multipart/form-data` bodies for `/files/upload`, as the SDKs build them.

use serde_json::Value;

pub const BOUNDARY: &str = "sandlet-test-boundary";

/// The upload's `Content-Type`.
pub fn content_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

pub enum Part<'a> {
    /// A metadata part sent as a file part (as the SDK does).
    MetaFile(Value),
    /// A metadata part sent as a plain form value.
    MetaValue(Value),
    File(&'a [u8]),
}

pub fn multipart(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let (head, content): (&str, Vec<u8>) = match part {
            Part::MetaFile(v) => (
                "Content-Disposition: form-data; name=\"metadata\"; filename=\"metadata\"\r\nContent-Type: application/json\r\n",
                v.to_string().into_bytes(),
            ),
            Part::MetaValue(v) => (
                "Content-Disposition: form-data; name=\"metadata\"\r\n",
                v.to_string().into_bytes(),
            ),
            Part::File(b) => (
                "Content-Disposition: form-data; name=\"file\"; filename=\"x\"\r\nContent-Type: application/octet-stream\r\n",
                b.to_vec(),
            ),
        };
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(&content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}
