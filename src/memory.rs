//! sandlet's use of glibc's allocator (sandlet is a static glibc binary): fixed thresholds for
//! speed, one arena, and freed memory given back to the kernel after a burst of work.
//!
//! glibc returns freed memory to the kernel only from the top of a heap, and only past the trim
//! threshold: what is freed below a block still in use stays resident. `malloc_trim(0)` releases
//! the free pages inside every heap, but the top of a thread arena's heap (up to the trim
//! threshold, 8 MiB here, each) only the main arena's. Measured with `benches/resources.rs`
//! (250 concurrent commands, 32 searches over 150 000 entries, a 25 000-file upload; idle
//! RSS 5.8-5.9 MiB), RSS 30 s after the loads:
//!
//! | allocator setup | RSS after |
//! |---|---|
//! | as before (16 arenas, no trim) | 32.9 MiB, for good |
//! | one arena, no trim | 29.7 MiB |
//! | 16 arenas, trimmed after the work | 14.0 MiB (two arenas' tops: 5.4 + 4.2 MiB) |
//! | one arena, trimmed after the work | 9.1 MiB (4.3 MiB anonymous, the rest the binary) |
//!
//! One arena costs nothing measurable here (exec API bench, A/B twice: SSE 476 and 308 MB/s
//! with 16 arenas, 342 and 505 with one; 200 concurrent streaming commands 1.10/1.11 s vs
//! 1.35/0.78 s): small allocations come from each thread's cache, and sandlet has two runtime
//! workers and blocking threads that mostly wait in syscalls. So: one arena, and a trim when
//! sandlet's RSS has moved by [`GROWTH_BEFORE_TRIM`] since the last one, looked at every
//! [`LOOK_EVERY`].

use std::time::{Duration, Instant};

/// How often sandlet's RSS is looked at.
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// Growth of RSS since the last trim (or the start) past which freed memory is given back.
const GROWTH_BEFORE_TRIM: u64 = 4 << 20;

/// Sets the allocator's thresholds; call before any other thread exists.
pub fn configure() {
    // Streamed output passes through buffers of up to a few hundred KiB. With glibc's default
    // (dynamic) thresholds they are mapped and unmapped, or the heap trimmed, over and over:
    // page faults took a quarter of the streaming time. Fixed thresholds keep them on the heap,
    // at the cost of up to 8 MiB of freed memory kept at its top until the next trim (see
    // `give_back_periodically`).
    // SAFETY: plain libc calls, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives freed memory back to the kernel whenever RSS has moved by [`GROWTH_BEFORE_TRIM`]
/// since the last time (grown: work is under way; shrunk: work that freed what it used has
/// ended, and what it freed below a live block is still resident); runs for sandlet's life.
pub async fn give_back_periodically() {
    let mut look = tokio::time::interval(LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut settled = resident_bytes();
    loop {
        look.tick().await;
        let now = resident_bytes();
        if now.abs_diff(settled) < GROWTH_BEFORE_TRIM {
            continue;
        }
        let started = Instant::now();
        // SAFETY: malloc_trim only releases free memory; it takes the arenas' locks itself.
        unsafe { libc::malloc_trim(0) };
        settled = resident_bytes();
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        tracing::debug!(
            before = now,
            after = settled,
            in_use = info.uordblks,
            free = info.fordblks,
            mapped = info.hblkhd,
            arenas = info.arena,
            took = ?started.elapsed(),
            "gave freed memory back"
        );
    }
}

/// sandlet's resident set, from `/proc/self/statm` (0 if unreadable).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page
}
