//! What the controllers read off a pod.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};

use crate::context::Result;

pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Running with condition Ready=True, and not going away.
pub fn is_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    !is_terminating(pod)
        && status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
}

/// The first waiting reason among the pod's containers that means it will not come up by
/// itself.
pub fn failure(pod: &Pod) -> Option<String> {
    const FAILING: [&str; 4] = [
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
    ];
    pod.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
        .find(|r| FAILING.contains(&r.as_str()))
}

/// Deletes pod `name`, with `grace` seconds for its containers to stop (the pod's own
/// `terminationGracePeriodSeconds` when `None`); a pod already gone is fine.
pub async fn delete(api: &Api<Pod>, name: &str, grace: Option<u32>) -> Result<()> {
    let params = DeleteParams {
        grace_period_seconds: grace,
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
