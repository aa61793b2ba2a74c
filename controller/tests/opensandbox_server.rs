//! The OpenSandbox server 1.1.1 and its Python SDK 1.1.1, both from PyPI and unchanged
//! (`.ci/setup` installs them into `$SANDLET_SERVER_VENV`), run sandboxes on the real node
//! (`node_env`) through sandlet-controller and sandlet: the server with
//! `runtime.type = "kubernetes"`, `execd_image = "sandlet:execd"` and the node's kubeconfig,
//! the node's own sandlet-controller, and a Pool from `deploy/examples/opensandbox-server-pool.yaml`.
//!
//! The server and the SDK run in the node's network namespace (`.ci/node exec`): the server
//! resolves a sandbox's endpoint to its pod IP, and the SDK talks to execd there, as a client
//! inside a cluster does. `tests/sdk/server_checks.py` goes through a sandbox's life in template
//! mode and in pool mode (create, command, files, metrics, renew, pause, resume, kill) and checks
//! the server's `GET /v1/sandboxes/{id}` at each step; this test then checks that nothing of
//! them is left in the cluster, and prints the figures beside a floor measured on the same node.

#[allow(
    dead_code,
    reason = "of the apiserver env these tests use only eventually()"
)]
mod kube_env;
#[allow(dead_code, reason = "of the node env this test uses a part")]
mod node_env;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube_env::eventually;
use node_env::NodeEnv;
use sandlet_controller::crd::{BatchSandbox, Pool, SANDBOX_ID, SandboxSnapshot};
use serde_json::{Value, json};

const NS: &str = "opensandbox";
const POOL_SAMPLE: &str = include_str!("../../deploy/examples/opensandbox-server-pool.yaml");
/// The node's busybox image: the sandboxes' image, and the pool's main container's.
const SANDBOX_IMAGE: &str = "sandlet-sandbox:dev";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// The venv `.ci/setup` installs the server and the SDK into (outside the repository).
fn server_venv() -> PathBuf {
    let venv = std::env::var_os("SANDLET_SERVER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/sandlet-opensandbox/venv".into());
    assert!(
        venv.join("bin/opensandbox-server").exists(),
        "no OpenSandbox server in {}: `./test` installs it (.ci/setup) and runs every test",
        venv.display()
    );
    venv
}

/// The server's process (through `.ci/node exec`, in a process group of its own), killed with
/// its group when the test ends, however it ends.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // The group the child leads: `.ci/node exec`, nsenter and the server.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Server {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

/// The sample Pool, with the node's image for its main container (nothing can be pulled) and
/// a short grace for its pods.
fn sample_pool() -> Pool {
    let mut pool: Value = serde_yaml::from_str(POOL_SAMPLE).unwrap();
    let spec = &mut pool["spec"]["template"]["spec"];
    spec["terminationGracePeriodSeconds"] = json!(1);
    assert_eq!(spec["containers"][0]["name"], "sandbox");
    spec["containers"][0]["image"] = json!(SANDBOX_IMAGE);
    pool["metadata"]["namespace"] = json!(NS);
    serde_json::from_value(pool).unwrap()
}

fn start_server(node: &NodeEnv, dir: &Path, port: u16, api_key: &str) -> Server {
    let venv = server_venv();
    // The upstream server's e2e template does the same: pods need no graceful stop here.
    let template = dir.join("batchsandbox-template.yaml");
    std::fs::write(
        &template,
        "spec:\n  template:\n    spec:\n      terminationGracePeriodSeconds: 1\n",
    )
    .unwrap();
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
host = "127.0.0.1"
port = {port}
api_key = "{api_key}"

[log]
level = "INFO"

[runtime]
type = "kubernetes"
execd_image = "sandlet:execd"

[store]
type = "sqlite"
path = "{store}"

[kubernetes]
kubeconfig_path = "{kubeconfig}"
namespace = "{NS}"
workload_provider = "batchsandbox"
batchsandbox_template_file = "{template}"
image_pull_policy = "IfNotPresent"
sandbox_create_timeout_seconds = 120
"#,
            store = dir.join("opensandbox.db").display(),
            kubeconfig = node.kubeconfig_path().display(),
            template = template.display(),
        ),
    )
    .unwrap();
    let log = dir.join("server.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = node
        .command(&[
            venv.join("bin/opensandbox-server").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        // Its sqlite store and anything else it keeps under ~ stay in the test's directory.
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .unwrap();
    Server { child, log }
}

/// What a bare pod of the sandbox image costs on this node, the floors under the figures: create
/// to Ready (under a sandbox's creation and resume) and delete (grace 1 s, as the sandboxes' pods
/// have) to gone (under a pause, which removes the pod).
struct Floors {
    start: Duration,
    delete: Duration,
}

async fn bare_pod(pods: &Api<Pod>) -> Floors {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "floor"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": SANDBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["sleep", "3600"],
            }],
        },
    }))
    .unwrap();
    let started = Instant::now();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually(
        "the floor pod Ready",
        Duration::from_secs(120),
        async || {
            let status = pods.get("floor").await.ok()?.status?;
            status
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let start = started.elapsed();
    let deleting = Instant::now();
    pods.delete("floor", &Default::default()).await.unwrap();
    eventually("the floor pod gone", Duration::from_secs(60), async || {
        pods.get_opt("floor").await.ok()?.is_none().then_some(())
    })
    .await;
    Floors {
        start,
        delete: deleting.elapsed(),
    }
}

#[tokio::test]
#[ignore = "needs the real node and the OpenSandbox server: `./test` installs both and runs every test"]
async fn the_opensandbox_server_runs_sandboxes_on_kubernetes_through_sandlet() {
    let venv = server_venv();
    let node = NodeEnv::get();
    node.namespace(NS).await;
    let client = node.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let floors = bare_pod(&pods).await;

    let pools: Api<Pool> = Api::namespaced(client.clone(), NS);
    pools
        .create(&PostParams::default(), &sample_pool())
        .await
        .unwrap();
    // A warm pool: pool mode's figure is an allocation, not a pod start.
    eventually(
        "an idle ready pool pod",
        Duration::from_secs(120),
        async || {
            let status = pools.get("opensandbox-server").await.ok()?.status?;
            (status.available >= 1).then_some(())
        },
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let port = node.in_netns(|| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let api_key = "server-checks-key";
    let server = start_server(node, dir.path(), port, api_key);
    let health = format!(
        "http://{}/health",
        node.forward(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    );
    let http = reqwest::Client::new();
    let mut waited = 0;
    eventually(
        "the server answers /health",
        Duration::from_secs(120),
        async || {
            waited += 1;
            let ok = http
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ok && waited % 100 == 0 {
                eprintln!("server log so far:\n{}", server.log_tail());
            }
            ok.then_some(())
        },
    )
    .await;

    let script = repo().join("tests/sdk/server_checks.py");
    let run = node
        .command(&[
            venv.join("bin/python").to_str().unwrap(),
            script.to_str().unwrap(),
        ])
        .env("OPENSANDBOX_SERVER", format!("127.0.0.1:{port}"))
        .env("OPENSANDBOX_API_KEY", api_key)
        .env("SANDBOX_IMAGE", SANDBOX_IMAGE)
        .env("SANDBOX_POOL", "opensandbox-server")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    eprintln!("{out}{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        run.status.success(),
        "server_checks.py failed; the server's log:\n{}\nsandlet-controller's log:\n{}",
        server.log_tail(),
        node.log_tail("sandlet-controller", 80)
    );
    let figures: Value = out
        .lines()
        .find_map(|l| l.strip_prefix("figures: "))
        .map(|f| serde_json::from_str(f).unwrap())
        .expect("a figures line");
    eprintln!(
        "figures (s): {figures}; floors: a bare pod of {SANDBOX_IMAGE} created to Ready in \
         {:.3} s, deleted to gone in {:.3} s",
        floors.start.as_secs_f64(),
        floors.delete.as_secs_f64()
    );

    // Nothing of the killed sandboxes is left: no BatchSandbox, no sandbox pod, no snapshot.
    let sandboxes: Api<BatchSandbox> = Api::namespaced(client.clone(), NS);
    let snapshots: Api<SandboxSnapshot> = Api::namespaced(client.clone(), NS);
    eventually(
        "no BatchSandbox, sandbox pod or snapshot left",
        Duration::from_secs(60),
        async || {
            let left_bsb = sandboxes.list(&ListParams::default()).await.ok()?.items;
            let left_pods = pods
                .list(&ListParams::default().labels(SANDBOX_ID))
                .await
                .ok()?
                .items;
            let left_snapshots = snapshots.list(&ListParams::default()).await.ok()?.items;
            (left_bsb.is_empty() && left_pods.is_empty() && left_snapshots.is_empty()).then_some(())
        },
    )
    .await;
    drop(server);
}
