//! Pods on a real node (`.ci/node` through `node_env`): a real kubelet, containerd, runc and
//! CNI bridge run the images `.ci/images/build` made from local files, with nothing pulled.
//! A pod of the sandbox image runs as its image's non-root user; a sandlet pod serves the task
//! API at its pod IP and runs a task; the node's sandlet-controller fills a Pool and runs a
//! BatchSandbox's task in one of its pods; the node, its pods and their addresses stay inside
//! the node's namespaces and below this process's cgroups.

#[allow(
    dead_code,
    reason = "of the apiserver env these tests use only eventually() and endpoints()"
)]
mod kube_env;
#[allow(dead_code, reason = "the node env serves other test binaries too")]
mod node_env;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use kube_env::{counters_reach, counters_until, event_says, eventually};
use node_env::{CONTROLLER_NAMESPACE, NodeEnv, in_container_pool};
use sandlet_controller::crd::{ALLOC_STATUS, BatchSandbox, PodList, Pool};
use serde_json::{Value, json};

/// The node's pod network (`.ci/node`): its bridge holds the first address.
const POD_NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 88, 0, 0), 16);

fn in_pod_network(ip: IpAddr) -> bool {
    let IpAddr::V4(ip) = ip else { return false };
    u32::from(ip) >> (32 - POD_NETWORK.1) == u32::from(POD_NETWORK.0) >> (32 - POD_NETWORK.1)
}

/// Creates the pod and returns its IP once it is Running and Ready; a container that cannot
/// start (e.g. an image missing with imagePullPolicy: Never) fails the test with its reason.
async fn run_pod(pods: &Api<Pod>, spec: Value) -> IpAddr {
    let pod: Pod = serde_json::from_value(spec).unwrap();
    let name = pod.metadata.name.clone().unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let what = format!("pod {name} Running and Ready");
    let ip = eventually(&what, Duration::from_secs(120), async || {
        let status = pods.get(&name).await.ok()?.status?;
        for container in status.container_statuses.iter().flatten() {
            let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
            if let Some(reason) = waiting.and_then(|w| w.reason.as_deref())
                && reason != "ContainerCreating"
            {
                panic!(
                    "container {} of {name} cannot start: {waiting:?}",
                    container.name
                );
            }
        }
        let ready = status
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (status.phase.as_deref() == Some("Running") && ready).then_some(status.pod_ip?)
    })
    .await;
    ip.parse().unwrap()
}

/// A pod of one container of the sandbox image, running `command`.
fn sandbox_pod(name: &str, command: &[&str]) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": "sandlet-sandbox:dev",
                "imagePullPolicy": "Never",
                "command": command,
            }],
        },
    })
}

/// The addresses of the calling thread's network namespace.
fn addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|a| Some(IpAddr::V4(a.address?.as_sockaddr_in()?.ip())))
        .collect()
}

#[tokio::test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn a_pod_of_the_sandbox_image_runs_as_the_images_non_root_user() {
    let node = NodeEnv::get_scoped();
    node.namespace("sandbox").await;
    let pods: Api<Pod> = Api::namespaced(node.client().await, "sandbox");
    // id -un resolves the uid in the image's own /etc/passwd.
    let mut pod = sandbox_pod(
        "busybox",
        &[
            "sh",
            "-c",
            "echo \"$(id -un) $(id -u):$(id -g)\"; exec sleep 3600",
        ],
    );
    pod["spec"]["containers"][0]["securityContext"] =
        json!({"runAsUser": 1000, "runAsGroup": 1000});
    let ip = run_pod(&pods, pod).await;
    assert!(in_pod_network(ip), "pod IP {ip}");
    let log = pods.logs("busybox", &LogParams::default()).await.unwrap();
    assert_eq!(log.trim(), "sandbox 1000:1000");
}

#[tokio::test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn a_sandlet_pod_runs_a_task_through_its_task_api_at_the_pod_ip() {
    let node = NodeEnv::get_scoped();
    node.namespace("tasks").await;
    let pods: Api<Pod> = Api::namespaced(node.client().await, "tasks");
    let ip = run_pod(
        &pods,
        json!({
            "metadata": {"name": "sandlet"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "sandlet",
                    "image": "sandlet:dev",
                    "imagePullPolicy": "Never",
                    "args": ["serve", "--listen-addr", "0.0.0.0:5758",
                             "--data-dir", "/var/lib/sandlet/tasks",
                             "--token-file", "/var/run/sandlet/token"],
                    "ports": [{"name": "tasks", "containerPort": 5758}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 5758}, "periodSeconds": 1},
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/var/lib/sandlet"},
                        {"name": "token", "mountPath": "/var/run/sandlet", "readOnly": true},
                    ],
                }],
                "volumes": [
                    {"name": "data", "emptyDir": {}},
                    {"name": "token", "secret": {"secretName": "sandlet-token"}},
                ],
            },
        }),
    )
    .await;
    assert!(in_pod_network(ip), "pod IP {ip}");
    let url = format!("http://{}", node.forward(SocketAddr::new(ip, 5758)));
    let http = reqwest::Client::new();
    let token = node.executor_token();

    let unauthenticated = http.get(format!("{url}/getTasks")).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let set = http
        .post(format!("{url}/setTasks"))
        .bearer_auth(token)
        .json(&json!([{"name": "hello", "process": {"command": ["/sandlet", "--version"]}}]))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200, "{}", set.text().await.unwrap());
    let ended = eventually("the task ends", Duration::from_secs(60), async || {
        let tasks: Vec<Value> = http
            .get(format!("{url}/getTasks"))
            .bearer_auth(token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let task = tasks.into_iter().find(|t| t["name"] == "hello")?;
        task["processStatus"]["terminated"]
            .is_object()
            .then(|| task["processStatus"]["terminated"].clone())
    })
    .await;
    assert_eq!(ended["exitCode"], 0, "{ended}");
    assert_eq!(ended["reason"], "Succeeded", "{ended}");
    let output = http
        .get(format!("{url}/tasks/hello/logs"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(output.starts_with("sandlet "), "task output: {output:?}");
}

/// The pods a BatchSandbox holds, in index order.
async fn held_pods(batches: &Api<BatchSandbox>, name: &str) -> Vec<String> {
    let b = batches.get(name).await.unwrap();
    PodList::from_annotation(b.metadata.annotations.as_ref(), ALLOC_STATUS).pods
}

/// `touch /tmp/gate` in pod `pod`'s main container (kubectl exec, through the kubelet).
fn open_gate(node: &NodeEnv, namespace: &str, pod: &str) {
    let out = node.exec(&[
        "kubectl",
        "-n",
        namespace,
        "exec",
        pod,
        "-c",
        "main",
        "--",
        "touch",
        "/tmp/gate",
    ]);
    assert!(out.status.success(), "{out:?}");
}

/// The controller's end-to-end case (controller/tests/e2e.rs) on real pods: a Pool fills its
/// buffer with pods the kubelet starts; a BatchSandbox gets 4, one task each, gated; a
/// controller restart (its runtime dropped, as a crash) loses nothing while tasks run and end;
/// a killed executor (the main container's sandlet) is reported unreachable, and when the
/// kubelet has restarted it, reachable again with its task's true end: the runtime killed the
/// task along with its container, so it is FAILED (the stand-in kubelet's tasks survive, as no
/// runtime ends them); deleting the BatchSandbox stops the last running task (it takes a
/// second on SIGTERM) before its pod is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn the_controllers_end_to_end_case_on_real_pods() {
    const NS: &str = "e2e";
    let node = NodeEnv::get_scoped();
    node.namespace(NS).await;
    let client = node.client().await;
    let mut controller = node.spawn_controller(NS);
    let pools: Api<Pool> = Api::namespaced(client.clone(), NS);
    let batches: Api<BatchSandbox> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let events: Api<Event> = Api::namespaced(client.clone(), NS);

    let capacity = json!({"bufferMin": 2, "bufferMax": 3, "poolMin": 0, "poolMax": 8});
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(in_container_pool("p", capacity)).unwrap(),
        )
        .await
        .unwrap();
    eventually(
        "the pool's buffer of 2 ready pods",
        Duration::from_secs(120),
        async || {
            let s = pools.get("p").await.ok()?.status?;
            (s.total == 2 && s.available == 2).then_some(())
        },
    )
    .await;

    // Tasks wait for /tmp/gate; the last one fails, the first one stops slowly on SIGTERM.
    let gate = "while [ ! -e /tmp/gate ]; do sleep 0.1; done";
    let slow = format!("trap 'sleep 1; exit 0' TERM; {gate}");
    let batch: BatchSandbox = serde_json::from_value(json!({
        "metadata": {"name": "b"},
        "spec": {
            "replicas": 4, "poolRef": "p",
            "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", gate]}}},
            "shardTaskPatches": [
                {"spec": {"process": {"command": ["sh", "-c", slow]}}}, {}, {},
                {"spec": {"process": {"command": ["sh", "-c", format!("{gate}; exit 3")]}}}],
        },
    }))
    .unwrap();
    batches
        .create(&PostParams::default(), &batch)
        .await
        .unwrap();
    counters_reach(
        &batches,
        "b",
        (4, 4, 0, 0, 0),
        "4 pods allocated, 4 tasks running",
        Duration::from_secs(180),
    )
    .await;
    let held = held_pods(&batches, "b").await;
    assert_eq!(held.len(), 4);
    for ip in kube_env::endpoints(&batches.get("b").await.unwrap()) {
        assert!(in_pod_network(ip.parse().unwrap()), "{ip}");
    }

    // A controller restart while tasks run and end: every status written shows them as they
    // are, never UNKNOWN or lost.
    let history = counters_until(&batches, "b", (4, 1, 2, 1, 0)).await;
    drop(controller);
    controller = node.spawn_controller(NS);
    for pod in &held[1..] {
        open_gate(node, NS, pod);
    }
    let history = tokio::time::timeout(Duration::from_secs(120), history)
        .await
        .expect("2 SUCCEED and 1 FAILED after the restart")
        .unwrap();
    assert!(
        history
            .iter()
            .all(|c| c.0 == 4 && c.4 == 0 && c.1 + c.2 + c.3 == 4),
        "a restarted controller wrote statuses it did not know: {history:?}"
    );
    event_says(
        &events,
        "b",
        "Warning",
        "TaskFailed",
        &format!("task b-3 on pod {} failed: exit code 3", held[3]),
    )
    .await;

    // The executor of pod 0 is killed: its container ends, the kubelet restarts it.
    let first = pods.get(&held[0]).await.unwrap();
    let uid = first.metadata.uid.clone().unwrap();
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|c| c[0].restart_count)
    };
    let before = restarts(&first);
    let sandlet = pod_processes(&uid)
        .into_iter()
        .find(|p| {
            p.cmdline
                .first()
                .is_some_and(|c| c == "/opt/sandlet/sandlet")
                && p.cmdline.get(1).is_some_and(|c| c == "serve")
        })
        .expect("the pod's sandlet");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sandlet.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    event_says(&events, "b", "Warning", "ExecutorUnreachable", &held[0]).await;
    eventually(
        "the kubelet restarted the executor's container",
        Duration::from_secs(120),
        async || {
            let p = pods.get(&held[0]).await.ok()?;
            (restarts(&p) > before).then_some(())
        },
    )
    .await;
    event_says(&events, "b", "Normal", "ExecutorReachable", &held[0]).await;
    counters_reach(
        &batches,
        "b",
        (4, 0, 2, 2, 0),
        "the killed executor's task is FAILED, nothing UNKNOWN",
        Duration::from_secs(120),
    )
    .await;

    // A task still running when its BatchSandbox is deleted is stopped before its pod goes.
    let batch: BatchSandbox = serde_json::from_value(json!({
        "metadata": {"name": "slow"},
        "spec": {"replicas": 1, "poolRef": "p",
                 "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", slow]}}}},
    }))
    .unwrap();
    batches
        .create(&PostParams::default(), &batch)
        .await
        .unwrap();
    counters_reach(
        &batches,
        "slow",
        (1, 1, 0, 0, 0),
        "its task runs",
        Duration::from_secs(180),
    )
    .await;
    let pod = held_pods(&batches, "slow").await.remove(0);
    let uid = pods.get(&pod).await.unwrap().metadata.uid.unwrap();
    let task = eventually("the task's shell", Duration::from_secs(30), async || {
        pod_processes(&uid)
            .into_iter()
            .find(|p| p.cmdline.get(2) == Some(&slow))
    })
    .await;
    let task_ended = std::thread::spawn(move || {
        while Path::new(&format!("/proc/{}", task.pid)).exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Instant::now()
    });
    batches
        .delete("slow", &DeleteParams::default())
        .await
        .unwrap();
    let pod_deleted = eventually(
        "its pod is being deleted",
        Duration::from_secs(60),
        async || {
            let p = pods.get_opt(&pod).await.ok()?;
            p.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
                .then(Instant::now)
        },
    )
    .await;
    let task_ended = task_ended.join().unwrap();
    assert!(
        task_ended < pod_deleted,
        "the pod was deleted before its task had stopped"
    );
    eventually(
        "the BatchSandbox is gone",
        Duration::from_secs(60),
        async || batches.get_opt("slow").await.ok()?.is_none().then_some(()),
    )
    .await;
    drop(controller);
}

#[tokio::test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn the_nodes_controller_runs_a_batch_sandbox_task_in_a_pool_pod() {
    let node = NodeEnv::get_scoped();
    node.namespace(CONTROLLER_NAMESPACE).await;
    let client = node.client().await;
    let capacity = json!({"bufferMin": 1, "bufferMax": 1, "poolMin": 1, "poolMax": 2});
    let pool: Pool = serde_json::from_value(in_container_pool("local", capacity)).unwrap();
    Api::<Pool>::namespaced(client.clone(), CONTROLLER_NAMESPACE)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();
    let batch: BatchSandbox = serde_json::from_value(json!({
        "metadata": {"name": "one"},
        "spec": {
            "replicas": 1,
            "poolRef": "local",
            "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", "test -d /opt/sandlet"]}}},
        },
    }))
    .unwrap();
    let batches: Api<BatchSandbox> = Api::namespaced(client, CONTROLLER_NAMESPACE);
    batches
        .create(&PostParams::default(), &batch)
        .await
        .unwrap();
    let status = eventually("the task SUCCEED", Duration::from_secs(120), async || {
        let status = batches.get("one").await.ok()?.status?;
        assert_eq!(status.task_failed, 0, "{status:?}");
        (status.task_succeed == 1).then_some(status)
    })
    .await;
    assert_eq!((status.allocated, status.ready), (1, 1), "{status:?}");
}

/// What every task of the README Pool prints: its user, its working directory, and files only
/// the sandbox image has (sandlet's image holds `/sandlet` alone: no passwd, no shell).
const WHERE_AM_I: &str =
    "echo \"$(id -un) $(id -u):$(id -g) $(pwd)\"; grep ^sandbox: /etc/passwd; readlink /bin/sh";

/// The OpenSandbox controller README's Pool as written there, only its images swapped
/// (deploy/examples/opensandbox-readme-pool.yaml): sandlet decides it is a sidecar, finds the
/// sandbox container by itself and enters it by chroot, holding the runtime's default
/// capabilities plus SYS_PTRACE. A BatchSandbox with a task template and a failing shard's patch
/// runs every task there, as the container's user, and the counters reach SUCCEED and FAILED.
#[tokio::test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn the_opensandbox_readme_pool_runs_every_task_in_its_sandbox_container() {
    let node = NodeEnv::get_scoped();
    node.namespace(CONTROLLER_NAMESPACE).await;
    let client = node.client().await;
    let pool: Pool = serde_yaml::from_str(include_str!(
        "../../deploy/local-node/opensandbox-readme-pool.yaml"
    ))
    .unwrap();
    Api::<Pool>::namespaced(client.clone(), CONTROLLER_NAMESPACE)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();
    let batch: BatchSandbox = serde_json::from_value(json!({
        "metadata": {"name": "readme"},
        "spec": {
            "replicas": 3,
            "poolRef": "task-example-pool",
            "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", WHERE_AM_I]}}},
            "shardTaskPatches": [{}, {},
                {"spec": {"process": {"command": ["sh", "-c", format!("{WHERE_AM_I}; exit 3")]}}}],
        },
    }))
    .unwrap();
    let batches: Api<BatchSandbox> = Api::namespaced(client, CONTROLLER_NAMESPACE);
    batches
        .create(&PostParams::default(), &batch)
        .await
        .unwrap();
    let status = eventually(
        "2 tasks SUCCEED and 1 FAILED",
        Duration::from_secs(180),
        async || {
            let status = batches.get("readme").await.ok()?.status?;
            (status.task_succeed + status.task_failed == 3).then_some(status)
        },
    )
    .await;
    assert_eq!(
        (status.allocated, status.task_succeed, status.task_failed),
        (3, 2, 1),
        "{status:?}"
    );

    let http = reqwest::Client::new();
    let endpoints = kube_env::endpoints(&batches.get("readme").await.unwrap());
    for (index, ip) in endpoints.iter().enumerate() {
        let url = format!(
            "http://{}",
            node.forward(SocketAddr::new(ip.parse().unwrap(), 5758))
        );
        // The template sets no token: the task API asks for none.
        let get = async |path: &str| {
            let response = http.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path} on {ip}");
            response.text().await.unwrap()
        };
        let health: Value = serde_json::from_str(&get("/health").await).unwrap();
        assert_eq!(health["sidecar"]["method"], "chroot", "{health}");
        assert_eq!(health["sidecar"]["target"]["uid"], 1000, "{health}");
        let output = get(&format!("/tasks/readme-{index}/logs")).await;
        assert_eq!(
            output,
            "sandbox 1000:1000 /home/sandbox\nsandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\nbusybox\n",
            "task readme-{index} on {ip}"
        );
        let tasks: Vec<Value> = serde_json::from_str(&get("/getTasks").await).unwrap();
        let exit_code = &tasks[0]["processStatus"]["terminated"]["exitCode"];
        assert_eq!(*exit_code, if index == 2 { 3 } else { 0 }, "{tasks:?}");
    }
}

/// A process of the node, as the host sees it.
struct HostProcess {
    pid: i32,
    cmdline: Vec<String>,
    /// `/proc/<pid>/cgroup`.
    cgroup: String,
}

/// The processes of pod `uid` (in its kubelet pod cgroup `pod<uid>`), seen from the host.
fn pod_processes(uid: &str) -> Vec<HostProcess> {
    let pod_cgroup = format!("/pod{uid}/");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let cgroup = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
            let cmdline = std::fs::read_to_string(e.path().join("cmdline")).ok()?;
            cgroup.contains(&pod_cgroup).then(|| HostProcess {
                pid,
                cmdline: cmdline.split_terminator('\0').map(String::from).collect(),
                cgroup,
            })
        })
        .collect()
}

/// The one process of pod `uid` whose command line is `cmdline`.
fn pod_process(uid: &str, cmdline: &[&str]) -> HostProcess {
    let mut found: Vec<HostProcess> = pod_processes(uid)
        .into_iter()
        .filter(|p| p.cmdline == cmdline)
        .collect();
    assert_eq!(found.len(), 1, "processes {cmdline:?} in pod {uid}");
    found.pop().unwrap()
}

/// The container IDs of a pod's containers, by name (`containerd://<id>` without the scheme).
async fn container_ids(pods: &Api<Pod>, name: &str) -> Vec<(String, String, i32)> {
    let status = pods.get(name).await.unwrap().status.unwrap();
    status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            let id = c.container_id.unwrap_or_default();
            let id = id.rsplit("://").next().unwrap().to_string();
            (c.name, id, c.restart_count)
        })
        .collect()
}

/// A client of one pod's task API through a forward, for a template that sets no token.
struct TaskApi {
    url: String,
    http: reqwest::Client,
}

impl TaskApi {
    fn new(node: &NodeEnv, ip: IpAddr) -> TaskApi {
        TaskApi {
            url: format!("http://{}", node.forward(SocketAddr::new(ip, 5758))),
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    }

    async fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await.expect("the task API answers");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// setTasks with the whole list.
    async fn set_tasks(&self, tasks: Value) {
        let response = self
            .http
            .post(format!("{}/setTasks", self.url))
            .json(&tasks)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    /// Waits until task `name` is in `state` (`running` or `terminated`) and returns it.
    async fn task_reaches(&self, name: &str, state: &str) -> Value {
        let what = format!("task {name} {state}");
        eventually(&what, Duration::from_secs(120), async || {
            let (_, body) = self.get("/getTasks").await?;
            let tasks: Vec<Value> = serde_json::from_str(&body).ok()?;
            let task = tasks.into_iter().find(|t| t["name"] == name)?;
            task["processStatus"][state].is_object().then_some(task)
        })
        .await
    }

    /// Waits until sandlet is ready to start tasks (it found the main container) and returns
    /// its /health.
    async fn ready(&self) -> Value {
        eventually("sandlet ready", Duration::from_secs(120), async || {
            (self.get("/ready").await?.0 == 200).then_some(())
        })
        .await;
        self.json("/health").await
    }
}

/// Sidecar mode in a real pod, the README template's containers: the main container's PID 1
/// killed, the kubelet restarts the container; the task running in it ends
/// `MainContainerRestarted` and the next one runs in the new container. What /health reports of
/// cgroups is what the runtime made: the main container's own cgroups, not joined (the sidecar
/// sees no cgroupfs of them), so tasks are in sandlet's container's cgroups, as they really are.
#[tokio::test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn a_sidecar_follows_its_main_container_through_a_restart_by_the_kubelet() {
    let node = NodeEnv::get_scoped();
    node.namespace("sidecar").await;
    let pods: Api<Pod> = Api::namespaced(node.client().await, "sidecar");
    let pool: Value = serde_yaml::from_str(include_str!(
        "../../deploy/local-node/opensandbox-readme-pool.yaml"
    ))
    .unwrap();
    let mut pod =
        json!({"metadata": {"name": "sidecar"}, "spec": pool["spec"]["template"]["spec"]});
    pod["spec"]["terminationGracePeriodSeconds"] = json!(1);
    let ip = run_pod(&pods, pod).await;
    let uid = pods.get("sidecar").await.unwrap().metadata.uid.unwrap();
    let api = TaskApi::new(node, ip);
    let health = api.ready().await;
    let sidecar = &health["sidecar"];
    assert_eq!(sidecar["method"], "chroot", "{health}");
    assert_eq!(sidecar["namespacesNotJoined"], json!(["mnt"]), "{health}");

    // cgroups: the container's as the host sees them, each hierarchy reported, none joined.
    let containers = container_ids(&pods, "sidecar").await;
    let id_of = |name: &str| {
        containers
            .iter()
            .find(|c| c.0 == name)
            .map(|c| c.1.clone())
            .unwrap()
    };
    let main = pod_process(&uid, &["sleep", "3600"]);
    let sandlet = pod_process(&uid, &["/sandlet", "serve"]);
    let reported = sidecar["cgroups"].as_array().unwrap();
    for line in main.cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (
            fields.next(),
            fields.next().unwrap(),
            fields.next().unwrap(),
        );
        assert!(
            path.ends_with(&format!("/pod{uid}/{}", id_of("sandbox-container"))),
            "the runtime's cgroup of the main container: {line}"
        );
        let hierarchies: Vec<&str> = if controllers.is_empty() {
            vec!["unified"]
        } else {
            controllers.split(',').collect()
        };
        for hierarchy in hierarchies {
            let entry = reported
                .iter()
                .find(|c| c["hierarchy"] == hierarchy || c["hierarchy"] == controllers)
                .unwrap_or_else(|| panic!("{hierarchy} not reported: {health}"));
            assert_eq!(entry["cgroup"], path, "{hierarchy}: {health}");
            assert!(
                entry["procs"].is_null() && entry["note"].is_string(),
                "{entry}"
            );
        }
    }

    // A task runs in the main container, in sandlet's cgroups as reported.
    let running = json!({"name": "before", "process": {"command": ["sh", "-c", "touch /tmp/old && exec sleep 3602"]}});
    api.set_tasks(json!([running])).await;
    api.task_reaches("before", "running").await;
    let task = eventually("the task's sleep", Duration::from_secs(30), async || {
        pod_processes(&uid)
            .into_iter()
            .find(|p| p.cmdline == ["sleep", "3602"])
    })
    .await;
    assert_eq!(
        task.cgroup, sandlet.cgroup,
        "the task's cgroups are sandlet's"
    );

    // The main container's PID 1 dies; the kubelet starts a new one.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(main.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let ended = api.task_reaches("before", "terminated").await;
    assert_eq!(
        ended["processStatus"]["terminated"]["reason"], "MainContainerRestarted",
        "{ended}"
    );
    eventually(
        "the kubelet restarted the main container",
        Duration::from_secs(120),
        async || {
            let now = container_ids(&pods, "sidecar").await;
            let main = now.iter().find(|c| c.0 == "sandbox-container")?;
            (main.2 == 1 && main.1 != id_of("sandbox-container")).then_some(())
        },
    )
    .await;
    let health = api.ready().await;
    assert_ne!(
        health["sidecar"]["target"]["pid"], sidecar["target"]["pid"],
        "{health}"
    );
    let after =
        json!({"name": "after", "process": {"command": ["sh", "-c", "ls -A /tmp; id -un"]}});
    api.set_tasks(json!([running, after])).await;
    let done = api.task_reaches("after", "terminated").await;
    assert_eq!(done["processStatus"]["terminated"]["exitCode"], 0, "{done}");
    let (_, output) = api.get("/tasks/after/logs").await.unwrap();
    assert_eq!(output, "sandbox\n", "a fresh container: no /tmp/old");
}

/// The chart's directory.
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/helm/sandlet");

/// Runs helm (`.ci/node exec`, which points it at the node) and returns its stdout.
fn helm(node: &NodeEnv, args: &[&str]) -> String {
    let cmd: Vec<&str> = ["helm"].iter().chain(args).copied().collect();
    let out = node.exec(&cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The Pool a `helm template` of the chart renders with `set`.
fn rendered_pool(node: &NodeEnv, set: &[&str]) -> Value {
    let mut args = vec!["template", "sample", CHART];
    for s in set {
        args.extend(["--set", s]);
    }
    let rendered = helm(node, &args);
    serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .find(|doc: &Value| doc["kind"] == "Pool")
        .expect("a Pool rendered")
}

/// The Helm chart (deploy/helm/sandlet): `helm lint --strict` is clean for each placement of
/// the sample Pool, whose defaults render deploy/pool-sidecar.yaml and deploy/pool-in-container.yaml
/// as shipped; installed on the node by helm, its controller (a pod running the
/// sandlet-controller image, as the service account the chart binds) fills the sample Pool of
/// sidecars and runs a BatchSandbox's tasks there; uninstalled, its cluster-wide objects go.
#[tokio::test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn the_helm_chart_installs_a_controller_that_runs_tasks_in_its_sample_pool() {
    let node = NodeEnv::get_scoped();
    for placement in ["sidecar", "in-container"] {
        let set = format!("samplePool.placement={placement}");
        helm(
            node,
            &[
                "lint",
                "--strict",
                CHART,
                "--set",
                "samplePool.enabled=true",
                "--set",
                &set,
            ],
        );
        let shipped: Value = serde_yaml::from_str(
            &std::fs::read_to_string(format!("{CHART}/../../pool-{placement}.yaml")).unwrap(),
        )
        .unwrap();
        let pool = rendered_pool(node, &["samplePool.enabled=true", &set]);
        assert_eq!(pool["metadata"]["name"], shipped["metadata"]["name"]);
        assert_eq!(
            pool["spec"], shipped["spec"],
            "the chart's {placement} Pool"
        );
    }
    helm(node, &["lint", "--strict", CHART]);

    // The node has no kube-proxy: the controller reaches the apiserver at the node's address.
    let env = r#"controller.env=[{"name":"KUBERNETES_SERVICE_HOST","value":"10.88.0.1"},{"name":"KUBERNETES_SERVICE_PORT","value":"6443"}]"#;
    let ns = "helm-sandlet";
    let installed = helm(
        node,
        &[
            "install",
            "sbx",
            CHART,
            "--namespace",
            ns,
            "--create-namespace",
            "--wait",
            "--timeout",
            "3m",
            "--set",
            "controller.imagePullPolicy=Never",
            "--set",
            &format!("controller.watchNamespace={ns}"),
            "--set-json",
            env,
            "--set",
            "samplePool.enabled=true",
            "--set",
            "samplePool.mainImage=sandlet-sandbox:nonroot",
            "--set",
            "samplePool.imagePullPolicy=Never",
            "--set-json",
            r#"samplePool.capacitySpec={"bufferMin":1,"bufferMax":2,"poolMin":2,"poolMax":3}"#,
            "--set-json",
            "samplePool.mainResources={}",
        ],
    );
    assert!(installed.contains("STATUS: deployed"), "{installed}");

    let client = node.client().await;
    let batch: BatchSandbox = serde_json::from_value(json!({
        "metadata": {"name": "from-helm"},
        "spec": {
            "replicas": 2,
            "poolRef": "sandlet-sidecar",
            "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", "id -un"]}}},
        },
    }))
    .unwrap();
    let batches: Api<BatchSandbox> = Api::namespaced(client.clone(), ns);
    batches
        .create(&PostParams::default(), &batch)
        .await
        .unwrap();
    let status = eventually("2 tasks SUCCEED", Duration::from_secs(180), async || {
        let status = batches.get("from-helm").await.ok()?.status?;
        (status.task_succeed == 2).then_some(status)
    })
    .await;
    assert_eq!((status.allocated, status.task_failed), (2, 0), "{status:?}");
    // The tasks ran in the main container, as its user, behind the token the chart made.
    let token = node.exec(&[
        "kubectl",
        "-n",
        ns,
        "get",
        "secret",
        "sandlet-token",
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    let token = String::from_utf8(token.stdout).unwrap();
    let ip = kube_env::endpoints(&batches.get("from-helm").await.unwrap())[0].clone();
    let url = format!(
        "http://{}",
        node.forward(SocketAddr::new(ip.parse().unwrap(), 5758))
    );
    let logs = reqwest::Client::new()
        .get(format!("{url}/tasks/from-helm-0/logs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), 200);
    assert_eq!(logs.text().await.unwrap(), "sandbox\n");

    batches
        .delete("from-helm", &Default::default())
        .await
        .unwrap();
    eventually(
        "the BatchSandbox is gone",
        Duration::from_secs(60),
        async || {
            batches
                .get_opt("from-helm")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    helm(node, &["uninstall", "sbx", "--namespace", ns, "--wait"]);
    let roles = node.exec(&["kubectl", "get", "clusterrole", "sbx-sandlet-controller"]);
    assert!(
        !roles.status.success(),
        "the ClusterRole outlived the release"
    );
}

#[test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
fn the_node_tool_runs_commands_against_the_node_in_its_network() {
    let node = NodeEnv::get_scoped();
    let text = |cmd: &[&str]| {
        let out = node.exec(cmd);
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let ready = text(&[
        "kubectl",
        "get",
        "node",
        "sandlet-node",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    assert_eq!(ready, "True");
    let images = text(&["crictl", "images", "-q"]);
    let named = text(&["ctr", "images", "ls", "-q"]);
    for image in ["sandlet:dev", "sandlet-sandbox:dev", "sandlet-pause:dev"] {
        let full = format!("docker.io/library/{image}");
        assert!(named.lines().any(|l| l == full), "{image} not in:\n{named}");
    }
    assert!(images.lines().count() >= 3, "{images}");
    // The node's own address answers in its namespace (kube-apiserver listens on it).
    let open = text(&["bash", "-c", "exec 3<>/dev/tcp/10.88.0.1/6443 && echo open"]);
    assert_eq!(open.trim(), "open");
}

#[tokio::test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn the_node_and_its_pods_stay_in_their_namespaces_and_below_our_cgroups() {
    let node = NodeEnv::get_scoped();
    node.namespace("contained").await;
    let pods: Api<Pod> = Api::namespaced(node.client().await, "contained");
    let ip = run_pod(&pods, sandbox_pod("sleeper", &["sleep", "3601"])).await;

    // Addresses: the pod's and the bridge's exist in the node's network namespace only.
    let inside = node.in_netns(addresses);
    assert!(
        inside.iter().any(|a| in_pod_network(*a)),
        "node: {inside:?}"
    );
    let outside = addresses();
    assert!(
        !outside.iter().any(|a| in_pod_network(*a) || *a == ip),
        "the host has a node address: {outside:?}"
    );

    // cgroups: the pod's processes are in the kubelet's pod cgroups below the node's, which is
    // below ours in every hierarchy.
    let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    for line in ours.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap();
        assert!(
            node.cgroup().starts_with(path.trim_end_matches('/')),
            "node cgroup {} is not below ours ({line})",
            node.cgroup()
        );
    }
    let pod_cgroup = format!("{}/kubepods", node.cgroup());
    let sleepers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cmdline"))
                .is_ok_and(|c| c.split_terminator('\0').eq(["sleep", "3601"]))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("cgroup")).ok())
        .filter(|c| c.contains(&pod_cgroup))
        .collect();
    assert_eq!(sleepers.len(), 1, "the pod's sleep below {pod_cgroup}");
    for line in sleepers[0].lines() {
        let path = line.splitn(3, ':').nth(2).unwrap();
        assert!(path.starts_with(&pod_cgroup), "{line}");
    }

    // Mounts: none of the node's (overlay rootfs, kubelet volumes, bind mounts) is ours.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for forbidden in ["sandlet-node", "kubelet", "containerd"] {
        assert!(
            !mounts.contains(forbidden),
            "a node mount shows in ours ({forbidden}):\n{mounts}"
        );
    }
}
