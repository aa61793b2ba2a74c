//! `sandlet serve`: wire the parts together and run until SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::cli::ServeArgs;
use crate::error::Error;
use crate::http::{self, auth::Auth};
use crate::process::{Launcher, Reaper};
use crate::target::{Locator, TargetWatch};
use crate::tasks::api::{TaskApi, router};
use crate::tasks::{TaskConfig, TaskManager};

/// How long in-flight requests get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub async fn serve(args: ServeArgs) -> Result<(), Error> {
    // Same-uid code in the sandbox must not read our memory (the token) through ptrace or /proc.
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Setup(format!("cannot mark sandlet non-dumpable: {e}")))?;
    if args.other_container && !args.enable_sidecar_mode {
        return Err(Error::Config(
            "--other-container only applies with --enable-sidecar-mode".into(),
        ));
    }
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

    let reaper = Reaper::install()
        .map_err(|e| Error::Setup(format!("cannot become a child subreaper: {e}")))?;
    let target = args.enable_sidecar_mode.then(|| {
        TargetWatch::new(if args.other_container {
            Locator::OtherContainer
        } else {
            Locator::Marker(args.main_container_name.clone())
        })
    });
    let config = TaskConfig {
        data_dir: args.data_dir.clone(),
        max_active: args.max_active_tasks,
        max_tasks: args.max_tasks,
        stop_grace: Duration::from_secs(args.stop_grace_seconds),
        log_limit: args.task_log_limit_bytes,
    };
    let tasks = TaskManager::open(config, Launcher::new(reaper), target.clone()).map_err(|e| {
        Error::Setup(format!(
            "cannot open the data dir {}: {e}",
            args.data_dir.display()
        ))
    })?;
    if let Some(target) = &target {
        let tasks = tasks.clone();
        tokio::spawn(Arc::clone(target).run(move |incarnation| tasks.on_target(incarnation)));
    }
    let listener = TcpListener::bind(args.listen_addr)
        .await
        .map_err(|e| Error::Setup(format!("cannot listen on {}: {e}", args.listen_addr)))?;
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %args.data_dir.display(),
        token = auth.is_enabled(),
        sidecar = args.enable_sidecar_mode,
        tasks = tasks.list().len(),
        "sandlet task API ready"
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let app = router(
        TaskApi {
            tasks,
            target,
            shutdown: shutdown_rx.clone(),
        },
        auth,
        args.max_body_bytes,
    );
    let mut server = tokio::spawn(http::serve(listener, app, async move {
        let _ = wait_for_signal().await;
    }));
    let mut stopping = shutdown_rx.clone();
    tokio::select! {
        result = &mut server => return result.map_err(|e| Error::Setup(e.to_string()))?.map_err(Error::from),
        _ = wait_for_signal() => {}
    }
    let _ = stopping.borrow_and_update();
    tracing::info!(
        "shutting down: tasks keep running under their shims and are re-adopted at the next start"
    );
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(joined) => joined
            .map_err(|e| Error::Setup(e.to_string()))?
            .map_err(Error::from),
        Err(_) => {
            tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; exiting anyway");
            Ok(())
        }
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
