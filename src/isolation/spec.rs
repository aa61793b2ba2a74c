//! What an isolated session is made of: the request as the 1.1.1 SDK sends it
//! (`CreateIsolatedSessionRequest`, snake_case, unknown fields ignored), checked and completed
//! with its profile's defaults into a [`Plan`] (which is also what the session's state echoes),
//! and the part of it the session's holder process carries out, a [`HolderSpec`].

use serde::{Deserialize, Serialize};

use crate::process::enter::Placement;

/// Overlays a session may have, at most (the SDK's documented limit, `workspace` included).
pub const MAX_OVERLAYS: usize = 16;
/// Where no mount may go: the session has its own.
const RESERVED: [&str; 3] = ["/proc", "/dev", "/sys"];
/// What the strict profile keeps out of the environment when nothing else is said (globs,
/// without regard to case).
const STRICT_DENIED: [&str; 9] = [
    "*_API_KEY",
    "*_TOKEN",
    "*_SECRET",
    "*_PASSWORD",
    "AWS_*",
    "ALI_*",
    "ALIYUN_*",
    "K8S_*",
    "KUBE_*",
];

#[derive(Debug, Default, Deserialize)]
pub struct CreateRequest {
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    workspace: Option<WorkspaceRequest>,
    #[serde(default)]
    overlays: Option<Vec<OverlayRequest>>,
    #[serde(default)]
    extra_writable: Option<Vec<String>>,
    #[serde(default)]
    binds: Option<Vec<BindRequest>>,
    #[serde(default)]
    share_net: Option<bool>,
    #[serde(default)]
    env_passthrough: Option<EnvRequest>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    uid_mode: Option<String>,
    #[serde(default)]
    idle_timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct WorkspaceRequest {
    path: String,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OverlayRequest {
    path: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    persist: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct BindRequest {
    source: String,
    #[serde(default)]
    dest: Option<String>,
    #[serde(default)]
    readonly: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct EnvRequest {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    keys: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Overlay workspaces, a private `/tmp`, secrets-looking variables kept out.
    Strict,
    /// Read-write workspaces, the sandbox's `/tmp`, every variable passed.
    Balanced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Writes go to a layer of the session's; the sandbox's directory is untouched.
    Overlay,
    /// The sandbox's directory itself, writable.
    Rw,
    /// The sandbox's directory, read-only.
    Ro,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UidMode {
    /// The session's processes run with the real uid and gid.
    Setpriv,
    /// ... in a user namespace of the session's that maps the uid and gid to themselves.
    Userns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvMode {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workspace {
    pub path: String,
    pub mode: Mode,
}

#[derive(Debug, Clone, Serialize)]
pub struct Overlay {
    pub path: String,
    pub mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persist: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bind {
    pub source: String,
    pub dest: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnvPassthrough {
    pub mode: EnvMode,
    pub keys: Vec<String>,
}

/// A checked session request with every default filled in: what the session is, as its state
/// echoes it (`uid` and `gid` are filled in once resolved in the sandbox).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub profile: Profile,
    /// Only for a session made from `workspace` alone, as the SDK expects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<Workspace>,
    pub overlays: Vec<Overlay>,
    pub extra_writable: Vec<String>,
    pub binds: Vec<Bind>,
    pub share_net: bool,
    pub env_passthrough: EnvPassthrough,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub uid_mode: UidMode,
    pub idle_timeout_seconds: u64,
}

/// What a request is checked against.
pub struct Limits<'a> {
    /// Directories whose subtrees `binds` and `extra_writable` may come from.
    pub writable: &'a [String],
    /// `idle_timeout_seconds` when the request has none.
    pub default_idle_seconds: u64,
}

impl Plan {
    /// Checks `request` and fills in its profile's defaults; the error is the client's (400).
    pub fn new(request: CreateRequest, limits: &Limits) -> Result<Plan, String> {
        let profile = match request.profile.as_deref() {
            None | Some("strict") => Profile::Strict,
            Some("balanced") => Profile::Balanced,
            Some(other) => {
                return Err(format!("profile {other:?} is not strict or balanced"));
            }
        };
        let mut overlays = Vec::new();
        let mut workspace = None;
        if let Some(w) = &request.workspace {
            let mode = match w.mode.as_deref() {
                None => match profile {
                    Profile::Strict => Mode::Overlay,
                    Profile::Balanced => Mode::Rw,
                },
                Some(m) => mode(m)?,
            };
            workspace = Some(Workspace {
                path: clean_path(&w.path, "workspace.path")?,
                mode,
            });
            overlays.push(Overlay {
                path: clean_path(&w.path, "workspace.path")?,
                mode,
                persist: (mode == Mode::Overlay).then_some(true),
            });
        }
        for o in request.overlays.iter().flatten() {
            let mode = o.mode.as_deref().map_or(Ok(Mode::Overlay), mode)?;
            let persist = match (mode, o.persist) {
                (Mode::Overlay, persist) => Some(persist.unwrap_or(true)),
                (_, None) => None,
                (_, Some(_)) => {
                    return Err(format!(
                        "overlay {}: persist applies to mode overlay only",
                        o.path
                    ));
                }
            };
            overlays.push(Overlay {
                path: clean_path(&o.path, "overlays.path")?,
                mode,
                persist,
            });
        }
        if overlays.is_empty() {
            return Err("a session needs workspace or overlays".into());
        }
        if overlays.len() > MAX_OVERLAYS {
            return Err(format!(
                "{} overlays; a session may have at most {MAX_OVERLAYS}",
                overlays.len()
            ));
        }
        // `workspace` is echoed only when it is the session's one overlay.
        if overlays.len() > 1 {
            workspace = None;
        }
        let within_allowed = |path: &str, what: &str| -> Result<(), String> {
            if limits.writable.iter().any(|dir| is_within(path, dir)) {
                Ok(())
            } else if limits.writable.is_empty() {
                Err(format!(
                    "{what} {path} is not allowed: no directory may be bound into sessions (--exec-isolation-writable)"
                ))
            } else {
                Err(format!(
                    "{what} {path} is outside the directories sessions may bind ({}; --exec-isolation-writable)",
                    limits.writable.join(", ")
                ))
            }
        };
        let mut extra_writable = Vec::new();
        for path in request.extra_writable.iter().flatten() {
            let path = clean_path(path, "extra_writable")?;
            within_allowed(&path, "extra_writable")?;
            extra_writable.push(path);
        }
        let mut binds = Vec::new();
        for b in request.binds.iter().flatten() {
            let source = clean_path(&b.source, "binds.source")?;
            within_allowed(&source, "binds.source")?;
            let dest = match &b.dest {
                Some(d) => clean_path(d, "binds.dest")?,
                None => source.clone(),
            };
            if dest == "/" {
                return Err("binds.dest may not be /".into());
            }
            binds.push(Bind {
                source,
                dest,
                readonly: b.readonly.unwrap_or(false),
            });
        }
        let dests: Vec<&str> = overlays
            .iter()
            .map(|o| o.path.as_str())
            .chain(extra_writable.iter().map(String::as_str))
            .chain(binds.iter().map(|b| b.dest.as_str()))
            .collect();
        for (i, dest) in dests.iter().enumerate() {
            if dests[..i].contains(dest) {
                return Err(format!("{dest} is mounted twice in one session"));
            }
            if let Some(reserved) = RESERVED.iter().find(|r| is_within(dest, r)) {
                return Err(format!(
                    "{dest}: the session has its own {reserved}; nothing may be mounted there"
                ));
            }
        }
        let env_passthrough = match &request.env_passthrough {
            None => EnvPassthrough {
                mode: EnvMode::Deny,
                keys: Vec::new(),
            },
            Some(e) => EnvPassthrough {
                mode: match e.mode.as_deref() {
                    None | Some("deny") => EnvMode::Deny,
                    Some("allow") => EnvMode::Allow,
                    Some(other) => {
                        return Err(format!(
                            "env_passthrough.mode {other:?} is not allow or deny"
                        ));
                    }
                },
                keys: e.keys.clone().unwrap_or_default(),
            },
        };
        let uid_mode = match request.uid_mode.as_deref() {
            None | Some("setpriv") => UidMode::Setpriv,
            Some("userns") => UidMode::Userns,
            Some(other) => return Err(format!("uid_mode {other:?} is not setpriv or userns")),
        };
        for (name, id) in [("uid", request.uid), ("gid", request.gid)] {
            if id == Some(u32::MAX) {
                return Err(format!("{name} {} is not an id", u32::MAX));
            }
        }
        Ok(Plan {
            profile,
            workspace,
            overlays,
            extra_writable,
            binds,
            share_net: request.share_net.unwrap_or(true),
            env_passthrough,
            uid: request.uid,
            gid: request.gid,
            uid_mode,
            idle_timeout_seconds: request
                .idle_timeout_seconds
                .unwrap_or(limits.default_idle_seconds),
        })
    }

    /// The mounts the holder makes, shallow first (an overlay of `/` first of all).
    pub fn mounts(&self) -> Vec<MountSpec> {
        let mut mounts: Vec<MountSpec> = self
            .overlays
            .iter()
            .map(|o| match o.mode {
                Mode::Overlay => MountSpec::Overlay {
                    path: o.path.clone(),
                    persist: o.persist.unwrap_or(true),
                },
                Mode::Rw | Mode::Ro => MountSpec::Bind {
                    source: o.path.clone(),
                    dest: o.path.clone(),
                    readonly: o.mode == Mode::Ro,
                },
            })
            .chain(self.extra_writable.iter().map(|p| MountSpec::Bind {
                source: p.clone(),
                dest: p.clone(),
                readonly: false,
            }))
            .chain(self.binds.iter().map(|b| MountSpec::Bind {
                source: b.source.clone(),
                dest: b.dest.clone(),
                readonly: b.readonly,
            }))
            .collect();
        mounts.sort_by_key(|m| depth(m.dest()));
        mounts
    }

    /// Whether the environment variable `name` goes into the session.
    pub fn passes(&self, name: &str) -> bool {
        let listed = self
            .env_passthrough
            .keys
            .iter()
            .any(|k| glob_matches(k, name, false));
        match self.env_passthrough.mode {
            EnvMode::Allow => listed,
            EnvMode::Deny => {
                let secret = self.profile == Profile::Strict
                    && STRICT_DENIED.iter().any(|k| glob_matches(k, name, true));
                !listed && !secret
            }
        }
    }

    /// The paths the session's file routes may reach: its overlays, binds and extras.
    pub fn file_roots(&self) -> Vec<String> {
        self.mounts().iter().map(|m| m.dest().to_string()).collect()
    }

    /// Where a run starts when it names no directory: the first overlay.
    pub fn default_cwd(&self) -> &str {
        &self.overlays[0].path
    }
}

/// One mount of a session, as the holder makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum MountSpec {
    /// An overlay of the sandbox's `path`, its upper layer in the layers' directory when
    /// `persist`, else in a tmpfs of the session's.
    Overlay { path: String, persist: bool },
    /// The sandbox's `source` at `dest`.
    Bind {
        source: String,
        dest: String,
        readonly: bool,
    },
}

impl MountSpec {
    pub fn dest(&self) -> &str {
        match self {
            MountSpec::Overlay { path, .. } => path,
            MountSpec::Bind { dest, .. } => dest,
        }
    }
}

/// What the holder of one session is asked to do (`sandlet isolate <json>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HolderSpec {
    pub session: String,
    /// The main container to enter first (sidecar mode).
    pub placement: Option<Placement>,
    pub share_net: bool,
    pub private_tmp: bool,
    /// The uid and gid a user namespace of the session's maps to themselves (uid_mode userns).
    pub userns: Option<(u32, u32)>,
    pub mounts: Vec<MountSpec>,
    /// Who gets the directories made for the session (missing overlay paths).
    pub owner: Option<(u32, u32)>,
    /// The directory of persistent upper layers, in the sandbox.
    pub upper_root: String,
    /// Directories of the sandbox the session must not see (the layers' directory, sandlet's
    /// own data): covered by an empty read-only tmpfs.
    pub hidden: Vec<String>,
    /// Sessions alive: layers of any other found in the layers' directory are removed.
    pub live: Vec<String>,
    /// Only try whether sessions can be made here, and say so.
    #[serde(default)]
    pub probe: bool,
}

impl HolderSpec {
    /// The directory of this session's persistent layers, in the sandbox.
    pub fn session_dir(&self) -> String {
        session_dir(&self.upper_root, &self.session)
    }

    /// The directory of mount `index`'s persistent layer (`upper`, `work`), in the sandbox.
    pub fn layer_dir(&self, index: usize) -> String {
        format!("{}/{index}", self.session_dir())
    }
}

/// Where a session's persistent layers are, in the sandbox.
pub fn session_dir(upper_root: &str, session: &str) -> String {
    format!("{}/sandlet/{session}", upper_root.trim_end_matches('/'))
}

fn mode(m: &str) -> Result<Mode, String> {
    match m {
        "overlay" => Ok(Mode::Overlay),
        "rw" => Ok(Mode::Rw),
        "ro" => Ok(Mode::Ro),
        other => Err(format!("mode {other:?} is not rw, overlay or ro")),
    }
}

/// An absolute path without `.`, `..`, empty segments or a trailing slash, as sent.
fn clean_path(path: &str, what: &str) -> Result<String, String> {
    let clean = path == "/"
        || (path.starts_with('/')
            && !path.ends_with('/')
            && path[1..]
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != ".."));
    if !clean || path.contains('\0') {
        return Err(format!(
            "{what} {path:?} is not a clean absolute path (no trailing slash, `.`, `..` or `//`)"
        ));
    }
    Ok(path.to_string())
}

/// Whether `path` is `dir` or below it.
pub fn is_within(path: &str, dir: &str) -> bool {
    dir == "/"
        || path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn depth(path: &str) -> usize {
    path.split('/').filter(|s| !s.is_empty()).count()
}

/// A glob with `*` only.
fn glob_matches(pattern: &str, name: &str, ignore_case: bool) -> bool {
    let (pattern, name) = if ignore_case {
        (pattern.to_ascii_uppercase(), name.to_ascii_uppercase())
    } else {
        (pattern.to_string(), name.to_string())
    };
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name.as_str();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(after) = rest.strip_prefix(part) else {
                return false;
            };
            rest = after;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: serde_json::Value) -> Result<Plan, String> {
        let writable = ["/data".to_string()];
        Plan::new(
            serde_json::from_value(json).unwrap(),
            &Limits {
                writable: &writable,
                default_idle_seconds: 1800,
            },
        )
    }

    #[test]
    fn profiles_fill_in_the_defaults_and_workspace_comes_first() {
        let p = plan(serde_json::json!({"workspace": {"path": "/ws"}})).unwrap();
        assert_eq!(p.profile, Profile::Strict);
        assert_eq!(p.overlays[0].mode, Mode::Overlay);
        assert_eq!(p.overlays[0].persist, Some(true));
        assert!(p.workspace.is_some() && p.share_net);
        assert_eq!(p.idle_timeout_seconds, 1800);
        let p = plan(serde_json::json!({
            "profile": "balanced", "workspace": {"path": "/ws"},
            "overlays": [{"path": "/", "persist": false}, {"path": "/ws/deep/er", "mode": "ro"}],
            "idle_timeout_seconds": 0
        }))
        .unwrap();
        assert_eq!(p.overlays[0].mode, Mode::Rw, "balanced workspaces are rw");
        assert!(p.workspace.is_none(), "echoed only for a single overlay");
        assert_eq!(p.idle_timeout_seconds, 0);
        let dests: Vec<String> = p.mounts().iter().map(|m| m.dest().to_string()).collect();
        assert_eq!(dests, ["/", "/ws", "/ws/deep/er"], "shallow first");
        assert_eq!(p.default_cwd(), "/ws");
    }

    #[test]
    fn bad_requests_are_named() {
        for (json, says) in [
            (serde_json::json!({}), "workspace or overlays"),
            (
                serde_json::json!({"workspace": {"path": "ws"}}),
                "clean absolute",
            ),
            (
                serde_json::json!({"workspace": {"path": "/ws/../etc"}}),
                "clean absolute",
            ),
            (
                serde_json::json!({"workspace": {"path": "/ws/"}}),
                "clean absolute",
            ),
            (
                serde_json::json!({"workspace": {"path": "/ws", "mode": "cow"}}),
                "rw, overlay or ro",
            ),
            (
                serde_json::json!({"overlays": [{"path": "/a", "mode": "rw", "persist": true}]}),
                "persist",
            ),
            (
                serde_json::json!({"overlays": [{"path": "/a"}, {"path": "/a"}]}),
                "twice",
            ),
            (
                serde_json::json!({"overlays": [{"path": "/proc/x"}]}),
                "own /proc",
            ),
            (
                serde_json::json!({"workspace": {"path": "/ws"}, "binds": [{"source": "/etc"}]}),
                "outside",
            ),
            (
                serde_json::json!({"workspace": {"path": "/ws"}, "extra_writable": ["/datax"]}),
                "outside",
            ),
            (
                serde_json::json!({"workspace": {"path": "/ws"}, "profile": "lax"}),
                "strict or balanced",
            ),
            (
                serde_json::json!({"workspace": {"path": "/ws"}, "uid_mode": "sudo"}),
                "setpriv or userns",
            ),
            (
                serde_json::json!({"workspace": {"path": "/ws"}, "uid": 4294967295u32}),
                "not an id",
            ),
        ] {
            let e = plan(json.clone()).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
        let too_many: Vec<_> = (0..17)
            .map(|i| serde_json::json!({"path": format!("/o{i}")}))
            .collect();
        assert!(
            plan(serde_json::json!({"overlays": too_many}))
                .unwrap_err()
                .contains("at most 16")
        );
        let ok = plan(serde_json::json!({"workspace": {"path": "/ws"},
            "binds": [{"source": "/data/in", "dest": "/in", "readonly": true}], "extra_writable": ["/data"]}))
        .unwrap();
        assert_eq!(ok.binds[0].dest, "/in");
    }

    #[test]
    fn the_environment_passes_by_profile_and_keys() {
        let strict = plan(serde_json::json!({"workspace": {"path": "/ws"}})).unwrap();
        assert!(strict.passes("PATH"));
        assert!(!strict.passes("OPENAI_API_KEY") && !strict.passes("aws_region"));
        let balanced = plan(
            serde_json::json!({"workspace": {"path": "/ws"}, "profile": "balanced",
            "env_passthrough": {"mode": "deny", "keys": ["SECRET_*"]}}),
        )
        .unwrap();
        assert!(balanced.passes("OPENAI_API_KEY") && !balanced.passes("SECRET_X"));
        let allow = plan(serde_json::json!({"workspace": {"path": "/ws"},
            "env_passthrough": {"mode": "allow", "keys": ["PATH", "LC_*"]}}))
        .unwrap();
        assert!(allow.passes("PATH") && allow.passes("LC_ALL") && !allow.passes("HOME"));
        assert!(glob_matches("a*b*c", "aXXbYc", false) && !glob_matches("a*b", "ab_", false));
    }
}
