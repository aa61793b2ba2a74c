//! `cargo bench -p sandlet-controller --bench pooled`: 100 pooled sandboxes with a trivial task,
//! on a real kube-apiserver with real sandlet executors (see `tests/kube_env`).
//!
//! Two waves of 100, each a BatchSandbox on the same pool: in the first the pods' processes
//! (executors, shims, tasks) share the two cores with the control plane as equals; in the second
//! they run at nice 10, so the apiserver, etcd and the controller go first, as on a cluster where
//! the pods run on other nodes. For each it prints the time from BatchSandbox create to all
//! allocated, to all tasks RUNNING and, once the tasks are let go together, to all SUCCEED; the
//! median delay from a task's exit to the status counter that shows it, and to its executor's
//! change feed (the executor's share of that delay, from ten executors the bench follows
//! itself); and the API writes the allocation took (from the apiserver's own
//! `apiserver_request_total`).

// The tests' support; the bench uses part of it.
#[allow(dead_code)]
#[path = "../tests/kube_env/mod.rs"]
mod kube_env;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use sandlet_controller::crd::{BatchSandbox, POOL_NAME, Pool};
use sandlet_controller::pods::is_ready;
use sandlet_controller::tasks::{TaskState, state_of};
use serde_json::json;

const NS: &str = "bench";
const TOKEN: &str = "bench-token";
const N: i32 = 100;
/// Executors whose change feed the bench also follows itself (their tasks get a shard patch
/// naming their index; a patch for every task would make the BatchSandbox, and so every
/// status write, larger than the figure is about).
const SAMPLED_FEEDS: usize = 10;

/// Write requests the apiserver served, by resource.
async fn writes(client: &kube::Client, resource: &str) -> u64 {
    let metrics = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains(&format!("resource=\"{resource}\"")))
        .filter(|l| {
            ["POST", "PUT", "PATCH", "APPLY", "DELETE"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Waits until pool `p` has `want` ready pods (allocated or not); returns how long that took.
/// Counted from the pods themselves: the pool's status lags right after an allocation.
async fn pool_pods_ready(pods: &Api<Pod>, want: usize) -> Duration {
    let started = Instant::now();
    let of_pool = ListParams::default().labels(&format!("{POOL_NAME}=p"));
    loop {
        let listed = pods.list(&of_pool).await.unwrap().items;
        if listed.iter().filter(|p| is_ready(p)).count() >= want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the pool did not reach {want} ready pods"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A task's exit time in nanoseconds, as it wrote it (bash's `$EPOCHREALTIME`, to the µs).
fn read_ns(path: &std::path::Path) -> u128 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Follows the change feed of the executor at `ip` (already connected when this returns) and
/// yields when it says task `name` ended.
async fn feed_end(ip: &str, name: &str) -> tokio::task::JoinHandle<u128> {
    let response = reqwest::Client::new()
        .get(format!("http://{ip}:5758/watchTasks"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let mut body = response.bytes_stream();
    let name = name.to_string();
    tokio::spawn(async move {
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) else {
                    continue;
                };
                let data: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
                let task = &data["task"];
                if task["name"] == name.as_str()
                    && matches!(state_of(task), TaskState::Succeed | TaskState::Failed)
                {
                    return now_ns();
                }
            }
        }
        panic!("the feed of {name} ended before the task did")
    })
}

/// What one wave measured.
struct Wave {
    allocated: Duration,
    running: Duration,
    succeeded: Duration,
    allocation_writes: u64,
    /// Task exit to the status counter showing it, sorted (ms).
    to_status: Vec<f64>,
    /// Task exit to its executor's change feed, for the sampled tasks, sorted (ms).
    to_feed: Vec<f64>,
    /// First exit to last (ms).
    spread: f64,
}

/// One BatchSandbox `name` of N on pool `p`: created, allocated, its tasks running and held,
/// then (after `settle`) let go together and followed until all are counted SUCCEED.
async fn wave(
    client: &kube::Client,
    name: &str,
    settle: impl std::future::Future<Output = ()>,
) -> Wave {
    let sandboxes: Api<BatchSandbox> = Api::namespaced(client.clone(), NS);
    // The tasks wait on a FIFO, blocked in read(2) rather than polling (100 polling loops
    // would load the 2 cores the whole system shares and slow what is measured). The bench
    // holds it open for writing from the start, so a task's open never blocks and its read
    // waits; opening the gate writes one byte per task, which even a late reader finds.
    let gate = tempfile::tempdir().unwrap();
    let fifo = gate.path().join("gate");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut gate_writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let exits = gate.path().join("exits");
    std::fs::create_dir(&exits).unwrap();
    // Builtins only: the exit time is taken without a fork, and the 100 tasks' own work stays
    // small beside what is measured (with `dd` and `date` it was 6 ms of CPU a task, 1.8 ms now).
    let script = format!(
        "read -rn1 < {fifo}; echo \"${{EPOCHREALTIME/[.,]/}}000\" > {exits}/${{TASK_INDEX:-pid$$}}",
        fifo = fifo.display(),
        exits = exits.display()
    );
    let writes_before = writes(client, "batchsandboxes").await;

    // Every status change, timestamped as it arrives.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watch = {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let sandboxes = sandboxes.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(sandboxes, config));
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) = event {
                    let _ = seen_tx.send((now_ns(), Instant::now(), b.status.unwrap_or_default()));
                }
            }
        })
    };
    let created = Instant::now();
    sandboxes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
                "metadata": {"name": name},
                "spec": {"replicas": N, "poolRef": "p",
                    "taskTemplate": {"spec": {"process": {"command": ["bash", "-c", script]}}},
                    "shardTaskPatches": (0..SAMPLED_FEEDS).map(|i| json!({"spec": {"process": {
                        "env": [{"name": "TASK_INDEX", "value": i.to_string()}]}}})).collect::<Vec<_>>()}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let (mut allocated, mut running) = (None, None);
    let mut allocation_writes = None;
    while running.is_none() {
        let (_, at, s) = seen.recv().await.unwrap();
        if allocated.is_none() && s.allocated >= N {
            allocated = Some(at - created);
            allocation_writes = Some(writes(client, "batchsandboxes").await - writes_before);
        }
        if s.task_running >= N {
            running = Some(at - created);
        }
    }
    settle.await;
    // A few executors' own feeds, to tell their share of the delay from the controller's.
    let endpoints = kube_env::endpoints(&sandboxes.get(name).await.unwrap());
    let mut feeds = Vec::new();
    for (index, ip) in endpoints.iter().enumerate().take(SAMPLED_FEEDS) {
        feeds.push((index, feed_end(ip, &format!("{name}-{index}")).await));
    }
    std::io::Write::write_all(&mut gate_writer, &[b'x'; N as usize]).unwrap();
    let mut counted: Vec<u128> = Vec::new();
    let mut last = 0;
    let succeeded = loop {
        let (wall, at, s) = seen.recv().await.unwrap();
        for _ in last..s.task_succeed {
            counted.push(wall);
        }
        last = last.max(s.task_succeed);
        if s.task_succeed >= N {
            break at - created;
        }
    };
    watch.abort();
    // The sampled tasks' exits are named by index, the others' by process id.
    let mut exited: Vec<u128> = std::fs::read_dir(&exits)
        .unwrap()
        .flatten()
        .map(|e| read_ns(&e.path()))
        .collect();
    exited.sort();
    let mut to_feed = Vec::new();
    for (index, feed) in feeds {
        let exit = read_ns(&exits.join(index.to_string()));
        to_feed.push((feed.await.unwrap() as f64 - exit as f64) / 1e6);
    }
    to_feed.sort_by(f64::total_cmp);
    let mut to_status: Vec<f64> = exited
        .iter()
        .zip(&counted)
        .map(|(exit, seen)| (*seen as f64 - *exit as f64) / 1e6)
        .collect();
    to_status.sort_by(f64::total_cmp);
    Wave {
        allocated: allocated.unwrap(),
        running: running.unwrap(),
        succeeded,
        allocation_writes: allocation_writes.unwrap(),
        to_status,
        to_feed,
        spread: (exited[exited.len() - 1] - exited[0]) as f64 / 1e6,
    }
}

/// The median and the largest of sorted delays, in ms.
fn p50_and_max(sorted: &[f64]) -> String {
    format!(
        "p50 {:.1}, max {:.1} ms",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let env = kube_env::KubeEnv::start_with(NS).await;
    let client = env.client();
    let kubelet = kube_env::FakeKubelet::start(client.clone(), NS, TOKEN).await;
    let controller = tokio::spawn(sandlet_controller::run::run(
        client.clone(),
        sandlet_controller::run::Settings {
            namespace: Some(NS.into()),
            executor_token: Some(TOKEN.into()),
            executor_port: 5758,
            max_feeds: 1024,
            containerd_address: None,
            node_name: None,
        },
    ));
    let pools: Api<Pool> = Api::namespaced(client.clone(), NS);
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool",
                "metadata": {"name": "p"},
                "spec": {
                    "template": {"spec": {"containers": [{"name": "main", "image": "busybox"}]}},
                    "capacitySpec": {"bufferMin": N, "bufferMax": N, "poolMin": N, "poolMax": 2 * N}
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    println!(
        "pool of {N} ready pods filled in {:?} (setup, not measured below)",
        pool_pods_ready(&pods, N as usize).await
    );
    let pod_writes = writes(&client, "pods").await;

    // The first wave's allocation makes the pool refill its buffer: the second wave's pods,
    // started at nice 10. The first wave's tasks are let go once that refill is over, so their
    // exits do not share the two cores with 100 executor starts (on a cluster those run on
    // other nodes); the pool is then at its maximum and does not refill again.
    kubelet.start_pods_at_nice(10);
    let shared = wave(&client, "b", async {
        println!(
            "pool buffer refilled in {:?} (not measured below)",
            pool_pods_ready(&pods, 2 * N as usize).await
        );
    })
    .await;
    let niced = wave(&client, "c", async {}).await;
    let pod_writes = writes(&client, "pods").await - pod_writes;

    println!();
    println!(
        "{N} pooled sandboxes, one trivial task each (2-core VM, real apiserver and executors)"
    );
    println!(
        "{:<34}{:>24}{:>24}",
        "", "pods share the CPU", "pods at nice 10"
    );
    let row = |what: &str, f: &dyn Fn(&Wave) -> String| {
        println!("{what:<34}{:>24}{:>24}", f(&shared), f(&niced));
    };
    row("create -> all allocated", &|w| {
        format!("{:.3} s", w.allocated.as_secs_f64())
    });
    row("create -> all tasks RUNNING", &|w| {
        format!("{:.3} s", w.running.as_secs_f64())
    });
    row("create -> all tasks SUCCEED*", &|w| {
        format!("{:.3} s", w.succeeded.as_secs_f64())
    });
    row("task exit -> counted in status", &|w| {
        p50_and_max(&w.to_status)
    });
    row("  of which exit -> executor's feed", &|w| {
        p50_and_max(&w.to_feed)
    });
    row("  the exits spread over", &|w| {
        format!("{:.1} ms", w.spread)
    });
    row("API writes until all allocated", &|w| {
        w.allocation_writes.to_string()
    });
    println!("* includes the bench's hold before it lets the tasks go");
    println!(
        "exit -> status: all {N} tasks of a wave (the Go controller polls every 3 s); exit -> feed: {SAMPLED_FEEDS} executors the bench follows itself"
    );
    println!("pod writes in the whole run: {pod_writes} (the pool refilling its buffer)");
    controller.abort();
    drop(kubelet);
}
