//! A real one-node Kubernetes for the tests: `.ci/node up` (kubelet, containerd, runc, CNI
//! bridge, the control plane and sandlet-controller, in their own network, mount and PID
//! namespaces and under this process's cgroups) booted once per test binary under an instance
//! name of its own, `<prefix>-<pid>` (prefix `SANDLET_NODE_INSTANCE`, default `test`), so test
//! binaries run side by side and people sharing a machine each keep to their own names.
//!
//! The node's addresses exist only in its network namespace. The tests reach them through
//! loopback forwards: [`NodeEnv::forward`] listens on an ephemeral 127.0.0.1 port of this
//! namespace and connects each accepted connection from a socket made in the node's namespace
//! (a thread `setns`es into it; a socket stays in the namespace it was made in). The kube client
//! goes through such a forward to the apiserver's 127.0.0.1:6443 there (its certificate names
//! 127.0.0.1; the port does not matter to TLS).
//!
//! Teardown: before `up`, the test binary starts a watcher in a session of its own, `sh` blocked
//! reading a pipe whose only writer this process holds. When this process ends, however it
//! ends (a panic, SIGKILL), the pipe closes and the watcher runs `.ci/node down`, which kills the
//! node's PID namespace and removes its cgroups, mounts and files.
//!
//! The node's own sandlet-controller watches every namespace, or with [`NodeEnv::get_scoped`]
//! [`CONTROLLER_NAMESPACE`] only: then tests can run a controller of their own
//! ([`NodeEnv::spawn_controller`]) in other namespaces.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};

/// The namespace the node's sandlet-controller watches with [`NodeEnv::get_scoped`]
/// (`SANDLET_NODE_WATCH_NAMESPACE`).
pub const CONTROLLER_NAMESPACE: &str = "pool";

pub struct NodeEnv {
    instance: String,
    /// The node's cgroup path (the same in every hierarchy): its kubelet's cgroupRoot.
    cgroup: String,
    /// The node's network namespace (`/proc/<its init>/ns/net`), held open.
    netns: File,
    /// The admin kubeconfig, its server replaced by the loopback forward.
    kubeconfig: Kubeconfig,
    /// The admin kubeconfig file as `up` wrote it: valid in the node's network namespace
    /// (apiserver at 127.0.0.1:6443).
    kubeconfig_path: PathBuf,
    /// The instance directory (`logs/<component>.log` among others).
    dir: PathBuf,
    /// The node's init, in this PID namespace.
    pid: u32,
    /// The one namespace the node's sandlet-controller watches; `None`: all.
    scope: Option<&'static str>,
    executor_token: String,
    /// Never waited for: it outlives this process, reading its stdin until this process ends
    /// (see the module docs).
    _watcher: Child,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn node_script() -> PathBuf {
    repo().join(".ci/node")
}

/// What the node needs and `./test` provides: root, and the binaries `.ci/node-setup` builds
/// (a first build takes tens of minutes: not started from a test).
fn assert_prerequisites() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the real node needs root (namespaces, mounts, cgroups): `sudo ./test` runs every test"
    );
    let cache = std::env::var_os("SANDLET_NODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/sandlet-node".into());
    assert!(
        cache.join("bin/kubelet").exists(),
        "no kubelet in {}: `./test` builds the node (.ci/node-setup) and runs every test",
        cache.display()
    );
}

/// The prefix of this test binary's instance name: `SANDLET_NODE_INSTANCE` when set (one per
/// person or job sharing the machine), else `test`. Never the name itself: each test binary
/// boots a node of its own, and the next binary's `up` must not meet the previous one's `down`.
fn instance_prefix() -> String {
    std::env::var("SANDLET_NODE_INSTANCE")
        .ok()
        .filter(|prefix| !prefix.is_empty())
        .unwrap_or_else(|| "test".into())
}

/// Runs `.ci/node down` for this prefix's test instances whose test binary is gone (its watcher
/// too, e.g. after a reboot): a node left behind is never reused, so nothing else would remove
/// it.
fn remove_abandoned_instances(prefix: &str) {
    let run = std::env::var_os("SANDLET_NODE_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/sandlet-node".into());
    let Ok(entries) = std::fs::read_dir(run) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new(node_script())
                .arg("down")
                .env("SANDLET_NODE_INSTANCE", &name)
                .status();
        }
    }
}

impl NodeEnv {
    /// The node of this test binary, booted on first use. Tests that use it are `#[ignore]`d
    /// with the reason: `cargo test` lists them as ignored, `./test` builds the node and runs
    /// them.
    /// Its sandlet-controller watches every namespace.
    pub fn get() -> &'static NodeEnv {
        Self::node(None)
    }

    /// The node of this test binary, its sandlet-controller watching [`CONTROLLER_NAMESPACE`]
    /// only, so that tests can run controllers of their own in other namespaces
    /// ([`NodeEnv::spawn_controller`]). A test binary uses either this or [`NodeEnv::get`].
    pub fn get_scoped() -> &'static NodeEnv {
        Self::node(Some(CONTROLLER_NAMESPACE))
    }

    fn node(scope: Option<&'static str>) -> &'static NodeEnv {
        static NODE: OnceLock<NodeEnv> = OnceLock::new();
        let node = NODE.get_or_init(|| {
            assert_prerequisites();
            NodeEnv::boot(scope)
        });
        assert_eq!(node.scope, scope, "one test binary, one controller scope");
        node
    }

    fn boot(scope: Option<&'static str>) -> NodeEnv {
        let started = Instant::now();
        let prefix = instance_prefix();
        remove_abandoned_instances(&prefix);
        let instance = format!("{prefix}-{}", std::process::id());
        let watcher = Command::new("setsid")
            .args(["sh", "-c", "cat >/dev/null; exec \"$0\" down"])
            .arg(node_script())
            .env("SANDLET_NODE_INSTANCE", &instance)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("setsid (util-linux) starts the node's watcher");
        let up = Command::new(node_script())
            .arg("up")
            .env("SANDLET_NODE_INSTANCE", &instance)
            .env("SANDLET_NODE_WATCH_NAMESPACE", scope.unwrap_or_default())
            // The controller this test binary was built with (the image's sandlet is the
            // release build `.ci/node up` makes).
            .env(
                "SANDLET_CONTROLLER_BIN",
                env!("CARGO_BIN_EXE_sandlet-controller"),
            )
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(up.status.success(), ".ci/node up failed ({})", up.status);
        let vars: std::collections::HashMap<String, String> = String::from_utf8_lossy(&up.stdout)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.into(), v.into())))
            .collect();
        let netns = File::open(format!("/proc/{}/ns/net", vars["SANDLET_NODE_PID"])).unwrap();
        let dir = PathBuf::from(&vars["SANDLET_NODE_DIR"]);
        let cgroup = std::fs::read_to_string(dir.join("cgroup"))
            .unwrap()
            .trim()
            .to_string();
        let executor_token =
            std::fs::read_to_string(&vars["SANDLET_NODE_EXECUTOR_TOKEN_FILE"]).unwrap();
        let api = forward(&netns, (Ipv4Addr::LOCALHOST, 6443).into());
        let kubeconfig_path = PathBuf::from(&vars["KUBECONFIG"]);
        let mut kubeconfig = Kubeconfig::read_from(&kubeconfig_path).unwrap();
        for cluster in &mut kubeconfig.clusters {
            cluster.cluster.as_mut().unwrap().server = Some(format!("https://{api}"));
        }
        eprintln!(
            "node {instance} Ready in {:?} (apiserver forwarded to {api})",
            started.elapsed()
        );
        NodeEnv {
            instance,
            cgroup,
            netns,
            kubeconfig,
            kubeconfig_path,
            dir,
            pid: vars["SANDLET_NODE_PID"].parse().unwrap(),
            scope,
            executor_token: executor_token.trim().into(),
            _watcher: watcher,
        }
    }

    /// A client of the node's apiserver, for the calling test's runtime.
    pub async fn client(&self) -> Client {
        let config =
            Config::from_custom_kubeconfig(self.kubeconfig.clone(), &KubeConfigOptions::default())
                .await
                .unwrap();
        Client::try_from(config).unwrap()
    }

    /// Where path `node_path` of the node's own filesystem (its `/var/lib`, `/run` and
    /// `/var/log` are the instance's, see `.ci/node`) is on the host: e.g. a hostPath volume.
    #[allow(dead_code, reason = "benches/pooled_node.rs uses it, the tests do not")]
    pub fn host_path(&self, node_path: &str) -> PathBuf {
        let inside = ["/var/lib/", "/run/", "/var/log/"];
        assert!(
            inside.iter().any(|p| node_path.starts_with(p)),
            "{node_path} is the host's own"
        );
        self.dir
            .join("root")
            .join(node_path.trim_start_matches('/'))
    }

    /// The node's cgroup path, below this process's own (see `.ci/node`).
    pub fn cgroup(&self) -> &str {
        &self.cgroup
    }

    /// Runs `f` on a thread in the node's network namespace.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.netns, f).unwrap()
    }

    /// Runs `.ci/node exec -- cmd...` for this node: `cmd` in its network namespace, with
    /// kubectl, crictl, ctr and helm on PATH and pointed at it.
    pub fn exec(&self, cmd: &[&str]) -> std::process::Output {
        self.command(cmd).output().unwrap()
    }

    /// `.ci/node exec -- cmd...` for this node, to spawn or run.
    pub fn command(&self, cmd: &[&str]) -> Command {
        let mut command = Command::new(node_script());
        command
            .args(["exec", "--"])
            .args(cmd)
            .env("SANDLET_NODE_INSTANCE", &self.instance);
        command
    }

    /// The last `lines` lines of the log of the node's `component` (`sandlet-controller`,
    /// `kubelet`, `containerd`, ...), to show when a test fails.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let path = self.dir.join("logs").join(format!("{component}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The admin kubeconfig for a process in the node's network namespace.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The task API token sandlet-controller sends (the `sandlet-token` Secret's `token`).
    pub fn executor_token(&self) -> &str {
        &self.executor_token
    }

    /// A 127.0.0.1 address of this network namespace whose connections go to `target` in the
    /// node's (see the module docs). Lives as long as the test binary.
    pub fn forward(&self, target: SocketAddr) -> SocketAddr {
        forward(&self.netns, target)
    }

    /// sandlet-controller (the binary the tests were built with) for `namespace`, a process
    /// in the node's network namespace, where the pods' addresses are, with the admin
    /// kubeconfig; its log is `logs/controller-<namespace>.log` in the node's directory.
    pub fn spawn_controller(&self, namespace: &str) -> NodeController {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("logs/controller-{namespace}.log")))
            .unwrap();
        let mut command = Command::new("nsenter");
        // SAFETY: prctl is async-signal-safe. A test binary killed outright takes its
        // controller along (nsenter execs it: the signal holds across exec).
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)
            });
        }
        let child = command
            .arg(format!("--net=/proc/{}/ns/net", self.pid))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_sandlet-controller"))
            .args(["--namespace", namespace, "--executor-token-file"])
            .arg(self.dir.join("executor-token"))
            .env("KUBECONFIG", &self.kubeconfig_path)
            .env("RUST_LOG", "sandlet_controller=debug,kube_runtime=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nsenter (util-linux) starts the controller");
        NodeController { child }
    }

    /// Creates namespace `name` (with the `sandlet-token` Secret) unless it exists (tests share
    /// [`CONTROLLER_NAMESPACE`]) and waits until its default service account exists: pods are
    /// refused before.
    pub async fn namespace(&self, name: &str) {
        let client = self.client().await;
        let created = Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await;
        exists_or_created(created);
        let created = Api::<Secret>::namespaced(client.clone(), name)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "sandlet-token"},
                    "stringData": {"token": self.executor_token},
                }))
                .unwrap(),
            )
            .await;
        exists_or_created(created);
        let accounts: Api<ServiceAccount> = Api::namespaced(client, name);
        let deadline = Instant::now() + Duration::from_secs(60);
        while accounts.get_opt("default").await.unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "no default service account in {name} after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A sandlet-controller [`NodeEnv::spawn_controller`] started; killed when dropped (SIGKILL:
/// as a crash, nothing of it is flushed or closed in order).
pub struct NodeController {
    child: Child,
}

impl Drop for NodeController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exists_or_created<T>(created: kube::Result<T>) {
    match created {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.is_already_exists() => {}
        Err(e) => panic!("{e}"),
    }
}

/// A Pool of deploy/pool-in-container.yaml's placement with the local images: sandlet is the
/// main container's process (the sandbox image's, running as its user) and checks the token.
pub fn in_container_pool(name: &str, capacity: Value) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "capacitySpec": capacity,
            "template": {"spec": {
                "terminationGracePeriodSeconds": 1,
                "initContainers": [{
                    "name": "install-sandlet",
                    "image": "sandlet:dev",
                    "imagePullPolicy": "Never",
                    "args": ["install", "/opt/sandlet/sandlet"],
                    "volumeMounts": [{"name": "sandlet-bin", "mountPath": "/opt/sandlet"}],
                }],
                "containers": [{
                    "name": "main",
                    "image": "sandlet-sandbox:dev",
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c"],
                    "args": ["exec /opt/sandlet/sandlet serve --listen-addr 0.0.0.0:5758 --data-dir /var/lib/sandlet/tasks --exec-data-dir /var/lib/sandlet/exec"],
                    "env": [{"name": "SANDLET_TOKEN_FILE", "value": "/var/run/sandlet/token"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 5758}, "periodSeconds": 1},
                    "volumeMounts": [
                        {"name": "sandlet-bin", "mountPath": "/opt/sandlet", "readOnly": true},
                        {"name": "sandlet-data", "mountPath": "/var/lib/sandlet"},
                        {"name": "sandlet-token", "mountPath": "/var/run/sandlet", "readOnly": true},
                    ],
                }],
                "volumes": [
                    {"name": "sandlet-bin", "emptyDir": {}},
                    {"name": "sandlet-data", "emptyDir": {}},
                    {"name": "sandlet-token", "secret": {"secretName": "sandlet-token"}},
                ],
            }},
        },
    })
}

/// See [`NodeEnv::forward`].
fn forward(netns: &File, target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let local = listener.local_addr().unwrap();
    let netns = netns.try_clone().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let netns = netns.try_clone().unwrap();
            std::thread::spawn(move || {
                let connect = move || TcpStream::connect_timeout(&target, Duration::from_secs(10));
                if let Ok(Ok(upstream)) = in_netns(&netns, connect) {
                    splice(client, upstream);
                }
            });
        }
    });
    local
}

/// Runs `f` in the network namespace `netns`, on a thread of its own: `setns` changes only the
/// calling thread's namespace. Sockets `f` makes stay in that namespace wherever they are used.
fn in_netns<T: Send + 'static>(
    netns: &File,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let netns = netns.try_clone()?;
    std::thread::spawn(move || {
        setns(&netns, CloneFlags::CLONE_NEWNET)?;
        Ok(f())
    })
    .join()
    .expect("a thread in the node's network namespace panicked")
}

/// Copies both ways until each side has closed its half.
fn splice(client: TcpStream, upstream: TcpStream) {
    let (Ok(mut client_read), Ok(mut upstream_write)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let to_upstream = std::thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut upstream_read, mut client_write) = (upstream, client);
    let _ = io::copy(&mut upstream_read, &mut client_write);
    let _ = client_write.shutdown(std::net::Shutdown::Write);
    let _ = to_upstream.join();
}
