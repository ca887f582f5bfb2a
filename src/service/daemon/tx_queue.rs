//! One bus's transmit queue in the CAN loop. The loop never waits for a
//! bus: frames go to the bus with [`CanBus::try_send`], and what the bus
//! cannot take yet waits here, in order, retried on a timer. A full or
//! dead bus therefore holds up neither the other bus, nor the timers, nor
//! the watchdog; past [`TX_QUEUE_FRAMES`] its frames are dropped and
//! counted.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::can::{CanBus, CanFrame};

use super::can_loop::BusCounters;

/// Frames one bus may have waiting: about 0.25 s of a 250 kbit/s bus at
/// full load. A bus that cannot take this many has failed (no ACK,
/// bus-off); older frames go first, newer ones are dropped.
pub(super) const TX_QUEUE_FRAMES: usize = 512;
/// The first retry after the bus refused a frame; doubled up to
/// [`RETRY_MAX`]. At 250 kbit/s a 10-frame kernel queue drains in about
/// 5 ms.
const RETRY_FIRST: Duration = Duration::from_millis(1);
const RETRY_MAX: Duration = Duration::from_millis(16);

#[derive(Debug)]
pub(super) struct TxQueue {
    frames: VecDeque<CanFrame>,
    retry_at: Option<Instant>,
    pace: Backoff,
    /// Which side, for the log.
    side: &'static str,
}

impl TxQueue {
    pub(super) fn new(side: &'static str) -> TxQueue {
        TxQueue {
            frames: VecDeque::new(),
            retry_at: None,
            pace: Backoff::steady(RETRY_FIRST, RETRY_MAX),
            side,
        }
    }

    /// Queue `frame` behind those waiting and send what the bus takes.
    pub(super) fn send<B: CanBus>(
        &mut self,
        bus: &mut B,
        frame: CanFrame,
        counters: &mut BusCounters,
    ) {
        if self.frames.len() >= TX_QUEUE_FRAMES {
            counters.tx_dropped += 1;
            if counters.tx_dropped == 1 || counters.tx_dropped.is_multiple_of(1000) {
                warn!(
                    side = self.side,
                    dropped = counters.tx_dropped,
                    "CAN transmit queue full: frame dropped"
                );
            }
            return;
        }
        self.frames.push_back(frame);
        if self.retry_at.is_none() {
            self.flush(bus, counters);
        }
    }

    /// Hand the bus what it takes, in order; on a refusal, retry later.
    pub(super) fn flush<B: CanBus>(&mut self, bus: &mut B, counters: &mut BusCounters) {
        self.retry_at = None;
        while let Some(frame) = self.frames.front() {
            match bus.try_send(frame) {
                Ok(true) => {
                    self.frames.pop_front();
                    counters.frames_out += 1;
                    self.pace.reset();
                }
                Ok(false) => {
                    self.retry_at = Some(Instant::now() + self.pace.next_delay().1);
                    return;
                }
                Err(e) => {
                    self.frames.pop_front();
                    counters.errors += 1;
                    debug!(side = self.side, error = %e, "send failed");
                }
            }
        }
    }

    /// When the loop should call [`TxQueue::flush`] again.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::can::{BusError, BusEvent, ExtendedId};

    /// Takes `room` frames, then refuses until given more room.
    struct Tight {
        room: usize,
        sent: Vec<CanFrame>,
        fail_next: bool,
    }

    impl CanBus for Tight {
        async fn send(&mut self, _: &CanFrame) -> Result<(), BusError> {
            unreachable!("the loop only uses try_send")
        }
        fn try_send(&mut self, frame: &CanFrame) -> Result<bool, BusError> {
            if std::mem::take(&mut self.fail_next) {
                return Err(BusError::Closed);
            }
            if self.room == 0 {
                return Ok(false);
            }
            self.room -= 1;
            self.sent.push(*frame);
            Ok(true)
        }
        async fn recv(&mut self) -> Result<BusEvent, BusError> {
            std::future::pending().await
        }
    }

    fn frame(i: u32) -> CanFrame {
        CanFrame::new(ExtendedId::new(i).expect("id"), &[i as u8]).expect("frame")
    }

    #[tokio::test(start_paused = true)]
    async fn frames_wait_in_order_and_a_full_queue_drops_the_newest() {
        let mut bus = Tight {
            room: 2,
            sent: Vec::new(),
            fail_next: false,
        };
        let mut q = TxQueue::new("bms");
        let mut c = BusCounters::default();
        for i in 0..(TX_QUEUE_FRAMES as u32 + 5) {
            q.send(&mut bus, frame(i), &mut c);
        }
        // Two went out; the rest wait, up to the limit; 3 were dropped.
        assert_eq!(bus.sent, vec![frame(0), frame(1)]);
        assert_eq!(q.len(), TX_QUEUE_FRAMES);
        assert_eq!((c.frames_out, c.tx_dropped), (2, 3));
        assert!(q.retry_at().is_some());
        // Still full at the retry: the next one comes later (backing off).
        assert_eq!(q.pace.attempts(), 1);
        q.flush(&mut bus, &mut c);
        assert!(q.retry_at().is_some());
        assert_eq!(q.pace.attempts(), 2);
        // Room again: everything goes, in order, and one failure costs
        // only its own frame.
        bus.room = usize::MAX;
        bus.fail_next = true;
        q.flush(&mut bus, &mut c);
        assert_eq!(q.len(), 0);
        assert_eq!(q.retry_at(), None);
        assert_eq!(c.errors, 1);
        let want: Vec<CanFrame> = (0..TX_QUEUE_FRAMES as u32 + 2)
            .filter(|&i| i != 2)
            .map(frame)
            .collect();
        assert_eq!(bus.sent, want);
    }
}
