//! `cargo bench -p sandlet-controller --bench pooled_node` (as root, with the node built:
//! `.ci/node-setup`): pooled sandboxes on the real node (`.ci/node`, through `tests/node_env`),
//! the figures `benches/pooled.rs` measures with the stand-in kubelet.
//!
//! A Pool of N pods of the in-container placement (sandlet inside the sandbox image's main
//! container), started by the real kubelet, containerd and runc; then one BatchSandbox of N on
//! it, run by the node's sandlet-controller (this bench's release build). It prints the pool's
//! fill time (N real pods), the node's memory per pod and how many pods that memory allows on
//! this machine, and the time from BatchSandbox create to all allocated, to all tasks RUNNING,
//! and, once the tasks are let go together, from that moment to each task counted SUCCEED.
//!
//! The tasks block reading a FIFO on a hostPath volume the bench holds open, and it lets them
//! go by writing one byte per task. The sandbox image's busybox has no sub-second clock, so a
//! task cannot stamp its exit: the delays are counted from the release, and include the wake-up
//! and exit of every task on the node's two cores. `SANDLET_BENCH_PODS` sets N (default 100;
//! the kubelet runs at most `SANDLET_NODE_MAX_PODS`, 110 by default).

#[allow(dead_code, reason = "the tests' support; the bench uses part of it")]
#[path = "../tests/kube_env/mod.rs"]
mod kube_env;
#[allow(dead_code, reason = "the tests' support; the bench uses part of it")]
#[path = "../tests/node_env/mod.rs"]
mod node_env;

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use node_env::{CONTROLLER_NAMESPACE, NodeEnv};
use sandlet_controller::crd::{BatchSandbox, POOL_NAME, Pool};
use sandlet_controller::pods::is_ready;
use serde_json::json;

/// The gate's directory in the node's filesystem (a hostPath volume of every pod).
const GATE: &str = "/var/lib/sandlet-bench";

/// The node's memory use (its cgroup's, v1 or v2), in bytes.
fn node_memory(node: &NodeEnv) -> u64 {
    let v1 = format!(
        "/sys/fs/cgroup/memory{}/memory.usage_in_bytes",
        node.cgroup()
    );
    let v2 = format!("/sys/fs/cgroup{}/memory.current", node.cgroup());
    let text = std::fs::read_to_string(v1)
        .or_else(|_| std::fs::read_to_string(v2))
        .expect("the node's memory cgroup");
    text.trim().parse().unwrap()
}

fn mem_available() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn run(cmd: &str, args: &[&str]) {
    let status = std::process::Command::new(cmd).args(args).status().unwrap();
    assert!(status.success(), "{cmd} {args:?}");
}

/// The median and the largest of sorted delays, in ms.
fn p50_and_max(sorted: &[f64]) -> String {
    format!(
        "p50 {:.0}, max {:.0} ms",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: i32 = std::env::var("SANDLET_BENCH_PODS")
        .map(|v| v.parse().expect("SANDLET_BENCH_PODS is a number"))
        .unwrap_or(100);
    let available_before = mem_available();
    let node = NodeEnv::get_scoped();
    node.namespace(CONTROLLER_NAMESPACE).await;
    let client = node.client().await;

    // The gate: a FIFO the bench holds open for writing, so a task's open never blocks and its
    // read waits for the byte the bench writes.
    let gate = node.host_path(GATE);
    std::fs::create_dir_all(&gate).unwrap();
    run("chmod", &["1777", &gate.display().to_string()]);
    let fifo = gate.join("fifo");
    run("mkfifo", &["-m", "666", &fifo.display().to_string()]);
    let mut gate_writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();

    // deploy/pool-in-container.yaml's placement with the local images, and the gate.
    let memory_before = node_memory(node);
    let capacity = json!({"bufferMin": 0, "bufferMax": 0, "poolMin": n, "poolMax": n});
    let mut pool = node_env::in_container_pool("bench", capacity);
    let pod = &mut pool["spec"]["template"]["spec"];
    pod["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "gate", "hostPath": {"path": GATE, "type": "Directory"}}));
    pod["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "gate", "mountPath": "/gate"}));
    let pool: Pool = serde_json::from_value(pool).unwrap();
    let filling = Instant::now();
    Api::<Pool>::namespaced(client.clone(), CONTROLLER_NAMESPACE)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    let of_pool = ListParams::default().labels(&format!("{POOL_NAME}=bench"));
    loop {
        let listed = pods.list(&of_pool).await.unwrap().items;
        if listed.iter().filter(|p| is_ready(p)).count() >= n as usize {
            break;
        }
        assert!(
            filling.elapsed() < Duration::from_secs(900),
            "the pool did not reach {n} ready pods in 15 min"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let filled = filling.elapsed();
    let per_pod = (node_memory(node) - memory_before) / n as u64;

    let sandboxes: Api<BatchSandbox> = Api::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watch = {
        let config = watcher::Config::default().fields("metadata.name=b");
        let sandboxes = sandboxes.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(sandboxes, config));
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) = event {
                    let _ = seen_tx.send((Instant::now(), b.status.unwrap_or_default()));
                }
            }
        })
    };
    let created = Instant::now();
    let batch: BatchSandbox = serde_json::from_value(json!({
        "metadata": {"name": "b"},
        "spec": {"replicas": n, "poolRef": "bench",
            "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", "read -n1 x < /gate/fifo"]}}}},
    }))
    .unwrap();
    sandboxes
        .create(&PostParams::default(), &batch)
        .await
        .unwrap();
    let (mut allocated, mut running) = (None, None);
    while running.is_none() {
        let (at, s) = seen.recv().await.unwrap();
        if allocated.is_none() && s.allocated >= n {
            allocated = Some(at - created);
        }
        if s.task_running >= n {
            running = Some(at - created);
        }
    }
    std::io::Write::write_all(&mut gate_writer, &vec![b'x'; n as usize]).unwrap();
    let released = Instant::now();
    let mut counted: Vec<f64> = Vec::new();
    let succeeded = loop {
        let (at, s) = seen.recv().await.unwrap();
        assert_eq!(s.task_failed, 0, "{s:?}");
        while (counted.len() as i32) < s.task_succeed {
            counted.push((at - released).as_secs_f64() * 1e3);
        }
        if s.task_succeed >= n {
            break at - created;
        }
    };
    watch.abort();

    println!();
    println!("{n} pooled sandboxes on the real node (kubelet, containerd, runc; 2-core VM)");
    println!(
        "{:<44}{:>12.1} s",
        format!("pool: {n} pods started and ready"),
        filled.as_secs_f64()
    );
    println!(
        "{:<44}{:>12.1} MiB",
        "node memory per pod (pause, shim, sandlet)",
        per_pod as f64 / 1048576.0
    );
    println!(
        "{:<44}{:>12}",
        "pods the memory available before allows",
        available_before / per_pod
    );
    println!(
        "{:<44}{:>12.3} s",
        "create -> all allocated",
        allocated.unwrap().as_secs_f64()
    );
    println!(
        "{:<44}{:>12.3} s",
        "create -> all tasks RUNNING",
        running.unwrap().as_secs_f64()
    );
    println!(
        "{:<44}{:>12.3} s",
        "create -> all tasks SUCCEED*",
        succeeded.as_secs_f64()
    );
    println!(
        "{:<44}{:>24}",
        "tasks let go -> counted SUCCEED",
        p50_and_max(&counted)
    );
    println!("* includes the hold between all RUNNING and the release");
    sandboxes
        .delete("b", &DeleteParams::default())
        .await
        .unwrap();
    drop(gate_writer);
}
