//! HTTP plumbing shared by sandlet's APIs: serving (TCP_NODELAY, limits on slow and idle
//! clients and on connections, graceful shutdown), errors, extractors and the token check.

pub mod auth;
pub mod error;
pub mod extract;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// Limits on what one client can hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A client must send a request's head within this, counted from when the server starts
    /// waiting for it: a connection that trickles its head, or idles between requests, is closed.
    pub header_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

/// Serves `router` until `shutdown` completes, then lets in-flight requests finish (idle
/// connections are closed at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, closing_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, typically: let connections end before trying again,
                    // rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Without TCP_NODELAY, small streamed writes (SSE events) can stall ~40 ms on delayed ACKs.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            // The peer's address is what `/proxy/` sends upstream as X-Forwarded-For.
            request.extensions_mut().insert(ConnectInfo(peer));
            let (request, read) = ReadToEnd::track(request);
            let answered = router.clone().oneshot(request);
            async move {
                let mut response = answered.await?;
                close_if_refused_unread(&mut response, &read);
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = http
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = async { drop(closing.wait_for(|closing| *closing).await) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(slot);
        });
    }
    let _ = closing.send(true);
    // Every connection holds a slot until it ends.
    let _ = slots
        .acquire_many(u32::try_from(limits.max_connections).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

/// A request body that records whether it was read to its end.
struct ReadToEnd {
    body: Incoming,
    done: Arc<AtomicBool>,
}

impl ReadToEnd {
    /// `request` with its body tracked, and the flag set once the body has been read.
    fn track(request: hyper::Request<Incoming>) -> (Request, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(request.body().is_end_stream()));
        let flag = Arc::clone(&done);
        let request = request.map(|body| axum::body::Body::new(ReadToEnd { body, done }));
        (request, flag)
    }
}

impl hyper::body::Body for ReadToEnd {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) || self.body.is_end_stream() {
            self.done.store(true, Ordering::Release);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An error answered before the request's body was read (an upload refused at its metadata, a
/// declared length over the limit) says `Connection: close`. hyper closes such a connection
/// after the response rather than read a body nobody wants, and a client told nothing would
/// send its next request on it and see the connection drop instead of an answer.
fn close_if_refused_unread(response: &mut Response, read: &AtomicBool) {
    let refused = response.status().is_client_error() || response.status().is_server_error();
    if refused && !read.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// A body size limit as a middleware's state: the limit, the flag that sets it and the error
/// code of the API it guards.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    pub bytes: u64,
    pub flag: &'static str,
    pub code: &'static str,
}

/// Answers a request whose declared body is over the limit with 413 at once, before a byte of
/// the body is read (a body without a declared length is still cut off at the limit as it
/// arrives, by the extractors).
pub async fn refuse_oversized(
    State(limit): State<BodyLimit>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit.bytes => error::ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            limit.code,
            format!(
                "the request body is {length} bytes; the limit is {} ({})",
                limit.bytes, limit.flag
            ),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

/// An error and its causes on one line: hyper's own message alone ("client error (Connect)")
/// does not say what went wrong.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
