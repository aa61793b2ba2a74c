//! `/proxy/{port}/{rest}`: execd's reverse proxy to a port on the pod's loopback, so callers that
//! can reach only the exec API reach servers started inside the sandbox. In the sidecar
//! placement the pod's containers share one network namespace, so loopback is right there too.
//!
//! Runs as middleware after the token check and before routing, for any method (as execd).
//! Differences from execd, each a fix of one of its bugs (contract §3, §15): the port must be
//! 1..=65535 (400 otherwise, not 502); the path goes upstream exactly as received, still
//! percent-encoded; one pooled client serves every request instead of a new transport per
//! request; `X-Forwarded-For` is the peer's address, never the client's own claim; the access
//! token is not passed on; failures are JSON `{"code","message"}`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Extensions, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

use super::{TOKEN_HEADER, invalid};
use crate::http::error::ApiError;
use crate::http::error_chain;

const PREFIX: &str = "/proxy/";

/// A connect to loopback fails or succeeds at once; this only bounds a full listen backlog.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that describe one hop, never passed on (RFC 9110 §7.6.1, plus the legacy ones).
/// `Upgrade` and `Connection` are set again for a protocol switch.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The proxy's limits (documented defaults in `cli.rs` and the README).
pub struct ProxyConfig {
    /// How long an idle upstream connection stays in the pool.
    pub idle: Duration,
    /// Idle upstream connections kept per port, at most.
    pub max_idle_per_port: usize,
    /// How long an upstream has to send its response headers.
    pub header_timeout: Duration,
}

/// The one client every proxied request goes through, so upstream connections are reused.
#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Sent>,
    header_timeout: Duration,
}

impl Proxy {
    pub fn new(config: &ProxyConfig) -> Proxy {
        let mut connector = HttpConnector::new();
        // Small writes (SSE events, WebSocket frames) must not wait on delayed ACKs.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.idle)
            .pool_max_idle_per_host(config.max_idle_per_port)
            // Without a timer the pool never expires idle connections.
            .pool_timer(TokioTimer::new())
            .build(connector);
        Proxy {
            client,
            header_timeout: config.header_timeout,
        }
    }
}

/// Middleware: requests under `/proxy/` are forwarded; everything else goes on to the routes.
pub async fn intercept(State(proxy): State<Proxy>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with(PREFIX) {
        return next.run(request).await;
    }
    proxy
        .forward(request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

impl Proxy {
    async fn forward(&self, mut request: Request) -> Result<Response, ApiError> {
        let (port, uri) = target(request.uri())?;
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            // An IPv4 client of a dual-stack listener as plain IPv4, not `::ffff:a.b.c.d`.
            .map(|c| c.0.ip().to_canonical());
        let protocol = upgrade_protocol(request.headers());
        let client_upgrade = protocol.is_some().then(|| hyper::upgrade::on(&mut request));

        let (mut parts, body) = request.into_parts();
        parts.uri = uri;
        // The client speaks HTTP/1.1 upstream whatever the caller used.
        parts.version = Version::HTTP_11;
        // Nothing the server attached to the request means anything to the upstream client.
        parts.extensions = Extensions::new();
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        headers.remove(TOKEN_HEADER);
        headers.remove("x-forwarded-host");
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        // Only the address the connection came from is known; a client's own claim is dropped.
        match peer.and_then(|ip| HeaderValue::try_from(ip.to_string()).ok()) {
            Some(ip) => headers.insert("x-forwarded-for", ip),
            None => headers.remove("x-forwarded-for"),
        };
        if let Some(protocol) = &protocol {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol.clone());
        }

        let (body, uploaded) = Sent::new(body);
        let sent = self.client.request(Request::from_parts(parts, body));
        // The clock starts once the request body is all sent: a long upload is not a slow answer.
        let timed_out = async {
            let _ = uploaded.await;
            tokio::time::sleep(self.header_timeout).await;
        };
        let response = tokio::select! {
            result = sent => Ok(result),
            () = timed_out => Err(()),
        };
        let response = match response {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "BAD_GATEWAY",
                    format!("proxy to 127.0.0.1:{port}: {}", error_chain(&e)),
                ));
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "GATEWAY_TIMEOUT",
                    format!(
                        "proxy to 127.0.0.1:{port}: no response headers within {} s after the request",
                        self.header_timeout.as_secs_f64()
                    ),
                ));
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return match client_upgrade {
                Some(client) => Ok(tunnel(port, client, response)),
                None => Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "BAD_GATEWAY",
                    format!("proxy to 127.0.0.1:{port}: switched protocols unasked"),
                )),
            };
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // Streamed as it arrives; a failure mid-body can only cut the response short.
        let body = body.map_err(move |e| {
            tracing::warn!(port, error = %error_chain(&e), "proxy: upstream response body failed");
            e
        });
        Ok(Response::from_parts(parts, Body::new(body)))
    }
}

/// A request body that reports when it has been sent to its end (or dropped unfinished).
struct Sent {
    body: Body,
    done: Option<oneshot::Sender<()>>,
}

impl Sent {
    fn new(body: Body) -> (Sent, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut sent = Sent {
            body,
            done: Some(tx),
        };
        // hyper does not poll a body that says it is already over.
        if sent.body.is_end_stream() {
            sent.finish();
        }
        (sent, rx)
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

impl HttpBody for Sent {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &frame {
            self.finish();
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

/// The upstream port and URI for a path under `/proxy/`: the rest of the path exactly as the
/// client sent it (percent-encoding untouched) and the query verbatim.
fn target(uri: &Uri) -> Result<(u16, Uri), ApiError> {
    let rest = &uri.path()[PREFIX.len()..];
    let (port, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    if port.is_empty() {
        return Err(invalid("port is required"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| invalid(format!("invalid port {port:?}: want 1 to 65535")))?;
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let uri = Uri::builder()
        .scheme("http")
        .authority(format!("127.0.0.1:{port}"))
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| invalid(format!("cannot proxy this path: {e}")))?;
    Ok((port, uri))
}

/// The protocol asked for when the request is an upgrade (`Connection: upgrade` + `Upgrade`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asked
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Removes the hop-by-hop headers and any header `Connection` names as one.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::try_from(token.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Answers the client's upgrade with the upstream's 101 and, once both sides have switched,
/// copies bytes both ways until both are done.
fn tunnel(port: u16, client: OnUpgrade, mut upstream: hyper::Response<Incoming>) -> Response {
    let upstream_upgrade = hyper::upgrade::on(&mut upstream);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream_upgrade) {
            Ok(both) => both,
            Err(e) => {
                tracing::warn!(port, error = %error_chain(&e), "proxy: protocol switch failed");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(port, up, down, "proxy: tunnel closed"),
            Err(e) => tracing::debug!(port, error = %e, "proxy: tunnel ended with an error"),
        }
    });
    let (mut parts, _) = upstream.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(protocol) = protocol {
        parts.headers.insert(header::UPGRADE, protocol);
    }
    Response::from_parts(parts, Body::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(path: &str) -> Result<(u16, String), u16> {
        target(&path.parse().unwrap())
            .map(|(port, uri)| (port, uri.to_string()))
            .map_err(|e| e.status.as_u16())
    }

    #[test]
    fn ports_and_paths_map_as_received() {
        let ok = |port, uri: &str| Ok((port, uri.to_string()));
        assert_eq!(upstream("/proxy/8080"), ok(8080, "http://127.0.0.1:8080/"));
        assert_eq!(upstream("/proxy/8080/"), ok(8080, "http://127.0.0.1:8080/"));
        assert_eq!(
            upstream("/proxy/1/a%2Fb/c?x=%2F&y"),
            ok(1, "http://127.0.0.1:1/a%2Fb/c?x=%2F&y")
        );
        assert_eq!(
            upstream("/proxy/65535?q=1"),
            ok(65535, "http://127.0.0.1:65535/?q=1")
        );
        for bad in [
            "/proxy/",
            "/proxy//x",
            "/proxy/0/",
            "/proxy/65536/",
            "/proxy/abc/",
            "/proxy/+80/",
            "/proxy/%38%30/",
        ] {
            assert_eq!(upstream(bad), Err(400), "{bad}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("keep-alive, X-Hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-end", HeaderValue::from_static("2"));
        assert_eq!(upgrade_protocol(&headers), None);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-end"], "2");

        headers.insert("connection", HeaderValue::from_static("Upgrade"));
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_protocol(&headers).unwrap(), "websocket");
    }
}
