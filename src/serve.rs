//! `sandlet serve`: wire the parts together and run until SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::cli::{Listen, ServeArgs};
use crate::container::{Locator, TargetWatch};
use crate::error::Error;
use crate::exec::api::{ExecApi, proxy};
use crate::exec::{self, ExecConfig};
use crate::http::{self, auth::Auth};
use crate::process::{Launcher, Reaper};
use crate::tasks::api::{TaskApi, router};
use crate::tasks::{TaskConfig, TaskManager};

/// How often the exec API's retention limits are applied (they are also applied on insert).
const RETENTION_SWEEP: Duration = Duration::from_secs(30);

/// How long in-flight requests get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub async fn serve(args: ServeArgs) -> Result<(), Error> {
    // Same-uid code in the sandbox must not read our memory (the token) through ptrace or /proc.
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Setup(format!("cannot mark sandlet non-dumpable: {e}")))?;
    if args.other_container && args.enable_sidecar_mode == Some(false) {
        return Err(Error::Config(
            "--other-container only applies in sidecar mode, which --enable-sidecar-mode=false switches off".into(),
        ));
    }
    if args.http_header_timeout_seconds == 0 || args.http_max_connections == 0 {
        return Err(Error::Config(
            "--http-header-timeout-seconds and --http-max-connections must be at least 1".into(),
        ));
    }
    let (Listen(task_addr), Listen(exec_addr)) = (args.listen_addr, args.exec_listen_addr);
    if task_addr.is_none() && exec_addr.is_none() {
        return Err(Error::Config(
            "--listen-addr and --exec-listen-addr are both off: nothing to serve".into(),
        ));
    }

    let reaper = Reaper::install()
        .map_err(|e| Error::Setup(format!("cannot become a child subreaper: {e}")))?;
    let target = placement(&args).map(TargetWatch::new);
    let launcher = Launcher::new(reaper);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let limits = http::ConnectionLimits {
        header_timeout: Duration::from_secs(args.http_header_timeout_seconds),
        max_connections: args.http_max_connections,
    };
    // Each API's router, on its listener: both are bound before either serves, so a port that
    // is taken stops sandlet before it accepts anything.
    let mut apis = Vec::new();
    if let Some(addr) = task_addr {
        let app = task_api(&args, &launcher, target.as_ref(), shutdown.clone())?;
        apis.push(("task", bind(addr, "task API").await?, app));
    }
    if let Some(addr) = exec_addr {
        let app = exec_api(&args, &launcher, target.as_ref(), shutdown.clone())?;
        apis.push(("exec", bind(addr, "exec API").await?, app));
    }
    if let Some(target) = &target {
        tracing::info!(main_container = ?target.current().map(|l| l.target.process).ok(), "sidecar mode");
    }
    let stop_signal = wait_for_signal()?;
    let mut servers = tokio::task::JoinSet::new();
    for (api, listener, app) in apis {
        tracing::info!(
            api,
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "serving"
        );
        let mut stop = shutdown.clone();
        servers.spawn(http::serve(listener, app, limits, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }));
    }
    tokio::select! {
        Some(ended) = servers.join_next() => {
            // A server ends only at shutdown: this one failed.
            ended.map_err(|e| Error::Setup(e.to_string()))??;
        }
        () = stop_signal => {}
    }
    tracing::info!(
        "shutting down: tasks keep running under their shims and are re-adopted at the next start"
    );
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, servers.join_all())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    Ok(())
}

/// Where processes run: in the main container, found by the returned [`Locator`], or (`None`)
/// next to sandlet. Explicit settings win (`--other-container` means sidecar mode too); with
/// none, sandlet is a sidecar exactly when it
/// shares its PID namespace with other containers, and takes the marked container, else the one
/// other container. (The Go executor runs tasks in its own container unless
/// ENABLE_SIDECAR_MODE is set.)
fn placement(args: &ServeArgs) -> Option<Locator> {
    let sidecar = args
        .enable_sidecar_mode
        .unwrap_or_else(|| args.other_container || crate::container::shares_pid_namespace());
    let locator = match (args.other_container, args.enable_sidecar_mode) {
        (true, _) => Locator::OtherContainer,
        (false, Some(true)) => Locator::Marker(args.main_container_name.clone()),
        (false, _) => Locator::MarkedOrOther(args.main_container_name.clone()),
    };
    sidecar.then_some(locator)
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Setup(format!("cannot listen on {addr} ({what}): {e}")))
}

/// The task API: its token, its tasks recovered from the data dir, and in sidecar mode a
/// watch on the main container that stops the tasks of a container that restarted.
fn task_api(
    args: &ServeArgs,
    launcher: &Arc<Launcher>,
    target: Option<&Arc<TargetWatch>>,
    shutdown: watch::Receiver<bool>,
) -> Result<axum::Router, Error> {
    if args.max_active_tasks == 0 || args.max_tasks < args.max_active_tasks {
        return Err(Error::Config(
            "need 0 < --max-active-tasks <= --max-tasks".into(),
        ));
    }
    if args.task_log_limit_bytes < 2 {
        return Err(Error::Config(
            "--task-log-limit-bytes must be at least 2".into(),
        ));
    }
    let auth = match &args.token_file {
        Some(path) => Auth::from_file(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?,
        None => {
            tracing::warn!(
                "no token file (--token-file / SANDLET_TOKEN_FILE): the task API accepts any caller that can reach it"
            );
            Auth::none()
        }
    };
    for (flag, value) in [
        ("-cri-socket", &args.cri_socket),
        ("-log-dir", &args.log_dir),
    ] {
        if value.is_some() {
            tracing::info!(
                flag,
                "accepted for compatibility with the Go executor and ignored"
            );
        }
    }
    let config = TaskConfig {
        data_dir: args.data_dir.clone(),
        max_active: args.max_active_tasks,
        max_tasks: args.max_tasks,
        stop_grace: Duration::from_secs(args.stop_grace_seconds),
        log_limit: args.task_log_limit_bytes,
    };
    let tasks = TaskManager::open(config, Arc::clone(launcher), target.cloned()).map_err(|e| {
        Error::Setup(format!(
            "cannot open the data dir {}: {e}",
            args.data_dir.display()
        ))
    })?;
    if let Some(target) = target {
        let tasks = tasks.clone();
        tokio::spawn(Arc::clone(target).run(move |incarnation| tasks.on_target(incarnation)));
    }
    tracing::info!(
        data_dir = %args.data_dir.display(),
        token = auth.is_enabled(),
        tasks = tasks.list().len(),
        "task API ready"
    );
    Ok(router(
        TaskApi {
            tasks,
            target: target.cloned(),
            shutdown,
        },
        auth,
        args.max_body_bytes,
    ))
}

/// The exec API: its directory cleaned of an earlier run's commands, its token, and a sweeper
/// that applies the retention limits.
fn exec_api(
    args: &ServeArgs,
    launcher: &Arc<Launcher>,
    target: Option<&Arc<TargetWatch>>,
    shutdown: watch::Receiver<bool>,
) -> Result<axum::Router, Error> {
    let data_dir = args.exec_data_dir.clone().unwrap_or_else(|| {
        let mut dir = args.data_dir.clone().into_os_string();
        dir.push("-exec");
        dir.into()
    });
    exec::remove_leftovers(&data_dir);
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        Error::Setup(format!(
            "cannot create the exec data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    let auth = match (&args.exec_token_file, &args.exec_token_from_env) {
        (Some(path), _) => Auth::from_file(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the exec token file {}: {e}",
                path.display()
            ))
        })?,
        (None, Some(token)) if !token.trim().is_empty() => Auth::from_value(token),
        _ => {
            tracing::warn!(
                "no exec API token (--exec-token-file / EXECD_ACCESS_TOKEN): the exec API accepts any caller that can reach it"
            );
            Auth::none()
        }
    };
    if args.exec_max_running == 0
        || args.exec_max_sessions == 0
        || args.exec_max_pty_sessions == 0
        || args.exec_pty_max_message_bytes < 64
        || args.exec_log_limit_bytes < 2
    {
        return Err(Error::Config(
            "--exec-max-running, --exec-max-sessions and --exec-max-pty-sessions must be at least 1, --exec-pty-max-message-bytes at least 64, --exec-log-limit-bytes at least 2"
                .into(),
        ));
    }
    if args.exec_max_walks == 0 || args.exec_max_upload_files == 0 {
        return Err(Error::Config(
            "--exec-max-walks and --exec-max-upload-files must be at least 1".into(),
        ));
    }
    let spool_dir = data_dir.join("uploads");
    std::fs::create_dir_all(&spool_dir).map_err(|e| {
        Error::Setup(format!(
            "cannot create the upload spool dir {}: {e}",
            spool_dir.display()
        ))
    })?;
    let files = crate::files::Files::new(
        target.cloned(),
        crate::files::FilesConfig {
            max_upload_bytes: args.exec_max_upload_bytes,
            max_upload_files: args.exec_max_upload_files,
            max_listed: args.exec_max_listed,
            max_walks: args.exec_max_walks,
            max_queued_walks: args.exec_max_queued_walks,
            max_replace_bytes: args.exec_max_replace_bytes,
            spool_dir,
        },
    );
    if args.exec_proxy_header_timeout_seconds == 0 {
        return Err(Error::Config(
            "--exec-proxy-header-timeout-seconds must be at least 1".into(),
        ));
    }
    let proxy = proxy::Proxy::new(&proxy::ProxyConfig {
        idle: Duration::from_secs(args.exec_proxy_idle_seconds),
        max_idle_per_port: args.exec_proxy_max_idle_per_port,
        header_timeout: Duration::from_secs(args.exec_proxy_header_timeout_seconds),
    });
    let code = code_interpreting(args, launcher, target, &data_dir)?;
    let env_file = exec::EnvFile::new(&args.exec_envs_file)
        .map_err(|e| Error::Config(format!("--exec-envs-file: {e}")))?;
    let config = Arc::new(ExecConfig {
        data_dir,
        max_running: args.exec_max_running,
        keep_finished: args.exec_keep_finished,
        keep_finished_for: Duration::from_secs(args.exec_keep_seconds),
        log_limit: args.exec_log_limit_bytes,
        max_sessions: args.exec_max_sessions,
        session_idle: Duration::from_secs(args.exec_session_idle_seconds),
        max_ptys: args.exec_max_pty_sessions,
        pty_idle: Duration::from_secs(args.exec_pty_idle_seconds),
        env_file,
        running: Default::default(),
    });
    let commands = exec::Commands::new(Arc::clone(&config), Arc::clone(launcher), target.cloned());
    let sessions = exec::Sessions::new(Arc::clone(&config), Arc::clone(launcher), target.cloned());
    let ptys = exec::Ptys::new(Arc::clone(&config), Arc::clone(launcher), target.cloned());
    if args.exec_isolation_max_sessions == 0
        || !args.exec_isolation_dir.starts_with('/')
        || args
            .exec_isolation_writable
            .iter()
            .any(|d| !d.starts_with('/'))
    {
        return Err(Error::Config(
            "--exec-isolation-max-sessions must be at least 1; --exec-isolation-dir and --exec-isolation-writable take absolute paths".into(),
        ));
    }
    let isolation = crate::isolation::Isolation::new(
        Arc::clone(&config),
        crate::isolation::IsolationConfig {
            max_sessions: args.exec_isolation_max_sessions,
            default_idle_seconds: args.exec_isolation_idle_seconds,
            layers_dir: args.exec_isolation_dir.clone(),
            writable: args
                .exec_isolation_writable
                .iter()
                .filter(|d| !d.is_empty())
                .map(|d| d.trim_end_matches('/').to_string())
                .map(|d| if d.is_empty() { "/".into() } else { d })
                .collect(),
            // In sidecar mode sessions are in the main container, which has none of these.
            hidden: if target.is_some() {
                Vec::new()
            } else {
                [&args.data_dir, &config.data_dir]
                    .iter()
                    .filter_map(|d| std::path::absolute(d).ok())
                    .map(|d| d.to_string_lossy().into_owned())
                    .collect()
            },
        },
        Arc::clone(launcher),
        target.cloned(),
        Arc::clone(&commands),
        Arc::clone(&files),
    );
    let (c, s, p, k, i) = (
        Arc::clone(&commands),
        Arc::clone(&sessions),
        Arc::clone(&ptys),
        Arc::clone(&code),
        Arc::clone(&isolation),
    );
    tokio::spawn(async move {
        let mut sweep = tokio::time::interval(RETENTION_SWEEP);
        loop {
            sweep.tick().await;
            c.evict_expired();
            s.evict_idle();
            p.evict_idle();
            k.evict_idle();
            i.evict_idle();
        }
    });
    tracing::info!(token = auth.is_enabled(), "exec API ready");
    Ok(exec::api::router(
        ExecApi {
            commands,
            sessions,
            metrics: exec::Metrics::new(target.cloned()),
            files,
            ptys,
            code,
            pty_max_message: args.exec_pty_max_message_bytes as usize,
            shutdown,
            proxy,
            isolation,
        },
        auth,
        args.max_body_bytes,
        args.exec_max_upload_bytes,
    ))
}

/// Code interpreting: the Jupyter server `--jupyter-host` names, or one sandlet manages.
fn code_interpreting(
    args: &ServeArgs,
    launcher: &Arc<Launcher>,
    target: Option<&Arc<TargetWatch>>,
    data_dir: &std::path::Path,
) -> Result<Arc<exec::Code>, Error> {
    if args.code_max_contexts == 0 || args.jupyter_start_timeout_seconds == 0 {
        return Err(Error::Config(
            "--code-max-contexts and --jupyter-start-timeout-seconds must be at least 1".into(),
        ));
    }
    let backend = match args.jupyter_host.as_deref().filter(|h| !h.is_empty()) {
        Some(host) => {
            let token = args.jupyter_token.as_deref().unwrap_or_default();
            exec::code::Backend::External(
                exec::code::jupyter::Jupyter::new(host, token).map_err(Error::Config)?,
            )
        }
        None => exec::code::Backend::Managed(exec::code::Managed::new(
            exec::code::ManagedConfig {
                command: args.jupyter_command.clone(),
                port: args.jupyter_port,
                start_timeout: Duration::from_secs(args.jupyter_start_timeout_seconds),
                log_dir: data_dir.join("jupyter"),
                log_limit: args.exec_log_limit_bytes,
            },
            Arc::clone(launcher),
            target.cloned(),
        )),
    };
    Ok(exec::Code::new(
        exec::code::CodeConfig {
            max_contexts: args.code_max_contexts,
            context_idle: Duration::from_secs(args.code_context_idle_seconds),
            run_timeout: (args.code_run_timeout_seconds > 0)
                .then(|| Duration::from_secs(args.code_run_timeout_seconds)),
        },
        backend,
        target.cloned(),
    ))
}

/// Resolves at the first SIGTERM or SIGINT. The handlers are installed when this is called,
/// not when the future is first polled: a signal that arrives once an API answers must reach
/// them, not the default action.
fn wait_for_signal() -> Result<impl Future<Output = ()>, Error> {
    let handler = |kind| {
        signal(kind).map_err(|e| Error::Setup(format!("cannot handle SIGTERM and SIGINT: {e}")))
    };
    let (mut term, mut int) = (
        handler(SignalKind::terminate())?,
        handler(SignalKind::interrupt())?,
    );
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
