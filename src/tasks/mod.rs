//! The task executor: declared tasks, their lifecycle, persistence, recovery and change feed.

pub mod api;
mod manager;
mod state;
mod store;
mod supervisor;
pub mod validate;
pub mod wire;

use std::io;

pub use manager::{FeedEvent, TaskConfig, TaskManager};
pub use state::{NO_EXIT_CODE, Outcome, StopCause, TaskState};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Limit(String),
    #[error("task {0:?} not found")]
    NotFound(String),
    #[error("task storage failed: {0}")]
    Storage(#[from] io::Error),
}
