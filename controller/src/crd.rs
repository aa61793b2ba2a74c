//! The resources, as `sandbox.opensandbox.io/v1alpha1` defines them: the same fields, short
//! names, printer columns and status subresource, so the OpenSandbox server, its SDKs and
//! existing manifests work unchanged. `crdgen` prints them; `deploy/crds/` holds the output.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const GROUP: &str = "sandbox.opensandbox.io";

/// Pod IPs of a BatchSandbox in index order (`""` for a pod with none yet); the server reads it.
pub const ENDPOINTS: &str = "sandbox.opensandbox.io/endpoints";
/// `{"pods":[…]}`: pods the pool allocated to a BatchSandbox, append-only, in allocation order.
pub const ALLOC_STATUS: &str = "sandbox.opensandbox.io/alloc-status";
/// `{"pods":[…]}`: pods a BatchSandbox asks its pool to take back.
pub const ALLOC_RELEASE: &str = "sandbox.opensandbox.io/alloc-release";
/// `{"pods":[…]}`: pods the pool has finished taking back.
pub const ALLOC_RELEASED: &str = "sandbox.opensandbox.io/alloc-released";
/// Pod label: the pool a pod belongs to.
pub const POOL_NAME: &str = "sandbox.opensandbox.io/pool-name";
/// Pod label: hash of the pool template the pod was made from.
pub const POOL_REVISION: &str = "sandbox.opensandbox.io/pool-revision";
/// Pod label (any value): take this idle pod out of the pool.
pub const EVICT: &str = "pool.opensandbox.io/evict";
/// Pod label of a non-pooled BatchSandbox's pods: their index.
pub const POD_INDEX: &str = "batch-sandbox.sandbox.opensandbox.io/pod-index";
/// Label of a non-pooled BatchSandbox's pods, and of the SandboxSnapshots its pauses make: the
/// BatchSandbox's name.
pub const BATCH_NAME: &str = "batch-sandbox.sandbox.opensandbox.io/name";
/// BatchSandbox finalizer: its tasks are stopped before it goes.
pub const TASK_CLEANUP: &str = "batch-sandbox.sandbox.opensandbox.io/task-cleanup";
/// BatchSandbox finalizer (sandlet-controller's own, on a BatchSandbox with its own template and
/// no tasks): its pods and pause snapshots are deleted before it goes, whether or not a garbage
/// collector runs.
pub const POD_CLEANUP: &str = "batch-sandbox.sandbox.opensandbox.io/pod-cleanup";
/// BatchSandbox finalizer: its pods are back in the pool before it goes.
pub const POOL_ALLOCATION: &str = "pool.sandbox.opensandbox.io/pool-allocation";
/// SandboxSnapshot finalizer: the images it committed are removed from the node before it goes.
pub const SNAPSHOT_CLEANUP: &str = "sandboxsnapshot.sandbox.opensandbox.io/cleanup";
/// The label the OpenSandbox server puts on a BatchSandbox (and its pod template): the sandbox
/// id its API shows.
pub const SANDBOX_ID: &str = "opensandbox.io/id";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[kube(
    group = "sandbox.opensandbox.io",
    version = "v1alpha1",
    kind = "BatchSandbox",
    namespaced,
    status = "BatchSandboxStatus",
    shortname = "bsbx",
    printcolumn = r#"{"name":"DESIRED","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"TOTAL","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"ALLOCATED","type":"integer","jsonPath":".status.allocated"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"TASK_RUNNING","type":"integer","jsonPath":".status.taskRunning","priority":1}"#,
    printcolumn = r#"{"name":"TASK_SUCCEED","type":"integer","jsonPath":".status.taskSucceed","priority":1}"#,
    printcolumn = r#"{"name":"TASK_FAILED","type":"integer","jsonPath":".status.taskFailed","priority":1}"#,
    printcolumn = r#"{"name":"TASK_UNKNOWN","type":"integer","jsonPath":".status.taskUnknown","priority":1}"#,
    printcolumn = r#"{"name":"EXPIRE","type":"string","jsonPath":".spec.expireTime"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BatchSandboxSpec {
    /// Desired sandboxes.
    #[schemars(range(min = 0), extend("default" = 1))]
    pub replicas: i32,
    /// The pool to take pods from; `"*"` asks for one to be chosen; empty: the BatchSandbox's
    /// own `template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schemaless")]
    pub template: Option<Value>,
    /// Strategic-merge patches on the whole pod, by index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schemaless_list")]
    pub shard_patches: Option<Vec<Value>>,
    /// When passed, the BatchSandbox is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub expire_time: Option<String>,
    /// One task per replica: `{spec:{process:{command,args,env,workingDir}, timeoutSeconds}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schemaless")]
    pub task_template: Option<Value>,
    /// Strategic-merge patches on the task template, by index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schemaless_list")]
    pub shard_task_patches: Option<Vec<Value>>,
    /// `Retain` (default) or `Release`: give a pod back once its task succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_resource_policy_when_completed: Option<TaskResourcePolicy>,
    /// Pause (true) or resume (false): the server writes it, the controller never clears it;
    /// `null` lets the server ask again after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TaskResourcePolicy {
    #[default]
    Retain,
    Release,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSandboxStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub replicas: i32,
    pub allocated: i32,
    pub ready: i32,
    pub task_running: i32,
    pub task_succeed: i32,
    pub task_failed: i32,
    pub task_pending: i32,
    pub task_unknown: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The generation whose `pause` the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<BatchSandboxCondition>,
}

/// A BatchSandbox's phase; the server maps it to the sandbox state its API shows. `Succeed`:
/// at least one pod is ready (the server shows `Running`); `Running` is read by the server like
/// `Succeed` and never written by this controller.
// No doc comments on the variants: schemars would move them to the end of the CRD's enum.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Succeed,
    Running,
    Pausing,
    Paused,
    Resuming,
    Failed,
}

/// A BatchSandbox condition's type: the Go controller's, and `PoolAllocationPending` (a pooled
/// BatchSandbox waits for its pool to have an idle pod; the server reports
/// `POOL_CAPACITY_EXHAUSTED`, then 429 once that lasts).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionType {
    Ready,
    Progressing,
    Paused,
    PauseFailed,
    ResumeFailed,
    PodFailed,
    PoolAllocationPending,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
}

/// A condition of a BatchSandbox or a SandboxSnapshot: its type, whether it holds, why and
/// since when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition<K> {
    #[serde(rename = "type")]
    pub kind: K,
    pub status: ConditionStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the condition last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

pub type BatchSandboxCondition = Condition<ConditionType>;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[kube(
    group = "sandbox.opensandbox.io",
    version = "v1alpha1",
    kind = "SandboxSnapshot",
    namespaced,
    status = "SandboxSnapshotStatus",
    shortname = "sbxsnap",
    printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"SANDBOX","type":"string","jsonPath":".spec.sandboxName"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSnapshotSpec {
    /// The BatchSandbox (same namespace) whose running pod's containers are committed.
    pub sandbox_name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SnapshotPhase>,
    /// One image per container, once `Succeed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerSnapshot>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<SnapshotCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SnapshotPhase {
    Pending,
    Committing,
    Succeed,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSnapshot {
    pub container_name: String,
    pub image_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SnapshotConditionType {
    Ready,
    Failed,
}

pub type SnapshotCondition = Condition<SnapshotConditionType>;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[kube(
    group = "sandbox.opensandbox.io",
    version = "v1alpha1",
    kind = "Pool",
    namespaced,
    status = "PoolStatus",
    printcolumn = r#"{"name":"TOTAL","type":"integer","jsonPath":".status.total"}"#,
    printcolumn = r#"{"name":"ALLOCATED","type":"integer","jsonPath":".status.allocated"}"#,
    printcolumn = r#"{"name":"AVAILABLE","type":"integer","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"UPDATED","type":"integer","jsonPath":".status.updated"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PoolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schemaless")]
    pub template: Option<Value>,
    pub capacity_spec: CapacitySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_strategy: Option<MaxUnavailableStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_strategy: Option<MaxUnavailableStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle_strategy: Option<RecycleStrategy>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapacitySpec {
    #[schemars(range(min = 0))]
    pub buffer_max: i32,
    #[schemars(range(min = 0))]
    pub buffer_min: i32,
    #[schemars(range(min = 0))]
    pub pool_max: i32,
    #[schemars(range(min = 0))]
    pub pool_min: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaxUnavailableStrategy {
    /// A count or a percentage; 25% when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct RecycleStrategy {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<RecycleType>,
}

/// What happens to a pod a BatchSandbox gives back. Only `Delete` (the default) is
/// implemented; `Restart` and `Noop` are accepted and treated as `Delete` (see the README).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RecycleType {
    #[default]
    Delete,
    Restart,
    Noop,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub revision: String,
    pub total: i32,
    pub allocated: i32,
    pub available: i32,
    #[serde(default)]
    pub updated: i32,
}

/// `{"pods":[…]}`, the value of the allocation annotations; `alloc-status` also names the pool
/// (`{"poolRef":…,"pods":[…]}`), which the server checks before it shows the allocation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodList {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_ref: Option<String>,
    #[serde(default)]
    pub pods: Vec<String>,
}

impl PodList {
    /// The list in `annotations[key]`; a missing or unreadable one is empty (and logged).
    pub fn from_annotation(annotations: Option<&BTreeMap<String, String>>, key: &str) -> PodList {
        let Some(value) = annotations.and_then(|a| a.get(key)) else {
            return PodList::default();
        };
        serde_json::from_str(value).unwrap_or_else(|e| {
            tracing::warn!(annotation = key, error = %e, "unreadable allocation annotation; taken as empty");
            PodList::default()
        })
    }

    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).expect("a list of strings serialises")
    }
}

fn schemaless(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn schemaless_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
    })
}

/// The CRDs as multi-document YAML, as `crdgen` prints them.
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    [BatchSandbox::crd(), Pool::crd(), SandboxSnapshot::crd()]
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD serialises"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crds_keep_the_opensandbox_names() {
        let bsb = BatchSandbox::crd();
        assert_eq!(bsb.spec.group, GROUP);
        assert_eq!(bsb.spec.names.short_names, Some(vec!["bsbx".to_string()]));
        let version = &bsb.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "DESIRED",
                "TOTAL",
                "ALLOCATED",
                "Ready",
                "TASK_RUNNING",
                "TASK_SUCCEED",
                "TASK_FAILED",
                "TASK_UNKNOWN",
                "EXPIRE",
                "AGE"
            ]
        );
        let pool = Pool::crd();
        assert_eq!(pool.spec.names.plural, "pools");
        assert_eq!(bsb.spec.names.plural, "batchsandboxes");
    }

    #[test]
    fn the_status_vocabulary_is_the_servers() {
        let crd = serde_json::to_value(BatchSandbox::crd()).unwrap();
        let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"];
        // An optional field's enum also holds null (the field is nullable).
        let values = |enumeration: &serde_json::Value| -> Vec<String> {
            let values = enumeration.as_array().expect("an enum");
            values
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        };
        assert_eq!(
            values(&status["phase"]["enum"]),
            [
                "Pending", "Succeed", "Running", "Pausing", "Paused", "Resuming", "Failed"
            ]
        );
        let condition = &status["conditions"]["items"]["properties"];
        assert_eq!(
            condition["type"]["enum"],
            serde_json::json!([
                "Ready",
                "Progressing",
                "Paused",
                "PauseFailed",
                "ResumeFailed",
                "PodFailed",
                "PoolAllocationPending"
            ])
        );
        assert_eq!(
            condition["status"]["enum"],
            serde_json::json!(["True", "False"])
        );
        let snapshot = SandboxSnapshot::crd();
        assert_eq!(
            snapshot.spec.names.short_names,
            Some(vec!["sbxsnap".to_string()])
        );
        let snapshot = serde_json::to_value(snapshot).unwrap();
        let schema = &snapshot["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        assert_eq!(
            schema["spec"]["required"],
            serde_json::json!(["sandboxName"])
        );
        assert_eq!(
            values(&schema["status"]["properties"]["phase"]["enum"]),
            ["Pending", "Committing", "Succeed", "Failed"]
        );
    }

    #[test]
    fn allocation_annotations_round_trip() {
        let mut a = BTreeMap::new();
        a.insert(
            ALLOC_STATUS.to_string(),
            r#"{"pods":["p-1","p-2"]}"#.to_string(),
        );
        let list = PodList::from_annotation(Some(&a), ALLOC_STATUS);
        assert_eq!(list.pods, ["p-1", "p-2"]);
        assert_eq!(list.to_annotation(), r#"{"pods":["p-1","p-2"]}"#);
        let named = PodList {
            pool_ref: Some("pool-a".into()),
            pods: vec!["p-1".into()],
        };
        assert_eq!(
            named.to_annotation(),
            r#"{"poolRef":"pool-a","pods":["p-1"]}"#,
            "the server reads alloc-status.poolRef"
        );
        assert!(
            PodList::from_annotation(Some(&a), ALLOC_RELEASE)
                .pods
                .is_empty()
        );
    }
}
