//! Deadlines from durations that sandlet does not choose itself: a task's `timeoutSeconds`, a
//! command's `timeout`, a flag. `Instant + Duration` panics past what the clock can represent,
//! and one such request would take both APIs down (and, stored in a task record, every restart
//! after it), so every such sum goes through here.

use std::time::Duration;

use tokio::time::Instant;

/// The instant `after` from now, or `None` when it is beyond what the clock can represent: a
/// deadline that never comes.
pub fn after(after: Duration) -> Option<Instant> {
    Instant::now().checked_add(after)
}

/// An instant to stand in for "never" in a `select!` branch that is disabled anyway (its
/// deadline is `None`) but must still be given one.
pub fn far() -> Instant {
    Instant::now() + Duration::from_secs(365 * 86400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_beyond_the_clock_do_not_panic() {
        assert!(after(Duration::from_secs(i64::MAX as u64)).is_none());
        assert!(after(Duration::MAX).is_none());
        assert!(after(Duration::from_secs(5)).is_some());
    }
}
