//! Command line and environment. The Go task-executor's flags and variables keep working,
//! including Go's single-dash long flags (`-listen-addr=...`) and running without a subcommand,
//! so existing Pool templates can exec sandlet in its place.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "sandlet",
    version,
    about = "In-sandbox agent for OpenSandbox: the task executor's API (port 5758) and execd's exec API (port 44772) in one binary"
)]
// A flag given twice takes its last value (a wrapper script can append to a Pool's arguments).
#[command(args_conflicts_with_subcommands = true, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// (The internal `shim` role is dispatched before this parser runs; see `main.rs`.)
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Serve the task API (5758) and the exec API (44772); the default without a subcommand.
    #[command(args_override_self = true)]
    Serve(ServeArgs),
    /// Locate the pod's main container as sidecar mode would, print it as JSON, and exit:
    /// a check of a pod's setup (shareProcessNamespace, capabilities, the marker).
    Target(TargetArgs),
    /// Copy this binary to a path and exit: how an init container puts sandlet into a shared
    /// volume for the in-container placement (the image has no shell and no `cp`).
    Install(InstallArgs),
}

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Where the executable goes (its directory must exist); replaced atomically.
    pub destination: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Value of the SANDBOX_MAIN_CONTAINER marker that identifies the main container.
    #[arg(long, env = "MAIN_CONTAINER_NAME", default_value = "main")]
    pub main_container_name: String,
    /// Ignore the marker: take the one container other than sandlet's and the pause container.
    #[arg(long)]
    pub other_container: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    // --- the task API (OpenSandbox task-executor)
    /// Address of the task API, or `off`.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:5758", value_parser = listen,
          help_heading = "Task API (port 5758)")]
    pub listen_addr: Listen,
    /// Where task records and output live.
    #[arg(
        long,
        env = "DATA_DIR",
        default_value = "/var/lib/sandbox/tasks",
        help_heading = "Task API (port 5758)"
    )]
    pub data_dir: PathBuf,
    /// File holding the bearer token required on every task API route but /health and /ready.
    #[arg(
        long,
        env = "SANDLET_TOKEN_FILE",
        help_heading = "Task API (port 5758)"
    )]
    pub token_file: Option<PathBuf>,
    /// Tasks not yet ended, at most.
    #[arg(
        long,
        env = "SANDLET_MAX_ACTIVE_TASKS",
        default_value_t = 64,
        help_heading = "Task API (port 5758)"
    )]
    pub max_active_tasks: usize,
    /// Tasks kept, ended ones included, at most.
    #[arg(
        long,
        env = "SANDLET_MAX_TASKS",
        default_value_t = 1024,
        help_heading = "Task API (port 5758)"
    )]
    pub max_tasks: usize,
    /// Seconds between SIGTERM and SIGKILL when a task's process tree is stopped.
    #[arg(long, env = "SANDLET_STOP_GRACE_SECONDS", default_value_t = 10, value_parser = seconds,
          help_heading = "Task API (port 5758)")]
    pub stop_grace_seconds: u64,
    /// Output kept per task and stream: the newest, between half and all of this.
    #[arg(long, env = "SANDLET_TASK_LOG_LIMIT_BYTES", default_value = "16MiB", value_parser = bytes,
          help_heading = "Task API (port 5758)")]
    pub task_log_limit_bytes: u64,

    // --- the exec API (OpenSandbox execd)
    /// Address of the exec API (execd's wire protocol), or `off`.
    #[arg(long, env = "SANDLET_EXEC_LISTEN_ADDR", default_value = "0.0.0.0:44772", value_parser = listen,
          help_heading = "Exec API (port 44772)")]
    pub exec_listen_addr: Listen,
    /// File holding the exec API's access token (`X-EXECD-ACCESS-TOKEN`), re-read when it
    /// changes. `EXECD_ACCESS_TOKEN` (a value) is honoured when no file is given.
    #[arg(
        long,
        env = "SANDLET_EXEC_TOKEN_FILE",
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_token_file: Option<PathBuf>,
    /// Where commands keep their output and records (default: the data dir's path + `-exec`).
    #[arg(
        long,
        env = "SANDLET_EXEC_DATA_DIR",
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_data_dir: Option<PathBuf>,
    /// Commands and session runs running at once, at most.
    #[arg(
        long,
        env = "SANDLET_EXEC_MAX_RUNNING",
        default_value_t = 256,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_max_running: usize,
    /// Finished command records (and background output) kept, at most; the oldest go first,
    /// even before `--exec-keep-seconds`.
    #[arg(
        long,
        env = "SANDLET_EXEC_KEEP_FINISHED",
        default_value_t = 4096,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_keep_finished: usize,
    /// Seconds a finished command's record and output are kept (execd 1.1: at least a day).
    #[arg(long, env = "SANDLET_EXEC_KEEP_SECONDS", default_value_t = 86400, value_parser = seconds,
          help_heading = "Exec API (port 44772)")]
    pub exec_keep_seconds: u64,
    /// The file of variables every command, session and PTY shell starts with, by its path in
    /// the sandbox (its path goes into their environment as `EXECD_ENVS`, so they can add to
    /// it, as the SDK's `set_env` does), or `off`.
    #[arg(
        long,
        env = "EXECD_ENVS",
        default_value = "/opt/opensandbox/.env",
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_envs_file: String,
    /// A background command's output kept (the newest).
    #[arg(long, env = "SANDLET_EXEC_LOG_LIMIT_BYTES", default_value = "16MiB", value_parser = bytes,
          help_heading = "Exec API (port 44772)")]
    pub exec_log_limit_bytes: u64,
    /// Bash sessions at once, at most.
    #[arg(
        long,
        env = "SANDLET_EXEC_MAX_SESSIONS",
        default_value_t = 64,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_max_sessions: usize,
    /// Seconds a bash session may sit unused before it is removed.
    #[arg(long, env = "SANDLET_EXEC_SESSION_IDLE_SECONDS", default_value_t = 86400,
          value_parser = seconds, help_heading = "Exec API (port 44772)")]
    pub exec_session_idle_seconds: u64,
    /// PTY sessions at once, at most (execd has no limit).
    #[arg(
        long,
        env = "SANDLET_EXEC_MAX_PTY_SESSIONS",
        default_value_t = 32,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_max_pty_sessions: usize,
    /// Seconds a PTY session with no client attached may sit before it is removed, its shell
    /// killed (one whose shell exited goes after at most 300 s).
    #[arg(long, env = "SANDLET_EXEC_PTY_IDLE_SECONDS", default_value_t = 1800, value_parser = seconds,
          help_heading = "Exec API (port 44772)")]
    pub exec_pty_idle_seconds: u64,
    /// Largest WebSocket message a PTY client may send (execd has no limit).
    #[arg(long, env = "SANDLET_EXEC_PTY_MAX_MESSAGE_BYTES", default_value = "1MiB", value_parser = bytes,
          help_heading = "Exec API (port 44772)")]
    pub exec_pty_max_message_bytes: u64,
    /// Isolated sessions (`/v1/isolated/session`) at once, at most.
    #[arg(
        long,
        env = "SANDLET_EXEC_ISOLATION_MAX_SESSIONS",
        default_value_t = 16,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_isolation_max_sessions: usize,
    /// Seconds an isolated session may sit without a run before it is destroyed, when its
    /// request says nothing (`idle_timeout_seconds`; 0: never).
    #[arg(long, env = "SANDLET_EXEC_ISOLATION_IDLE_SECONDS", default_value_t = 1800,
          value_parser = seconds, help_heading = "Exec API (port 44772)")]
    pub exec_isolation_idle_seconds: u64,
    /// Where isolated sessions keep persistent overlay layers, by its path in the sandbox: it
    /// must be on a filesystem overlayfs takes as upper (an emptyDir; the OpenSandbox server
    /// mounts one here with `bootstrap.execd.isolation=enable`).
    #[arg(
        long,
        env = "SANDLET_EXEC_ISOLATION_DIR",
        default_value = "/var/lib/execd/isolation",
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_isolation_dir: String,
    /// Directories (comma-separated) whose subtrees isolated sessions may bind (`binds`,
    /// `extra_writable`); none by default.
    #[arg(
        long,
        env = "SANDLET_EXEC_ISOLATION_WRITABLE",
        value_delimiter = ',',
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_isolation_writable: Vec<String>,
    /// What one `/files/upload` request may carry (all its files together).
    #[arg(long, env = "SANDLET_EXEC_MAX_UPLOAD_BYTES", default_value = "16GiB", value_parser = bytes,
          help_heading = "Exec API (port 44772)")]
    pub exec_max_upload_bytes: u64,
    /// Files one `/files/upload` form may carry (more: 413).
    #[arg(
        long,
        env = "SANDLET_EXEC_MAX_UPLOAD_FILES",
        default_value_t = 100_000,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_max_upload_files: usize,
    /// Entries one `/directories/list` or `/files/search` answer may hold.
    #[arg(
        long,
        env = "SANDLET_EXEC_MAX_LISTED",
        default_value_t = 100_000,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_max_listed: usize,
    /// `/directories/list` and `/files/search` walks running at once (each holds a
    /// directory's names per level it is in); more wait for a turn.
    #[arg(
        long,
        env = "SANDLET_EXEC_MAX_WALKS",
        default_value_t = 4,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_max_walks: usize,
    /// Listings and searches waiting for a turn, at most; more get 429.
    #[arg(
        long,
        env = "SANDLET_EXEC_MAX_QUEUED_WALKS",
        default_value_t = 64,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_max_queued_walks: usize,
    /// Largest file `/files/replace` reads, and largest result it writes (both streamed).
    #[arg(long, env = "SANDLET_EXEC_MAX_REPLACE_BYTES", default_value = "64MiB", value_parser = bytes,
          help_heading = "Exec API (port 44772)")]
    pub exec_max_replace_bytes: u64,
    /// `/proxy/{port}/`: seconds an idle upstream connection is kept in the shared pool.
    #[arg(long, env = "SANDLET_EXEC_PROXY_IDLE_SECONDS", default_value_t = 90, value_parser = seconds,
          help_heading = "Exec API (port 44772)")]
    pub exec_proxy_idle_seconds: u64,
    /// `/proxy/{port}/`: idle upstream connections kept per port, at most.
    #[arg(
        long,
        env = "SANDLET_EXEC_PROXY_MAX_IDLE_PER_PORT",
        default_value_t = 32,
        help_heading = "Exec API (port 44772)"
    )]
    pub exec_proxy_max_idle_per_port: usize,
    /// `/proxy/{port}/`: seconds an upstream has to answer with its response headers, counted
    /// from when the request body has been sent in full, before the client gets a 504.
    #[arg(long, env = "SANDLET_EXEC_PROXY_HEADER_TIMEOUT_SECONDS", default_value_t = 300,
          value_parser = seconds, help_heading = "Exec API (port 44772)")]
    pub exec_proxy_header_timeout_seconds: u64,

    // --- code interpreting (execd's /code, on Jupyter)
    /// Jupyter server for `/code` (execd's flag), e.g. `http://127.0.0.1:44771`. Without it,
    /// sandlet starts one on demand where Jupyter is installed.
    #[arg(long, env = "JUPYTER_HOST", help_heading = "Code interpreting")]
    pub jupyter_host: Option<String>,
    /// Token of the `--jupyter-host` server (execd's flag).
    #[arg(
        long,
        env = "JUPYTER_TOKEN",
        hide_env_values = true,
        help_heading = "Code interpreting"
    )]
    pub jupyter_token: Option<String>,
    /// The program that starts the Jupyter server sandlet manages (a name on the sandbox's
    /// PATH, or a path inside the sandbox).
    #[arg(
        long,
        env = "SANDLET_JUPYTER_COMMAND",
        default_value = "jupyter-server",
        help_heading = "Code interpreting"
    )]
    pub jupyter_command: String,
    /// Port (on 127.0.0.1) of the Jupyter server sandlet manages, the code-interpreter image's.
    #[arg(
        long,
        env = "JUPYTER_PORT",
        default_value_t = 44771,
        help_heading = "Code interpreting"
    )]
    pub jupyter_port: u16,
    /// Seconds a managed Jupyter server has to answer after it was started.
    #[arg(long, env = "SANDLET_JUPYTER_START_TIMEOUT_SECONDS", default_value_t = 60,
          value_parser = seconds, help_heading = "Code interpreting")]
    pub jupyter_start_timeout_seconds: u64,
    /// Code contexts (each a kernel) at once, at most.
    #[arg(
        long,
        env = "SANDLET_CODE_MAX_CONTEXTS",
        default_value_t = 32,
        help_heading = "Code interpreting"
    )]
    pub code_max_contexts: usize,
    /// Seconds a code context may sit unused before it is removed and its kernel shut down.
    #[arg(long, env = "SANDLET_CODE_CONTEXT_IDLE_SECONDS", default_value_t = 3600,
          value_parser = seconds, help_heading = "Code interpreting")]
    pub code_context_idle_seconds: u64,
    /// A code run's deadline in seconds when the request gives none (0: none); past it the
    /// kernel is interrupted (and shut down if that does not stop it within 3 s).
    #[arg(long, env = "SANDLET_CODE_RUN_TIMEOUT_SECONDS", default_value_t = 86400,
          value_parser = seconds, help_heading = "Code interpreting")]
    pub code_run_timeout_seconds: u64,

    // --- where processes run
    /// Run tasks and commands inside the pod's main container (sidecar placement): `true`,
    /// `false`, or unset: sidecar mode when sandlet shares its PID namespace with other
    /// containers (shareProcessNamespace), else next to sandlet.
    #[arg(long, env = "ENABLE_SIDECAR_MODE", num_args = 0..=1, default_missing_value = "true",
          value_parser = parse_go_bool, help_heading = "Sidecar mode")]
    pub enable_sidecar_mode: Option<bool>,
    /// Value of the SANDBOX_MAIN_CONTAINER marker that identifies the main container (when
    /// sidecar mode is not set explicitly, a container without the marker is found too).
    #[arg(
        long,
        env = "MAIN_CONTAINER_NAME",
        default_value = "main",
        help_heading = "Sidecar mode"
    )]
    pub main_container_name: String,
    /// Sidecar mode without the marker: the main container is the one container other than
    /// sandlet's and the pause container.
    #[arg(long, env = "SANDLET_OTHER_CONTAINER", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool, help_heading = "Sidecar mode")]
    pub other_container: bool,

    // --- both APIs
    /// Largest request body accepted (uploads have their own limit).
    #[arg(long, env = "SANDLET_MAX_BODY_BYTES", default_value = "1MiB", value_parser = bytes,
          help_heading = "HTTP (both APIs)")]
    pub max_body_bytes: u64,
    /// Seconds a client has to send a request's head, counted from when the server waits for
    /// it: a connection that trickles its head or sits idle between requests is closed.
    #[arg(long, env = "SANDLET_HTTP_HEADER_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = seconds, help_heading = "HTTP (both APIs)")]
    pub http_header_timeout_seconds: u64,
    /// Connections each API serves at once; more wait to be accepted.
    #[arg(
        long,
        env = "SANDLET_HTTP_MAX_CONNECTIONS",
        default_value_t = 1024,
        help_heading = "HTTP (both APIs)"
    )]
    pub http_max_connections: usize,

    // --- logs
    /// Log format on stderr.
    #[arg(long, env = "SANDLET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text,
          help_heading = "Logging")]
    pub log_format: LogFormat,
    /// Log filter, in RUST_LOG syntax (e.g. `sandlet=debug`).
    #[arg(
        long,
        env = "SANDLET_LOG",
        default_value = "info",
        help_heading = "Logging"
    )]
    pub log_level: String,

    /// Accepted for compatibility with the Go executor; unused (container mode does not exist).
    #[arg(long, env = "CRI_SOCKET", hide = true)]
    pub cri_socket: Option<String>,
    /// Accepted for compatibility with the Go executor; sandlet logs to stderr.
    #[arg(long, hide = true)]
    pub log_dir: Option<String>,
    #[arg(long, hide = true)]
    pub log_max_size: Option<String>,
    #[arg(long, hide = true)]
    pub log_max_backups: Option<String>,
    #[arg(long, hide = true)]
    pub log_max_age: Option<String>,
    /// The exec API's token from `EXECD_ACCESS_TOKEN`, taken out of sandlet's environment at
    /// start (see `main.rs`) so that no process sandlet starts inherits it.
    #[arg(skip)]
    pub exec_token_from_env: Option<String>,
}

/// Where an API listens: an address, or `off` (the API is not served).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn listen(s: &str) -> Result<Listen, String> {
    match s {
        "off" | "none" => Ok(Listen(None)),
        _ => s
            .parse()
            .map(|a| Listen(Some(a)))
            .map_err(|e| format!("{s:?} is neither an address (host:port) nor `off`: {e}")),
    }
}

/// A size: a number of bytes, or with a unit: `KiB`, `MiB`, `GiB`, `TiB` (also `K`, `M`, `G`,
/// `T`: powers of 1024), or `KB`, `MB`, `GB`, `TB` (powers of 1000).
pub fn bytes(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1048576, 512KiB, 16MiB, 2GiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB)"
            ));
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The largest number of seconds a flag takes (ten years): every such figure is added to the
/// current time somewhere, and a sum past what the clock can represent would panic.
pub const MAX_SECONDS: u64 = 10 * 365 * 86400;

fn seconds(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if n > MAX_SECONDS {
        return Err(format!("{n} is more than {MAX_SECONDS} (ten years)"));
    }
    Ok(n)
}

/// Go's `strconv.ParseBool`, which its flag package uses.
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean")),
    }
}

/// The Go executor's flag names, which Go also accepts with a single dash.
const GO_FLAGS: &[&str] = &[
    "data-dir",
    "listen-addr",
    "cri-socket",
    "enable-sidecar-mode",
    "main-container-name",
    "log-dir",
    "log-max-size",
    "log-max-backups",
    "log-max-age",
];

/// Rewrites `-listen-addr=x` (Go style) to `--listen-addr=x`.
pub fn normalize_go_flags(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .map(|arg| {
            let Some(s) = arg.to_str() else { return arg };
            let Some(rest) = s.strip_prefix('-').filter(|r| !r.starts_with('-')) else {
                return arg;
            };
            let name = rest.split('=').next().unwrap_or_default();
            if GO_FLAGS.contains(&name) {
                format!("-{s}").into()
            } else {
                arg
            }
        })
        .collect()
}

impl Cli {
    pub fn parse_args() -> Cli {
        Cli::parse_from(normalize_go_flags(std::env::args_os()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(normalize_go_flags(args.iter().map(OsString::from))).unwrap();
        match cli.command {
            Some(Command::Serve(a)) => a,
            None => cli.serve,
            Some(other) => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn go_style_flags_work_without_subcommand() {
        let a = parse(&[
            "task-executor",
            "-listen-addr=127.0.0.1:9",
            "-data-dir",
            "/d",
            "-enable-sidecar-mode",
        ]);
        assert_eq!(a.listen_addr, Listen(Some("127.0.0.1:9".parse().unwrap())));
        assert_eq!(a.data_dir, PathBuf::from("/d"));
        assert_eq!(a.enable_sidecar_mode, Some(true));
        let b = parse(&[
            "sandlet",
            "serve",
            "--enable-sidecar-mode=false",
            "--max-active-tasks",
            "3",
        ]);
        assert_eq!(b.enable_sidecar_mode, Some(false));
        assert_eq!(b.max_active_tasks, 3);
    }

    #[test]
    fn sizes_and_switched_off_apis() {
        assert_eq!(bytes("1048576"), Ok(1 << 20));
        assert_eq!(bytes("16MiB"), Ok(16 << 20));
        assert_eq!(bytes("16m"), Ok(16 << 20));
        assert_eq!(bytes("2 GiB"), Ok(2 << 30));
        assert_eq!(bytes("5KB"), Ok(5000));
        for bad in ["", "MiB", "1.5MiB", "-1", "12 parsecs", "99999999999TiB"] {
            assert!(bytes(bad).is_err(), "{bad}");
        }
        let a = parse(&["sandlet", "serve", "--exec-listen-addr", "off"]);
        assert_eq!(a.exec_listen_addr, Listen(None));
        assert!(a.listen_addr.0.is_some());
    }
}
