//! The controller against a real kube-apiserver and etcd, with real sandlet executors (the
//! test plays the kubelet: see `common`). A Pool fills its buffer; a BatchSandbox of 10 gets
//! pods, one task per pod runs in its sandlet, and the counters follow RUNNING -> SUCCEED (and
//! FAILED for the failing shard); a killed executor makes its task UNKNOWN until it returns;
//! a controller restart mid-flight loses nothing; deletion stops the tasks and returns the pods.
//! Each of those changes, and a spec that cannot work, shows as a Kubernetes Event.

mod kube_env;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube_env::{
    FakeKubelet, KubeEnv, counters, counters_reach, counters_until, event_says, eventually,
};
use sandlet_controller::crd::{
    BatchSandbox, ConditionType, POOL_NAME, Phase, Pool, SANDBOX_ID, SandboxSnapshot, SnapshotPhase,
};
use serde_json::json;

const NS: &str = "e2e";
const TOKEN: &str = "e2e-executor-token";

/// A file the test's tasks wait for: they run until the test opens the gate.
struct Gate {
    dir: tempfile::TempDir,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join("open")
    }

    /// A shell script that waits until the gate is open.
    fn wait_script(&self) -> String {
        format!(
            "while [ ! -e {} ]; do sleep 0.05; done",
            self.file().display()
        )
    }

    fn open(&self) {
        std::fs::write(self.file(), "").unwrap();
    }
}

fn start_controller(client: kube::Client) -> tokio::task::JoinHandle<()> {
    kube_env::start_controller(client, NS, TOKEN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kube-apiserver and etcd: `./test` builds them and runs every test"]
async fn pool_and_batchsandbox_run_tasks_through_sandlet() {
    let env = KubeEnv::start_with(NS).await;
    let client = env.client();
    let kubelet = FakeKubelet::start(client.clone(), NS, TOKEN).await;
    let mut controller = start_controller(client.clone());
    let pools: Api<Pool> = Api::namespaced(client.clone(), NS);
    let sandboxes: Api<BatchSandbox> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);

    // The pool fills its buffer.
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool",
                "metadata": {"name": "p"},
                "spec": {
                    "template": {"metadata": {"labels": {"app": "sbx"}}, "spec": {"containers": [
                        {"name": "main", "image": "busybox", "command": ["sleep", "infinity"]}]}},
                    "capacitySpec": {"bufferMin": 2, "bufferMax": 3, "poolMin": 0, "poolMax": 20}
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    eventually(
        "the pool's buffer of 2 ready pods",
        Duration::from_secs(60),
        async || {
            let p = pools.get("p").await.ok()?;
            let s = p.status?;
            (s.total == 2 && s.available == 2).then_some(())
        },
    )
    .await;

    // Ten sandboxes, each a task that waits for a gate; shard 3 then fails.
    let gate = Gate::new();
    let script = gate.wait_script();
    sandboxes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
                "metadata": {"name": "b"},
                "spec": {
                    "replicas": 10, "poolRef": "p",
                    "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", script.clone()]}}},
                    "shardTaskPatches": [{}, {}, {}, {"spec": {"process": {"command": ["sh", "-c", format!("{script}; exit 3")]}}}]
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    counters_reach(
        &sandboxes,
        "b",
        (10, 10, 0, 0, 0),
        "10 pods allocated and 10 tasks running",
        Duration::from_secs(90),
    )
    .await;
    eprintln!(
        "10 sandboxes allocated and running in {:?}",
        started.elapsed()
    );
    let endpoints = kube_env::endpoints(&sandboxes.get("b").await.unwrap());
    assert_eq!(endpoints.len(), 10);
    assert!(
        endpoints.iter().all(|ip| ip.starts_with("127.")),
        "{endpoints:?}"
    );

    // A controller restart while the tasks run loses nothing, and does not make the tasks
    // look UNKNOWN while the new one reconnects to their executors: every status written
    // from here until one executor is killed below counts at most that one.
    let history = counters_until(&sandboxes, "b", (10, 9, 0, 0, 1)).await;
    controller.abort();
    let _ = controller.await;
    controller = start_controller(client.clone());

    // An executor that cannot be reached makes its task UNKNOWN, never gone; it comes back.
    let first = &b_pods(&sandboxes).await[0];
    kubelet.kill_executor(first);
    counters_reach(
        &sandboxes,
        "b",
        (10, 9, 0, 0, 1),
        "the killed executor's task is UNKNOWN",
        Duration::from_secs(30),
    )
    .await;
    let history = tokio::time::timeout(Duration::from_secs(30), history)
        .await
        .expect("the watch saw the counters the polls saw")
        .unwrap();
    assert!(
        history.iter().all(|c| c.4 <= 1 && c.1 >= 9),
        "a restarted controller wrote statuses it did not know: {history:?}"
    );
    let events = Api::<Event>::namespaced(client.clone(), NS);
    event_says(&events, "b", "Warning", "ExecutorUnreachable", first).await;
    kubelet.restart_executor(first).await;
    counters_reach(
        &sandboxes,
        "b",
        (10, 10, 0, 0, 0),
        "it recovers when the executor returns",
        Duration::from_secs(30),
    )
    .await;
    event_says(&events, "b", "Normal", "ExecutorReachable", first).await;

    // Open the gate: nine succeed, shard 3 fails.
    gate.open();
    let opened = Instant::now();
    counters_reach(
        &sandboxes,
        "b",
        (10, 0, 9, 1, 0),
        "9 tasks SUCCEED and 1 FAILED",
        Duration::from_secs(30),
    )
    .await;
    eprintln!("task exits reached the status in {:?}", opened.elapsed());
    let failed = &b_pods(&sandboxes).await[3];
    let note = format!("task b-3 on pod {failed} failed: exit code 3");
    event_says(&events, "b", "Warning", "TaskFailed", &note).await;

    // A spec that cannot work says why where `kubectl describe` looks.
    sandboxes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
                "metadata": {"name": "any-pool"}, "spec": {"replicas": 1, "poolRef": "*"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    event_says(
        &events,
        "any-pool",
        "Warning",
        "InvalidSpec",
        "poolRef \"*\"",
    )
    .await;
    sandboxes
        .delete("any-pool", &DeleteParams::default())
        .await
        .unwrap();

    // Deletion stops the tasks, then the pool takes the pods back (deletes them).
    let held = b_pods(&sandboxes).await;
    sandboxes
        .delete("b", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the BatchSandbox is gone",
        Duration::from_secs(60),
        async || sandboxes.get_opt("b").await.ok()?.is_none().then_some(()),
    )
    .await;
    eventually(
        "its pods are deleted",
        Duration::from_secs(30),
        async || {
            let left = pods
                .list(&ListParams::default().labels(&format!("{POOL_NAME}=p")))
                .await
                .ok()?;
            (!left
                .items
                .iter()
                .any(|p| held.contains(p.metadata.name.as_ref().unwrap())))
            .then_some(())
        },
    )
    .await;
    eventually(
        "the pool is back to its buffer",
        Duration::from_secs(60),
        async || {
            let s = pools.get("p").await.ok()?.status?;
            (s.allocated == 0 && (2..=3).contains(&s.total)).then_some(())
        },
    )
    .await;
    controller.abort();
    drop(kubelet);
}

/// A BatchSandbox with its own template: it creates pod `<name>-<i>` per index (shard patches
/// merged in), runs a task in each, recreates a pod deleted under it, and at deletion stops the
/// tasks and then deletes its pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kube-apiserver and etcd: `./test` builds them and runs every test"]
async fn a_batchsandbox_with_its_own_template_creates_runs_and_deletes_its_pods() {
    let env = KubeEnv::start_with(NS).await;
    let client = env.client();
    let kubelet = FakeKubelet::start(client.clone(), NS, TOKEN).await;
    let controller = start_controller(client.clone());
    let sandboxes: Api<BatchSandbox> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let gate = Gate::new();
    let script = gate.wait_script();
    sandboxes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
                "metadata": {"name": "own"},
                "spec": {
                    "replicas": 3,
                    "template": {"metadata": {"labels": {"app": "own"}}, "spec": {"containers": [
                        {"name": "main", "image": "busybox", "command": ["sleep", "infinity"]},
                        {"name": "side", "image": "busybox"}]}},
                    "shardPatches": [{}, {"metadata": {"labels": {"shard": "one"}},
                        "spec": {"containers": [{"name": "main", "image": "python"}]}}],
                    "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", script.clone()]}}},
                    "shardTaskPatches": [{}, {}, {"spec": {"process": {"command": ["sh", "-c", format!("{script}; exit 4")]}}}]
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    counters_reach(
        &sandboxes,
        "own",
        (3, 3, 0, 0, 0),
        "3 pods and 3 tasks running",
        Duration::from_secs(60),
    )
    .await;
    let owned = pods
        .list(&ListParams::default().labels("batch-sandbox.sandbox.opensandbox.io/name=own"))
        .await
        .unwrap()
        .items;
    let mut names: Vec<String> = owned
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["own-0", "own-1", "own-2"]);
    let one = owned
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("own-1"))
        .unwrap();
    let labels = one.metadata.labels.clone().unwrap();
    assert_eq!(
        (labels["app"].as_str(), labels["shard"].as_str()),
        ("own", "one")
    );
    assert_eq!(
        labels["batch-sandbox.sandbox.opensandbox.io/pod-index"],
        "1"
    );
    let containers = &one.spec.as_ref().unwrap().containers;
    assert_eq!(
        containers
            .iter()
            .map(|c| (c.name.as_str(), c.image.as_deref().unwrap()))
            .collect::<Vec<_>>(),
        [("main", "python"), ("side", "busybox")],
        "the shard patch merges containers by name"
    );
    let owner = &one.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("BatchSandbox", "own", Some(true))
    );

    // A pod deleted under it comes back under the same name, with its task.
    pods.delete("own-0", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "own-0 is recreated and its task runs again",
        Duration::from_secs(60),
        async || {
            let p = pods.get_opt("own-0").await.ok()??;
            let b = sandboxes.get("own").await.ok()?;
            (p.metadata.deletion_timestamp.is_none() && counters(&b) == (3, 3, 0, 0, 0))
                .then_some(())
        },
    )
    .await;

    gate.open();
    counters_reach(
        &sandboxes,
        "own",
        (3, 0, 2, 1, 0),
        "2 SUCCEED and 1 FAILED",
        Duration::from_secs(30),
    )
    .await;

    sandboxes
        .delete("own", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the BatchSandbox and its pods are gone",
        Duration::from_secs(60),
        async || {
            let left = pods
                .list(
                    &ListParams::default().labels("batch-sandbox.sandbox.opensandbox.io/name=own"),
                )
                .await
                .ok()?;
            (sandboxes.get_opt("own").await.ok()?.is_none() && left.items.is_empty()).then_some(())
        },
    )
    .await;

    // Deleting one whose task is still running: the task is stopped (it takes a second to
    // finish on SIGTERM), and only then does its pod go.
    let mark = gate.dir.path().join("stopped");
    sandboxes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
                "metadata": {"name": "slow"},
                "spec": {
                    "replicas": 1,
                    "template": {"spec": {"containers": [{"name": "main", "image": "busybox"}]}},
                    "taskTemplate": {"spec": {"process": {"command": ["sh", "-c", format!(
                        "trap 'sleep 1; touch {}; exit 0' TERM; while :; do sleep 0.05; done",
                        mark.display()
                    )]}}}
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    counters_reach(
        &sandboxes,
        "slow",
        (1, 1, 0, 0, 0),
        "its task runs",
        Duration::from_secs(60),
    )
    .await;
    sandboxes
        .delete("slow", &DeleteParams::default())
        .await
        .unwrap();
    eventually("its pod is gone", Duration::from_secs(60), async || {
        pods.get_opt("slow-0").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(mark.exists(), "the pod went before its task had stopped");
    controller.abort();
    drop(kubelet);
}

async fn b_pods(sandboxes: &Api<BatchSandbox>) -> Vec<String> {
    let b = sandboxes.get("b").await.unwrap();
    sandlet_controller::crd::PodList::from_annotation(
        b.metadata.annotations.as_ref(),
        sandlet_controller::crd::ALLOC_STATUS,
    )
    .pods
}

/// What the OpenSandbox server writes and reads, on a bare apiserver (no garbage collector) and
/// a controller without containerd: a BatchSandbox with its own template and no tasks, labelled
/// with the sandbox id and expiring at a time with fractions and an offset (as the server writes
/// it), becomes `Succeed` with its pod's IP in `endpoints`; a pause cannot commit here, so it
/// fails with `PauseFailed`/`NoNodeAgent` and the sandbox runs on; the server's retry (`pause:
/// null`, then `true`) asks again and fails the same way; a deletion with
/// `gracePeriodSeconds=0` takes its pods and snapshots with it, with no garbage collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kube-apiserver and etcd: `./test` builds them and runs every test"]
async fn the_servers_sandbox_pause_fails_without_containerd_and_goes_without_a_garbage_collector() {
    let env = KubeEnv::start_with(NS).await;
    let client = env.client();
    let kubelet = FakeKubelet::start(client.clone(), NS, TOKEN).await;
    let controller = start_controller(client.clone());
    let sandboxes: Api<BatchSandbox> = Api::namespaced(client.clone(), NS);
    let snapshots: Api<SandboxSnapshot> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let expire = (chrono::Utc::now() + chrono::TimeDelta::hours(1))
        .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
        .to_string();
    sandboxes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
                "metadata": {"name": "srv", "labels": {SANDBOX_ID: "srv"}},
                "spec": {
                    "replicas": 1,
                    "expireTime": expire,
                    "template": {"metadata": {"labels": {SANDBOX_ID: "srv"}}, "spec": {
                        "containers": [{"name": "sandbox", "image": "busybox"}]}},
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let phase = |b: &BatchSandbox| b.status.as_ref().and_then(|s| s.phase);
    eventually(
        "srv Succeed with an endpoint",
        Duration::from_secs(60),
        async || {
            let b = sandboxes.get("srv").await.ok()?;
            (phase(&b) == Some(Phase::Succeed) && !kube_env::endpoints(&b).is_empty()).then_some(())
        },
    )
    .await;

    let pause_failed = |b: &BatchSandbox| {
        let status = b.status.clone()?;
        let failed = status
            .conditions
            .iter()
            .find(|c| c.kind == ConditionType::PauseFailed)?
            .clone();
        Some((status.phase?, status.pause_observed_generation?, failed))
    };
    let patch = async |spec: serde_json::Value| {
        sandboxes
            .patch(
                "srv",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap()
            .metadata
            .generation
            .unwrap()
    };
    let mut asked = patch(json!({"pause": true})).await;
    for attempt in ["the first pause", "the retried pause"] {
        if attempt == "the retried pause" {
            // The server's retry bridge.
            patch(json!({"pause": null})).await;
            asked = patch(json!({"pause": true})).await;
        }
        let (phase, failed) = eventually(
            &format!("{attempt} fails"),
            Duration::from_secs(60),
            async || {
                let b = sandboxes.get("srv").await.ok()?;
                let (phase, observed, failed) = pause_failed(&b)?;
                (observed == asked).then_some((phase, failed))
            },
        )
        .await;
        assert_eq!(phase, Phase::Succeed, "{attempt}: the sandbox runs on");
        assert_eq!(
            failed.reason, "NoNodeAgent",
            "{attempt}: {}",
            failed.message
        );
        assert!(
            failed.message.contains("--containerd-address"),
            "{attempt}: the message says what to do: {}",
            failed.message
        );
        let snapshot = snapshots.get(&format!("srv-pause-{asked}")).await.unwrap();
        assert_eq!(
            snapshot.status.and_then(|s| s.phase),
            Some(SnapshotPhase::Failed),
            "{attempt}"
        );
    }
    assert_eq!(
        pods.get("srv-0").await.unwrap().metadata.deletion_timestamp,
        None
    );

    sandboxes
        .delete(
            "srv",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually(
        "the BatchSandbox, its pod and its snapshots are gone",
        Duration::from_secs(60),
        async || {
            let pods_left = pods
                .list(&ListParams::default().labels(SANDBOX_ID))
                .await
                .ok()?
                .items;
            let snapshots_left = snapshots.list(&ListParams::default()).await.ok()?.items;
            (sandboxes.get_opt("srv").await.ok()?.is_none()
                && pods_left.is_empty()
                && snapshots_left.is_empty())
            .then_some(())
        },
    )
    .await;
    controller.abort();
    drop(kubelet);
}
