//! Time as the protocol cores see it.
//!
//! The sans-IO cores never read a clock. The async shell owns a [`Clock`] and
//! hands the cores a [`Timestamp`]: microseconds on a monotonic axis whose
//! origin the shell chose. Tests build timestamps directly, so every timeout
//! path runs in memory at full speed.

use std::ops::Add;
use std::time::Duration;

/// A point on a monotonic time axis, in microseconds since the shell's origin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub const fn from_micros(us: u64) -> Self {
        Timestamp(us)
    }

    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms.saturating_mul(1000))
    }

    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`, zero if `earlier` is in the future.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    /// Saturates instead of overflowing: a deadline past the end of time is
    /// simply never reached.
    fn add(self, d: Duration) -> Timestamp {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(us))
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// The shell's clock: converts between tokio's clock and [`Timestamp`].
///
/// Built on `tokio::time::Instant`, so `tokio::time::pause()` in tests drives
/// the cores' notion of time too.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            origin: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        let d = tokio::time::Instant::now().saturating_duration_since(self.origin);
        Timestamp::ZERO + d
    }

    /// The tokio instant at which `t` falls, for `sleep_until`.
    pub fn instant_at(&self, t: Timestamp) -> tokio::time::Instant {
        self.origin + Duration::from_micros(t.as_micros())
    }

    /// Sleep until `deadline`; with no deadline, never wake. For a
    /// `select!` branch next to the bus and a shutdown signal.
    pub async fn sleep_until(&self, deadline: Option<Timestamp>) {
        sleep_until(deadline.map(|t| self.instant_at(t))).await;
    }
}

/// Sleep until `at`; with none, never wake (a `select!` branch for an
/// optional timer).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Wall-clock Unix seconds, for credential validity. The protocol's
/// deadlines run on the monotonic [`Clock`]; only validity windows, which
/// the cloud sets in calendar time, need this.
pub fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// A duration as people write it in configs and flags: `10s`, `500ms`,
/// `2m`, `1h`, or bare seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration; expected e.g. 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}'; use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is not a non-negative duration"))
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_saturates_and_since_never_underflows() {
        let t = Timestamp::from_micros(u64::MAX - 1);
        assert_eq!(t + Duration::from_secs(1), Timestamp::from_micros(u64::MAX));
        let a = Timestamp::from_millis(5);
        let b = Timestamp::from_millis(7);
        assert_eq!(b.saturating_since(a), Duration::from_millis(2));
        assert_eq!(a.saturating_since(b), Duration::ZERO);
    }

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration(" 1.5 "), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn display_is_seconds_dot_micros() {
        assert_eq!(Timestamp::from_micros(1_000_123).to_string(), "1.000123");
    }
}
