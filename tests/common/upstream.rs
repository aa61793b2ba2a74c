//! Bodies for the stand-in upstream servers that the proxy's test and benchmark run.

use axum::body::{Body, Bytes};

/// `n` bytes of `x`, streamed in 64 KiB chunks.
pub fn x_bytes(n: u64) -> Body {
    const CHUNK: u64 = 64 << 10;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            (left > 0).then(|| {
                let take = left.min(CHUNK);
                (
                    Ok::<_, std::io::Error>(chunk.slice(..take as usize)),
                    left - take,
                )
            })
        }
    });
    Body::from_stream(stream)
}
