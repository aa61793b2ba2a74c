//! Pods on a real node (`.ci/node` through `node_env`): a real kubelet, containerd, runc and
//! CNI bridge run the images `.ci/images/build` made from local files, with nothing pulled.
//! A pod of the sandbox image runs as its image's non-root user; a sandlet pod serves the task
//! API at its pod IP and runs a task; the node's sandlet-controller fills a Pool and runs a
//! BatchSandbox's task in one of its pods; the node, its pods and their addresses stay inside
//! the node's namespaces and below this process's cgroups.

#[allow(
    dead_code,
    reason = "of the apiserver env these tests use only eventually()"
)]
mod kube_env;
#[allow(dead_code, reason = "the node env serves other test binaries too")]
mod node_env;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, PostParams};
use kube_env::eventually;
use node_env::NodeEnv;
use sandlet_controller::crd::{BatchSandbox, Pool};
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
    let node = NodeEnv::get();
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
    let node = NodeEnv::get();
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

#[tokio::test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
async fn the_nodes_controller_runs_a_batch_sandbox_task_in_a_pool_pod() {
    let node = NodeEnv::get();
    node.namespace("pool").await;
    let client = node.client().await;
    // deploy/pool-in-container.yaml's placement, with the local images.
    let pool: Pool = serde_json::from_value(json!({
        "metadata": {"name": "local"},
        "spec": {
            "capacitySpec": {"bufferMin": 1, "bufferMax": 1, "poolMin": 1, "poolMax": 2},
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
                    "args": ["exec /opt/sandlet/sandlet serve --listen-addr 0.0.0.0:5758 --data-dir /var/lib/sandlet"],
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
    }))
    .unwrap();
    Api::<Pool>::namespaced(client.clone(), "pool")
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
    let batches: Api<BatchSandbox> = Api::namespaced(client, "pool");
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

#[test]
#[ignore = "needs the real node: `./test` builds it (.ci/node-setup) and runs every test"]
fn the_node_tool_runs_commands_against_the_node_in_its_network() {
    let node = NodeEnv::get();
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
    let node = NodeEnv::get();
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
