//! Keeping track of the main container in sidecar mode: locate it, hold on to its process, and
//! when that process ends (the container restarted) say so and locate the next incarnation.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::cgroup::{self, CgroupJoin};
use super::{Locator, Target, locate};
use crate::process::enter::{Method, capability_set, differs, namespace_names};
use crate::process::{PidFd, ProcessIdentity};

/// How often a missing main container is looked for again.
const RELOCATE_INTERVAL: Duration = Duration::from_millis(100);

const CAP_SYS_CHROOT: u32 = 18;
const CAP_SYS_ADMIN: u32 = 21;

/// A located main container and everything a start in it needs.
#[derive(Debug)]
pub struct Located {
    pub target: Target,
    /// How tasks enter it, by the capabilities sandlet holds.
    pub method: Method,
    /// Its namespaces that differ from sandlet's and that tasks do not join (with
    /// [`Method::Chroot`]).
    pub not_joined: Vec<&'static str>,
    /// Its environment, the base of every task's.
    pub environ: Vec<(String, String)>,
    /// Its supplementary groups (those the runtime gave it: `supplementalGroups`, `fsGroup`).
    pub groups: Vec<u32>,
    pub bounding_set: u64,
    pub no_new_privs: bool,
    pub cgroups: Vec<CgroupJoin>,
}

impl Located {
    /// `/proc/<pid>/root`: the container's filesystem as sandlet reaches it.
    pub fn root(&self) -> std::path::PathBuf {
        format!("/proc/{}/root", self.target.process.pid).into()
    }
}

#[derive(Debug, Clone)]
enum Status {
    Searching(String),
    Ready(Arc<Located>),
}

pub struct TargetWatch {
    locator: Locator,
    status: watch::Sender<Status>,
}

impl TargetWatch {
    pub fn new(locator: Locator) -> Arc<TargetWatch> {
        Arc::new(TargetWatch {
            locator,
            status: watch::channel(Status::Searching("not looked for yet".into())).0,
        })
    }

    /// The main container, or why there is none to start in.
    pub fn current(&self) -> Result<Arc<Located>, String> {
        match &*self.status.borrow() {
            Status::Ready(located) => Ok(Arc::clone(located)),
            Status::Searching(why) => Err(format!("the main container is not available: {why}")),
        }
    }

    /// The main container once it is located (at once if it is now).
    pub async fn located(&self) -> Arc<Located> {
        let mut status = self.status.subscribe();
        let ready = status
            .wait_for(|s| matches!(s, Status::Ready(_)))
            .await
            .expect("the sender lives in self");
        match &*ready {
            Status::Ready(located) => Arc::clone(located),
            Status::Searching(_) => unreachable!("waited for Ready"),
        }
    }

    /// What `/ready` and `/health` say about it.
    pub fn detail(&self) -> (bool, Value) {
        match &*self.status.borrow() {
            Status::Ready(l) => (
                true,
                json!({
                    "mode": "sidecar",
                    "target": {
                        "pid": l.target.process.pid,
                        "startTicks": l.target.process.start_ticks,
                        "uid": l.target.uid,
                        "gid": l.target.gid,
                    },
                    "method": l.method,
                    "namespacesNotJoined": l.not_joined,
                    "cgroups": l.cgroups,
                }),
            ),
            Status::Searching(why) => (false, json!({"mode": "sidecar", "reason": why})),
        }
    }

    /// Locates the main container until sandlet ends. `incarnation` is told the container's
    /// current process each time it is found, and `None` the moment that process ends.
    pub async fn run(self: Arc<Self>, incarnation: impl Fn(Option<ProcessIdentity>)) {
        loop {
            // Off the async threads, awaited: at shutdown this task is dropped at the await,
            // where a find run in place would carry on into a timer of a runtime going away
            // (and panic there).
            let finder = Arc::clone(&self);
            let found = tokio::task::spawn_blocking(move || finder.find())
                .await
                .unwrap_or_else(|e| Err(format!("looking for the main container failed: {e}")));
            let (located, pidfd) = match found {
                Ok(found) => found,
                Err(why) => {
                    let changed =
                        !matches!(&*self.status.borrow(), Status::Searching(w) if *w == why);
                    if changed {
                        tracing::warn!(reason = %why, "main container not available; tasks cannot start until it is");
                        self.status.send_replace(Status::Searching(why));
                    }
                    tokio::time::sleep(RELOCATE_INTERVAL).await;
                    continue;
                }
            };
            let process = located.target.process;
            let moved: Vec<&str> = located
                .cgroups
                .iter()
                .filter(|c| c.procs.is_some())
                .map(|c| c.hierarchy.as_str())
                .collect();
            tracing::info!(
                pid = process.pid,
                uid = located.target.uid,
                method = ?located.method,
                namespaces_not_joined = ?located.not_joined,
                cgroups_joined = ?moved,
                "main container found; tasks start inside it"
            );
            for c in located.cgroups.iter().filter(|c| c.procs.is_none()) {
                tracing::info!(hierarchy = %c.hierarchy, note = c.note.as_deref().unwrap_or(""), "main container's cgroup not joined");
            }
            self.status.send_replace(Status::Ready(Arc::new(located)));
            incarnation(Some(process));
            let _ = pidfd.exited().await;
            let why = format!(
                "its process {} ended (the container restarted); looking for the new one",
                process.pid
            );
            tracing::warn!(
                pid = process.pid,
                "main container's process ended: stopping the tasks started in it"
            );
            self.status.send_replace(Status::Searching(why));
            incarnation(None);
        }
    }

    fn find(&self) -> Result<(Located, PidFd), String> {
        let target = locate(&self.locator).map_err(|e| e.to_string())?;
        let pid = target.process.pid;
        let own_caps = capability_set(std::process::id() as i32, "CapEff:")
            .map_err(|e| format!("cannot read sandlet's capabilities: {e}"))?;
        let has = |bit: u32| own_caps & (1 << bit) != 0;
        let method = match (has(CAP_SYS_ADMIN), has(CAP_SYS_CHROOT)) {
            (true, true) => Method::Namespaces,
            (false, true) => Method::Chroot,
            (_, false) => {
                return Err(
                    "sandlet lacks CAP_SYS_CHROOT, needed to enter the main container (docs/sidecar-mode.md lists the capabilities)"
                        .into(),
                );
            }
        };
        let not_joined = match method {
            Method::Namespaces => Vec::new(),
            Method::Chroot => namespace_names().filter(|ns| differs(pid, ns)).collect(),
        };
        let user_ns = |p: &str| {
            std::fs::metadata(format!("/proc/{p}/ns/user")).map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
        };
        if user_ns(&pid.to_string()).ok() != user_ns("self").ok() {
            return Err(
                "the main container runs in its own user namespace (hostUsers: false), which sidecar mode does not support"
                    .into(),
            );
        }
        let pidfd = PidFd::open_identity(target.process)
            .map_err(|e| format!("cannot watch the main container's process {pid}: {e}"))?;
        let environ = std::fs::read(format!("/proc/{pid}/environ"))
            .map_err(|e| format!("cannot read the main container's environment: {e}"))?
            .split(|b| *b == 0)
            .filter_map(|e| {
                let e = String::from_utf8_lossy(e);
                let (k, v) = e.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("cannot read the main container's status: {e}"))?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
        };
        let groups = field("Groups:")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect();
        let bounding_set = field("CapBnd:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or("no CapBnd in the main container's status")?;
        let no_new_privs = field("NoNewPrivs:") == Some("1");
        // Read after the pidfd: if the process is still the same now, all of this is its.
        let located = Located {
            cgroups: cgroup::plan(pid),
            target,
            method,
            not_joined,
            environ,
            groups,
            bounding_set,
            no_new_privs,
        };
        if !located.target.process.is_alive() {
            return Err(format!("its process {pid} ended while being located"));
        }
        Ok((located, pidfd))
    }
}
