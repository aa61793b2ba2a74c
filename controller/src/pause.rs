//! Pause and resume of a BatchSandbox (`spec.pause: true / false`, written by the OpenSandbox
//! server), with the phases and conditions the server reads.
//!
//! Pause (from phase `Succeed`): phase `Pausing`; a SandboxSnapshot `<name>-pause-<generation>`
//! owned by the BatchSandbox commits its pod's containers to images on the node
//! ([`crate::snapshot`]); then the pods go. Own pods are deleted; pooled pods go back to the
//! pool (`alloc-release`), after which the BatchSandbox becomes one with its own template, the
//! pool's, so that it can be recreated alone. Then phase `Paused`. A failed commit leaves the
//! pods as they were (the container was only frozen while its changes were read): phase
//! `Succeed` again, with condition `PauseFailed` carrying the snapshot's reason.
//!
//! Resume (from phase `Paused`): the newest committed snapshot's images replace the template's
//! (by container name), the pod is pinned to the node holding them (`nodeName`), phase
//! `Resuming`; the normal reconcile recreates the pod, and its readiness makes the phase
//! `Succeed` (a pod that cannot start makes it `Failed` with `ResumeFailed`). Tasks run again
//! in the new pod, as in the Go controller.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::batch::{Mode, ask_release, condition, mode, pause_snapshots, pods_of, set_endpoints};
use crate::context::{Context, Result, apply_status};
use crate::crd::{
    ALLOC_RELEASE, ALLOC_RELEASED, ALLOC_STATUS, BATCH_NAME, BatchSandbox, BatchSandboxCondition,
    BatchSandboxStatus, ConditionType, POOL_ALLOCATION, Phase, PodList, Pool, SANDBOX_ID,
    SandboxSnapshot, SnapshotConditionType, SnapshotPhase,
};

/// Seconds a paused pod gets to stop: its filesystem is already committed, so what it would
/// still write is lost anyway.
const PAUSED_POD_GRACE: u32 = 1;

/// Handles the BatchSandbox when a pause or resume is under way or asked for; `None`: the
/// normal reconcile goes on (`Resuming` included: it recreates the pods).
pub async fn dispatch(bsb: &BatchSandbox, ctx: &Context) -> Result<Option<Action>> {
    let old = bsb.status.clone().unwrap_or_default();
    let generation = bsb.meta().generation.unwrap_or(0);
    let unacked = generation > old.pause_observed_generation.unwrap_or(0);
    let action = match (old.phase, bsb.spec.pause) {
        (Some(Phase::Pausing), _) => continue_pause(bsb, ctx, &old).await?,
        (Some(Phase::Paused), Some(false)) if unacked => {
            begin_resume(bsb, ctx, &old, generation).await?
        }
        (Some(Phase::Paused), _) => {
            if unacked {
                let mut status = old.clone();
                status.pause_observed_generation = Some(generation);
                write(bsb, ctx, &status).await?;
            }
            Action::await_change()
        }
        (Some(Phase::Succeed), Some(true)) if unacked => {
            begin_pause(bsb, ctx, &old, generation).await?
        }
        _ => return Ok(None),
    };
    Ok(Some(action))
}

async fn write(bsb: &BatchSandbox, ctx: &Context, status: &BatchSandboxStatus) -> Result<()> {
    let api: Api<BatchSandbox> =
        Api::namespaced(ctx.client.clone(), &bsb.namespace().unwrap_or_default());
    if bsb.status.as_ref() != Some(status) {
        apply_status(&api, &bsb.name_any(), status).await?;
    }
    Ok(())
}

/// The conditions of `old` but those of `kinds`.
fn without(old: &BatchSandboxStatus, kinds: &[ConditionType]) -> Vec<BatchSandboxCondition> {
    old.conditions
        .iter()
        .filter(|c| !kinds.contains(&c.kind))
        .cloned()
        .collect()
}

async fn begin_pause(
    bsb: &BatchSandbox,
    ctx: &Context,
    old: &BatchSandboxStatus,
    generation: i64,
) -> Result<Action> {
    let refuse = |reason: &str, message: String| {
        let mut status = old.clone();
        status.pause_observed_generation = Some(generation);
        status.conditions = without(old, &[ConditionType::PauseFailed]);
        status
            .conditions
            .push(condition(old, ConditionType::PauseFailed, reason, &message));
        status
    };
    if bsb.spec.replicas != 1 {
        let message = format!(
            "only a BatchSandbox of one replica can be paused; this one has {}",
            bsb.spec.replicas
        );
        write(bsb, ctx, &refuse("UnsupportedReplicas", message)).await?;
        return Ok(Action::await_change());
    }
    if let Mode::Pooled(pool) = mode(bsb)? {
        let ns = bsb.namespace().unwrap_or_default();
        if Api::<Pool>::namespaced(ctx.client.clone(), &ns)
            .get_opt(pool)
            .await?
            .is_none()
        {
            let message = format!(
                "pool {pool} no longer exists: its pod template is what the sandbox is \
                 recreated from on resume"
            );
            write(bsb, ctx, &refuse("PoolNotFound", message)).await?;
            return Ok(Action::await_change());
        }
    }
    let mut status = old.clone();
    status.phase = Some(Phase::Pausing);
    status.pause_observed_generation = Some(generation);
    status.conditions = vec![condition(
        old,
        ConditionType::Progressing,
        "PauseInProgress",
        "Committing the sandbox's filesystem",
    )];
    tracing::info!(batchsandbox = %bsb.name_any(), generation, "pausing");
    write(bsb, ctx, &status).await?;
    Ok(Action::await_change())
}

async fn continue_pause(
    bsb: &BatchSandbox,
    ctx: &Context,
    old: &BatchSandboxStatus,
) -> Result<Action> {
    let ns = bsb.namespace().unwrap_or_default();
    let name = bsb.name_any();
    let snapshots: Api<SandboxSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let snapshot_name = format!(
        "{name}-pause-{}",
        old.pause_observed_generation.unwrap_or(0)
    );
    let Some(snapshot) = snapshots.get_opt(&snapshot_name).await? else {
        let owner = bsb
            .controller_owner_ref(&())
            .expect("a stored object has a uid");
        let snapshot: SandboxSnapshot = serde_json::from_value(json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1",
            "kind": "SandboxSnapshot",
            "metadata": {
                "name": snapshot_name,
                "namespace": ns,
                "labels": {BATCH_NAME: name},
                "ownerReferences": [owner],
            },
            "spec": {"sandboxName": name},
        }))
        .expect("a snapshot");
        match snapshots.create(&PostParams::default(), &snapshot).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        // The snapshot's status changes wake this BatchSandbox (it owns the snapshot).
        return Ok(Action::await_change());
    };
    let snap_status = snapshot.status.clone().unwrap_or_default();
    match snap_status.phase {
        Some(SnapshotPhase::Succeed) => {}
        Some(SnapshotPhase::Failed) => {
            let failed = snap_status
                .conditions
                .iter()
                .find(|c| c.kind == SnapshotConditionType::Failed);
            let reason = failed.map_or("SnapshotFailed", |c| c.reason.as_str());
            let message = format!(
                "snapshot {snapshot_name} failed: {}; the sandbox runs on unchanged",
                failed.map_or("no reason given", |c| c.message.as_str())
            );
            let mut status = old.clone();
            let running = status.ready > 0;
            status.phase = Some(if running {
                Phase::Succeed
            } else {
                Phase::Failed
            });
            status.conditions = Vec::new();
            if running {
                status.conditions.push(condition(
                    old,
                    ConditionType::Ready,
                    "PodsReady",
                    "Sandbox is running",
                ));
            }
            status
                .conditions
                .push(condition(old, ConditionType::PauseFailed, reason, &message));
            tracing::warn!(batchsandbox = %name, %message, "pause failed");
            write(bsb, ctx, &status).await?;
            return Ok(Action::await_change());
        }
        _ => return Ok(Action::await_change()),
    }

    // Committed: the pods go.
    let api: Api<BatchSandbox> = Api::namespaced(ctx.client.clone(), &ns);
    match mode(bsb)? {
        Mode::OwnTemplate(_) => {
            let pods = pods_of(bsb, ctx).await?;
            if !pods.is_empty() {
                let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
                for (_, pod) in pods.iter().filter(|(_, p)| !crate::pods::is_terminating(p)) {
                    crate::pods::delete(&pod_api, &pod.name_any(), Some(PAUSED_POD_GRACE)).await?;
                }
                // Their deletion wakes this BatchSandbox (its pods carry its name).
                return Ok(Action::await_change());
            }
        }
        Mode::Pooled(pool) => {
            let annotations = bsb.meta().annotations.as_ref();
            let released = PodList::from_annotation(annotations, ALLOC_RELEASED).pods;
            let held: Vec<String> = PodList::from_annotation(annotations, ALLOC_STATUS)
                .pods
                .into_iter()
                .filter(|p| !released.contains(p))
                .collect();
            if !held.is_empty() {
                // The pool deletes them and records them in alloc-released, which wakes this.
                ask_release(&api, bsb, held).await?;
                return Ok(Action::await_change());
            }
            let Some(pool_obj) = Api::<Pool>::namespaced(ctx.client.clone(), &ns)
                .get_opt(pool)
                .await?
            else {
                let message = format!(
                    "pool {pool} was deleted during the pause: the sandbox was committed \
                     (snapshot {snapshot_name}) but has no pod template to be recreated from"
                );
                let mut status = old.clone();
                status.phase = Some(Phase::Failed);
                status.conditions = vec![condition(
                    old,
                    ConditionType::PauseFailed,
                    "PoolNotFound",
                    &message,
                )];
                write(bsb, ctx, &status).await?;
                return Ok(Action::await_change());
            };
            // The sandbox leaves the pool: from now on it is recreated alone, from the pool's
            // template.
            let mut template = pool_obj.spec.template.clone().unwrap_or_else(|| json!({}));
            if let Some(id) = bsb.labels().get(SANDBOX_ID) {
                template["metadata"]["labels"][SANDBOX_ID] = json!(id);
            }
            let finalizers: Vec<&String> = bsb
                .finalizers()
                .iter()
                .filter(|f| *f != POOL_ALLOCATION)
                .collect();
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "metadata": {
                        "resourceVersion": bsb.resource_version(),
                        "finalizers": finalizers,
                        "annotations": {ALLOC_STATUS: null, ALLOC_RELEASE: null, ALLOC_RELEASED: null},
                    },
                    "spec": {"poolRef": null, "template": template},
                })),
            )
            .await?;
            return Ok(Action::await_change());
        }
    }

    // Nothing runs any more.
    for key in ctx.tracker.pods_of(&ObjectRef::from_obj(bsb)) {
        ctx.tracker.forget(&key);
    }
    set_endpoints(&api, bsb, &[]).await?;
    for older in pause_snapshots(bsb, ctx).await? {
        // Older pauses' images: the new one references every layer it needs itself. Left
        // behind, they go with the BatchSandbox.
        if older.name_any() != snapshot_name
            && older.meta().deletion_timestamp.is_none()
            && let Err(e) = snapshots
                .delete(&older.name_any(), &Default::default())
                .await
        {
            tracing::warn!(snapshot = %older.name_any(), error = %e, "older snapshot not deleted");
        }
    }
    let status = BatchSandboxStatus {
        observed_generation: bsb.meta().generation,
        phase: Some(Phase::Paused),
        pause_observed_generation: old.pause_observed_generation,
        conditions: vec![condition(
            old,
            ConditionType::Paused,
            "Paused",
            "Sandbox is paused",
        )],
        ..Default::default()
    };
    tracing::info!(batchsandbox = %name, snapshot = %snapshot_name, "paused");
    write(bsb, ctx, &status).await?;
    Ok(Action::await_change())
}

async fn begin_resume(
    bsb: &BatchSandbox,
    ctx: &Context,
    old: &BatchSandboxStatus,
    generation: i64,
) -> Result<Action> {
    let ns = bsb.namespace().unwrap_or_default();
    let name = bsb.name_any();
    let mut committed: Vec<SandboxSnapshot> = pause_snapshots(bsb, ctx)
        .await?
        .into_iter()
        .filter(|s| {
            s.meta().deletion_timestamp.is_none()
                && s.status.as_ref().and_then(|s| s.phase) == Some(SnapshotPhase::Succeed)
        })
        .collect();
    committed.sort_by_key(|s| s.meta().creation_timestamp.as_ref().map(|t| t.0));
    let template = bsb.spec.template.clone();
    let (Some(snapshot), Some(mut template)) = (committed.pop(), template) else {
        let message = format!(
            "no committed snapshot of {name} exists (SandboxSnapshots labelled {BATCH_NAME}={name}); \
             it cannot be resumed"
        );
        let mut status = old.clone();
        status.pause_observed_generation = Some(generation);
        status.conditions = without(old, &[ConditionType::ResumeFailed]);
        status.conditions.push(condition(
            old,
            ConditionType::ResumeFailed,
            "SnapshotNotFound",
            &message,
        ));
        write(bsb, ctx, &status).await?;
        return Ok(Action::await_change());
    };
    let snap_status = snapshot.status.clone().unwrap_or_default();
    for container in template["spec"]["containers"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        if let Some(committed) = snap_status
            .containers
            .iter()
            .find(|c| Some(c.container_name.as_str()) == container["name"].as_str())
        {
            container["image"] = json!(committed.image_uri);
            // The image exists only in that node's containerd: never pulled.
            container["imagePullPolicy"] = json!("IfNotPresent");
        }
    }
    if let Some(node) = &snap_status.source_node_name {
        template["spec"]["nodeName"] = json!(node);
    }
    if bsb.spec.template.as_ref() != Some(&template) {
        Api::<BatchSandbox>::namespaced(ctx.client.clone(), &ns)
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"template": template}})),
            )
            .await?;
    }
    let mut status = old.clone();
    status.phase = Some(Phase::Resuming);
    status.pause_observed_generation = Some(generation);
    status.conditions = vec![condition(
        old,
        ConditionType::Progressing,
        "ResumeInProgress",
        &format!(
            "Recreating the sandbox from snapshot {}",
            snapshot.name_any()
        ),
    )];
    tracing::info!(batchsandbox = %name, snapshot = %snapshot.name_any(), "resuming");
    write(bsb, ctx, &status).await?;
    Ok(Action::await_change())
}
