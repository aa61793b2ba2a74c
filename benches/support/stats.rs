//! Latency and throughput arithmetic the benchmarks share, and their sample count.

use std::time::{Duration, Instant};

/// `SANDLET_BENCH_SAMPLES`, or `default`.
pub fn samples(default: usize) -> usize {
    std::env::var("SANDLET_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

pub fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

pub fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

pub fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

/// The `pct` percentile of sorted samples.
pub fn p(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One line: what, p50 and p99.
pub fn row(what: &str, sorted: &[Duration]) {
    println!(
        "{what:<60} {:>8.3}ms {:>8.3}ms",
        ms(p(sorted, 50)),
        ms(p(sorted, 99))
    );
}
