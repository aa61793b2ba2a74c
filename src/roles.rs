//! sandlet in the places OpenSandbox's server puts execd: started under the name `execd` it
//! takes execd's flags and serves only the exec API; started as `bootstrap.sh` it is the
//! sandbox container's entrypoint wrapper, which starts `execd` and then the sandbox's own
//! command. The server's execd image copies both files from its working directory into each
//! sandbox (see `docs/opensandbox-server.md`), so one static binary, copied twice, fills both
//! places; the sandbox image needs no shell.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

use clap::Parser;

use crate::cli::{Cli, Command as Subcommand, ServeArgs};

/// The name that selects a role, from `argv[0]`.
pub enum Role {
    Execd,
    Bootstrap,
}

impl Role {
    pub fn of(argv0: &OsString) -> Option<Role> {
        match Path::new(argv0).file_name()?.to_str()? {
            "execd" => Some(Role::Execd),
            "bootstrap.sh" => Some(Role::Bootstrap),
            _ => None,
        }
    }
}

/// execd's command line (Go's flag package: one or two dashes, `-x=v` or `-x v`).
#[derive(Debug, Parser)]
#[command(name = "execd", about = "sandlet in execd's place: the exec API only")]
struct ExecdArgs {
    /// Port of the exec API, on every interface (`SANDLET_EXEC_LISTEN_ADDR` names an address
    /// instead).
    #[arg(long, default_value_t = 44772)]
    port: u16,
    /// The API token; empty: none.
    #[arg(long, env = "EXECD_ACCESS_TOKEN", hide_env_values = true)]
    access_token: Option<String>,
    /// Jupyter server for `/code`.
    #[arg(long, env = "JUPYTER_HOST")]
    jupyter_host: Option<String>,
    #[arg(long, env = "JUPYTER_TOKEN", hide_env_values = true)]
    jupyter_token: Option<String>,
    /// execd's numeric level: 0-3 errors, 4 warnings, 5-6 info, 7 and above debug.
    #[arg(long, default_value_t = 6)]
    log_level: u8,
    /// Accepted for compatibility; sandlet's shutdown has its own grace.
    #[arg(long, hide = true)]
    graceful_shutdown_timeout: Option<String>,
    /// Accepted for compatibility; sandlet does not poll Jupyter.
    #[arg(long, hide = true)]
    jupyter_idle_poll_interval: Option<String>,
}

/// The `serve` arguments of sandlet in execd's place. Settings of sandlet's own (its `SANDLET_*`
/// variables) still apply; execd's flags come on top.
pub fn execd_serve_args(
    args: impl IntoIterator<Item = OsString>,
) -> Result<ServeArgs, clap::Error> {
    let execd = ExecdArgs::try_parse_from(go_style(args))?;
    // Commands' records go where execd put its logs: the temporary directory.
    let exec_dir = std::env::temp_dir().join("sandlet-execd");
    let defaults = [
        "sandlet",
        "serve",
        "--listen-addr",
        "off",
        "--enable-sidecar-mode=false",
    ];
    let cli = Cli::try_parse_from(defaults.map(OsString::from))?;
    let Some(Subcommand::Serve(mut serve)) = cli.command else {
        unreachable!("`serve` was given")
    };
    if std::env::var_os("SANDLET_EXEC_LISTEN_ADDR").is_none() {
        serve.exec_listen_addr.0 = Some(([0, 0, 0, 0], execd.port).into());
    }
    serve.exec_data_dir.get_or_insert(exec_dir);
    serve.exec_token_from_env = execd.access_token.filter(|t| !t.is_empty());
    serve.jupyter_host = execd.jupyter_host.or(serve.jupyter_host);
    serve.jupyter_token = execd.jupyter_token.or(serve.jupyter_token);
    if std::env::var_os("SANDLET_LOG").is_none() {
        serve.log_level = match execd.log_level {
            0..=3 => "error",
            4 => "warn",
            5 | 6 => "info",
            _ => "debug",
        }
        .into();
    }
    Ok(serve)
}

/// Go's flag package takes `-name`; clap wants `--name`.
fn go_style(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .enumerate()
        .map(|(i, arg)| match arg.to_str() {
            Some(s) if i > 0 && s.len() > 2 && s.starts_with('-') && !s.starts_with("--") => {
                format!("-{s}").into()
            }
            _ => arg,
        })
        .collect()
}

/// `bootstrap.sh <command...>`: starts `$EXECD` (default `/opt/opensandbox/execd`) with
/// `EXECD_ENVS` (default `/opt/opensandbox/.env`) in its environment, sources
/// `$EXECD_BOOTSTRAP_PRE_SCRIPT` with `/bin/sh` if one is set, then becomes the command, so the
/// container's main process is the sandbox's own and gets its signals. Without a command, it
/// becomes execd itself.
pub fn bootstrap(args: Vec<OsString>) -> ExitCode {
    let execd = std::env::var_os("EXECD").unwrap_or_else(|| "/opt/opensandbox/execd".into());
    if std::env::var_os("EXECD_ENVS").is_none() {
        // SAFETY: the process is single-threaded until it execs.
        unsafe { std::env::set_var("EXECD_ENVS", "/opt/opensandbox/.env") };
    }
    let Some((program, rest)) = args.split_first() else {
        let error = Command::new(&execd).exec();
        eprintln!(
            "bootstrap.sh: cannot run {}: {error}",
            execd.to_string_lossy()
        );
        return ExitCode::from(127);
    };
    if let Err(e) = Command::new(&execd).spawn() {
        // The sandbox's own command still runs: without execd it is reachable only through the
        // task API, which is better than not at all.
        eprintln!(
            "bootstrap.sh: cannot start {}: {e}",
            execd.to_string_lossy()
        );
    }
    let error = match std::env::var_os("EXECD_BOOTSTRAP_PRE_SCRIPT").filter(|s| !s.is_empty()) {
        Some(_) => Command::new("/bin/sh")
            .args([
                "-c",
                ". \"$EXECD_BOOTSTRAP_PRE_SCRIPT\" && exec \"$@\"",
                "bootstrap.sh",
            ])
            .arg(program)
            .args(rest)
            .exec(),
        None => Command::new(program).args(rest).exec(),
    };
    eprintln!(
        "bootstrap.sh: cannot run {}: {error}",
        program.to_string_lossy()
    );
    ExitCode::from(127)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        execd_serve_args(args.iter().map(OsString::from)).unwrap()
    }

    #[test]
    fn execd_flags_become_an_exec_api_only_sandlet() {
        let s = serve(&[
            "execd",
            "-port=4321",
            "-access-token",
            "t0k",
            "--log-level=7",
        ]);
        assert_eq!(s.listen_addr.0, None, "no task API");
        assert_eq!(s.exec_listen_addr.0, Some(([0, 0, 0, 0], 4321).into()));
        assert_eq!(s.exec_token_from_env.as_deref(), Some("t0k"));
        assert_eq!(s.enable_sidecar_mode, Some(false));
        let s = serve(&["execd", "--access-token="]);
        assert_eq!(s.exec_listen_addr.0, Some(([0, 0, 0, 0], 44772).into()));
        assert_eq!(s.exec_token_from_env, None, "an empty token is none");
        assert!(execd_serve_args(["execd", "-nonsense"].map(OsString::from)).is_err());
    }

    #[test]
    fn roles_come_from_the_name() {
        assert!(matches!(
            Role::of(&"/opt/opensandbox/execd".into()),
            Some(Role::Execd)
        ));
        assert!(matches!(
            Role::of(&"./bootstrap.sh".into()),
            Some(Role::Bootstrap)
        ));
        assert!(Role::of(&"sandlet".into()).is_none());
    }
}
