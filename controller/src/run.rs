//! Runs the controllers (Pool, BatchSandbox, SandboxSnapshot) in one process until a shutdown
//! signal.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::context::Context;
use crate::crd::{ALLOC_STATUS, BATCH_NAME, BatchSandbox, PodList, Pool, SandboxSnapshot};
use crate::tasks::Tracker;
use crate::{batch, pool, snapshot};
use kube::runtime::reflector::ObjectRef;

pub struct Settings {
    /// Watched namespace; `None`: all.
    pub namespace: Option<String>,
    /// Sent as `Authorization: Bearer` to the executors' task API.
    pub executor_token: Option<String>,
    pub executor_port: u16,
    /// Change-feed connections open at once, at most.
    pub max_feeds: usize,
    /// The node's containerd socket: this process commits SandboxSnapshots (pause).
    pub containerd_address: Option<std::path::PathBuf>,
    /// Only snapshots of pods on this node (a node agent); `None`: all.
    pub node_name: Option<String>,
}

pub async fn run(client: Client, settings: Settings) {
    let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
    let (pod_cache, pod_cache_writer) = kube::runtime::reflector::store::<Pod>();
    let ctx = Arc::new(Context {
        client: client.clone(),
        tracker: Tracker::new(
            settings.executor_token,
            settings.executor_port,
            settings.max_feeds,
            wake,
        ),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: pool::MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        pods: pod_cache,
        allocations: Mutex::new(Default::default()),
        released: Mutex::new(Default::default()),
        containerd: settings
            .containerd_address
            .as_deref()
            .map(crate::containerd::Containerd::new),
        node_name: settings.node_name,
    });
    let (pools, sandboxes, pods, snapshots): (
        Api<Pool>,
        Api<BatchSandbox>,
        Api<Pod>,
        Api<SandboxSnapshot>,
    ) = match &settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let config = watcher::Config::default();
    let pool_controller = Controller::new(pools, config.clone())
        .owns(pods.clone(), config.clone())
        .watches_stream(
            watcher(sandboxes.clone(), config.clone())
                .default_backoff()
                .touched_objects()
                .predicate_filter(pool::pool_inputs, Default::default()),
            |bsb| pool::pool_of(&bsb),
        )
        .shutdown_on_signal()
        .run(pool::reconcile, pool::error_policy, Arc::clone(&ctx))
        .for_each(|_| async {});
    // A pod event wakes the BatchSandbox that created it (non-pooled, by its label) or that
    // holds it (pooled, by its alloc-status); task changes wake it through the followers.
    let snapshot_controller = Controller::new(snapshots.clone(), config.clone())
        .shutdown_on_signal()
        .run(
            snapshot::reconcile,
            snapshot::error_policy,
            Arc::clone(&ctx),
        )
        .for_each(|_| async {});
    let bsb_controller = Controller::new(sandboxes, config.clone());
    let holders = bsb_controller.store();
    // A snapshot's progress wakes the BatchSandbox pausing through it (its owner).
    let bsb_controller = bsb_controller
        .owns(snapshots, config.clone())
        .watches_stream(
            kube::runtime::reflector(pod_cache_writer, watcher(pods, config.clone()))
                .default_backoff()
                .touched_objects(),
            move |pod: Pod| {
                if let Some(owner) = pod.metadata.labels.as_ref().and_then(|l| l.get(BATCH_NAME)) {
                    let ns = pod.metadata.namespace.clone().unwrap_or_default();
                    return vec![ObjectRef::new(owner).within(&ns)];
                }
                let name = pod.metadata.name.unwrap_or_default();
                holders
                    .state()
                    .into_iter()
                    .filter(|b| {
                        PodList::from_annotation(b.metadata.annotations.as_ref(), ALLOC_STATUS)
                            .pods
                            .contains(&name)
                    })
                    .map(|b| ObjectRef::from_obj(&*b))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_on(UnboundedReceiverStream::new(woken))
        .shutdown_on_signal()
        .run(batch::reconcile, batch::error_policy, Arc::clone(&ctx))
        .for_each(|_| async {});
    tokio::join!(pool_controller, bsb_controller, snapshot_controller);
}
