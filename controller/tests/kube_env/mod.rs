//! A real control plane for the controller's tests, the way envtest does it: etcd and
//! kube-apiserver (built by `.ci/kube-setup`) on loopback with generated certificates and a
//! token, and a stand-in kubelet (there is none) that gives each pod a real sandlet executor on
//! its own loopback address and reports the pod Running and Ready.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config, ResourceExt};
use sandlet_controller::crd::{BatchSandbox, ENDPOINTS};
use serde_json::json;

pub struct KubeEnv {
    client: Client,
    processes: Vec<Child>,
    _dir: tempfile::TempDir,
}

fn bin_dir() -> PathBuf {
    std::env::var_os("SANDLET_KUBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/sandlet-kube/bin"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sh(dir: &Path, script: &str) {
    let status = Command::new("sh")
        .args(["-ec", script])
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "failed: {script}");
}

impl KubeEnv {
    /// Tests that start one are `#[ignore]`d with the reason: `cargo test` lists them as
    /// ignored, `./test` builds the binaries and runs them.
    pub async fn start() -> KubeEnv {
        let bin = bin_dir();
        assert!(
            bin.join("kube-apiserver").exists() && bin.join("etcd").exists(),
            "no kube-apiserver/etcd in {}: `./test` builds them (.ci/kube-setup) and runs every test",
            bin.display()
        );
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("sandlet-kube-")
            .tempdir()
            .unwrap();
        let pki = dir.path();
        sh(
            pki,
            r#"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 30 \
  -subj /CN=test-ca -keyout ca.key -out ca.crt \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' > server.ext
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -subj /CN=kube-apiserver \
  -keyout server.key -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 -extfile server.ext -out server.crt
openssl genpkey -algorithm ec -pkeyopt ec_paramgen_curve:prime256v1 -out sa.key
openssl pkey -in sa.key -pubout -out sa.pub
"#,
        );
        let token = format!(
            "t{:x}",
            std::process::id() as u64 * 7919 + started.elapsed().as_nanos() as u64
        );
        std::fs::write(
            pki.join("tokens.csv"),
            format!("{token},admin,admin-uid,\"system:masters\"\n"),
        )
        .unwrap();
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let log = |name: &str| Stdio::from(std::fs::File::create(pki.join(name)).unwrap());
        let etcd = Command::new(bin.join("etcd"))
            .args([
                "--name=default".to_string(),
                format!("--data-dir={}", pki.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--initial-cluster-state=new".into(),
                "--unsafe-no-fsync".into(),
            ])
            .stdout(log("etcd.log"))
            .stderr(log("etcd.err"))
            .spawn()
            .unwrap();
        let p = |f: &str| pki.join(f).display().to_string();
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .args([
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", p("certs")),
                format!("--tls-cert-file={}", p("server.crt")),
                format!("--tls-private-key-file={}", p("server.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--profiling=false".into(),
            ])
            .stdout(log("apiserver.log"))
            .stderr(log("apiserver.err"))
            .spawn()
            .unwrap();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    certificate-authority: {ca}\nusers:\n- name: t\n  user:\n    token: {token}\ncontexts:\n- name: t\n  context: {{cluster: t, user: t}}\ncurrent-context: t\n",
            ca = p("ca.crt")
        );
        std::fs::write(pki.join("kubeconfig"), &kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(
            Kubeconfig::from_yaml(&kubeconfig).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = Client::try_from(config).unwrap();
        let mut env = KubeEnv {
            client,
            processes: vec![etcd, apiserver],
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = env
                .client
                .request_text(http::Request::get("/readyz").body(Vec::new()).unwrap())
                .await;
            if matches!(&ready, Ok(body) if body.trim() == "ok") {
                break;
            }
            for process in &mut env.processes {
                if let Ok(Some(status)) = process.try_wait() {
                    let err = std::fs::read_to_string(env._dir.path().join("apiserver.err"))
                        .unwrap_or_default();
                    panic!(
                        "a control-plane process exited ({status}): {}",
                        err.lines().rev().take(5).collect::<Vec<_>>().join("\n")
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready in 90 s: {ready:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("kube-apiserver ready in {:?}", started.elapsed());
        env
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// An apiserver with the committed CRDs Established and `namespace` created: where every
    /// test and the benchmark begin.
    pub async fn start_with(namespace: &str) -> KubeEnv {
        let env = KubeEnv::start().await;
        env.apply_crds(include_str!(
            "../../../deploy/crds/sandbox.opensandbox.io.yaml"
        ))
        .await;
        Api::<Namespace>::all(env.client())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
            )
            .await
            .unwrap();
        env
    }

    /// Creates the CRDs of a multi-document YAML and waits until each is Established.
    async fn apply_crds(&self, yaml: &str) {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let mut names = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let crd: CustomResourceDefinition = serde::Deserialize::deserialize(doc).unwrap();
            names.push(crd.name_any());
            api.create(&PostParams::default(), &crd).await.unwrap();
        }
        for name in names {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let crd = api.get(&name).await.unwrap();
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                assert!(Instant::now() < deadline, "CRD {name} not established");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        for process in self.processes.iter_mut().rev() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Waits until `check` gives a value, polling every 50 ms; fails the test with `what` after
/// `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (allocated, tasks running, succeeded, failed, unknown)
pub fn counters(b: &BatchSandbox) -> (i32, i32, i32, i32, i32) {
    let s = b.status.clone().unwrap_or_default();
    (
        s.allocated,
        s.task_running,
        s.task_succeed,
        s.task_failed,
        s.task_unknown,
    )
}

/// Waits until BatchSandbox `name`'s counters are `want` (see [`counters`]).
pub async fn counters_reach(
    sandboxes: &Api<BatchSandbox>,
    name: &str,
    want: (i32, i32, i32, i32, i32),
    what: &str,
    timeout: Duration,
) {
    eventually(what, timeout, async || {
        let b = sandboxes.get(name).await.ok()?;
        (counters(&b) == want).then_some(())
    })
    .await;
}

/// Watches BatchSandbox `name` from now on and returns every set of counters its status shows
/// (see [`counters`]) until it shows `last`.
pub async fn counters_until(
    sandboxes: &Api<BatchSandbox>,
    name: &str,
    last: (i32, i32, i32, i32, i32),
) -> tokio::task::JoinHandle<Vec<(i32, i32, i32, i32, i32)>> {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(sandboxes.clone(), config).boxed();
    // The watch is established (its initial list done) before anything it must see happens.
    loop {
        match stream.next().await.expect("the watch runs").unwrap() {
            watcher::Event::InitDone => break,
            _ => continue,
        }
    }
    tokio::spawn(async move {
        let mut history = Vec::new();
        while let Some(event) = stream.next().await {
            if let Ok(watcher::Event::Apply(b)) = event {
                let seen = counters(&b);
                if history.last() != Some(&seen) {
                    history.push(seen);
                }
                if seen == last {
                    break;
                }
            }
        }
        history
    })
}

/// Waits for an Event of `kind` and `reason` on BatchSandbox `name` whose note contains `says`.
pub async fn event_says(events: &Api<Event>, name: &str, kind: &str, reason: &str, says: &str) {
    let what = format!("a {kind} {reason} event on {name} saying {says:?}");
    eventually(&what, Duration::from_secs(30), async || {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.type_.as_deref() == Some(kind)
                    && e.reason.as_deref() == Some(reason)
                    && e.note.as_deref().is_some_and(|n| n.contains(says))
            })
            .then_some(())
    })
    .await;
}

/// sandlet-controller for `namespace`, in this process, sending `token` to the executors (a
/// [`FakeKubelet`]'s). Its log goes to the test's captured output, shown when a test fails.
pub fn start_controller(
    client: Client,
    namespace: &str,
    token: &str,
) -> tokio::task::JoinHandle<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("sandlet_controller=debug,kube_runtime=info")
        .with_test_writer()
        .try_init();
    tokio::spawn(sandlet_controller::run::run(
        client,
        sandlet_controller::run::Settings {
            namespace: Some(namespace.into()),
            executor_token: Some(token.into()),
            executor_port: 5758,
            max_feeds: 64,
            containerd_address: None,
            node_name: None,
        },
    ))
}

/// One pod's executor: a real sandlet process on the pod's address.
struct Executor {
    ip: String,
    dir: PathBuf,
    process: Option<Child>,
}

/// The executor addresses a BatchSandbox's `endpoints` annotation lists, in index order.
pub fn endpoints(bsb: &BatchSandbox) -> Vec<String> {
    let annotation = &bsb.annotations()[ENDPOINTS];
    serde_json::from_str(annotation).expect("the endpoints annotation is a JSON list")
}

/// Plays the kubelet for one namespace (see the module docs).
pub struct FakeKubelet {
    executors: Arc<Mutex<BTreeMap<String, Executor>>>,
    /// The sandlet every executor runs, built once.
    binary: PathBuf,
    /// The niceness new pods' executors (and so their shims and tasks) start at.
    nice: Arc<AtomicI32>,
    token_file: PathBuf,
    watch: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// The sandlet the executors run: the tests' debug build, or for the bench (built without debug
/// assertions) the release build, so its figures are those of the binary that ships.
fn sandlet_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let (profile, flags): (_, &[&str]) = if cfg!(debug_assertions) {
        ("debug", &[])
    } else {
        ("release", &["--release"])
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "sandlet", "--bin", "sandlet"])
        .args(flags)
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(status.success(), "cannot build sandlet");
    root.join("target/x86_64-unknown-linux-gnu")
        .join(profile)
        .join("sandlet")
}

fn start_executor(binary: &Path, nice: i32, ip: &str, dir: &Path, token_file: &Path) -> Child {
    let mut child = Command::new("nice")
        .args(["-n", &nice.to_string()])
        .arg(binary)
        .args([
            "serve",
            "--listen-addr",
            &format!("{ip}:5758"),
            "--exec-listen-addr",
            &format!("{ip}:44772"),
            "--data-dir",
            &dir.display().to_string(),
            "--token-file",
            &token_file.display().to_string(),
            "--log-level",
            "warn",
        ])
        // Marks the executor, its shims and tasks, so the kubelet's drop can find them all.
        .env(MARKER, token_file.parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(format!("{ip}:5758")).is_err() {
        // An executor that exited (its address taken after all) is not the one that answers.
        if let Ok(Some(status)) = child.try_wait() {
            panic!("sandlet on {ip} exited ({status}) before it served");
        }
        assert!(Instant::now() < deadline, "sandlet on {ip} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Executor addresses, unique in the process (tests run kubelets side by side).
static NEXT_IP: AtomicU32 = AtomicU32::new(2);

/// The next executor address whose ports nobody holds: another process on the machine (another
/// test binary, or executors a killed test left behind) may use the same addresses, and the
/// controller would then talk to its sandlet.
fn next_free_ip() -> String {
    loop {
        let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
        let ip = format!("127.0.{}.{}", n / 250, n % 250 + 2);
        let free = |port: u16| TcpListener::bind((ip.as_str(), port)).is_ok();
        if free(5758) && free(44772) {
            return ip;
        }
    }
}

impl FakeKubelet {
    pub async fn start(client: Client, namespace: &str, token: &str) -> FakeKubelet {
        let dir = tempfile::Builder::new()
            .prefix("sandlet-kubelet-")
            .tempdir()
            .unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token).unwrap();
        let binary = sandlet_binary();
        let executors: Arc<Mutex<BTreeMap<String, Executor>>> = Arc::default();
        let nice: Arc<AtomicI32> = Arc::default();
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let (shared, niceness, executor_binary, base, token_path) = (
            Arc::clone(&executors),
            Arc::clone(&nice),
            binary.clone(),
            dir.path().to_path_buf(),
            token_file.clone(),
        );
        let watch = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(pods.clone(), watcher::Config::default()));
            while let Some(event) = events.next().await {
                let (applied, deleted): (Vec<Pod>, Vec<Pod>) = match event {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        (vec![p], vec![])
                    }
                    Ok(watcher::Event::Delete(p)) => (vec![], vec![p]),
                    _ => continue,
                };
                for pod in deleted {
                    if let Some(mut e) = shared.lock().unwrap().remove(&pod.name_any())
                        && let Some(mut p) = e.process.take()
                    {
                        let _ = p.kill();
                        let _ = p.wait();
                    }
                }
                for pod in applied {
                    let name = pod.name_any();
                    if pod.metadata.deletion_timestamp.is_some()
                        || shared.lock().unwrap().contains_key(&name)
                    {
                        continue;
                    }
                    let ip = next_free_ip();
                    let data = base.join(&name);
                    let (bin, ipc, datac, tokenc) = (
                        executor_binary.clone(),
                        ip.clone(),
                        data.clone(),
                        token_path.clone(),
                    );
                    let nice = niceness.load(Ordering::Relaxed);
                    let process = tokio::task::spawn_blocking(move || {
                        start_executor(&bin, nice, &ipc, &datac, &tokenc)
                    })
                    .await
                    .unwrap();
                    shared.lock().unwrap().insert(
                        name.clone(),
                        Executor {
                            ip: ip.clone(),
                            dir: data,
                            process: Some(process),
                        },
                    );
                    let now = k8s_openapi::jiff::Timestamp::now().to_string();
                    let status = json!({"status": {
                        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now,
                        "conditions": [
                            {"type": "Ready", "status": "True", "lastTransitionTime": now},
                            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}
                        ]
                    }});
                    let _ = pods
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                        .await;
                }
            }
        });
        FakeKubelet {
            executors,
            binary,
            nice,
            token_file,
            watch,
            _dir: dir,
        }
    }

    /// Pods that start from now on run at this niceness (a bench's way to let the control plane
    /// go first, as on a cluster where the pods are on other nodes).
    #[allow(dead_code, reason = "benches/pooled.rs uses it, the tests do not")]
    pub fn start_pods_at_nice(&self, nice: i32) {
        self.nice.store(nice, Ordering::Relaxed);
    }

    /// SIGKILLs the executor of `pod` (its tasks keep running under their shims).
    pub fn kill_executor(&self, pod: &str) {
        let mut executors = self.executors.lock().unwrap();
        let e = executors.get_mut(pod).expect("a pod with an executor");
        if let Some(mut p) = e.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Starts the executor of `pod` again, on the same address and data.
    pub async fn restart_executor(&self, pod: &str) {
        let (ip, dir) = {
            let executors = self.executors.lock().unwrap();
            let e = executors.get(pod).expect("a pod with an executor");
            (e.ip.clone(), e.dir.clone())
        };
        let (bin, token) = (self.binary.clone(), self.token_file.clone());
        let (ipc, dirc) = (ip.clone(), dir.clone());
        let nice = self.nice.load(Ordering::Relaxed);
        let process =
            tokio::task::spawn_blocking(move || start_executor(&bin, nice, &ipc, &dirc, &token))
                .await
                .unwrap();
        self.executors.lock().unwrap().get_mut(pod).unwrap().process = Some(process);
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.watch.abort();
        for e in self.executors.lock().unwrap().values_mut() {
            if let Some(mut p) = e.process.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
        // Shims and tasks outlive a killed executor by design: they go too.
        let marker = format!("{MARKER}={}", self._dir.path().display());
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ"))
                && environ.split(|b| *b == 0).any(|e| e == marker.as_bytes())
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

const MARKER: &str = "SANDLET_KUBELET_INSTANCE";
