//! The bearer token. Read from a file (a Secret mounted only into sandlet) and re-read when the
//! file changes, so a rotated Secret takes effect without a restart; compared in constant time;
//! never logged: these types have no `Debug`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// How often the token file is checked for a change, at most.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Where execd takes its token from; sandlet honours it too (see `serve`).
pub const EXEC_TOKEN_VAR: &str = "EXECD_ACCESS_TOKEN";

/// Every token sandlet checks requests against, so that none is handed to a process it starts.
static IN_FORCE: Mutex<Vec<Auth>> = Mutex::new(Vec::new());

/// Removes sandlet's own credentials from an environment given to a process it starts (the main
/// container's, in sidecar mode): execd's token variable, and any variable holding a token in
/// force, wherever that token came from.
pub fn strip_credentials(env: &mut Vec<(String, String)>) {
    let tokens: Vec<Arc<[u8]>> = IN_FORCE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Auth::token)
        .collect();
    env.retain(|(name, value)| {
        name != EXEC_TOKEN_VAR && !tokens.iter().any(|t| t.as_ref() == value.trim().as_bytes())
    });
}

#[derive(Clone)]
pub struct Auth {
    file: Option<Arc<TokenFile>>,
    /// A token given as a value (execd's `EXECD_ACCESS_TOKEN`), when there is no file.
    fixed: Option<Arc<[u8]>>,
}

struct TokenFile {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

struct Loaded {
    token: Arc<[u8]>,
    modified: Option<SystemTime>,
    checked: Instant,
}

impl Auth {
    pub fn none() -> Auth {
        Auth {
            file: None,
            fixed: None,
        }
    }

    /// A token given as a value; surrounding whitespace is not part of it. Empty: no token.
    pub fn from_value(token: &str) -> Auth {
        let token = token.trim();
        Auth {
            file: None,
            fixed: (!token.is_empty()).then(|| token.as_bytes().into()),
        }
        .in_force()
    }

    /// Reads the token from `path`; surrounding whitespace (a trailing newline) is not part of it.
    pub fn from_file(path: &Path) -> io::Result<Auth> {
        let (token, modified) = read_token(path)?;
        let loaded = RwLock::new(Loaded {
            token,
            modified,
            checked: Instant::now(),
        });
        Ok(Auth {
            file: Some(Arc::new(TokenFile {
                path: path.to_owned(),
                loaded,
            })),
            fixed: None,
        }
        .in_force())
    }

    /// Registers the token for [`strip_credentials`].
    fn in_force(self) -> Auth {
        IN_FORCE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.clone());
        self
    }

    /// The token in force, if any.
    fn token(&self) -> Option<Arc<[u8]>> {
        match (&self.file, &self.fixed) {
            (Some(file), _) => Some(file.current()),
            (None, fixed) => fixed.clone(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.file.is_some() || self.fixed.is_some()
    }

    pub fn admits(&self, presented: Option<&[u8]>) -> bool {
        let Some(expected) = self.token() else {
            return true;
        };
        presented.is_some_and(|p| bool::from(p.ct_eq(&expected)))
    }
}

impl TokenFile {
    /// The token in force, re-read if the file changed since it was last looked at.
    fn current(&self) -> Arc<[u8]> {
        {
            let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
            if loaded.checked.elapsed() < RELOAD_INTERVAL {
                return Arc::clone(&loaded.token);
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if loaded.checked.elapsed() >= RELOAD_INTERVAL {
            loaded.checked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != loaded.modified {
                match read_token(&self.path) {
                    Ok((token, modified)) => {
                        loaded.token = token;
                        loaded.modified = modified;
                        tracing::info!(path = %self.path.display(), "token file changed; the new token is in force");
                    }
                    // Fail closed on the token we have rather than open on a broken file.
                    Err(e) => {
                        tracing::error!(path = %self.path.display(), error = %e, "token file changed but cannot be used; keeping the previous token")
                    }
                }
            }
        }
        Arc::clone(&loaded.token)
    }
}

fn read_token(path: &Path) -> io::Result<(Arc<[u8]>, Option<SystemTime>)> {
    let modified = std::fs::metadata(path)?.modified().ok();
    let raw = std::fs::read(path)?;
    let token = raw.trim_ascii();
    if token.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("token file {} is empty", path.display()),
        ));
    }
    Ok((token.into(), modified))
}

/// Middleware for every protected route: `Authorization: Bearer <token>`.
pub async fn require_token(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if !auth.admits(presented) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "missing or wrong bearer token",
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_trimmed_and_compared_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let auth = Auth::from_file(&path).unwrap();
        assert!(auth.admits(Some(b"s3cret")));
        assert!(!auth.admits(Some(b"s3cret\n")));
        assert!(!auth.admits(Some(b"s3cre")));
        assert!(!auth.admits(None));
        assert!(Auth::none().admits(None));
        std::fs::write(&path, " \n").unwrap();
        assert!(Auth::from_file(&path).is_err());
    }

    #[test]
    fn a_rotated_token_takes_over_and_a_broken_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "old").unwrap();
        let auth = Auth::from_file(&path).unwrap();
        let file = auth.file.as_ref().unwrap();
        let age = |file: &TokenFile| file.loaded.write().unwrap().checked -= RELOAD_INTERVAL;

        std::fs::write(&path, "new").unwrap();
        file.loaded.write().unwrap().modified = None; // as if the mtime had moved on
        age(file);
        assert!(auth.admits(Some(b"new")) && !auth.admits(Some(b"old")));

        std::fs::write(&path, "").unwrap();
        file.loaded.write().unwrap().modified = None;
        age(file);
        assert!(
            auth.admits(Some(b"new")),
            "an empty file does not open the door or lock it"
        );
    }
}
