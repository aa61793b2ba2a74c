//! `GET /metrics`: CPU and memory of the sandbox, from its cgroup where sandlet can read it
//! (the main container's in sidecar mode, else sandlet's own), falling back to the host's
//! `/proc/stat` and `/proc/meminfo`. CPU use is the share of the sandbox's CPUs used since the
//! previous sample (taken at startup and at each call at least 100 ms apart), so a call never
//! waits for a sampling window as execd's one-second one did.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::container::TargetWatch;
use crate::container::cgroup::dirs_of;

/// Samples closer together than this reuse the previous CPU figure.
const MIN_WINDOW: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub cpu_count: f64,
    pub cpu_used_pct: f64,
    pub mem_total_mib: f64,
    pub mem_used_mib: f64,
    pub timestamp: i64,
}

pub struct Metrics {
    target: Option<Arc<TargetWatch>>,
    last: Mutex<Last>,
}

struct Last {
    at: Instant,
    cpu_usec: u64,
    pct: f64,
}

impl Metrics {
    pub fn new(target: Option<Arc<TargetWatch>>) -> Arc<Metrics> {
        let sources = Sources::find(target.as_deref());
        Arc::new(Metrics {
            target,
            last: Mutex::new(Last {
                at: Instant::now(),
                cpu_usec: sources.cpu_usec().unwrap_or(0),
                pct: 0.0,
            }),
        })
    }

    pub fn sample(&self) -> Result<Sample, String> {
        let timestamp = chrono::Utc::now().timestamp_millis();
        let sources = Sources::find(self.target.as_deref());
        let cpu_count = sources.cpu_count();
        let usage = sources.cpu_usec().ok_or("cannot read CPU usage")?;
        let pct = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let window = last.at.elapsed();
            if window >= MIN_WINDOW {
                let used = usage.saturating_sub(last.cpu_usec) as f64;
                let capacity = window.as_micros() as f64 * cpu_count;
                last.pct = (used / capacity * 100.0).clamp(0.0, 100.0);
                last.at = Instant::now();
                last.cpu_usec = usage;
            }
            last.pct
        };
        let (used, total) = sources.memory().ok_or("cannot read memory usage")?;
        Ok(Sample {
            cpu_count,
            cpu_used_pct: (pct * 100.0).round() / 100.0,
            mem_total_mib: total as f64 / 1048576.0,
            mem_used_mib: used as f64 / 1048576.0,
            timestamp,
        })
    }
}

/// The cgroup directories metrics are read from.
struct Sources {
    dirs: Vec<(String, PathBuf)>,
}

impl Sources {
    fn find(target: Option<&TargetWatch>) -> Sources {
        let own = std::process::id() as i32;
        let pid = target
            .and_then(|t| t.current().ok())
            .map_or(own, |l| l.target.process.pid);
        let mut dirs = dirs_of(pid);
        if dirs.is_empty() && pid != own {
            dirs = dirs_of(own);
        }
        Sources { dirs }
    }

    fn dir(&self, controller: &str) -> Option<&PathBuf> {
        self.dirs
            .iter()
            .find(|(h, _)| {
                if controller == "unified" {
                    h == "unified"
                } else {
                    h.split(',').any(|c| c == controller)
                }
            })
            .map(|(_, d)| d)
    }

    fn read(&self, controller: &str, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir(controller)?.join(file)).ok()
    }

    /// CPU time used, in microseconds.
    fn cpu_usec(&self) -> Option<u64> {
        if let Some(stat) = self.read("unified", "cpu.stat")
            && let Some(v) = field(&stat, "usage_usec")
        {
            return Some(v);
        }
        if let Some(ns) = self.read("cpuacct", "cpuacct.usage") {
            return ns.trim().parse::<u64>().ok().map(|ns| ns / 1000);
        }
        // The host's: user+nice+system+irq+softirq+steal ticks of the "cpu" line.
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: u64 = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .enumerate()
            .filter(|(i, _)| ![3, 4].contains(i))
            .take(6)
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(ticks * 1_000_000 / hz)
    }

    /// CPUs the sandbox may use: its quota, within the CPUs it may run on.
    fn cpu_count(&self) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let quota = self
            .read("unified", "cpu.max")
            .and_then(|m| {
                let mut f = m.split_whitespace();
                let quota: f64 = f.next()?.parse().ok()?;
                let period: f64 = f.next()?.parse().ok()?;
                Some(quota / period)
            })
            .or_else(|| {
                let quota: f64 = self.read("cpu", "cpu.cfs_quota_us")?.trim().parse().ok()?;
                let period: f64 = self.read("cpu", "cpu.cfs_period_us")?.trim().parse().ok()?;
                (quota > 0.0).then(|| quota / period)
            });
        match quota {
            Some(q) if q < cpus => q.floor().max(1.0),
            _ => cpus,
        }
    }

    /// (working set, limit) in bytes: usage less inactive page cache, as kubelet counts it.
    fn memory(&self) -> Option<(u64, u64)> {
        let host_total = meminfo("MemTotal:")?;
        let cgroup = self
            .read("unified", "memory.current")
            .map(|current| {
                let stat = self.read("unified", "memory.stat").unwrap_or_default();
                let limit = self.read("unified", "memory.max");
                (current, field(&stat, "inactive_file"), limit)
            })
            .or_else(|| {
                let usage = self.read("memory", "memory.usage_in_bytes")?;
                let stat = self.read("memory", "memory.stat").unwrap_or_default();
                let limit = self.read("memory", "memory.limit_in_bytes");
                Some((usage, field(&stat, "total_inactive_file"), limit))
            });
        let Some((usage, inactive, limit)) = cgroup else {
            let available = meminfo("MemAvailable:")?;
            return Some((host_total.saturating_sub(available), host_total));
        };
        let usage: u64 = usage.trim().parse().ok()?;
        let used = usage.saturating_sub(inactive.unwrap_or(0));
        let total = limit
            .and_then(|l| l.trim().parse::<u64>().ok())
            .filter(|l| *l < host_total)
            .unwrap_or(host_total);
        Some((used, total))
    }
}

fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn meminfo(key: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_plausible() {
        let metrics = Metrics::new(None);
        let s = metrics.sample().unwrap();
        assert!(s.cpu_count >= 1.0);
        assert!((0.0..=100.0).contains(&s.cpu_used_pct));
        assert!(
            s.mem_used_mib > 0.0 && s.mem_used_mib <= s.mem_total_mib,
            "{s:?}"
        );
        assert!(s.timestamp > 0);
    }

    /// A call never waits for a sampling window: within one, it answers the previous figure.
    #[test]
    fn samples_closer_than_the_window_reuse_the_previous_figure() {
        let metrics = Metrics::new(None);
        // A window that has not begun yet: however slow this machine, the call is within it.
        let later = Instant::now() + Duration::from_secs(3600);
        {
            let mut last = metrics.last.lock().unwrap();
            last.pct = 42.0;
            last.at = later;
        }
        assert_eq!(metrics.sample().unwrap().cpu_used_pct, 42.0);
        assert_eq!(metrics.last.lock().unwrap().at, later);
        // Past the window, the figure is measured over it and a new window starts.
        let past = Instant::now() - MIN_WINDOW;
        metrics.last.lock().unwrap().at = past;
        let s = metrics.sample().unwrap();
        assert!((0.0..=100.0).contains(&s.cpu_used_pct));
        assert!(metrics.last.lock().unwrap().at > past);
    }

    #[test]
    fn stat_fields_are_read_by_key() {
        assert_eq!(
            field("usage_usec 42\nuser_usec 7\n", "usage_usec"),
            Some(42)
        );
        assert_eq!(field("usage_usec 42\n", "user_usec"), None);
    }
}
