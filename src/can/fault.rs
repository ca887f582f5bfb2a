//! A fault-injecting wrapper for any [`CanBus`]: random frame loss and
//! payload corruption, reproducible from a seed.
//!
//! Why it exists: the fault suite (`tests/fault_*.rs`) must show that the
//! J1939 transport and the GB/T state machines recover from, or fail
//! cleanly on, a bad link, and a failure it finds must be replayable. On a
//! real CAN bus the controller's CRC hides almost every corruption and
//! retransmits; what gets through to software is a lost frame (a full
//! receive queue, a node that was bus-off) or, far more rarely, a frame
//! damaged past the CRC or by a faulty transceiver or gateway. This wrapper
//! makes both common, so that the error paths run in every test.
//!
//! Faults apply to what the wrapped node *receives*: wrapping every node
//! of a bus gives each receiver its own independent losses, the harshest
//! case for a request/response protocol. Frames the node sends, error
//! frames and link changes pass unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BusError, BusEvent, CanBus, CanFrame};
use crate::prng::SplitMix64;

/// How often each fault happens, in parts per million of received frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultConfig {
    /// Frames dropped.
    pub loss_ppm: u32,
    /// Frames (of those not dropped) with one payload bit flipped. A frame
    /// without payload is never corrupted.
    pub corruption_ppm: u32,
    /// Seeds the generator: the same seed on the same traffic gives the
    /// same faults.
    pub seed: u64,
}

impl FaultConfig {
    /// The fault suite's link: 10% loss and 1% corruption.
    pub fn lossy(seed: u64) -> Self {
        FaultConfig {
            loss_ppm: 100_000,
            corruption_ppm: 10_000,
            seed,
        }
    }
}

/// What a [`FaultyBus`] did, shared with whoever holds a clone.
#[derive(Clone, Debug, Default)]
pub struct FaultCounters {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    passed: AtomicU64,
    lost: AtomicU64,
    corrupted: AtomicU64,
    refused: AtomicU64,
}

/// A snapshot of [`FaultCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Frames delivered unchanged.
    pub passed: u64,
    pub lost: u64,
    pub corrupted: u64,
    /// Sends refused by a [`FaultyBus::refusing_sends`] node.
    pub refused: u64,
}

impl FaultCounters {
    pub fn stats(&self) -> FaultStats {
        FaultStats {
            passed: self.inner.passed.load(Ordering::Relaxed),
            lost: self.inner.lost.load(Ordering::Relaxed),
            corrupted: self.inner.corrupted.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
        }
    }
}

/// A node whose received frames are lost or corrupted as its
/// [`FaultConfig`] says.
#[derive(Debug)]
pub struct FaultyBus<B> {
    inner: B,
    config: FaultConfig,
    rng: SplitMix64,
    counters: FaultCounters,
    refuse_sends: bool,
}

impl<B: CanBus> FaultyBus<B> {
    pub fn new(inner: B, config: FaultConfig) -> Self {
        FaultyBus {
            inner,
            config,
            rng: SplitMix64::new(config.seed),
            counters: FaultCounters::default(),
            refuse_sends: false,
        }
    }

    /// This node's transmit queue is full for ever (a bus with no ACK, or
    /// stuck bus-off, as the daemon sees it): every
    /// [`CanBus::try_send`] says so. Receiving is unaffected.
    pub fn refusing_sends(mut self) -> Self {
        self.refuse_sends = true;
        self
    }

    /// The counters, live (clone before handing the bus away).
    pub fn counters(&self) -> FaultCounters {
        self.counters.clone()
    }

    /// What to do with one received frame: `None` drops it.
    fn apply(&mut self, frame: CanFrame) -> Option<CanFrame> {
        let c = &self.counters.inner;
        if chance(&mut self.rng, self.config.loss_ppm) {
            c.lost.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if !frame.is_empty() && chance(&mut self.rng, self.config.corruption_ppm) {
            let mut data = frame.data().to_vec();
            let bit = self.rng.below(data.len() as u64 * 8);
            // `bit / 8 < data.len()` by construction of `below`.
            if let Some(b) = data.get_mut((bit / 8) as usize) {
                *b ^= 1 << (bit % 8);
            }
            // Same id, same length: always a valid frame.
            if let Ok(bad) = CanFrame::new(frame.id(), &data) {
                c.corrupted.fetch_add(1, Ordering::Relaxed);
                return Some(bad);
            }
        }
        c.passed.fetch_add(1, Ordering::Relaxed);
        Some(frame)
    }
}

impl<B: CanBus> CanBus for FaultyBus<B> {
    /// A node refusing sends never drains: `send` waits for ever.
    async fn send(&mut self, frame: &CanFrame) -> Result<(), BusError> {
        if self.refuse_sends {
            self.counters.inner.refused.fetch_add(1, Ordering::Relaxed);
            return std::future::pending().await;
        }
        self.inner.send(frame).await
    }

    /// A bus that refuses sends ([`FaultyBus::refusing_sends`]) is always
    /// full.
    fn try_send(&mut self, frame: &CanFrame) -> Result<bool, BusError> {
        if self.refuse_sends {
            self.counters.inner.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        self.inner.try_send(frame)
    }

    fn try_recv(&mut self) -> Option<BusEvent> {
        loop {
            match self.inner.try_recv()? {
                BusEvent::Frame(f) => {
                    if let Some(f) = self.apply(f) {
                        return Some(BusEvent::Frame(f));
                    }
                }
                other => return Some(other),
            }
        }
    }

    /// Cancel-safe as the inner `recv` is: the fault decision is made only
    /// once a frame has been taken, with no await after it.
    async fn recv(&mut self) -> Result<BusEvent, BusError> {
        loop {
            match self.inner.recv().await? {
                BusEvent::Frame(f) => {
                    if let Some(f) = self.apply(f) {
                        return Ok(BusEvent::Frame(f));
                    }
                }
                other => return Ok(other),
            }
        }
    }
}

/// True with probability `ppm` per million.
fn chance(rng: &mut SplitMix64, ppm: u32) -> bool {
    ppm > 0 && rng.below(1_000_000) < u64::from(ppm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::can::{ExtendedId, VirtualBus};

    fn frame(i: u8) -> CanFrame {
        let id = ExtendedId::new(0x18EF_56F4).expect("valid id");
        CanFrame::new(id, &[i, 0, 0, 0, 0, 0, 0, i]).expect("valid frame")
    }

    /// Sends `n` frames through a faulty receiver; returns what arrived.
    async fn run(config: FaultConfig, n: u8) -> (Vec<CanFrame>, FaultStats) {
        let bus = VirtualBus::new();
        let mut tx = bus.node();
        let mut rx = FaultyBus::new(bus.node(), config);
        let counters = rx.counters();
        for i in 0..n {
            tx.send(&frame(i)).await.expect("send");
        }
        // A marker the wrapper cannot drop: a link event.
        bus.inject(BusEvent::Link(crate::can::LinkState::Up));
        let mut got = Vec::new();
        while let BusEvent::Frame(f) = rx.recv().await.expect("recv") {
            got.push(f);
        }
        (got, counters.stats())
    }

    #[tokio::test]
    async fn rates_are_close_to_the_configured_ones_and_counted() {
        let (got, stats) = run(FaultConfig::lossy(7), 250).await;
        // Not exact: a 250-frame sample of 10% is 25 ± 15 at 3 sigma.
        assert!((10..=40).contains(&stats.lost), "{stats:?}");
        assert_eq!(stats.passed + stats.corrupted, got.len() as u64);
        assert_eq!(stats.passed + stats.corrupted + stats.lost, 250);
        let damaged = got
            .iter()
            .filter(|f| f.data().first() != f.data().last())
            .count() as u64;
        // A flip in byte 0 or 7 shows as a mismatch; in bytes 1..7 it does
        // not, so at most the counted corruptions show.
        assert!(damaged <= stats.corrupted, "{damaged} vs {stats:?}");
    }

    #[tokio::test]
    async fn the_same_seed_gives_the_same_faults() {
        let a = run(FaultConfig::lossy(42), 200).await;
        let b = run(FaultConfig::lossy(42), 200).await;
        let c = run(FaultConfig::lossy(43), 200).await;
        assert_eq!(a, b);
        assert_ne!(a.0, c.0);
    }

    #[tokio::test]
    async fn corruption_flips_exactly_one_bit() {
        let config = FaultConfig {
            loss_ppm: 0,
            corruption_ppm: 1_000_000,
            seed: 1,
        };
        let (got, stats) = run(config, 50).await;
        assert_eq!(stats.corrupted, 50);
        for (i, f) in got.iter().enumerate() {
            let sent = frame(i as u8);
            assert_eq!(f.id(), sent.id());
            let flipped: u32 = f
                .data()
                .iter()
                .zip(sent.data())
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(flipped, 1, "frame {i}");
        }
    }

    #[tokio::test]
    async fn no_faults_configured_means_none_happen() {
        let config = FaultConfig {
            loss_ppm: 0,
            corruption_ppm: 0,
            seed: 3,
        };
        let (got, stats) = run(config, 100).await;
        assert_eq!(got.len(), 100);
        assert_eq!(stats.passed, 100);
        assert!(got.iter().enumerate().all(|(i, f)| *f == frame(i as u8)));
    }
}
