//! Capped exponential backoff with jitter, for loops that wait out Redis trouble.
//!
//! Owns only the arithmetic: each failure doubles the delay from `min` up to `max`, and the delay
//! actually slept is drawn from the upper half of that, so many loops that failed together do not
//! retry together. What to retry is the caller's business.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            current: min,
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        // Uniform in [ceiling/2, ceiling].
        let half = ceiling / 2;
        let spread = (ceiling - half).as_micros() as u64;
        let jitter = if spread == 0 {
            0
        } else {
            getrandom::u64().unwrap_or(0) % (spread + 1)
        };
        half + Duration::from_micros(jitter)
    }

    /// Records a success; returns how many failures preceded it.
    pub fn succeed(&mut self) -> u32 {
        self.current = self.min;
        std::mem::take(&mut self.failures)
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.fail()).collect();
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (d, c) in delays.iter().zip(ceilings) {
            let c = Duration::from_millis(c);
            assert!(*d >= c / 2 && *d <= c, "{d:?} not in [{:?}, {c:?}]", c / 2);
        }
        assert_eq!(b.failures(), 8);
        assert_eq!(b.succeed(), 8);
        assert!(
            b.fail() <= Duration::from_millis(100),
            "reset to the minimum"
        );
    }
}
