//! Jupyter's REST API, the calls execd makes (`GET /api/kernelspecs`, `POST /api/sessions`,
//! `DELETE /api/sessions/{id}`, `POST /api/kernels/{id}/interrupt`) and the few sandlet adds
//! (`GET /api` to see the server up, `GET /api/kernels/{id}`). Every call
//! carries `Authorization: Token <token>`.

use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use serde_json::{Value, json};

/// A REST call that takes longer than this is a Jupyter that does not answer (starting a
/// kernel takes about a second on a loaded machine).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum JupyterError {
    /// Nothing answers at the address (not started, stopped, restarting).
    #[error("Jupyter at {0} does not answer: {1}")]
    Unreachable(String, String),
    /// It answered, with an error status.
    #[error("Jupyter answered {status} to {what}: {body}")]
    Status {
        what: String,
        status: StatusCode,
        body: String,
    },
    #[error("Jupyter's answer to {0} is not what it should be: {1}")]
    Answer(String, String),
}

impl JupyterError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, JupyterError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// Where a Jupyter server is and how to authenticate to it.
#[derive(Clone)]
pub struct Jupyter {
    /// `http://host:port`, without a trailing slash; any path prefix of the configured URL is
    /// dropped, as execd drops it.
    base: String,
    /// `host:port`, for the kernel WebSockets.
    authority: String,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A kernel spec: its name and the language it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSpec {
    pub name: String,
    pub language: String,
}

/// A started session: the kernel behind a context.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session_id: String,
    pub kernel_id: String,
}

impl Jupyter {
    /// `url` is `http://host[:port][/...]`; https is not supported (no TLS in sandlet).
    pub fn new(url: &str, token: &str) -> Result<Jupyter, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("JUPYTER_HOST {url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "JUPYTER_HOST {url:?} must start with http:// (sandlet speaks no TLS to Jupyter)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("JUPYTER_HOST {url:?} names no host"))?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{authority}:80"),
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Jupyter {
            base: format!("http://{authority}"),
            authority,
            token: token.to_string(),
            client,
        })
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether the server answers its API root (used while it starts).
    pub async fn answers(&self) -> bool {
        self.call(Method::GET, "/api", None).await.is_ok()
    }

    pub async fn kernel_specs(&self) -> Result<(Option<String>, Vec<KernelSpec>), JupyterError> {
        #[derive(Deserialize)]
        struct Specs {
            #[serde(default)]
            default: Option<String>,
            kernelspecs: std::collections::HashMap<String, Named>,
        }
        #[derive(Deserialize)]
        struct Named {
            name: String,
            spec: Spec,
        }
        #[derive(Deserialize)]
        struct Spec {
            #[serde(default)]
            language: String,
        }
        let body = self.call(Method::GET, "/api/kernelspecs", None).await?;
        let specs: Specs = serde_json::from_value(body)
            .map_err(|e| JupyterError::Answer("GET /api/kernelspecs".into(), e.to_string()))?;
        let mut list: Vec<KernelSpec> = specs
            .kernelspecs
            .into_values()
            .map(|n| KernelSpec {
                name: n.name,
                language: n.spec.language,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((specs.default, list))
    }

    /// Starts a kernel of `kernel` in a session whose notebook path is `path` (the kernel's
    /// working directory is that path's directory, relative to the server's root).
    pub async fn create_session(
        &self,
        name: &str,
        path: &str,
        kernel: &str,
    ) -> Result<SessionInfo, JupyterError> {
        let body =
            json!({"path": path, "name": name, "type": "notebook", "kernel": {"name": kernel}});
        let answer = self.call(Method::POST, "/api/sessions", Some(body)).await?;
        let field = |v: &Value, what: &str| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                JupyterError::Answer("POST /api/sessions".into(), format!("no {what}"))
            })
        };
        Ok(SessionInfo {
            session_id: field(&answer["id"], "id")?,
            kernel_id: field(&answer["kernel"]["id"], "kernel.id")?,
        })
    }

    /// Shuts the session's kernel down.
    pub async fn delete_session(&self, session_id: &str) -> Result<(), JupyterError> {
        self.call(Method::DELETE, &format!("/api/sessions/{session_id}"), None)
            .await
            .map(drop)
    }

    pub async fn interrupt(&self, kernel_id: &str) -> Result<(), JupyterError> {
        self.call(
            Method::POST,
            &format!("/api/kernels/{kernel_id}/interrupt"),
            Some(json!({})),
        )
        .await
        .map(drop)
    }

    /// Whether the kernel still exists.
    pub async fn kernel_exists(&self, kernel_id: &str) -> Result<bool, JupyterError> {
        match self
            .call(Method::GET, &format!("/api/kernels/{kernel_id}"), None)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, JupyterError> {
        let what = format!("{method} {path}");
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("Authorization", format!("Token {}", self.token))
            .header("Content-Type", "application/json")
            .body(Full::new(
                body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
            ))
            .expect("a valid request");
        let unreachable = |e: String| JupyterError::Unreachable(self.base.clone(), e);
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unreachable(crate::http::error_chain(&e)))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, JupyterError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("{what} took longer than {CALL_TIMEOUT:?}")))??;
        if !status.is_success() {
            return Err(JupyterError::Status {
                what,
                status,
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| JupyterError::Answer(what, e.to_string()))
    }
}

/// The kernel spec for `language`: the spec named like the language, else the server's default
/// spec if it runs that language, else the first by name that does. (execd skips `python3` and
/// takes a random match; sandlet's choice is the same every time.)
pub fn choose_spec<'a>(
    default: Option<&str>,
    specs: &'a [KernelSpec],
    language: &str,
) -> Option<&'a KernelSpec> {
    let runs = |s: &&KernelSpec| s.language.eq_ignore_ascii_case(language);
    specs
        .iter()
        .filter(runs)
        .find(|s| s.name == language)
        .or_else(|| {
            specs
                .iter()
                .filter(runs)
                .find(|s| Some(s.name.as_str()) == default)
        })
        .or_else(|| specs.iter().find(runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, language: &str) -> KernelSpec {
        KernelSpec {
            name: name.into(),
            language: language.into(),
        }
    }

    #[test]
    fn the_spec_named_like_the_language_wins_then_the_default_then_the_first() {
        let specs = [
            spec("bash", "bash"),
            spec("py-old", "python"),
            spec("python", "python"),
            spec("python3", "python"),
            spec("tslab", "typescript"),
        ];
        assert_eq!(choose_spec(None, &specs, "python").unwrap().name, "python");
        assert_eq!(
            choose_spec(Some("python3"), &specs[..2], "python")
                .unwrap()
                .name,
            "py-old"
        );
        assert_eq!(
            choose_spec(Some("python3"), &specs[3..], "python")
                .unwrap()
                .name,
            "python3"
        );
        assert_eq!(choose_spec(None, &specs, "Bash").unwrap().name, "bash");
        assert!(choose_spec(None, &specs, "go").is_none());
    }

    #[test]
    fn only_plain_http_is_accepted_and_a_path_prefix_is_dropped() {
        let j = Jupyter::new("http://127.0.0.1:44771/some/prefix", "t").unwrap();
        assert_eq!(j.authority(), "127.0.0.1:44771");
        assert_eq!(j.base, "http://127.0.0.1:44771");
        assert!(Jupyter::new("https://h:1", "t").is_err());
        assert!(Jupyter::new("127.0.0.1:44771", "t").is_err());
        assert_eq!(Jupyter::new("http://h", "t").unwrap().authority(), "h:80");
    }
}
