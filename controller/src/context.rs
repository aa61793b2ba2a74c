//! What every reconcile shares, and the crate's error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub struct Context {
    pub client: Client,
    pub tracker: Tracker,
    pub reporter: Reporter,
    /// Every pod of the watched namespaces, kept by a watch: a BatchSandbox reconcile makes no
    /// read calls (it runs on every task change).
    pub pods: Store<Pod>,
    /// Pods this process allocated, by `namespace/pool`, until the BatchSandbox cache shows
    /// them: a reconcile that runs on a cache older than its own last patch must not hand the
    /// same pod out twice.
    pub allocations: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// Pods this process released (deleted), by `namespace/pool`, for the same reason.
    pub released: Mutex<BTreeMap<String, BTreeSet<String>>>,
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

    pub fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
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
