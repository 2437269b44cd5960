//! Reconnect and retry pacing shared by sinks, terminal links and cloud clients.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: the n-th retry waits a random time in
/// [min, min(max, min·2ⁿ)], so a fleet of gateways does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let lo = self.min.as_millis() as u64;
        let hi = (cap.as_millis() as u64).max(lo);
        Duration::from_millis(rand::rng().random_range(lo..=hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(100)));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[0] <= Duration::from_millis(100));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
