//! HTTP plumbing shared by sandlet's APIs: serving with TCP_NODELAY and graceful shutdown,
//! errors, extractors and the token check.

pub mod auth;
pub mod error;
pub mod extract;

use std::future::Future;
use std::io;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

/// Serves `router` until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    // Without TCP_NODELAY, small streamed writes (SSE events) can stall ~40 ms on delayed ACKs.
    let listener = listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
