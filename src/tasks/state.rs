//! A task's lifecycle as data: each state carries the facts that prove it, and the wire
//! `processStatus` is derived from it in one place.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::wire::{ProcessStatus, Running, Terminated, Waiting};
pub use crate::process::Outcome;

/// `exitCode` reported when a process has no exit status at all: it never started, or its
/// status was lost. Never 0 (that would read as success) and never a made-up 137.
pub const NO_EXIT_CODE: i32 = -1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// Accepted; its process is being started.
    Waiting,
    Running {
        started_at: DateTime<Utc>,
    },
    Terminated {
        started_at: Option<DateTime<Utc>>,
        finished_at: DateTime<Utc>,
        outcome: Outcome,
        stopped_by: Option<StopCause>,
    },
}

/// Why sandlet itself stopped a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum StopCause {
    Timeout {
        seconds: i64,
    },
    Removed,
    /// The main container's process the task was started in ended (sidecar mode).
    ContainerRestarted {
        pid: i32,
    },
}

impl TaskState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, TaskState::Terminated { .. })
    }

    pub fn to_wire(&self) -> ProcessStatus {
        match self {
            TaskState::Waiting => ProcessStatus {
                waiting: Some(Waiting {
                    reason: "Pending".into(),
                    message: "the process is being started".into(),
                }),
                ..Default::default()
            },
            TaskState::Running { started_at } => ProcessStatus {
                running: Some(Running {
                    started_at: Some(*started_at),
                }),
                ..Default::default()
            },
            TaskState::Terminated {
                started_at,
                finished_at,
                outcome,
                stopped_by,
            } => {
                let (exit_code, signal) = match outcome {
                    Outcome::Exited { code } => (*code, 0),
                    // Shells and Kubernetes report a signal death as 128+N; `signal` says it exactly.
                    Outcome::Signaled { signal } => (128 + signal, *signal),
                    Outcome::StartFailed { .. } | Outcome::Lost { .. } => (NO_EXIT_CODE, 0),
                };
                let (reason, message) = describe(outcome, stopped_by.as_ref());
                ProcessStatus {
                    terminated: Some(Terminated {
                        exit_code,
                        signal,
                        reason,
                        message,
                        started_at: *started_at,
                        finished_at: Some(*finished_at),
                    }),
                    ..Default::default()
                }
            }
        }
    }
}

fn describe(outcome: &Outcome, stopped_by: Option<&StopCause>) -> (String, String) {
    let how = match outcome {
        Outcome::Exited { code } => format!("exited with code {code}"),
        Outcome::Signaled { signal } => {
            format!("was killed by signal {signal} ({})", signal_name(*signal))
        }
        Outcome::StartFailed { message } => return ("StartFailed".into(), message.clone()),
        Outcome::Lost { reason, message } => return (reason.clone(), message.clone()),
    };
    match (stopped_by, outcome) {
        (Some(StopCause::Timeout { seconds }), _) => (
            "TaskTimeout".into(),
            format!("task exceeded its timeout of {seconds} seconds and was stopped; it {how}"),
        ),
        (Some(StopCause::ContainerRestarted { pid }), _) => (
            "MainContainerRestarted".into(),
            format!(
                "the main container restarted (its process {pid} ended), so the task started in it was stopped; it {how}"
            ),
        ),
        (Some(StopCause::Removed), _) => (
            "Stopped".into(),
            format!("task was removed and stopped; it {how}"),
        ),
        (None, Outcome::Exited { code: 0 }) => ("Succeeded".into(), how),
        (None, Outcome::Exited { .. }) => ("Failed".into(), how),
        (None, _) => ("Killed".into(), how),
    }
}

fn signal_name(signal: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str())
        .unwrap_or("unknown signal")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terminated(outcome: Outcome, stopped_by: Option<StopCause>) -> Terminated {
        let state = TaskState::Terminated {
            started_at: None,
            finished_at: Utc::now(),
            outcome,
            stopped_by,
        };
        state.to_wire().terminated.unwrap()
    }

    #[test]
    fn exit_codes_and_signals_are_exact() {
        let ok = terminated(Outcome::Exited { code: 0 }, None);
        assert_eq!(
            (ok.exit_code, ok.signal, ok.reason.as_str()),
            (0, 0, "Succeeded")
        );
        let failed = terminated(Outcome::Exited { code: 3 }, None);
        assert_eq!((failed.exit_code, failed.reason.as_str()), (3, "Failed"));
        let killed = terminated(Outcome::Signaled { signal: 9 }, None);
        assert_eq!(
            (killed.exit_code, killed.signal, killed.reason.as_str()),
            (137, 9, "Killed")
        );
        assert!(killed.message.contains("SIGKILL"), "{}", killed.message);
    }

    #[test]
    fn timeout_keeps_the_real_ending() {
        let t = terminated(
            Outcome::Signaled { signal: 15 },
            Some(StopCause::Timeout { seconds: 2 }),
        );
        assert_eq!(
            (t.exit_code, t.signal, t.reason.as_str()),
            (143, 15, "TaskTimeout")
        );
        assert!(t.message.contains("timeout of 2 seconds"));
    }

    #[test]
    fn lost_is_never_success() {
        let t = terminated(
            Outcome::Lost {
                reason: "ProcessLost".into(),
                message: "gone".into(),
            },
            None,
        );
        assert_eq!(
            (t.exit_code, t.reason.as_str()),
            (NO_EXIT_CODE, "ProcessLost")
        );
    }
}
