//! The SandboxSnapshot controller: commits every container of a BatchSandbox's running pod to
//! an image in the node's containerd ([`crate::containerd`]), one image per container, named
//! `sandlet.local/<namespace>/<snapshot>:<container>`, and records them in the status
//! (`containers[].imageUri`), as OpenSandbox's snapshot controller does with its commit Job and
//! a registry. The images stay on that node: no registry is involved, so what is made from them
//! (a resumed sandbox) must run there.
//!
//! Committing needs containerd's socket, so it happens in a process on the pod's node: this
//! controller when it runs there with `--containerd-address` (a one-node cluster, the tests),
//! or, in a larger cluster, a node agent: the same binary on every node (a DaemonSet with the
//! socket mounted) with `--node-name`, which takes only the snapshots of pods on its node.
//! Without a socket, a snapshot fails at once with a reason saying so.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::context::{Context, Error, Result, apply_status};
use crate::crd::{
    ALLOC_RELEASE, ALLOC_STATUS, BATCH_NAME, BatchSandbox, ConditionStatus, ContainerSnapshot,
    PodList, SNAPSHOT_CLEANUP, SandboxSnapshot, SandboxSnapshotStatus, SnapshotCondition,
    SnapshotConditionType, SnapshotPhase,
};

/// The image a snapshot's commit of `container` is registered as.
pub fn image_name(namespace: &str, snapshot: &str, container: &str) -> String {
    format!("sandlet.local/{namespace}/{snapshot}:{container}")
}

pub async fn reconcile(snap: Arc<SandboxSnapshot>, ctx: Arc<Context>) -> Result<Action> {
    let ns = snap.namespace().unwrap_or_default();
    let name = snap.name_any();
    let api: Api<SandboxSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let status = snap.status.clone().unwrap_or_default();
    if snap.meta().deletion_timestamp.is_some() {
        return remove_images(&snap, &ctx, &api).await;
    }
    if matches!(
        status.phase,
        Some(SnapshotPhase::Succeed | SnapshotPhase::Failed)
    ) {
        return Ok(Action::await_change());
    }
    let sandbox = &snap.spec.sandbox_name;
    let Some(bsb) = Api::<BatchSandbox>::namespaced(ctx.client.clone(), &ns)
        .get_opt(sandbox)
        .await?
    else {
        let message = format!("BatchSandbox {sandbox} does not exist in namespace {ns}");
        return fail(&api, &snap, status, "SandboxNotFound", message).await;
    };
    let Some(pod) = source_pod(&bsb, &ctx) else {
        let message = format!(
            "BatchSandbox {sandbox} has no running pod to commit; a sandbox can be snapshotted \
             while it runs"
        );
        return fail(&api, &snap, status, "NoRunningPod", message).await;
    };
    let pod_name = pod.name_any();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    if let Some(ours) = &ctx.node_name
        && *ours != node
    {
        tracing::debug!(snapshot = %name, %node, "pod on another node: left to that node's agent");
        return Ok(Action::await_change());
    }
    let Some(containerd) = &ctx.containerd else {
        let message = format!(
            "no containerd socket: pod {pod_name} on node {node} can be committed only by \
             sandlet-controller running on that node with --containerd-address (or its node \
             agent there)"
        );
        return fail(&api, &snap, status, "NoNodeAgent", message).await;
    };

    // The finalizer first: once an image may exist, deleting the snapshot must remove it.
    if !snap.finalizers().iter().any(|f| f == SNAPSHOT_CLEANUP) {
        let mut finalizers = snap.finalizers().to_vec();
        finalizers.push(SNAPSHOT_CLEANUP.into());
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "resourceVersion": snap.resource_version(),
                "finalizers": finalizers,
            }})),
        )
        .await?;
    }
    let mut status = SandboxSnapshotStatus {
        phase: Some(SnapshotPhase::Committing),
        source_pod_name: Some(pod_name.clone()),
        source_node_name: Some(node.clone()),
        observed_generation: snap.meta().generation,
        ..status
    };
    apply_status(&api, &name, &status).await?;

    let mut containers = Vec::new();
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    for container in &running {
        let id = container.container_id.as_deref().unwrap_or_default();
        let Some(id) = id.strip_prefix("containerd://") else {
            let message = format!(
                "container {} of pod {pod_name} is not a containerd container ({id:?}); only \
                 containerd's can be committed",
                container.name
            );
            return fail(&api, &snap, status, "UnsupportedRuntime", message).await;
        };
        let image = image_name(&ns, &name, &container.name);
        let created_by = format!("sandlet-controller: snapshot {ns}/{name} of pod {pod_name}");
        match containerd.commit(id, &image, &created_by).await {
            Ok(committed) => {
                tracing::info!(snapshot = %name, container = %container.name, %image,
                    layer_bytes = committed.layer_size, "committed");
                containers.push(ContainerSnapshot {
                    container_name: container.name.clone(),
                    image_uri: image,
                    image_digest: Some(committed.digest),
                });
            }
            Err(e) => {
                let message = format!(
                    "committing container {} of pod {pod_name} on node {node} through \
                     containerd at {}: {e}",
                    container.name,
                    containerd.path().display()
                );
                return fail(&api, &snap, status, "CommitFailed", message).await;
            }
        }
    }
    let message = format!(
        "{} container(s) of pod {pod_name} committed to images in containerd on node {node}",
        containers.len()
    );
    status.phase = Some(SnapshotPhase::Succeed);
    status.containers = containers;
    status.conditions = vec![condition(
        SnapshotConditionType::Ready,
        "Committed",
        message,
    )];
    apply_status(&api, &name, &status).await?;
    Ok(Action::await_change())
}

pub fn error_policy(snap: Arc<SandboxSnapshot>, error: &Error, ctx: Arc<Context>) -> Action {
    crate::context::after_error(&*snap, error, ctx)
}

/// The BatchSandbox's first running pod: its allocated pods (pooled), else its own.
fn source_pod(bsb: &BatchSandbox, ctx: &Context) -> Option<Arc<Pod>> {
    let ns = bsb.namespace()?;
    let annotations = bsb.meta().annotations.as_ref();
    let released = PodList::from_annotation(annotations, ALLOC_RELEASE).pods;
    let allocated: Vec<String> = PodList::from_annotation(annotations, ALLOC_STATUS)
        .pods
        .into_iter()
        .filter(|p| !released.contains(p))
        .collect();
    let running = |p: &Pod| {
        p.metadata.namespace.as_deref() == Some(ns.as_str())
            && p.metadata.deletion_timestamp.is_none()
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    };
    let pods = ctx.pods.state();
    let by_allocation = allocated
        .iter()
        .find_map(|n| pods.iter().find(|p| running(p) && p.name_any() == *n));
    let own = || {
        pods.iter().find(|p| {
            running(p) && p.labels().get(BATCH_NAME).map(String::as_str) == Some(&bsb.name_any())
        })
    };
    by_allocation.or_else(own).cloned()
}

async fn fail(
    api: &Api<SandboxSnapshot>,
    snap: &SandboxSnapshot,
    status: SandboxSnapshotStatus,
    reason: &str,
    message: String,
) -> Result<Action> {
    tracing::warn!(snapshot = %snap.name_any(), reason, %message, "snapshot failed");
    let status = SandboxSnapshotStatus {
        phase: Some(SnapshotPhase::Failed),
        conditions: vec![condition(SnapshotConditionType::Failed, reason, message)],
        observed_generation: snap.meta().generation,
        ..status
    };
    apply_status(api, &snap.name_any(), &status).await?;
    Ok(Action::await_change())
}

fn condition(kind: SnapshotConditionType, reason: &str, message: String) -> SnapshotCondition {
    SnapshotCondition {
        kind,
        status: ConditionStatus::True,
        reason: reason.into(),
        message,
        last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
    }
}

/// Deleting: the images go from the node that holds them, then the finalizer.
async fn remove_images(
    snap: &SandboxSnapshot,
    ctx: &Context,
    api: &Api<SandboxSnapshot>,
) -> Result<Action> {
    if !snap.finalizers().iter().any(|f| f == SNAPSHOT_CLEANUP) {
        return Ok(Action::await_change());
    }
    let status = snap.status.clone().unwrap_or_default();
    let node = status.source_node_name.unwrap_or_default();
    if ctx.node_name.as_ref().is_some_and(|ours| *ours != node) {
        return Ok(Action::await_change());
    }
    let Some(containerd) = &ctx.containerd else {
        // Only a process with the socket adds the finalizer; one started without it since
        // cannot remove the images, and says so.
        return Err(Error::Invalid(format!(
            "snapshot {}: its images on node {node} need a sandlet-controller with \
             --containerd-address to be removed",
            snap.name_any()
        )));
    };
    let ns = snap.namespace().unwrap_or_default();
    for container in &status.containers {
        let expected = image_name(&ns, &snap.name_any(), &container.container_name);
        // Only images this controller named: an imageUri edited to something else is not ours
        // to delete.
        if container.image_uri == expected {
            containerd.delete_image(&container.image_uri).await?;
        }
    }
    let finalizers: Vec<&String> = snap
        .finalizers()
        .iter()
        .filter(|f| *f != SNAPSHOT_CLEANUP)
        .collect();
    let removed = api
        .patch(
            &snap.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "resourceVersion": snap.resource_version(),
                "finalizers": finalizers,
            }})),
        )
        .await;
    match removed {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(e.into()),
    }
}
