//! The Pool controller: keeps a buffer of idle pods from the pool's template, allocates idle
//! ready pods to the BatchSandboxes that name the pool, and takes pods back (deletes them)
//! when a BatchSandbox releases them or goes away.
//!
//! The allocation lives where the OpenSandbox server and the Go controller keep it: in the
//! BatchSandbox annotations (`alloc-status`, `alloc-release`, `alloc-released`). Allocating N
//! pods to one BatchSandbox is one merge patch of that object, whatever N is.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::context::{Context, Error, Result, apply_status};
use crate::crd::{
    ALLOC_RELEASE, ALLOC_RELEASED, ALLOC_STATUS, BatchSandbox, EVICT, POOL_ALLOCATION, POOL_NAME,
    POOL_REVISION, PodList, Pool, PoolStatus, TASK_CLEANUP,
};
use crate::pods::{delete as delete_pod, is_ready, is_terminating};

pub const MANAGER: &str = "sandlet-controller";

pub async fn reconcile(pool: Arc<Pool>, ctx: Arc<Context>) -> Result<Action> {
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let key = format!("{ns}/{name}");
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let bsb_api: Api<BatchSandbox> = Api::namespaced(ctx.client.clone(), &ns);
    if pool.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let revision = revision(&pool);
    let listed = pods_api
        .list(&ListParams::default().labels(&format!("{POOL_NAME}={name}")))
        .await?
        .items;
    let pods: Vec<Pod> = {
        let mut released = ctx.released_lock();
        let released = released.entry(key.clone()).or_default();
        // A deleted pod that is no longer listed needs no entry any more.
        released.retain(|r| listed.iter().any(|p| p.name_any() == *r));
        listed
            .into_iter()
            .filter(|p| !is_terminating(p) && !released.contains(&p.name_any()))
            .collect()
    };
    let mut sandboxes: Vec<BatchSandbox> = bsb_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|b| b.spec.pool_ref.as_deref() == Some(name.as_str()) && b.spec.template.is_none())
        .collect();
    sandboxes.sort_by(|a, b| {
        (
            a.meta().creation_timestamp.as_ref().map(|t| t.0),
            a.name_any(),
        )
            .cmp(&(
                b.meta().creation_timestamp.as_ref().map(|t| t.0),
                b.name_any(),
            ))
    });

    // Each BatchSandbox's allocation (alloc-status) and what is already back (alloc-released).
    let allocations: Vec<(Vec<String>, BTreeSet<String>)> = sandboxes
        .iter()
        .map(|bsb| {
            let annotations = bsb.meta().annotations.as_ref();
            let released = PodList::from_annotation(annotations, ALLOC_RELEASED).pods;
            (
                PodList::from_annotation(annotations, ALLOC_STATUS).pods,
                released.into_iter().collect(),
            )
        })
        .collect();
    // Who holds what: the annotations, plus what this process allocated that the cache may
    // not show yet.
    let mut holder: BTreeMap<String, String> = BTreeMap::new();
    for (bsb, (status, released)) in sandboxes.iter().zip(&allocations) {
        for pod in status.iter().filter(|p| !released.contains(*p)) {
            holder.insert(pod.clone(), bsb.name_any());
        }
    }
    {
        let mut recent = ctx.allocations_lock();
        let recent = recent.entry(key.clone()).or_default();
        // Entries the cache now shows are no longer needed.
        recent.retain(|pod, bsb| holder.get(pod) != Some(bsb));
        for (pod, bsb) in recent.iter() {
            holder.insert(pod.clone(), bsb.clone());
        }
    }

    // Releases: pods given back, or all of a BatchSandbox that is going away (once its tasks
    // are stopped). Recycling is deletion.
    let mut shortfall = 0usize;
    let mut requests: Vec<(&BatchSandbox, usize)> = Vec::new();
    for (bsb, (status, released)) in sandboxes.iter().zip(&allocations) {
        let annotations = bsb.meta().annotations.as_ref();
        let deleting = bsb.meta().deletion_timestamp.is_some();
        let to_release: Vec<String> = if deleting {
            if bsb.finalizers().iter().any(|f| f == TASK_CLEANUP) {
                tracing::debug!(pool = %name, batchsandbox = %bsb.name_any(), "deleting: pods held until its tasks have stopped");
                continue;
            }
            status
                .iter()
                .filter(|p| !released.contains(*p))
                .cloned()
                .collect()
        } else {
            PodList::from_annotation(annotations, ALLOC_RELEASE)
                .pods
                .into_iter()
                .filter(|p| !released.contains(p))
                .collect()
        };
        if !to_release.is_empty()
            || (deleting && bsb.finalizers().iter().any(|f| f == POOL_ALLOCATION))
        {
            release(&ctx, &key, &pods_api, &bsb_api, bsb, &to_release).await?;
            for pod in &to_release {
                holder.remove(pod);
            }
        }
        if !deleting {
            let want = usize::try_from(bsb.spec.replicas).unwrap_or(0);
            let need = want.saturating_sub(status.len());
            if need > 0 {
                requests.push((bsb, need));
            }
        }
    }

    // Allocation: idle ready pods, oldest first, each request filled before the next.
    let mut idle: Vec<&Pod> = pods
        .iter()
        .filter(|p| !holder.contains_key(&p.name_any()) && is_ready(p) && !is_evicted(p))
        .collect();
    idle.sort_by_key(|p| {
        (
            p.meta().creation_timestamp.as_ref().map(|t| t.0),
            p.name_any(),
        )
    });
    let mut idle = idle.into_iter();
    for (bsb, need) in requests {
        let picked: Vec<String> = idle.by_ref().take(need).map(|p| p.name_any()).collect();
        shortfall += need - picked.len();
        if picked.is_empty() {
            continue;
        }
        allocate(&ctx, &key, &bsb_api, bsb, &picked).await?;
        for pod in picked {
            holder.insert(pod, bsb.name_any());
        }
    }

    // Evicted idle pods go; template changes replace idle pods; then the buffer is refilled.
    let mut removed: BTreeSet<String> = BTreeSet::new();
    for pod in pods.iter().filter(|p| !holder.contains_key(&p.name_any())) {
        let old = pod.labels().get(POOL_REVISION) != Some(&revision);
        if is_evicted(pod) || (old && !is_ready(pod)) {
            delete_pod(&pods_api, &pod.name_any(), None).await?;
            removed.insert(pod.name_any());
        }
    }
    let not_ready = pods
        .iter()
        .filter(|p| !is_ready(p) && !removed.contains(&p.name_any()))
        .count();
    let budget = (pods.len().div_ceil(4).max(1)).saturating_sub(not_ready);
    let outdated: Vec<String> = pods
        .iter()
        .filter(|p| !holder.contains_key(&p.name_any()) && !removed.contains(&p.name_any()))
        .filter(|p| p.labels().get(POOL_REVISION) != Some(&revision))
        .take(budget)
        .map(|p| p.name_any())
        .collect();
    for pod in outdated {
        delete_pod(&pods_api, &pod, None).await?;
        removed.insert(pod);
    }

    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| !removed.contains(&p.name_any()))
        .collect();
    let allocated = live
        .iter()
        .filter(|p| holder.contains_key(&p.name_any()))
        .count();
    let capacity = &pool.spec.capacity_spec;
    let (buffer_min, buffer_max) = (as_count(capacity.buffer_min), as_count(capacity.buffer_max));
    let buffer = live.len() - allocated;
    let desired_buffer = if (buffer_min..=buffer_max).contains(&buffer) {
        buffer
    } else {
        (buffer_min + buffer_max) / 2
    };
    let desired = (allocated + shortfall + desired_buffer)
        .max(as_count(capacity.pool_min))
        .min(as_count(capacity.pool_max).max(allocated));
    if desired > live.len() {
        let not_ready = live.iter().filter(|p| !is_ready(p)).count();
        for _ in 0..pods_to_create(desired, live.len(), not_ready) {
            create_pod(&pool, &pods_api, &revision).await?;
        }
    } else if desired < live.len() {
        let mut surplus: Vec<&&Pod> = live
            .iter()
            .filter(|p| !holder.contains_key(&p.name_any()))
            .collect();
        // Not-ready ones first, then the oldest.
        surplus.sort_by_key(|p| {
            (
                is_ready(p),
                p.meta().creation_timestamp.as_ref().map(|t| t.0),
            )
        });
        for pod in surplus.into_iter().take(live.len() - desired) {
            delete_pod(&pods_api, &pod.name_any(), None).await?;
        }
    }

    let status = PoolStatus {
        observed_generation: pool.meta().generation,
        revision: revision.clone(),
        total: live.len() as i32,
        allocated: allocated as i32,
        available: live
            .iter()
            .filter(|p| !holder.contains_key(&p.name_any()) && is_ready(p))
            .count() as i32,
        updated: live
            .iter()
            .filter(|p| p.labels().get(POOL_REVISION) == Some(&revision))
            .count() as i32,
    };
    if pool.status.as_ref() != Some(&status) {
        let pools: Api<Pool> = Api::namespaced(ctx.client.clone(), &ns);
        apply_status(&pools, &name, &status).await?;
    }
    Ok(if shortfall > 0 {
        // New pods become ready through pod events; this is the backstop.
        Action::requeue(Duration::from_secs(5))
    } else {
        Action::await_change()
    })
}

pub fn error_policy(pool: Arc<Pool>, error: &Error, ctx: Arc<Context>) -> Action {
    crate::context::after_error(&*pool, error, ctx)
}

/// Appends `picked` to the BatchSandbox's `alloc-status` and holds it with the pool finalizer:
/// one merge patch.
async fn allocate(
    ctx: &Context,
    key: &str,
    api: &Api<BatchSandbox>,
    bsb: &BatchSandbox,
    picked: &[String],
) -> Result<()> {
    let mut status = PodList::from_annotation(bsb.meta().annotations.as_ref(), ALLOC_STATUS);
    status.pods.extend(picked.iter().cloned());
    status.pool_ref = bsb.spec.pool_ref.clone();
    let mut finalizers = bsb.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == POOL_ALLOCATION) {
        finalizers.push(POOL_ALLOCATION.to_string());
    }
    // The resourceVersion makes the patch fail on a stale object instead of losing an
    // allocation another writer made meanwhile.
    api.patch(
        &bsb.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "resourceVersion": bsb.resource_version(),
            "annotations": {ALLOC_STATUS: status.to_annotation()},
            "finalizers": finalizers,
        }})),
    )
    .await?;
    {
        let mut recent = ctx.allocations_lock();
        let recent = recent.entry(key.to_string()).or_default();
        for pod in picked {
            recent.insert(pod.clone(), bsb.name_any());
        }
    }
    ctx.event(
        &bsb.object_ref(&()),
        EventType::Normal,
        "Allocated",
        "Allocate",
        format!("{} pod(s) allocated from the pool", picked.len()),
    )
    .await;
    Ok(())
}

/// Deletes the released pods, then records them in `alloc-released`; a BatchSandbox that is
/// going away and has everything back loses the pool finalizer.
async fn release(
    ctx: &Context,
    key: &str,
    pods: &Api<Pod>,
    api: &Api<BatchSandbox>,
    bsb: &BatchSandbox,
    to_release: &[String],
) -> Result<()> {
    for pod in to_release {
        delete_pod(pods, pod, None).await?;
    }
    ctx.released_lock()
        .entry(key.to_string())
        .or_default()
        .extend(to_release.iter().cloned());
    let annotations = bsb.meta().annotations.as_ref();
    let mut released = PodList::from_annotation(annotations, ALLOC_RELEASED);
    released.pods.extend(to_release.iter().cloned());
    released.pods.sort();
    released.pods.dedup();
    let all_back = PodList::from_annotation(annotations, ALLOC_STATUS)
        .pods
        .iter()
        .all(|p| released.pods.contains(p));
    let mut metadata = json!({
        "resourceVersion": bsb.resource_version(),
        "annotations": {ALLOC_RELEASED: released.to_annotation()},
    });
    if bsb.meta().deletion_timestamp.is_some() && all_back {
        let finalizers: Vec<&String> = bsb
            .finalizers()
            .iter()
            .filter(|f| *f != POOL_ALLOCATION)
            .collect();
        metadata["finalizers"] = json!(finalizers);
    }
    match api
        .patch(
            &bsb.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": metadata})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn create_pod(pool: &Pool, pods: &Api<Pod>, revision: &str) -> Result<()> {
    let template = pool.spec.template.clone().unwrap_or_else(|| json!({}));
    let mut metadata = template
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let name = pool.name_any();
    metadata["generateName"] = json!(format!("{name}-"));
    metadata["labels"][POOL_NAME] = json!(name);
    metadata["labels"][POOL_REVISION] = json!(revision);
    metadata["ownerReferences"] = json!([pool
        .controller_owner_ref(&())
        .expect("a pool from the API has a uid")]);
    metadata.as_object_mut().map(|m| m.remove("name"));
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    }))
    .map_err(|e| {
        Error::Invalid(format!(
            "pool {name}: the template is not a pod template: {e}"
        ))
    })?;
    pods.create(&PostParams::default(), &pod).await?;
    Ok(())
}

/// Hex of the first 8 bytes of the SHA-256 of the template's JSON.
pub fn revision(pool: &Pool) -> String {
    let json = serde_json::to_vec(&pool.spec.template).expect("JSON serialises");
    Sha256::digest(&json)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_evicted(pod: &Pod) -> bool {
    pod.labels().contains_key(EVICT)
}

fn as_count(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// How many pods to create towards `desired` when `live` exist and `not_ready` of them are not
/// ready yet: as the Go controller does, at most a quarter of `desired` (at least one) may be
/// starting at once. Pods that are starting count in the buffer but cannot fill a shortfall
/// yet; without the limit each reconcile while a real kubelet starts them (seconds) would see
/// the shortfall again beside a full buffer, create more, then delete the surplus, forever.
fn pods_to_create(desired: usize, live: usize, not_ready: usize) -> usize {
    let starting_at_most = desired.div_ceil(4).max(1);
    desired
        .saturating_sub(live)
        .min(starting_at_most.saturating_sub(not_ready))
}

/// What of a BatchSandbox the pool acts on: its spec, the allocation annotations, finalizers
/// and deletion. Its status is not among them: a status write (every task's change of state)
/// need not wake the pool, whose reconcile lists every pool pod from the apiserver.
pub fn pool_inputs(bsb: &BatchSandbox) -> Option<u64> {
    let meta = bsb.meta();
    let mut hasher = std::hash::DefaultHasher::new();
    (
        meta.generation,
        &meta.annotations,
        &meta.finalizers,
        meta.deletion_timestamp.is_some(),
    )
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// The pool a BatchSandbox names, for the pool controller's watch on BatchSandboxes.
pub fn pool_of(bsb: &BatchSandbox) -> Option<kube::runtime::reflector::ObjectRef<Pool>> {
    let pool = bsb
        .spec
        .pool_ref
        .as_deref()
        .filter(|p| !p.is_empty() && *p != "*")?;
    Some(kube::runtime::reflector::ObjectRef::new(pool).within(&bsb.namespace()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BatchSandboxStatus;

    #[test]
    fn at_most_a_quarter_of_the_desired_pods_start_at_once() {
        // An empty pool of 12 desired starts 3, then no more until some are ready.
        assert_eq!(pods_to_create(12, 0, 0), 3);
        assert_eq!(pods_to_create(12, 3, 3), 0);
        assert_eq!(pods_to_create(12, 3, 1), 2);
        // Never more than missing; one at a time when a quarter rounds to nothing.
        assert_eq!(pods_to_create(12, 11, 0), 1);
        assert_eq!(pods_to_create(2, 0, 0), 1);
        assert_eq!(pods_to_create(2, 1, 1), 0);
        assert_eq!(pods_to_create(5, 5, 0), 0);
    }

    #[test]
    fn only_what_the_pool_acts_on_wakes_it() {
        let bsb: BatchSandbox = serde_json::from_value(json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
            "metadata": {"name": "b", "namespace": "ns", "generation": 1, "resourceVersion": "7",
                "annotations": {ALLOC_STATUS: "{\"pods\":[\"p-1\"]}"},
                "finalizers": [POOL_ALLOCATION, TASK_CLEANUP]},
            "spec": {"replicas": 1, "poolRef": "p"}
        }))
        .unwrap();
        let before = pool_inputs(&bsb);

        let mut status_written = bsb.clone();
        status_written.metadata.resource_version = Some("8".into());
        status_written.status = Some(BatchSandboxStatus {
            task_succeed: 1,
            ..Default::default()
        });
        assert_eq!(pool_inputs(&status_written), before);

        let mut released = bsb.clone();
        released
            .annotations_mut()
            .insert(ALLOC_RELEASE.into(), "{\"pods\":[\"p-1\"]}".into());
        let mut scaled = bsb.clone();
        scaled.metadata.generation = Some(2);
        let mut tasks_stopped = bsb.clone();
        tasks_stopped.finalizers_mut().retain(|f| f != TASK_CLEANUP);
        let mut deleted = bsb.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        for changed in [released, scaled, tasks_stopped, deleted] {
            assert_ne!(pool_inputs(&changed), before, "{:?}", changed.metadata);
        }
    }
}
