//! Retry pacing, one implementation for every retry in the crate: the
//! cloud link's reconnects (with jitter, so that a fleet does not
//! reconnect in step after a broker restart), the CAN interface's
//! reopening, and a full CAN transmit queue (steady doubling).

use std::time::Duration;

use crate::prng::SplitMix64;

/// The jittered delay of attempt `attempt` (from 1): a uniform delay in
/// `[max(min, upper / 2), upper]` where `upper = min(max, min * 2^n)`.
/// Attempt 1 waits between `min` and `2 min`, and once capped the delay
/// stays in `[max / 2, max]`. `unit` is the jitter, in `[0, 1)`.
pub fn backoff_delay(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let max = max.max(min);
    let upper = doubled(min, max, attempt);
    let lower = (upper / 2).max(min);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    lower + (upper - lower).mul_f64(unit)
}

/// `min * 2^n`, capped at `max` (no overflow).
fn doubled(min: Duration, max: Duration, n: u32) -> Duration {
    let mut d = min;
    for _ in 0..n {
        d = d.saturating_mul(2);
        if d >= max {
            return max;
        }
    }
    d
}

/// A retry schedule: [`Backoff::jittered`] for reconnects over a network,
/// [`Backoff::steady`] for local retries (`min`, `2 min`, … capped at
/// `max`). Seeded, so a schedule can be tested without a clock.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    jitter: Option<SplitMix64>,
}

impl Backoff {
    pub fn jittered(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            min,
            max,
            attempt: 0,
            jitter: Some(SplitMix64::new(seed)),
        }
    }

    pub fn steady(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            attempt: 0,
            jitter: None,
        }
    }

    /// The next attempt number and how long to wait before it.
    pub fn next_delay(&mut self) -> (u32, Duration) {
        self.attempt = self.attempt.saturating_add(1);
        let delay = match self.jitter.as_mut() {
            Some(rng) => {
                let unit = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                backoff_delay(self.attempt, self.min, self.max, unit)
            }
            None => doubled(self.min, self.max.max(self.min), self.attempt - 1),
        };
        (self.attempt, delay)
    }

    /// Attempts since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// After a success: start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn steady_doubles_from_min_and_stops_at_max() {
        let mut b = Backoff::steady(MS, 16 * MS);
        let got: Vec<_> = (0..7).map(|_| b.next_delay()).collect();
        let want = [1, 2, 4, 8, 16, 16, 16];
        for (i, ((attempt, d), w)) in got.iter().zip(want).enumerate() {
            assert_eq!((*attempt, *d), (i as u32 + 1, w * MS));
        }
        assert_eq!(b.attempts(), 7);
        b.reset();
        assert_eq!(b.next_delay(), (1, MS));
        // Far past the cap, no overflow.
        let mut b = Backoff::steady(MS, Duration::MAX);
        for _ in 0..200 {
            b.next_delay();
        }
        assert_eq!(b.next_delay().1, Duration::MAX);
    }

    #[test]
    fn backoff_grows_doubles_and_caps_within_its_bounds() {
        let (min, max) = (100 * MS, 5_000 * MS);
        // Jitter 0 gives the lower edge, jitter near 1 the upper edge.
        let low: Vec<_> = (1..=8).map(|a| backoff_delay(a, min, max, 0.0)).collect();
        let high: Vec<_> = (1..=8)
            .map(|a| backoff_delay(a, min, max, 0.999_999))
            .collect();
        assert_eq!(
            low,
            [100, 200, 400, 800, 1600, 2500, 2500, 2500].map(|m| m * MS)
        );
        for (a, h) in high.iter().enumerate() {
            let expect = [200, 400, 800, 1600, 3200, 5000, 5000, 5000][a] * MS;
            assert!(expect - *h < MS, "attempt {}: {h:?} vs {expect:?}", a + 1);
        }
        // Absurd attempt numbers stay capped, bad jitter stays in range.
        assert_eq!(backoff_delay(u32::MAX, min, max, 0.0), 2500 * MS);
        assert_eq!(backoff_delay(3, min, max, f64::NAN), 400 * MS);
        assert_eq!(backoff_delay(3, min, max, 7.0), 800 * MS);
        // min above max: max is raised to min.
        assert_eq!(backoff_delay(4, 300 * MS, 100 * MS, 0.5), 300 * MS);
    }

    #[test]
    fn seeded_schedule_is_reproducible_jittered_and_resets() {
        let (min, max) = (500 * MS, 60_000 * MS);
        let schedule = |seed| {
            let mut b = Backoff::jittered(min, max, seed);
            (0..12).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        let a = schedule(7);
        assert_eq!(a, schedule(7));
        assert_ne!(a, schedule(8), "the seed changes the jitter");
        for (i, (attempt, delay)) in a.iter().enumerate() {
            assert_eq!(*attempt as usize, i + 1);
            let upper = backoff_delay(*attempt, min, max, 0.999_999_999);
            let lower = backoff_delay(*attempt, min, max, 0.0);
            assert!(
                lower <= *delay && *delay <= upper + MS,
                "{attempt}: {delay:?}"
            );
            assert!(*delay >= min && *delay <= max);
        }
        // Jitter really spreads: not every delay sits on the lower edge.
        assert!(
            a.iter()
                .any(|(n, d)| *d > backoff_delay(*n, min, max, 0.0) + MS)
        );
        let mut b = Backoff::jittered(min, max, 7);
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        let (attempt, delay) = b.next_delay();
        assert_eq!(attempt, 1);
        assert!(delay >= min && delay <= 2 * min);
    }
}
