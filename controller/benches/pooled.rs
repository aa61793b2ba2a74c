//! `cargo bench -p sandlet-controller --bench pooled`: 100 pooled sandboxes with a trivial task,
//! on a real kube-apiserver with real sandlet executors (see `tests/kube_env`).
//!
//! Prints the time from BatchSandbox create to all allocated, to all tasks RUNNING and, once the
//! tasks are let go, to all SUCCEED; the median delay from a task's exit to the status counter
//! that shows it; and the API writes the allocation took (from the apiserver's own
//! `apiserver_request_total`).

// The tests' support; the bench uses part of it.
#[allow(dead_code)]
#[path = "../tests/kube_env/mod.rs"]
mod kube_env;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use sandlet_controller::crd::{BatchSandbox, Pool};
use serde_json::json;

const NS: &str = "bench";
const TOKEN: &str = "bench-token";
const N: i32 = 100;

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
    let filled = Instant::now();
    loop {
        if let Some(s) = pools.get("p").await.unwrap().status
            && s.available >= N
        {
            break;
        }
        assert!(
            filled.elapsed() < Duration::from_secs(300),
            "the pool did not fill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "pool of {N} ready pods filled in {:?} (setup, not measured below)",
        filled.elapsed()
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
    let script = format!(
        "dd if={fifo} of=/dev/null bs=1 count=1 status=none; date +%s%N > {exits}/$$",
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
                    "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", script]}}}}
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
    let mut exited: Vec<u128> = std::fs::read_dir(&exits)
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    exited.sort();
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
