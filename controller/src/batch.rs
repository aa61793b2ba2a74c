//! The BatchSandbox controller: reports its pods (status counters, phase, conditions, the
//! endpoints annotation), runs one task per pod through the pod's executor, counts the tasks
//! from their change feeds, and on deletion stops every task before the pods go (finalizer
//! `task-cleanup`). Pooled (`poolRef`): the pool allocated the pods; they are given back under
//! the `Release` policy and at deletion. Non-pooled (`template`): it creates pod `<name>-<i>`
//! for each missing index (with that index's `shardPatches` merged in) and deletes them itself
//! at deletion (finalizer `pod-cleanup` when there are no tasks), so they go whether or not a
//! garbage collector runs. Pause and resume: [`crate::pause`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::context::{Context, Error, Result, apply_status};
use crate::crd::{
    ALLOC_RELEASE, ALLOC_STATUS, BATCH_NAME, BatchSandbox, BatchSandboxCondition,
    BatchSandboxStatus, ConditionStatus, ConditionType, ENDPOINTS, POD_CLEANUP, POD_INDEX,
    POOL_NAME, Phase, PodList, Pool, SandboxSnapshot, TASK_CLEANUP, TaskResourcePolicy,
};
use crate::pods::{failure, ip, is_ready};
use crate::tasks::TaskState;

pub async fn reconcile(bsb: Arc<BatchSandbox>, ctx: Arc<Context>) -> Result<Action> {
    let ns = bsb.namespace().unwrap_or_default();
    let api: Api<BatchSandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(name) = finalizer_of(&bsb) else {
        if bsb.meta().deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        return apply(&bsb, &ctx).await;
    };
    finalizer(&api, name, bsb, |event| async {
        match event {
            Finalizer::Apply(bsb) => apply(&bsb, &ctx).await,
            Finalizer::Cleanup(bsb) => cleanup(&bsb, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

pub fn error_policy(bsb: Arc<BatchSandbox>, error: &Error, ctx: Arc<Context>) -> Action {
    crate::context::after_error(&*bsb, error, ctx)
}

/// The finalizer a BatchSandbox holds while it exists: `task-cleanup` when it has tasks (they
/// are stopped before it goes), `pod-cleanup` when it has its own pods and no tasks (they are
/// deleted, with its pause snapshots, before it goes: the OpenSandbox server deletes with
/// `gracePeriodSeconds=0` and leaves the pods to whoever cleans up); none when pooled without
/// tasks (the pool's `pool-allocation` takes the pods back).
fn finalizer_of(bsb: &BatchSandbox) -> Option<&'static str> {
    if bsb.spec.task_template.is_some() {
        Some(TASK_CLEANUP)
    } else if let Ok(Mode::OwnTemplate(_)) = mode(bsb) {
        Some(POD_CLEANUP)
    } else {
        None
    }
}

/// Where a BatchSandbox's pods come from.
pub(crate) enum Mode<'a> {
    Pooled(&'a str),
    OwnTemplate(&'a Value),
}

pub(crate) fn mode(bsb: &BatchSandbox) -> Result<Mode<'_>> {
    match (
        bsb.spec.pool_ref.as_deref().filter(|p| !p.is_empty()),
        &bsb.spec.template,
    ) {
        (Some("*"), _) => Err(Error::Invalid(format!(
            "batchsandbox {}: poolRef \"*\" (choose a pool) is not supported; name the pool",
            bsb.name_any()
        ))),
        (Some(pool), _) => Ok(Mode::Pooled(pool)),
        (None, Some(template)) => Ok(Mode::OwnTemplate(template)),
        (None, None) => Err(Error::Invalid(format!(
            "batchsandbox {}: needs spec.poolRef or spec.template",
            bsb.name_any()
        ))),
    }
}

/// The pods a BatchSandbox has, with their index: the position in the allocation (pooled) or
/// the `pod-index` label (non-pooled), in index order.
pub(crate) async fn pods_of(bsb: &BatchSandbox, ctx: &Context) -> Result<Vec<(usize, Arc<Pod>)>> {
    let ns = bsb.namespace().unwrap_or_default();
    let in_namespace = |p: &Pod| p.metadata.namespace.as_deref() == Some(ns.as_str());
    match mode(bsb)? {
        Mode::Pooled(pool) => {
            let annotations = bsb.meta().annotations.as_ref();
            let release = PodList::from_annotation(annotations, ALLOC_RELEASE).pods;
            let names: Vec<String> = PodList::from_annotation(annotations, ALLOC_STATUS)
                .pods
                .into_iter()
                .filter(|p| !release.contains(p))
                .collect();
            if names.is_empty() {
                return Ok(Vec::new());
            }
            wait_for_cache(ctx)?;
            let mut by_name: BTreeMap<String, Arc<Pod>> = ctx
                .pods
                .state()
                .into_iter()
                .filter(|p| {
                    in_namespace(p) && p.labels().get(POOL_NAME).map(String::as_str) == Some(pool)
                })
                .map(|p| (p.name_any(), p))
                .collect();
            Ok(names
                .iter()
                .filter_map(|n| by_name.remove(n))
                .enumerate()
                .collect())
        }
        Mode::OwnTemplate(_) => {
            wait_for_cache(ctx)?;
            let uid = bsb.uid();
            let mut pods: Vec<(usize, Arc<Pod>)> = ctx
                .pods
                .state()
                .into_iter()
                .filter(|p| {
                    in_namespace(p)
                        && p.owner_references()
                            .iter()
                            .any(|o| Some(&o.uid) == uid.as_ref())
                })
                .filter_map(|p| {
                    let index = p.labels().get(POD_INDEX)?.parse().ok()?;
                    Some((index, p))
                })
                .collect();
            pods.sort_by_key(|(index, p)| (*index, p.name_any()));
            pods.dedup_by_key(|(index, _)| *index);
            Ok(pods)
        }
    }
}

fn wait_for_cache(ctx: &Context) -> Result<()> {
    if futures::FutureExt::now_or_never(ctx.pods.wait_until_ready()).is_none() {
        return Err(Error::NotReady("the pod cache is still loading"));
    }
    Ok(())
}

/// Creates the pod of every index below `replicas` that has none (non-pooled). A pod the cache
/// has not seen yet is already there: creating it again is a no-op.
async fn create_missing(
    bsb: &BatchSandbox,
    template: &Value,
    have: &[(usize, Arc<Pod>)],
    ctx: &Context,
) -> Result<()> {
    let ns = bsb.namespace().unwrap_or_default();
    let name = bsb.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let replicas = usize::try_from(bsb.spec.replicas).unwrap_or(0);
    let patches = bsb.spec.shard_patches.as_deref().unwrap_or_default();
    for index in (0..replicas).filter(|i| !have.iter().any(|(h, _)| h == i)) {
        let pod_name = format!("{name}-{index}");
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
            "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
        });
        if let Some(patch) = patches.get(index) {
            merge(&mut pod, patch);
        }
        let owner = bsb
            .controller_owner_ref(&())
            .expect("a stored object has a uid");
        let meta = &mut pod["metadata"];
        meta["name"] = json!(pod_name);
        meta["namespace"] = json!(ns);
        meta["labels"][POD_INDEX] = json!(index.to_string());
        meta["labels"][BATCH_NAME] = json!(name);
        meta["ownerReferences"] = json!([owner]);
        let pod: Pod = serde_json::from_value(pod)
            .map_err(|e| Error::Invalid(format!("batchsandbox {name}: template: {e}")))?;
        match api.create(&Default::default(), &pod).await {
            Ok(_) => {
                tracing::info!(batchsandbox = %name, pod = %pod_name, "created");
                ctx.event(
                    &bsb.object_ref(&()),
                    EventType::Normal,
                    "SuccessfulCreate",
                    "Create",
                    format!("Created pod {pod_name}"),
                )
                .await;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn apply(bsb: &BatchSandbox, ctx: &Context) -> Result<Action> {
    let ns = bsb.namespace().unwrap_or_default();
    let name = bsb.name_any();
    let api: Api<BatchSandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let mut requeue: Option<Duration> = None;
    if let Some(expiry) = bsb
        .spec
        .expire_time
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    {
        let left = expiry.with_timezone(&Utc) - Utc::now();
        if left <= chrono::TimeDelta::zero() {
            tracing::info!(batchsandbox = %name, "expired; deleting");
            let note = format!("expireTime {expiry} has passed; deleting");
            ctx.event(
                &bsb.object_ref(&()),
                EventType::Normal,
                "Expired",
                "Delete",
                note,
            )
            .await;
            api.delete(&name, &Default::default()).await?;
            return Ok(Action::await_change());
        }
        requeue = left.to_std().ok();
    } else if let Some(unreadable) = &bsb.spec.expire_time {
        return Err(Error::Invalid(format!(
            "batchsandbox {name}: expireTime {unreadable:?} is not an RFC 3339 time"
        )));
    }
    if let Some(action) = crate::pause::dispatch(bsb, ctx).await? {
        return Ok(action);
    }
    let indexed = pods_of(bsb, ctx).await?;
    if let Mode::OwnTemplate(template) = mode(bsb)? {
        create_missing(bsb, template, &indexed, ctx).await?;
    }
    let pods: Vec<&Pod> = indexed.iter().map(|(_, p)| &**p).collect();
    let owner = ObjectRef::from_obj(bsb);

    let mut status = BatchSandboxStatus {
        observed_generation: bsb.meta().generation,
        replicas: pods.len() as i32,
        allocated: pods
            .iter()
            .filter(|p| ip(p).is_some() || p.spec.as_ref().is_some_and(|s| s.node_name.is_some()))
            .count() as i32,
        ready: pods.iter().filter(|p| is_ready(p)).count() as i32,
        ..Default::default()
    };

    let mut release: Vec<String> = Vec::new();
    // Task changes worth an Event, published once the status is written.
    let mut events = Vec::new();
    // A task whose executor has not answered yet (a follower just started, e.g. after a
    // controller restart): the status already written knows more than these counters.
    let mut unknown_yet = false;
    if let Some(template) = &bsb.spec.task_template {
        let patches = bsb.spec.shard_task_patches.as_deref().unwrap_or_default();
        let replicas = usize::try_from(bsb.spec.replicas).unwrap_or(0);
        let followed: Vec<String> = ctx.tracker.pods_of(&owner);
        for index in 0..replicas {
            let task_name = format!("{name}-{index}");
            let pod = indexed.iter().find(|(i, _)| *i == index).map(|(_, p)| p);
            let Some((pod, ip)) = pod.and_then(|p| Some((p, ip(p)?))) else {
                status.task_pending += 1;
                continue;
            };
            let key = format!("{ns}/{}", pod.name_any());
            let task = task_spec(&task_name, template, patches.get(index))?;
            ctx.tracker.declare(&owner, &key, ip, Some(task));
            let (state, before) = ctx.tracker.state(&key, &task_name);
            match state {
                None => {
                    unknown_yet = true;
                    status.task_pending += 1;
                }
                Some(TaskState::Pending) => status.task_pending += 1,
                Some(TaskState::Running) => status.task_running += 1,
                Some(TaskState::Succeed) => status.task_succeed += 1,
                Some(TaskState::Failed) => status.task_failed += 1,
                Some(TaskState::Unknown) => status.task_unknown += 1,
            }
            if let Some(now) = state
                && before != Some(now)
            {
                let task = ctx.tracker.task(&key, &task_name);
                let at = TaskAt {
                    task: &task_name,
                    pod: &pod.name_any(),
                    executor: ip,
                };
                events.extend(task_events(&at, before, now, task.as_ref()));
            }
            let done = matches!(state, Some(TaskState::Succeed | TaskState::Failed));
            if done
                && bsb.spec.task_resource_policy_when_completed == Some(TaskResourcePolicy::Release)
            {
                release.push(pod.name_any());
            }
        }
        // Pods no longer held (released, gone) are not followed any more.
        for key in followed {
            if !pods.iter().any(|p| format!("{ns}/{}", p.name_any()) == key) {
                ctx.tracker.forget(&key);
            }
        }
    }
    ask_release(&api, bsb, release).await?;

    // Phase and conditions, as the Go controller sets them; one failing pod makes it Failed.
    let old = bsb.status.clone().unwrap_or_default();
    let failed: Vec<(String, String)> = pods
        .iter()
        .filter_map(|p| Some((p.name_any(), failure(p)?)))
        .collect();
    let resuming = old.phase == Some(Phase::Resuming);
    let phase = if !failed.is_empty() || old.phase == Some(Phase::Failed) {
        Phase::Failed
    } else if status.ready > 0 {
        Phase::Succeed
    } else if resuming {
        Phase::Resuming
    } else {
        Phase::Pending
    };
    status.phase = Some(phase);
    status.pause_observed_generation = bsb.meta().generation;
    status.conditions = match phase {
        Phase::Succeed => vec![condition(
            &old,
            ConditionType::Ready,
            "PodsReady",
            "Sandbox is running",
        )],
        Phase::Pending => vec![condition(
            &old,
            ConditionType::Progressing,
            "Creating",
            "Sandbox is being created",
        )],
        Phase::Resuming => vec![condition(
            &old,
            ConditionType::Progressing,
            "ResumeInProgress",
            "Sandbox is being recreated from its snapshot",
        )],
        _ if !failed.is_empty() => {
            let message = format!(
                "{}/{} observed pods failed; primary reason={}; sample pod={}",
                failed.len(),
                pods.len(),
                failed[0].1,
                failed[0].0
            );
            let mut conditions = vec![condition(
                &old,
                ConditionType::PodFailed,
                &failed[0].1,
                &message,
            )];
            if resuming {
                let message = format!("the resumed pod does not start: {message}");
                conditions.push(condition(
                    &old,
                    ConditionType::ResumeFailed,
                    &failed[0].1,
                    &message,
                ));
            }
            conditions
        }
        _ => old.conditions.clone(),
    };
    // A failed pause or resume stays on record (the server retries through it) until the next
    // one starts.
    for kind in [ConditionType::PauseFailed, ConditionType::ResumeFailed] {
        if !status.conditions.iter().any(|c| c.kind == kind)
            && let Some(failed) = old
                .conditions
                .iter()
                .find(|c| c.kind == kind && c.status == ConditionStatus::True)
        {
            status.conditions.push(failed.clone());
        }
    }
    if phase == Phase::Pending
        && let Mode::Pooled(pool) = mode(bsb)?
        && pods.len() < usize::try_from(bsb.spec.replicas).unwrap_or(0)
        && let Some((reason, message)) = allocation_pending(ctx, &ns, pool).await?
    {
        status.conditions.push(condition(
            &old,
            ConditionType::PoolAllocationPending,
            reason,
            &message,
        ));
    }

    let endpoints: Vec<&str> = pods.iter().map(|p| ip(p).unwrap_or("")).collect();
    set_endpoints(&api, bsb, &endpoints).await?;
    let initial = pods.is_empty()
        && bsb.status.is_none()
        && bsb.spec.replicas > 0
        && status.conditions.len() == 1;
    let partial = unknown_yet && bsb.status.is_some();
    if bsb.status.as_ref() != Some(&status) && !initial && !partial {
        apply_status(&api, &name, &status).await?;
    }
    let reference = bsb.object_ref(&());
    for (kind, reason, note) in events {
        ctx.event(&reference, kind, reason, "Track", note).await;
    }
    Ok(match requeue {
        Some(at) => Action::requeue(at),
        None => Action::await_change(),
    })
}

/// Where a task runs, for the words of its events.
struct TaskAt<'a> {
    task: &'a str,
    pod: &'a str,
    executor: &'a str,
}

/// The Events a task's change of state makes: its executor lost or back, and its failure.
/// Only changes this process saw: after a controller restart the first look at a task that had
/// already failed says nothing again; an executor that does not answer is news either way.
fn task_events(
    at: &TaskAt,
    before: Option<TaskState>,
    now: TaskState,
    task: Option<&Value>,
) -> Vec<(EventType, &'static str, String)> {
    let TaskAt {
        task: name,
        pod,
        executor,
    } = at;
    let mut events = Vec::new();
    if before == Some(now) {
        return events;
    }
    match (before, now) {
        (_, TaskState::Unknown) => events.push((
            EventType::Warning,
            "ExecutorUnreachable",
            format!(
                "task {name}: the executor of pod {pod} ({executor}) does not answer; \
                 the task counts as UNKNOWN until it does"
            ),
        )),
        (Some(TaskState::Unknown), now) => events.push((
            EventType::Normal,
            "ExecutorReachable",
            format!("task {name}: the executor of pod {pod} answers again; the task is {now:?}"),
        )),
        _ => {}
    }
    if now == TaskState::Failed && before.is_some() {
        let ended = task.map_or(&Value::Null, |t| &t["processStatus"]["terminated"]);
        let mut note = format!("task {name} on pod {pod} failed");
        if let Some(code) = ended["exitCode"].as_i64() {
            note += &format!(": exit code {code}");
        }
        for field in ["reason", "message"] {
            if let Some(text) = ended[field].as_str().filter(|t| !t.is_empty()) {
                note += &format!("; {field}: {text}");
            }
        }
        events.push((EventType::Warning, "TaskFailed", note));
    }
    events
}

/// Why a pooled BatchSandbox waits for pods, when its pool has none idle: the condition the
/// server reports as `POOL_CAPACITY_EXHAUSTED` (and answers 429 once that lasts).
async fn allocation_pending(
    ctx: &Context,
    ns: &str,
    pool: &str,
) -> Result<Option<(&'static str, String)>> {
    let Some(pool_obj) = Api::<Pool>::namespaced(ctx.client.clone(), ns)
        .get_opt(pool)
        .await?
    else {
        return Ok(Some((
            "PoolNotFound",
            format!("pool {pool} does not exist in namespace {ns}"),
        )));
    };
    let status = pool_obj.status.unwrap_or_default();
    let max = pool_obj.spec.capacity_spec.pool_max;
    Ok(match status.available {
        0 if status.total >= max => Some((
            "PoolCapacityExhausted",
            format!("pool {pool} has no idle pod and is at its poolMax ({max} pods)"),
        )),
        0 => Some((
            "PoolPodsStarting",
            format!(
                "pool {pool} has no idle ready pod yet ({} of at most {max} pods exist)",
                status.total
            ),
        )),
        _ => None,
    })
}

/// Adds `pods` to the BatchSandbox's `alloc-release`: the pool takes them back.
pub(crate) async fn ask_release(
    api: &Api<BatchSandbox>,
    bsb: &BatchSandbox,
    pods: Vec<String>,
) -> Result<()> {
    if pods.is_empty() {
        return Ok(());
    }
    let mut asked = PodList::from_annotation(bsb.meta().annotations.as_ref(), ALLOC_RELEASE);
    let before = asked.pods.len();
    asked.pods.extend(pods);
    asked.pods.sort();
    asked.pods.dedup();
    if asked.pods.len() != before {
        api.patch(
            &bsb.name_any(),
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {ALLOC_RELEASE: asked.to_annotation()}}}),
            ),
        )
        .await?;
    }
    Ok(())
}

/// The `endpoints` annotation: the pods' IPs in index order (the server uses the first).
pub(crate) async fn set_endpoints(
    api: &Api<BatchSandbox>,
    bsb: &BatchSandbox,
    ips: &[&str],
) -> Result<()> {
    let endpoints = serde_json::to_string(ips).expect("strings serialise");
    let current = bsb.annotations().get(ENDPOINTS);
    if current != Some(&endpoints) && !(current.is_none() && endpoints == "[]") {
        api.patch(
            &bsb.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ENDPOINTS: endpoints}}})),
        )
        .await?;
    }
    Ok(())
}

/// The SandboxSnapshots this BatchSandbox's pauses made.
pub(crate) async fn pause_snapshots(
    bsb: &BatchSandbox,
    ctx: &Context,
) -> Result<Vec<SandboxSnapshot>> {
    let ns = bsb.namespace().unwrap_or_default();
    let selector = format!("{BATCH_NAME}={}", bsb.name_any());
    Ok(Api::<SandboxSnapshot>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Deleting: every pod's executor is told to run nothing, and the finalizer goes once each
/// says it runs nothing (or its pod is gone). Then the pool takes the pods back, or its own
/// pods and pause snapshots are deleted.
async fn cleanup(bsb: &BatchSandbox, ctx: &Context) -> Result<Action> {
    let ns = bsb.namespace().unwrap_or_default();
    let owner = ObjectRef::from_obj(bsb);
    let pods = pods_of(bsb, ctx).await?;
    let mut waiting = Vec::new();
    let tasks = bsb.spec.task_template.is_some();
    for (_, pod) in pods.iter().filter(|_| tasks) {
        let Some(ip) = ip(pod) else { continue };
        let key = format!("{ns}/{}", pod.name_any());
        ctx.tracker.declare(&owner, &key, ip, None);
        if !ctx.tracker.is_idle(&key) {
            waiting.push(key);
        }
    }
    if !waiting.is_empty() {
        tracing::debug!(batchsandbox = %bsb.name_any(), ?waiting, "deleting: tasks still stopping");
        // Not Ok: the finalizer helper removes the finalizer after any successful cleanup.
        // The followers wake this reconcile when the tasks are gone; the error policy's
        // requeue is the backstop.
        return Err(Error::NotReady("tasks are still stopping"));
    }
    for key in ctx.tracker.pods_of(&owner) {
        ctx.tracker.forget(&key);
    }
    // Its own pods go now that their tasks have stopped (the garbage collector would only get
    // to them after the BatchSandbox is gone, and not at all where none runs).
    if let Mode::OwnTemplate(_) = mode(bsb)? {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        for (_, pod) in pods.iter().filter(|(_, p)| !crate::pods::is_terminating(p)) {
            crate::pods::delete(&api, &pod.name_any(), None).await?;
        }
    }
    let snapshots: Api<SandboxSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    for snapshot in pause_snapshots(bsb, ctx).await? {
        if snapshot.meta().deletion_timestamp.is_none() {
            match snapshots
                .delete(&snapshot.name_any(), &Default::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(Action::await_change())
}

/// The task for one index: the template with that index's patch merged in (strategic-merge
/// style: objects merge, lists of named objects merge by `name`, other lists are replaced), as sandlet's
/// and the Go executor's `{name, process}`. The timeout comes from the unpatched template.
pub fn task_spec(name: &str, template: &Value, patch: Option<&Value>) -> Result<Value> {
    let mut merged = template.clone();
    if let Some(patch) = patch {
        merge(&mut merged, patch);
    }
    let mut process = merged["spec"]["process"].clone();
    if !process.is_object() || process["command"].as_array().is_none_or(|c| c.is_empty()) {
        return Err(Error::Invalid(format!(
            "task {name}: taskTemplate.spec.process.command is required"
        )));
    }
    if let Some(timeout) = template["spec"]["timeoutSeconds"].as_i64() {
        process["timeoutSeconds"] = json!(timeout);
    }
    Ok(json!({"name": name, "process": process}))
}

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (k, v) in patch {
                match base.get_mut(k) {
                    Some(existing) if named_items(existing) && named_items(v) => {
                        merge_by_name(existing, v)
                    }
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ if v.is_null() => {
                        base.remove(k);
                    }
                    _ => {
                        base.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

/// A list of objects that all have a `name` (containers, env, volumes, ports): strategic merge
/// patches merge those item by item.
fn named_items(list: &Value) -> bool {
    list.as_array().is_some_and(|items| {
        items
            .iter()
            .all(|i| i.get("name").is_some_and(Value::is_string))
    })
}

fn merge_by_name(base: &mut Value, patch: &Value) {
    let (Some(base), Some(patch)) = (base.as_array_mut(), patch.as_array()) else {
        return;
    };
    for item in patch {
        match base.iter_mut().find(|b| b["name"] == item["name"]) {
            Some(existing) => merge(existing, item),
            None => base.push(item.clone()),
        }
    }
}

/// A True condition; its transition time is the old one's when nothing about it changed.
pub(crate) fn condition(
    old: &BatchSandboxStatus,
    kind: ConditionType,
    reason: &str,
    message: &str,
) -> BatchSandboxCondition {
    let previous = old.conditions.iter().find(|c| c.kind == kind);
    let unchanged = previous.is_some_and(|c| {
        c.status == ConditionStatus::True && c.reason == reason && c.message == message
    });
    BatchSandboxCondition {
        kind,
        status: ConditionStatus::True,
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: match previous {
            Some(c) if unchanged => c.last_transition_time.clone(),
            _ => Some(Time(k8s_openapi::jiff::Timestamp::now())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_patches_merge_env_by_name_and_replace_args() {
        let template = json!({"spec": {"process": {
            "command": ["sh", "-c"], "args": ["exit 0"],
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
        }, "timeoutSeconds": 60}});
        let patch = json!({"spec": {"process": {
            "args": ["exit 3"], "env": [{"name": "B", "value": "x"}, {"name": "C", "value": "3"}]
        }, "timeoutSeconds": 1}});
        let task = task_spec("b-1", &template, Some(&patch)).unwrap();
        assert_eq!(task["name"], "b-1");
        assert_eq!(task["process"]["args"], json!(["exit 3"]));
        assert_eq!(
            task["process"]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "x"}, {"name": "C", "value": "3"}])
        );
        assert_eq!(
            task["process"]["timeoutSeconds"], 60,
            "the timeout is the template's"
        );
        assert!(task_spec("b-0", &json!({"spec": {}}), None).is_err());
    }

    #[test]
    fn events_come_from_changes_this_process_saw() {
        use TaskState::*;
        let at = TaskAt {
            task: "b-3",
            pod: "p-1",
            executor: "10.0.0.7",
        };
        let failed = json!({"processStatus": {"terminated": {"exitCode": 3, "reason": "Error"}}});
        let reasons = |before, now, task| -> Vec<&str> {
            task_events(&at, before, now, task)
                .into_iter()
                .map(|(_, reason, _)| reason)
                .collect()
        };
        assert_eq!(reasons(Some(Running), Running, None), Vec::<&str>::new());
        assert_eq!(reasons(Some(Running), Succeed, None), Vec::<&str>::new());
        assert_eq!(
            reasons(Some(Running), Unknown, None),
            ["ExecutorUnreachable"]
        );
        assert_eq!(reasons(None, Unknown, None), ["ExecutorUnreachable"]);
        assert_eq!(reasons(Some(Unknown), Running, None), ["ExecutorReachable"]);
        assert_eq!(
            reasons(Some(Unknown), Failed, Some(&failed)),
            ["ExecutorReachable", "TaskFailed"]
        );
        // A restarted controller's first look at a task that failed before is not news.
        assert_eq!(reasons(None, Failed, Some(&failed)), Vec::<&str>::new());
        let (kind, _, note) = task_events(&at, Some(Running), Failed, Some(&failed)).remove(0);
        assert_eq!(kind, EventType::Warning);
        assert_eq!(
            note,
            "task b-3 on pod p-1 failed: exit code 3; reason: Error"
        );
    }
}
