//! What every reconcile shares, and the crate's error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};

use crate::tasks::Tracker;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{0}")]
    Invalid(String),
    #[error("not ready: {0}")]
    NotReady(&'static str),
    #[error("{0}")]
    Containerd(#[from] crate::containerd::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub struct Context {
    pub client: Client,
    pub tracker: Tracker,
    /// One recorder for the process: it folds repeats of an event into one series.
    pub recorder: Recorder,
    /// Every pod of the watched namespaces, kept by a watch: a BatchSandbox reconcile makes no
    /// read calls (it runs on every task change).
    pub pods: Store<Pod>,
    /// Pods this process allocated, by `namespace/pool`, until the BatchSandbox cache shows
    /// them: a reconcile that runs on a cache older than its own last patch must not hand the
    /// same pod out twice.
    pub allocations: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// Pods this process released (deleted), by `namespace/pool`, for the same reason.
    pub released: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// The node's containerd, when this process runs on the node and may commit its
    /// containers (SandboxSnapshots, pause).
    pub containerd: Option<crate::containerd::Containerd>,
    /// The node whose pods this process commits; `None`: every pod's (one node).
    pub node_name: Option<String>,
}

impl Context {
    pub fn allocations_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, String>>> {
        self.allocations.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn released_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.released.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a Kubernetes Event on `object`. An event that cannot be written is logged,
    /// never an error: it must not hold up the reconcile that noticed it.
    pub async fn event(
        &self,
        object: &ObjectReference,
        kind: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: kind,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, object).await {
            tracing::debug!(%error, reason, "event not recorded");
        }
    }
}

/// What both controllers do after a failed reconcile. Not ready yet: look again soon. A spec
/// that cannot work: say so in a Warning event, where `kubectl describe` shows it, and look
/// again only rarely (editing the spec reconciles at once). Anything else: log and retry.
pub fn after_error<K>(object: &K, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()> + ResourceExt,
{
    match error {
        Error::NotReady(_) => Action::requeue(Duration::from_millis(200)),
        Error::Invalid(message) => {
            tracing::warn!(kind = K::kind(&()).as_ref(), name = %object.name_any(), %error, "invalid spec");
            let (reference, note) = (object.object_ref(&()), message.clone());
            tokio::spawn(async move {
                let warning = EventType::Warning;
                ctx.event(&reference, warning, "InvalidSpec", "Reconcile", note)
                    .await;
            });
            Action::requeue(Duration::from_secs(60))
        }
        _ => {
            tracing::warn!(kind = K::kind(&()).as_ref(), name = %object.name_any(), %error, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(2))
        }
    }
}

/// Writes an object's `status` by server-side apply, as this controller's field manager.
pub async fn apply_status<K>(api: &Api<K>, name: &str, status: &impl serde::Serialize) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::apply(crate::pool::MANAGER).force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        })),
    )
    .await?;
    Ok(())
}
