use clap::Parser;

/// BatchSandbox and Pool controller that runs tasks through sandlet.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Only this namespace (default: all).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// File holding the executors' task API token (sandlet's --token-file).
    #[arg(long, env = "SANDLET_TOKEN_FILE")]
    executor_token_file: Option<std::path::PathBuf>,
    /// The executors' task API port.
    #[arg(long, default_value_t = 5758)]
    executor_port: u16,
    /// Change-feed connections open at once, at most.
    #[arg(long, default_value_t = 4096)]
    max_feeds: usize,
    /// containerd's socket on this node: with it, this process commits SandboxSnapshots of
    /// the pods on this node (pause). Without it, a pause fails with reason NoNodeAgent.
    #[arg(long, env = "CONTAINERD_ADDRESS")]
    containerd_address: Option<std::path::PathBuf>,
    /// Commit only snapshots of pods on this node (a node agent, one per node); default: all
    /// (a one-node cluster).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log_level))
        .init();
    let token = match &args.executor_token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the executor token");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(namespace = ?args.namespace, "sandlet-controller starting");
    sandlet_controller::run::run(
        client,
        sandlet_controller::run::Settings {
            namespace: args.namespace,
            executor_token: token,
            executor_port: args.executor_port,
            max_feeds: args.max_feeds,
            containerd_address: args.containerd_address,
            node_name: args.node_name,
        },
    )
    .await;
    std::process::ExitCode::SUCCESS
}
