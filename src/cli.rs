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
    about = "In-sandbox agent: OpenSandbox task executor (and exec API) in one binary"
)]
#[command(args_conflicts_with_subcommands = true)]
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
    /// Serve the task API (the default when no subcommand is given).
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
    /// Where task records and output live.
    #[arg(long, env = "DATA_DIR", default_value = "/var/lib/sandbox/tasks")]
    pub data_dir: PathBuf,
    /// Address of the task API.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:5758")]
    pub listen_addr: SocketAddr,
    /// Run tasks inside the main container of the pod (sidecar placement).
    #[arg(long, env = "ENABLE_SIDECAR_MODE", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub enable_sidecar_mode: bool,
    /// Value of the SANDBOX_MAIN_CONTAINER marker that identifies the main container.
    #[arg(long, env = "MAIN_CONTAINER_NAME", default_value = "main")]
    pub main_container_name: String,
    /// Sidecar mode without the marker: the main container is the one container other than
    /// sandlet's and the pause container.
    #[arg(long, env = "SANDLET_OTHER_CONTAINER", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub other_container: bool,
    /// Address of the exec API (execd's wire protocol).
    #[arg(
        long,
        env = "SANDLET_EXEC_LISTEN_ADDR",
        default_value = "0.0.0.0:44772"
    )]
    pub exec_listen_addr: SocketAddr,
    /// Where commands keep their output and records (default: the data dir's path + `-exec`).
    #[arg(long, env = "SANDLET_EXEC_DATA_DIR")]
    pub exec_data_dir: Option<PathBuf>,
    /// File holding the exec API's access token (`X-EXECD-ACCESS-TOKEN`), re-read when it
    /// changes. `EXECD_ACCESS_TOKEN` (a value) is honoured when no file is given.
    #[arg(long, env = "SANDLET_EXEC_TOKEN_FILE")]
    pub exec_token_file: Option<PathBuf>,
    /// Commands and session runs running at once, at most.
    #[arg(long, env = "SANDLET_EXEC_MAX_RUNNING", default_value_t = 256)]
    pub exec_max_running: usize,
    /// Finished command records (and background output) kept, at most.
    #[arg(long, env = "SANDLET_EXEC_KEEP_FINISHED", default_value_t = 256)]
    pub exec_keep_finished: usize,
    /// How long a finished command's record and output are kept, in seconds.
    #[arg(long, env = "SANDLET_EXEC_KEEP_SECONDS", default_value_t = 3600, value_parser = seconds)]
    pub exec_keep_seconds: u64,
    /// Bytes of a background command's output kept (the newest).
    #[arg(long, env = "SANDLET_EXEC_LOG_LIMIT_BYTES", default_value_t = 16 << 20)]
    pub exec_log_limit_bytes: u64,
    /// Bash sessions at once, at most.
    #[arg(long, env = "SANDLET_EXEC_MAX_SESSIONS", default_value_t = 64)]
    pub exec_max_sessions: usize,
    /// Seconds a bash session may sit unused before it is removed.
    #[arg(
        long,
        env = "SANDLET_EXEC_SESSION_IDLE_SECONDS",
        default_value_t = 86400,
        value_parser = seconds)]
    pub exec_session_idle_seconds: u64,
    /// Bytes one `/files/upload` request may carry (all its files together).
    #[arg(long, env = "SANDLET_EXEC_MAX_UPLOAD_BYTES", default_value_t = 16 << 30)]
    pub exec_max_upload_bytes: u64,
    /// Entries one `/directories/list` or `/files/search` answer may hold.
    #[arg(long, env = "SANDLET_EXEC_MAX_LISTED", default_value_t = 100_000)]
    pub exec_max_listed: usize,
    /// Largest file `/files/replace` rewrites (it is read into memory).
    #[arg(long, env = "SANDLET_EXEC_MAX_REPLACE_BYTES", default_value_t = 64 << 20)]
    pub exec_max_replace_bytes: u64,
    /// `/proxy/{port}/`: seconds an idle upstream connection is kept in the shared pool.
    #[arg(long, env = "SANDLET_EXEC_PROXY_IDLE_SECONDS", default_value_t = 90, value_parser = seconds)]
    pub exec_proxy_idle_seconds: u64,
    /// `/proxy/{port}/`: idle upstream connections kept per port, at most.
    #[arg(
        long,
        env = "SANDLET_EXEC_PROXY_MAX_IDLE_PER_PORT",
        default_value_t = 32
    )]
    pub exec_proxy_max_idle_per_port: usize,
    /// `/proxy/{port}/`: seconds an upstream has to answer with its response headers, counted
    /// from when the request body has been sent in full, before the client gets a 504.
    #[arg(
        long,
        env = "SANDLET_EXEC_PROXY_HEADER_TIMEOUT_SECONDS",
        default_value_t = 300,
        value_parser = seconds)]
    pub exec_proxy_header_timeout_seconds: u64,
    /// PTY sessions at once, at most (execd has no limit).
    #[arg(long, env = "SANDLET_EXEC_MAX_PTY_SESSIONS", default_value_t = 32)]
    pub exec_max_pty_sessions: usize,
    /// Seconds a PTY session with no client attached may sit before it is removed, its shell
    /// killed (one whose shell exited goes after at most 300 s).
    #[arg(long, env = "SANDLET_EXEC_PTY_IDLE_SECONDS", default_value_t = 1800, value_parser = seconds)]
    pub exec_pty_idle_seconds: u64,
    /// Largest WebSocket message a PTY client may send, in bytes (execd has no limit).
    #[arg(long, env = "SANDLET_EXEC_PTY_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub exec_pty_max_message_bytes: usize,
    /// File holding the bearer token required on every route but /health.
    #[arg(long, env = "SANDLET_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Tasks not yet ended, at most.
    #[arg(long, env = "SANDLET_MAX_ACTIVE_TASKS", default_value_t = 64)]
    pub max_active_tasks: usize,
    /// Tasks kept, ended ones included, at most.
    #[arg(long, env = "SANDLET_MAX_TASKS", default_value_t = 1024)]
    pub max_tasks: usize,
    /// Seconds between SIGTERM and SIGKILL when a task's process tree is stopped.
    #[arg(long, env = "SANDLET_STOP_GRACE_SECONDS", default_value_t = 10, value_parser = seconds)]
    pub stop_grace_seconds: u64,
    /// Bytes of stdout (and of stderr) kept per task: the newest output, between half and all of this.
    #[arg(long, env = "SANDLET_TASK_LOG_LIMIT_BYTES", default_value_t = 16 << 20)]
    pub task_log_limit_bytes: u64,
    /// Largest request body accepted.
    #[arg(long, env = "SANDLET_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a client has to send a request's head, counted from when the server waits for
    /// it: a connection that trickles its head or sits idle between requests is closed.
    #[arg(
        long,
        env = "SANDLET_HTTP_HEADER_TIMEOUT_SECONDS",
        default_value_t = 30,
        value_parser = seconds
    )]
    pub http_header_timeout_seconds: u64,
    /// Connections each API serves at once; more wait to be accepted.
    #[arg(long, env = "SANDLET_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,
    /// Log format on stderr.
    #[arg(long, env = "SANDLET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, in RUST_LOG syntax.
    #[arg(long, env = "SANDLET_LOG", default_value = "info")]
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
        assert_eq!(a.listen_addr.to_string(), "127.0.0.1:9");
        assert_eq!(a.data_dir, PathBuf::from("/d"));
        assert!(a.enable_sidecar_mode);
        let b = parse(&[
            "sandlet",
            "serve",
            "--enable-sidecar-mode=false",
            "--max-active-tasks",
            "3",
        ]);
        assert!(!b.enable_sidecar_mode);
        assert_eq!(b.max_active_tasks, 3);
    }
}
