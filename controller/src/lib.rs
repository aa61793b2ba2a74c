//! sandlet-controller: the BatchSandbox and Pool resources of `sandbox.opensandbox.io/v1alpha1`,
//! with tasks handed to each pod's executor (sandlet, or the Go task-executor) and their state
//! followed on sandlet's change feed.

pub mod batch;
pub mod containerd;
pub mod context;
pub mod crd;
pub mod pause;
pub mod pods;
pub mod pool;
pub mod run;
pub mod snapshot;
pub mod tasks;
