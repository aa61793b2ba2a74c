//! A kernel's channels over Jupyter's WebSocket (`/api/kernels/{id}/channels`, the JSON text
//! protocol): one connection per context, kept open across runs (execd opens one per run).
//! Sends `execute_request`s and reads every channel's messages.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::jupyter::Jupyter;

/// The message protocol version of the requests sandlet sends (execd's).
const PROTOCOL_VERSION: &str = "5.3";

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot connect to the kernel's channels at {0}: {1}")]
    Connect(String, String),
    #[error("the connection to the kernel was lost: {0}")]
    Lost(String),
}

/// One message from the kernel, as much of it as sandlet reads.
#[derive(Debug)]
pub struct KernelMessage {
    pub channel: String,
    pub msg_type: String,
    /// The `msg_id` of the request this message answers (empty for the kernel's own).
    pub parent_id: String,
    pub content: Value,
}

pub struct KernelChannel {
    socket: WebSocketStream<TcpStream>,
    /// Jupyter's client session: messages sent while the socket was away are replayed to a
    /// connection with the same one.
    session: String,
}

impl KernelChannel {
    pub async fn connect(
        jupyter: &Jupyter,
        kernel_id: &str,
        session: &str,
    ) -> Result<KernelChannel, ChannelError> {
        let url = format!(
            "ws://{}/api/kernels/{kernel_id}/channels?session_id={session}",
            jupyter.authority()
        );
        let fail = |e: String| ChannelError::Connect(url.clone(), e);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| fail(e.to_string()))?;
        request.headers_mut().insert(
            "Authorization",
            format!("Token {}", jupyter.token())
                .parse()
                .map_err(|_| fail("the token is not a valid header value".into()))?,
        );
        let stream = TcpStream::connect(jupyter.authority())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (socket, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(KernelChannel {
            socket,
            session: session.to_string(),
        })
    }

    /// Sends `code` to run as execd sends it; returns the request's `msg_id`.
    pub async fn execute(&mut self, code: &str) -> Result<String, ChannelError> {
        let msg_id = crate::exec::new_id();
        let request = json!({
            "header": {
                "msg_id": msg_id,
                "username": "sandlet",
                "session": self.session,
                "msg_type": "execute_request",
                "version": PROTOCOL_VERSION,
                "date": chrono::Utc::now().to_rfc3339(),
            },
            "parent_header": {},
            "metadata": {},
            "content": {
                "code": code,
                "silent": false,
                "store_history": true,
                "user_expressions": {},
                "allow_stdin": false,
                "stop_on_error": true,
            },
            "channel": "shell",
            "buffers": [],
        });
        self.socket
            .send(Message::text(request.to_string()))
            .await
            .map_err(|e| ChannelError::Lost(e.to_string()))?;
        Ok(msg_id)
    }

    /// The next message from any channel. Cancel-safe.
    pub async fn next(&mut self) -> Result<KernelMessage, ChannelError> {
        loop {
            let frame = match self.socket.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Err(ChannelError::Lost(e.to_string())),
                None => return Err(ChannelError::Lost("Jupyter closed it".into())),
            };
            let text = match frame {
                Message::Text(text) => text,
                Message::Close(reason) => {
                    return Err(ChannelError::Lost(match reason {
                        Some(r) => format!("Jupyter closed it ({}: {})", r.code, r.reason),
                        None => "Jupyter closed it".into(),
                    }));
                }
                // Pings are answered by the library; the binary protocol is never asked for.
                _ => continue,
            };
            let Ok(mut message) = serde_json::from_str::<Value>(&text) else {
                tracing::debug!("a kernel message that is not JSON; ignored");
                continue;
            };
            let string = |v: &Value| v.as_str().unwrap_or_default().to_string();
            return Ok(KernelMessage {
                channel: string(&message["channel"]),
                msg_type: string(&message["header"]["msg_type"]),
                parent_id: string(&message["parent_header"]["msg_id"]),
                content: message["content"].take(),
            });
        }
    }
}
