//! HTTP plumbing shared by sandlet's APIs: serving (TCP_NODELAY, limits on slow and idle
//! clients and on connections, graceful shutdown), errors, extractors and the token check.

pub mod auth;
pub mod error;
pub mod extract;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
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
        // The peer's address is what `/proxy/` sends upstream as X-Forwarded-For.
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(axum::body::Body::new))
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
