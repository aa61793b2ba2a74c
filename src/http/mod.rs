//! HTTP plumbing shared by sandlet's APIs: serving with TCP_NODELAY and graceful shutdown,
//! errors, extractors and the token check.

pub mod auth;
pub mod error;
pub mod extract;

use std::future::Future;
use std::io;
use std::net::SocketAddr;

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
    // The peer's address is what `/proxy/` sends upstream as X-Forwarded-For.
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
