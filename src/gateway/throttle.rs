//! How often the gateway asks for a credential, sans-IO.
//!
//! Every charge request costs something: a cloud request, or offline a
//! voucher that is spent before the pile proves its key (the pile must see
//! the ticket to prove anything). A fake pile that restarts the session over
//! and over, or flips its charger number to look like a new pile each time,
//! would otherwise make the gateway ask the cloud without end and, offline,
//! drain the wallet one voucher per restart.
//!
//! Two limits, both reset by nothing an attacker on the bus controls:
//! - a token bucket on requests: a burst of [`ThrottleConfig::burst`], then
//!   one per [`ThrottleConfig::refill`];
//! - credentials spent at piles that never proved their key: after
//!   [`ThrottleConfig::max_unproven`] in a row, no credential until
//!   [`ThrottleConfig::cooldown`] has passed since the last one. A session in
//!   which the pile proved its key clears the count.
//!
//! Time is wall-clock Unix seconds (what the orchestrator has at a session's
//! end); a clock that steps back restarts the intervals rather than
//! blocking for the size of the step.

use std::time::Duration;

/// The limits; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Requests allowed back to back (a BMS retries a failed attempt a few
    /// times).
    pub burst: u32,
    /// One more request per this interval once the burst is used.
    pub refill: Duration,
    /// Credentials in a row at piles that did not prove their key before
    /// the gateway stops asking.
    pub max_unproven: u32,
    /// How long it stops asking then.
    pub cooldown: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            burst: 4,
            refill: Duration::from_secs(30),
            max_unproven: 3,
            cooldown: Duration::from_secs(600),
        }
    }
}

/// Why a request was not made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Throttled {
    #[error("too many charge requests ({burst} in a row); the next is allowed in {wait_s} s")]
    Rate { burst: u32, wait_s: u32 },
    #[error(
        "{count} credentials in a row went to piles that never proved their key; \
         none for another {wait_s} s"
    )]
    Unproven { count: u32, wait_s: u32 },
}

/// The throttle's state; see the module docs.
#[derive(Clone, Debug)]
pub struct CredentialThrottle {
    config: ThrottleConfig,
    tokens: u32,
    /// When the bucket last gained a token (or was last full).
    refilled_at: u32,
    unproven: u32,
    last_unproven_at: u32,
}

impl CredentialThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        CredentialThrottle {
            config,
            tokens: config.burst,
            refilled_at: 0,
            unproven: 0,
            last_unproven_at: 0,
        }
    }

    /// May a credential be requested now? Takes a token if so.
    pub fn request(&mut self, unix: u32) -> Result<(), Throttled> {
        if self.unproven >= self.config.max_unproven {
            let cooldown = secs(self.config.cooldown);
            let since = elapsed(&mut self.last_unproven_at, unix);
            if since < cooldown {
                return Err(Throttled::Unproven {
                    count: self.unproven,
                    wait_s: cooldown - since,
                });
            }
            self.unproven = 0;
        }
        self.refill(unix);
        if self.tokens == 0 {
            let since = elapsed(&mut self.refilled_at, unix);
            return Err(Throttled::Rate {
                burst: self.config.burst,
                wait_s: secs(self.config.refill).saturating_sub(since).max(1),
            });
        }
        if self.tokens == self.config.burst {
            // The interval for the next token starts with the first use.
            self.refilled_at = unix;
        }
        self.tokens -= 1;
        Ok(())
    }

    /// A session that had a credential ended; `pile_proven` says whether the
    /// pile proved its key in it.
    pub fn on_session_end(&mut self, pile_proven: bool, unix: u32) {
        if pile_proven {
            self.unproven = 0;
        } else {
            self.unproven = self.unproven.saturating_add(1);
            self.last_unproven_at = unix;
        }
    }

    fn refill(&mut self, unix: u32) {
        let step = secs(self.config.refill).max(1);
        let since = elapsed(&mut self.refilled_at, unix);
        let gained = since / step;
        if gained > 0 {
            self.tokens = self.tokens.saturating_add(gained).min(self.config.burst);
            self.refilled_at = self.refilled_at.saturating_add(gained * step);
        }
    }
}

impl Default for CredentialThrottle {
    fn default() -> Self {
        CredentialThrottle::new(ThrottleConfig::default())
    }
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Seconds from `*since` to `now`; a clock that went back moves `*since` to
/// `now` (and gives 0).
fn elapsed(since: &mut u32, now: u32) -> u32 {
    if now < *since {
        *since = now;
    }
    now - *since
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u32 = 1_800_000_000;

    fn throttle() -> CredentialThrottle {
        CredentialThrottle::new(ThrottleConfig {
            burst: 3,
            refill: Duration::from_secs(30),
            max_unproven: 2,
            cooldown: Duration::from_secs(600),
        })
    }

    #[test]
    fn a_burst_then_one_per_interval() {
        let mut t = throttle();
        for _ in 0..3 {
            assert_eq!(t.request(T0), Ok(()));
        }
        assert_eq!(
            t.request(T0 + 10),
            Err(Throttled::Rate {
                burst: 3,
                wait_s: 20
            })
        );
        assert_eq!(t.request(T0 + 30), Ok(()));
        assert!(t.request(T0 + 31).is_err());
        // A long pause refills the bucket, but never beyond the burst.
        for _ in 0..3 {
            assert_eq!(t.request(T0 + 10_000), Ok(()));
        }
        assert!(t.request(T0 + 10_000).is_err());
    }

    #[test]
    fn piles_that_never_prove_their_key_stop_the_requests_until_the_cooldown() {
        let mut t = throttle();
        t.request(T0).unwrap();
        t.on_session_end(false, T0 + 5);
        t.request(T0 + 100).unwrap();
        t.on_session_end(false, T0 + 105);
        assert_eq!(
            t.request(T0 + 200),
            Err(Throttled::Unproven {
                count: 2,
                wait_s: 505
            })
        );
        assert_eq!(t.request(T0 + 705), Ok(()));
    }

    #[test]
    fn a_proven_pile_clears_the_count() {
        let mut t = throttle();
        t.request(T0).unwrap();
        t.on_session_end(false, T0 + 5);
        t.request(T0 + 100).unwrap();
        t.on_session_end(true, T0 + 200);
        t.request(T0 + 300).unwrap();
        t.on_session_end(false, T0 + 305);
        assert_eq!(t.request(T0 + 400), Ok(()));
    }

    #[test]
    fn a_clock_that_steps_back_does_not_block_for_the_step() {
        let mut t = throttle();
        for _ in 0..3 {
            t.request(T0).unwrap();
        }
        // Back by a day: the interval restarts from the new now.
        assert!(t.request(T0 - 86_400).is_err());
        assert_eq!(t.request(T0 - 86_400 + 30), Ok(()));
        t.on_session_end(false, T0);
        t.on_session_end(false, T0);
        assert!(t.request(T0 - 1000).is_err());
        assert_eq!(t.request(T0 - 1000 + 600), Ok(()));
    }
}
