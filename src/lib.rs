//! sandlet: the in-sandbox agent for Kubernetes AI sandboxes. It serves OpenSandbox's
//! task-executor API and supervises the tasks it is given.

pub mod atomic_file;
pub mod cli;
pub mod container;
pub mod deadline;
pub mod error;
pub mod exec;
pub mod files;
pub mod http;
pub mod isolation;
pub mod memory;
pub mod process;
pub mod roles;
pub mod serve;
pub mod tasks;
pub mod telemetry;
