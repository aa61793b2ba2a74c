//! The main container's cgroups, as far as sandlet can reach them.
//!
//! A process started by a sidecar lands in the sidecar's cgroups, so its CPU and memory count
//! against the sidecar's limits, not the sandbox's. For every hierarchy the main container's
//! process is in (`/proc/<pid>/cgroup`: v1 controllers and the v2 unified tree alike), sandlet
//! looks for a mount of that hierarchy in its own mount namespace whose root contains the
//! container's cgroup, and checks that the cgroup's `cgroup.procs` can be written. Tasks join
//! every cgroup found so; the others are reported, with why, in `/health` and `/ready`.
//! In a typical pod the sidecar's own cgroup mount is read-only and shows only its own subtree,
//! so tasks stay in sandlet's cgroups: size the sidecar for them.

use std::path::PathBuf;

use serde::Serialize;

/// One hierarchy of the main container's cgroups and whether tasks join it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupJoin {
    /// `unified` for cgroup v2, else the v1 controllers (`cpu,cpuacct`, `name=systemd`).
    pub hierarchy: String,
    /// The container's cgroup, as `/proc/<pid>/cgroup` shows it to sandlet.
    pub cgroup: String,
    /// Where tasks are added; `None` when they are not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub procs: Option<PathBuf>,
    /// Why tasks do not join it (or that sandlet is in it already).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The plan for every hierarchy of process `pid`.
pub fn plan(pid: i32) -> Vec<CgroupJoin> {
    let (Ok(theirs), Ok(ours), Ok(mounts)) = (
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")),
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return Vec::new();
    };
    // Opening for writing has no effect by itself, and fails as a task's join would.
    plan_from(&theirs, &ours, &mounts, |procs| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(procs)
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

fn plan_from(
    theirs: &str,
    ours: &str,
    mountinfo: &str,
    writable: impl Fn(&PathBuf) -> Result<(), String>,
) -> Vec<CgroupJoin> {
    let own: Vec<(&str, &str)> = ours.lines().filter_map(parse_line).collect();
    theirs
        .lines()
        .filter_map(parse_line)
        .map(|(controllers, cgroup)| {
            let hierarchy = if controllers.is_empty() {
                "unified".to_string()
            } else {
                controllers.to_string()
            };
            let join = |procs, note: Option<String>| CgroupJoin {
                hierarchy: hierarchy.clone(),
                cgroup: cgroup.to_string(),
                procs,
                note,
            };
            if own.contains(&(controllers, cgroup)) {
                return join(None, Some("sandlet is in this cgroup already".into()));
            }
            if cgroup.split('/').any(|c| c == "..") {
                return join(
                    None,
                    Some("outside sandlet's cgroup namespace; tasks stay in sandlet's cgroup".into()),
                );
            }
            let Some(dir) = find_dir(mountinfo, controllers, cgroup) else {
                return join(
                    None,
                    Some("no mount of this hierarchy in sandlet's filesystem shows it; tasks stay in sandlet's cgroup".into()),
                );
            };
            let procs = dir.join("cgroup.procs");
            match writable(&procs) {
                Ok(()) => join(Some(procs), None),
                Err(e) => join(
                    None,
                    Some(format!(
                        "{} is not writable ({e}); tasks stay in sandlet's cgroup",
                        procs.display()
                    )),
                ),
            }
        })
        .collect()
}

/// The cgroup directories of process `pid` reachable in sandlet's filesystem, by hierarchy
/// (`unified` for v2, else the v1 controllers).
pub fn dirs_of(pid: i32) -> Vec<(String, PathBuf)> {
    let (Ok(cgroups), Ok(mounts)) = (
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return Vec::new();
    };
    cgroups
        .lines()
        .filter_map(parse_line)
        .filter(|(_, cgroup)| !cgroup.split('/').any(|c| c == ".."))
        .filter_map(|(controllers, cgroup)| {
            let dir = find_dir(&mounts, controllers, cgroup)?;
            let name = if controllers.is_empty() {
                "unified".to_string()
            } else {
                controllers.to_string()
            };
            Some((name, dir))
        })
        .collect()
}

/// `hierarchy-id:controllers:path` → (controllers, path).
fn parse_line(line: &str) -> Option<(&str, &str)> {
    let mut fields = line.splitn(3, ':');
    let _id = fields.next()?;
    Some((fields.next()?, fields.next()?))
}

/// The directory of `cgroup` under a mount of the hierarchy named by `controllers` (empty: v2).
fn find_dir(mountinfo: &str, controllers: &str, cgroup: &str) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mountpoint), Some(fstype)) =
            (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let matches = if controllers.is_empty() {
            *fstype == "cgroup2"
        } else {
            let options: Vec<&str> = right.get(2).map_or(vec![], |o| o.split(',').collect());
            *fstype == "cgroup" && controllers.split(',').all(|c| options.contains(&c))
        };
        if !matches {
            continue;
        }
        let rest = if *root == "/" {
            Some(cgroup)
        } else {
            cgroup
                .strip_prefix(root)
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        if let Some(rest) = rest {
            let mut dir = PathBuf::from(unescape(mountpoint));
            dir.push(rest.trim_start_matches('/'));
            return Some(dir);
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 /kubepods /mnt/my\\040systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn each_hierarchy_is_found_under_its_mount_or_explained() {
        let theirs = "12:pids:/pod/main\n11:cpu,cpuacct:/pod/main\n3:name=systemd:/kubepods/pod/main\n2:memory:/pod/main\n1:blkio:/shared\n0::/pod/main\n";
        let ours = "12:pids:/pod/side\n1:blkio:/shared\n0::/pod/side\n";
        let plan = plan_from(theirs, ours, MOUNTS, |p| {
            if p.starts_with("/sys/fs/cgroup/pids") {
                Err("Read-only file system".into())
            } else {
                Ok(())
            }
        });
        let by = |h: &str| plan.iter().find(|j| j.hierarchy == h).unwrap();
        assert!(by("pids").note.as_ref().unwrap().contains("Read-only"));
        assert_eq!(
            by("cpu,cpuacct").procs.as_deref(),
            Some("/sys/fs/cgroup/cpu,cpuacct/pod/main/cgroup.procs".as_ref())
        );
        assert_eq!(
            by("name=systemd").procs.as_deref(),
            Some("/mnt/my systemd/pod/main/cgroup.procs".as_ref())
        );
        assert!(by("memory").note.as_ref().unwrap().contains("no mount"));
        assert!(by("blkio").note.as_ref().unwrap().contains("already"));
        assert_eq!(
            by("unified").procs.as_deref(),
            Some("/sys/fs/cgroup/unified/pod/main/cgroup.procs".as_ref())
        );
    }

    #[test]
    fn a_cgroup_outside_the_namespace_or_the_mount_root_is_not_joined() {
        let plan = plan_from("0::/../other/main\n", "0::/\n", MOUNTS, |_| Ok(()));
        assert!(plan[0].procs.is_none());
        let plan = plan_from(
            "3:name=systemd:/elsewhere/main\n",
            "3:name=systemd:/kubepods/x\n",
            MOUNTS,
            |_| Ok(()),
        );
        assert!(plan[0].procs.is_none(), "{plan:?}");
    }
}
