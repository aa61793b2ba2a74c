//! `cargo bench -p sandlet-controller --bench pooled`: 100 pooled sandboxes with a trivial task,
//! on a real kube-apiserver with real sandlet executors (see `tests/kube_env`).
//!
//! Prints the time from BatchSandbox create to all allocated, to all tasks RUNNING and, once the
//! tasks are let go, to all SUCCEED; the median delay from a task's exit to the status counter
//! that shows it, and to its executor's change feed (the executor's share of that delay, from
//! ten executors the bench follows itself); and the API writes the allocation took (from the
//! apiserver's own `apiserver_request_total`).

// The tests' support; the bench uses part of it.
#[allow(dead_code)]
#[path = "../tests/kube_env/mod.rs"]
mod kube_env;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use sandlet_controller::crd::{BatchSandbox, ENDPOINTS, POOL_NAME, Pool};
use sandlet_controller::pods::is_ready;
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
                if task["name"] == name.as_str() && !task["processStatus"]["terminated"].is_null() {
                    return now_ns();
                }
            }
        }
        panic!("the feed of {name} ended before the task did")
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(env) = kube_env::KubeEnv::start_with(NS).await else {
        return;
    };
    let client = env.client();
    let kubelet = kube_env::FakeKubelet::start(client.clone(), NS, TOKEN).await;
    let controller = tokio::spawn(sandlet_controller::run::run(
        client.clone(),
        sandlet_controller::run::Settings {
            namespace: Some(NS.into()),
            executor_token: Some(TOKEN.into()),
            executor_port: 5758,
            max_feeds: 1024,
        },
    ));
    let pools: Api<Pool> = Api::namespaced(client.clone(), NS);
    let sandboxes: Api<BatchSandbox> = Api::namespaced(client.clone(), NS);
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
    let bsb_writes = writes(&client, "batchsandboxes").await;
    let pod_writes = writes(&client, "pods").await;

    // Every status change, timestamped as it arrives.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watch = {
        let sandboxes = sandboxes.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(sandboxes, watcher::Config::default()));
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
                "metadata": {"name": "b"},
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
    let mut alloc_writes = None;
    while running.is_none() {
        let (_, at, s) = seen.recv().await.unwrap();
        if allocated.is_none() && s.allocated >= N {
            allocated = Some(at - created);
            alloc_writes = Some(writes(&client, "batchsandboxes").await - bsb_writes);
        }
        if s.task_running >= N {
            running = Some(at - created);
        }
    }
    // The pool refills its buffer meanwhile: 100 pods created, and this harness starts an
    // executor for each. The exits are measured once that is over, so they do not share the
    // two cores with 100 executor starts (on a cluster those run on other nodes).
    println!(
        "pool buffer refilled in {:?} (not measured below)",
        pool_pods_ready(&pods, 2 * N as usize).await
    );
    // A few executors' own feeds, to tell their share of the delay from the controller's.
    let b = sandboxes.get("b").await.unwrap();
    let endpoints: Vec<String> =
        serde_json::from_str(&b.metadata.annotations.unwrap()[ENDPOINTS]).unwrap();
    let mut feeds = Vec::new();
    for (index, ip) in endpoints.iter().enumerate().take(SAMPLED_FEEDS) {
        feeds.push((index, feed_end(ip, &format!("b-{index}")).await));
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
    // The sampled tasks' exits are named by index, the others' by process id.
    let mut exited: Vec<u128> = std::fs::read_dir(&exits)
        .unwrap()
        .flatten()
        .map(|e| read_ns(&e.path()))
        .collect();
    exited.sort();
    let mut at_executor = Vec::new();
    for (index, feed) in feeds {
        let exit = read_ns(&exits.join(index.to_string()));
        at_executor.push((feed.await.unwrap() as f64 - exit as f64) / 1e6);
    }
    at_executor.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut delays: Vec<f64> = exited
        .iter()
        .zip(&counted)
        .map(|(exit, seen)| (*seen as f64 - *exit as f64) / 1e6)
        .collect();
    delays.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let total_bsb_writes = writes(&client, "batchsandboxes").await - bsb_writes;
    let total_pod_writes = writes(&client, "pods").await - pod_writes;

    println!();
    println!(
        "{N} pooled sandboxes, one trivial task each (2-core VM, real apiserver and executors)"
    );
    println!(
        "create -> all allocated        {:>10.3} s",
        allocated.unwrap().as_secs_f64()
    );
    println!(
        "create -> all tasks RUNNING    {:>10.3} s",
        running.unwrap().as_secs_f64()
    );
    println!(
        "create -> all tasks SUCCEED    {:>10.3} s  (includes the test's hold before letting them exit)",
        succeeded.as_secs_f64()
    );
    println!(
        "task exit -> counted in status  p50 {:.1} ms, max {:.1} ms  (Go controller: 3 s polling)",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    println!(
        "  of which exit -> on the executor's feed  p50 {:.1} ms, max {:.1} ms  ({} executors watched directly)",
        at_executor[at_executor.len() / 2],
        at_executor[at_executor.len() - 1],
        at_executor.len()
    );
    println!(
        "API writes to BatchSandboxes until all allocated: {}",
        alloc_writes.unwrap()
    );
    println!(
        "API writes in the whole run: BatchSandboxes {total_bsb_writes}, pods {total_pod_writes} (the pool refilling its buffer)"
    );
    watch.abort();
    controller.abort();
    drop(kubelet);
}
