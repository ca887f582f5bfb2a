//! The SAE J1939-21 transport protocol for one local address, sans-IO.
//!
//! GB/T 27930 messages longer than 8 bytes (BRM, BCP, BCS, ...) travel as
//! J1939 multi-packet transfers: RTS/CTS with EndOfMsgAck to one destination,
//! or BAM to all. [`Transport`] owns those sessions for one node and is the
//! only place in the crate that knows about packets, windows and the
//! J1939-21 timers; everything above it sends and receives whole
//! [`J1939Message`]s.
//!
//! Like quinn-proto or rustls it performs no I/O and reads no clock. The shell
//! feeds it frames ([`Transport::handle_frame`]) and the time
//! ([`Transport::handle_timeout`] at [`Transport::poll_timeout`]), and drains
//! [`Transport::poll_transmit`] and [`Transport::poll_event`] after every
//! input.
//!
//! Timers (J1939-21 §5.10.2.4), as this core applies them:
//! - **Tr** (200 ms, response time): every answer (CTS, EndOfMsgAck, Abort,
//!   the DTs of a granted window) is queued inside the call that delivered
//!   the frame calling for it, so Tr holds as long as the shell flushes
//!   `poll_transmit` right after each input. No timer is needed for it.
//! - **T1** (750 ms): receiver, between two DTs of a window (and between BAM
//!   packets).
//! - **T2** (1250 ms): receiver, after a CTS until the first DT arrives.
//! - **T3** (1250 ms): sender, after the RTS or a window, until CTS or
//!   EndOfMsgAck. It is armed when the CTS arrives and the whole window is
//!   handed to the shell at once; a full 255-packet window occupies a 250
//!   kbit/s bus for about 140 ms, which only makes us stricter than the
//!   standard by that much.
//! - **T4** (1050 ms): sender, after a hold CTS (0 packets), until the next CTS.
//! - **Th** (500 ms): a holding receiver repeats its hold CTS this often.
//!
//! A timeout of a connection-mode session sends Connection Abort (reason 3)
//! and emits the matching `*Aborted` event; a BAM has nobody to abort to, so
//! only the event is emitted.
//!
//! Field deviations a sender meets in the receiver's CTS
//! ([`TpConfig::profile`], see [`crate::interop`]), each reported once per
//! transfer as [`TpEvent::Deviation`]:
//! - **A packet interval in bytes 4–5**: the field profile spaces the
//!   window's packets by it (at most [`MAX_CTS_GAP`]; T3 is extended by the
//!   window's length), since the peer asked for it and it costs nothing.
//! - **A CTS without its PGN**: the field profile takes it for the transfer
//!   in progress to that peer. That reading is unambiguous because we run
//!   one transfer per destination at a time ([`Transport::send`] refuses a
//!   second), and it only ever releases packets of a message already sent.
//!
//! The strict profile aborts the transfer (reason 250) on either. What we
//! send in CTS bytes 4–5 is explained in the `wire` module: `00 00`.

mod reassembly;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Duration;

use tracing::debug;

use crate::can::{CAN_MAX_DLEN, CanFrame};
use crate::interop::{Deviation, Profile};
use crate::j1939::{Address, J1939Id, Pgn, Priority};
use crate::time::Timestamp;

pub use wire::{AbortReason, MAX_TP_LEN};

pub(crate) use reassembly::{Insert, Reassembly, validate_announce};
pub(crate) use wire::{Cm, TP_CM, TP_DT, parse_dt};

use wire::{NO_LIMIT, dt_payload, frame8, packets_for};

/// J1939-21 default timer values, shared with the passive monitor.
pub(crate) const T1: Duration = Duration::from_millis(750);
pub(crate) const T2: Duration = Duration::from_millis(1250);
pub(crate) const T3: Duration = Duration::from_millis(1250);
pub(crate) const T4: Duration = Duration::from_millis(1050);
const TR: Duration = Duration::from_millis(200);
const TH: Duration = Duration::from_millis(500);
const BAM_GAP: Duration = Duration::from_millis(50);
/// The longest packet interval from a CTS that is honoured; a longer one
/// is cut to it. J1939-21's own pacing (BAM) stays within 200 ms, and a
/// receiver that asks for more still gets every packet well within its T1.
pub const MAX_CTS_GAP: Duration = Duration::from_millis(200);

/// Tuning and limits of one [`Transport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpConfig {
    /// Priority of the TP.CM and TP.DT frames we send (7 gives the
    /// 0x1CEC…/0x1CEB… ids that GB/T 27930 expects).
    pub priority: Priority,
    /// As receiver: packets granted per CTS (1..=255; 0 is read as 1). The
    /// grant is also capped by the sender's RTS byte 5.
    pub packets_per_cts: u8,
    /// As sender: RTS byte 5, most packets we want per CTS (0xFF: no limit).
    pub max_rts_packets: u8,
    /// Concurrent sessions, receive and send together. Bounds work per frame.
    pub max_sessions: usize,
    /// Bound on the bytes held by all receive reassemblies together.
    pub max_buffered_bytes: usize,
    /// Retransmission requests tolerated in a row, without progress, before
    /// aborting with reason 5. J1939-21 leaves the number to the
    /// implementation; a small one keeps a lossy link from looping, and
    /// resetting it on progress lets sporadic losses in a long transfer heal.
    pub max_retransmits: u8,
    /// Spacing between BAM data packets (J1939-21: 50 to 200 ms).
    pub bam_gap: Duration,
    pub t1: Duration,
    pub t2: Duration,
    pub t3: Duration,
    pub t4: Duration,
    /// Response time. Documentary: this core answers within the call that
    /// delivered the frame (see the module docs), so the shell's flush latency
    /// is what has to stay under it.
    pub tr: Duration,
    pub th: Duration,
    /// What to do with the peers' known deviations (see the module docs).
    pub profile: Profile,
}

impl TpConfig {
    /// Plain SAE J1939-21: TP frames at priority 7, the standard's timers,
    /// room for a busy multi-node network.
    pub fn j1939() -> Self {
        TpConfig {
            priority: Priority::LOWEST,
            packets_per_cts: 255,
            max_rts_packets: NO_LIMIT,
            max_sessions: 32,
            max_buffered_bytes: 16 * MAX_TP_LEN,
            max_retransmits: 2,
            bam_gap: BAM_GAP,
            t1: T1,
            t2: T2,
            t3: T3,
            t4: T4,
            tr: TR,
            th: TH,
            profile: Profile::Field,
        }
    }

    /// GB/T 27930-2015: J1939-21 unchanged at priority 7. A charging link
    /// has two nodes, so a few sessions and buffers are plenty.
    pub fn gbt27930() -> Self {
        TpConfig {
            max_sessions: 8,
            max_buffered_bytes: 4 * MAX_TP_LEN,
            ..Self::j1939()
        }
    }

    pub fn with_profile(self, profile: Profile) -> Self {
        TpConfig { profile, ..self }
    }
}

impl Default for TpConfig {
    fn default() -> Self {
        Self::j1939()
    }
}

/// A whole J1939 message, whatever it travelled as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct J1939Message {
    /// For sending: the priority of a single frame (TP frames use
    /// [`TpConfig::priority`]). For a reassembled message: the priority of
    /// its RTS or BAM.
    pub priority: Priority,
    pub pgn: Pgn,
    pub source: Address,
    /// [`Address::GLOBAL`] for broadcasts (BAM, PDU2).
    pub destination: Address,
    pub data: Vec<u8>,
}

/// What the transport reports to the layer above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpEvent {
    /// A single frame addressed to us or to all, or a completed TP/BAM
    /// reassembly.
    Received(J1939Message),
    /// A multi-packet send completed: EndOfMsgAck received, or the last BAM
    /// packet handed out. Single frames produce no event.
    Sent { pgn: Pgn, destination: Address },
    /// A multi-packet send ended without success, including our own timeouts.
    SendAborted {
        pgn: Pgn,
        destination: Address,
        reason: AbortReason,
    },
    /// A reassembly ended without a message, or an RTS was refused.
    ReceiveAborted {
        pgn: Pgn,
        source: Address,
        reason: AbortReason,
    },
    /// `peer` showed a known deviation: accepted under the field profile,
    /// refused under the strict one (and the transfer it belongs to
    /// aborted). Reported once per transfer.
    Deviation {
        peer: Address,
        deviation: Deviation,
        refused: bool,
        /// What exactly was seen, for the log and the refusal.
        detail: String,
    },
}

/// Why [`Transport::send`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpError {
    #[error(
        "PGN {pgn} message is {len} bytes; the J1939 transport protocol carries at most {MAX_TP_LEN}"
    )]
    TooLarge { pgn: Pgn, len: usize },
    #[error(
        "PGN {pgn} to {destination}: a transfer of PGN {in_progress} to that destination is still running; retry when it ends"
    )]
    Busy {
        pgn: Pgn,
        destination: Address,
        in_progress: Pgn,
    },
    #[error("PGN {pgn} to {destination}: all {max} transport sessions are in use; retry later")]
    NoSessionSlot {
        pgn: Pgn,
        destination: Address,
        max: usize,
    },
}

/// The J1939 message layer for one local address.
#[derive(Debug)]
pub struct Transport {
    config: TpConfig,
    local: Address,
    rx: Vec<RxSession>,
    tx: Vec<TxSession>,
    /// Frames ready to go: single frames and TP.CM. DTs are produced lazily
    /// from the sessions, after these.
    control: VecDeque<CanFrame>,
    events: VecDeque<TpEvent>,
    /// Sum of the sizes of all receive reassemblies.
    buffered: usize,
    /// Set by the layer above to make receivers hold at window boundaries.
    hold: bool,
}

/// One message being received.
#[derive(Debug)]
struct RxSession {
    source: Address,
    /// Us for RTS/CTS, global for BAM.
    destination: Address,
    pgn: Pgn,
    priority: Priority,
    buf: Reassembly,
    flow: RxFlow,
}

#[derive(Debug)]
enum RxFlow {
    /// Broadcast: no flow control; T1 between packets.
    Bam {
        deadline: Timestamp,
    },
    Cmdt(CmdtRx),
}

/// Receiver side of a connection-mode (RTS/CTS) transfer.
#[derive(Debug)]
struct CmdtRx {
    /// Packets per CTS: our config capped by the sender's RTS byte 5.
    grant: u8,
    retransmits: u8,
    state: RxState,
}

#[derive(Debug, Clone, Copy)]
enum RxState {
    /// A CTS granted `first..=last`. The deadline is T2 until the first DT of
    /// the window arrives, then T1 from the latest new DT.
    Receiving {
        first: u8,
        last: u8,
        deadline: Timestamp,
    },
    /// A hold CTS was sent; it is repeated at `repeat_at` (Th).
    Holding { repeat_at: Timestamp },
}

/// What one input did to a receive session.
enum RxStep {
    Nothing,
    Send(Cm),
    Complete,
    Abort(AbortReason),
}

/// One message being sent.
#[derive(Debug)]
struct TxSession {
    destination: Address,
    pgn: Pgn,
    data: Vec<u8>,
    total: u8,
    flow: TxFlow,
    /// Deviations already reported for this transfer.
    reported: Vec<Deviation>,
}

#[derive(Debug)]
enum TxFlow {
    Bam(BamTx),
    Cmdt(CmdtTx),
}

#[derive(Debug)]
struct BamTx {
    /// The packet to send next.
    next: u8,
    pacing: BamPacing,
}

#[derive(Debug, Clone, Copy)]
enum BamPacing {
    /// Packet `next` may go at `release_at`.
    Waiting { release_at: Timestamp },
    /// Released at `at`; the shell collects it from `poll_transmit`.
    Released { at: Timestamp },
}

/// Sender side of a connection-mode transfer.
#[derive(Debug)]
struct CmdtTx {
    /// Highest packet handed out so far; a CTS asking for one at or below it
    /// is a retransmission request.
    highest_sent: u8,
    retransmits: u8,
    state: TxState,
}

#[derive(Debug, Clone, Copy)]
enum TxState {
    /// Waiting for CTS or EndOfMsgAck: T3 after the RTS or a window, T4
    /// after a hold.
    Awaiting { deadline: Timestamp },
    /// A CTS `(count, next)` granted `next..=last`; packets from `next` on are
    /// being handed to the shell.
    Sending {
        next: u8,
        last: u8,
        cts: (u8, u8),
        deadline: Timestamp,
        /// Set when the CTS asked for a packet interval (field profile).
        paced: Option<Paced>,
    },
}

/// Packets spaced by a receiver's CTS interval, as BAM packets are spaced.
#[derive(Debug, Clone, Copy)]
struct Paced {
    gap: Duration,
    pacing: BamPacing,
}

/// What the sender does about a CTS.
enum CtsStep {
    Nothing,
    Abort(AbortReason),
}

/// What `poll_transmit` found in a send session.
enum DtStep {
    None,
    Frame([u8; 8]),
    /// The last BAM packet: the session is done.
    Last([u8; 8]),
}

impl Transport {
    pub fn new(config: TpConfig, local: Address) -> Self {
        let config = TpConfig {
            packets_per_cts: config.packets_per_cts.max(1),
            max_rts_packets: if config.max_rts_packets == 0 {
                NO_LIMIT
            } else {
                config.max_rts_packets
            },
            ..config
        };
        Transport {
            config,
            local,
            rx: Vec::new(),
            tx: Vec::new(),
            control: VecDeque::new(),
            events: VecDeque::new(),
            buffered: 0,
            hold: false,
        }
    }

    pub fn local(&self) -> Address {
        self.local
    }

    pub fn config(&self) -> &TpConfig {
        &self.config
    }

    /// Open sessions, receive and send.
    pub fn session_count(&self) -> usize {
        self.rx.len() + self.tx.len()
    }

    /// Bytes held by open reassemblies (at most `max_buffered_bytes`).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Control frames and events waiting for the shell to collect: what an
    /// input left queued. The shell drains both after every input, so this
    /// stays at what one input can produce.
    pub fn queued(&self) -> usize {
        self.control.len() + self.events.len()
    }

    /// Queues `msg` for sending from our local address (`msg.source` is
    /// ignored). Up to 8 bytes go as one frame at `msg.priority`; longer
    /// messages use RTS/CTS to a specific destination or BAM to global.
    ///
    /// Only one transfer per destination runs at a time: a second one gets
    /// [`TpError::Busy`], and the caller retries at its next period.
    pub fn send(&mut self, msg: J1939Message, now: Timestamp) -> Result<(), TpError> {
        let J1939Message {
            priority,
            pgn,
            destination,
            data,
            ..
        } = msg;
        let len = data.len();
        let too_large = TpError::TooLarge { pgn, len };
        if len > MAX_TP_LEN {
            return Err(too_large);
        }
        if len <= CAN_MAX_DLEN {
            let id = J1939Id::new(priority, pgn, self.local, destination);
            let frame = CanFrame::new(id.to_can_id(), &data)
                .expect("length was checked against CAN_MAX_DLEN just above");
            self.control.push_back(frame);
            return Ok(());
        }
        if let Some(busy) = self.tx.iter().find(|s| s.destination == destination) {
            return Err(TpError::Busy {
                pgn,
                destination,
                in_progress: busy.pgn,
            });
        }
        if self.session_count() >= self.config.max_sessions {
            return Err(TpError::NoSessionSlot {
                pgn,
                destination,
                max: self.config.max_sessions,
            });
        }
        let (Ok(size), Ok(total)) = (u16::try_from(len), u8::try_from(packets_for(len))) else {
            return Err(too_large);
        };
        let (announce, flow) = if destination.is_global() {
            let pacing = BamPacing::Waiting {
                release_at: now + self.config.bam_gap,
            };
            (
                Cm::Bam {
                    size,
                    packets: total,
                    pgn,
                },
                TxFlow::Bam(BamTx { next: 1, pacing }),
            )
        } else {
            let state = TxState::Awaiting {
                deadline: now + self.config.t3,
            };
            (
                Cm::Rts {
                    size,
                    packets: total,
                    max_per_cts: self.config.max_rts_packets,
                    pgn,
                },
                TxFlow::Cmdt(CmdtTx {
                    highest_sent: 0,
                    retransmits: 0,
                    state,
                }),
            )
        };
        self.queue_cm(destination, announce);
        self.tx.push(TxSession {
            destination,
            pgn,
            data,
            total,
            flow,
            reported: Vec::new(),
        });
        Ok(())
    }

    /// Feeds one received frame. Standard ids, frames for other nodes and
    /// frames from our own address (echoes) are ignored.
    /// [`Transport::send`], first abandoning a transfer of the same PGN to
    /// the same destination that is still running, without an Abort: by
    /// J1939-21 the receiver acts on the latest RTS for a PGN and abandons
    /// the earlier transfer. For a message sent again because the first
    /// copy stalled (a lost CTS leaves it waiting T3, longer than the
    /// caller can wait).
    pub fn send_replacing(&mut self, msg: J1939Message, now: Timestamp) -> Result<(), TpError> {
        let (destination, pgn) = (msg.destination, msg.pgn);
        let before = self.tx.len();
        self.tx
            .retain(|s| !(s.destination == destination && s.pgn == pgn));
        if self.tx.len() != before {
            debug!(%destination, %pgn, "transfer abandoned for a new copy");
        }
        self.send(msg, now)
    }

    pub fn handle_frame(&mut self, frame: &CanFrame, now: Timestamp) {
        let Ok(id) = J1939Id::from_can_id(frame.id()) else {
            return;
        };
        if id.source == self.local || (id.destination != self.local && !id.destination.is_global())
        {
            return;
        }
        let data = frame.data();
        if id.pgn == TP_CM {
            match Cm::parse(data) {
                Ok(cm) => self.on_cm(id, cm, now),
                Err(e) => debug!(%frame, error = %e, "TP.CM dropped"),
            }
        } else if id.pgn == TP_DT {
            if let Some((seq, bytes)) = parse_dt(data) {
                self.on_dt(id, seq, bytes, now);
            }
        } else {
            self.events.push_back(TpEvent::Received(J1939Message {
                priority: id.priority,
                pgn: id.pgn,
                source: id.source,
                destination: id.destination,
                data: data.to_vec(),
            }));
        }
    }

    /// Makes receivers hold (CTS with 0 packets, repeated every Th) at their
    /// next window boundary instead of granting more, for a layer above that
    /// cannot take more data yet. Clearing it grants the next window of every
    /// holding session at once.
    ///
    /// Note: some stacks (the Linux kernel's among them) abort on a second
    /// consecutive CTS, so holding is off unless asked for.
    pub fn set_receive_hold(&mut self, hold: bool, now: Timestamp) {
        self.hold = hold;
        if hold {
            return;
        }
        let mut out = Vec::new();
        for s in &mut self.rx {
            if let RxFlow::Cmdt(c) = &mut s.flow
                && matches!(c.state, RxState::Holding { .. })
            {
                out.push((
                    s.source,
                    c.open_window(&s.buf, s.pgn, false, &self.config, now),
                ));
            }
        }
        for (to, cm) in out {
            self.queue_cm(to, cm);
        }
    }

    /// Runs every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let mut i = 0;
        while let Some(s) = self.rx.get_mut(i) {
            let step = match &mut s.flow {
                RxFlow::Bam { deadline } if *deadline <= now => RxStep::Abort(AbortReason::Timeout),
                RxFlow::Bam { .. } => RxStep::Nothing,
                RxFlow::Cmdt(c) => match c.state {
                    RxState::Receiving { deadline, .. } if deadline <= now => {
                        RxStep::Abort(AbortReason::Timeout)
                    }
                    RxState::Holding { repeat_at } if repeat_at <= now => {
                        RxStep::Send(c.open_window(&s.buf, s.pgn, self.hold, &self.config, now))
                    }
                    _ => RxStep::Nothing,
                },
            };
            if self.apply_rx_step(i, step) {
                i += 1;
            }
        }

        let mut i = 0;
        while let Some(s) = self.tx.get_mut(i) {
            match &mut s.flow {
                TxFlow::Bam(b) => {
                    if let BamPacing::Waiting { release_at } = b.pacing
                        && release_at <= now
                    {
                        b.pacing = BamPacing::Released { at: now };
                    }
                }
                TxFlow::Cmdt(c) => {
                    if let TxState::Sending { paced: Some(p), .. } = &mut c.state
                        && let BamPacing::Waiting { release_at } = p.pacing
                        && release_at <= now
                    {
                        p.pacing = BamPacing::Released { at: now };
                    }
                    let (TxState::Awaiting { deadline } | TxState::Sending { deadline, .. }) =
                        c.state;
                    if deadline <= now {
                        self.abort_tx(i, AbortReason::Timeout, true);
                        continue;
                    }
                }
            }
            i += 1;
        }
    }

    /// The next frame to put on the bus: control frames first, then data
    /// packets of granted windows and released BAM packets.
    pub fn poll_transmit(&mut self) -> Option<CanFrame> {
        if let Some(frame) = self.control.pop_front() {
            return Some(frame);
        }
        for i in 0..self.tx.len() {
            let Some(s) = self.tx.get_mut(i) else { break };
            let destination = s.destination;
            match s.next_dt(self.config.bam_gap) {
                DtStep::None => {}
                DtStep::Frame(payload) => return Some(self.dt_frame(destination, payload)),
                DtStep::Last(payload) => {
                    let done = self.tx.swap_remove(i);
                    self.events.push_back(TpEvent::Sent {
                        pgn: done.pgn,
                        destination,
                    });
                    return Some(self.dt_frame(destination, payload));
                }
            }
        }
        None
    }

    pub fn poll_event(&mut self) -> Option<TpEvent> {
        self.events.pop_front()
    }

    /// The earliest instant at which [`Transport::handle_timeout`] has work:
    /// a protocol deadline, a hold repeat or the next BAM packet.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let rx = self.rx.iter().map(|s| match &s.flow {
            RxFlow::Bam { deadline } => Some(*deadline),
            RxFlow::Cmdt(c) => match c.state {
                RxState::Receiving { deadline, .. } => Some(deadline),
                RxState::Holding { repeat_at } => Some(repeat_at),
            },
        });
        let tx = self.tx.iter().map(|s| match &s.flow {
            TxFlow::Bam(b) => match b.pacing {
                BamPacing::Waiting { release_at } => Some(release_at),
                BamPacing::Released { .. } => None,
            },
            TxFlow::Cmdt(c) => match c.state {
                TxState::Sending {
                    deadline,
                    paced:
                        Some(Paced {
                            pacing: BamPacing::Waiting { release_at },
                            ..
                        }),
                    ..
                } => Some(deadline.min(release_at)),
                TxState::Awaiting { deadline } | TxState::Sending { deadline, .. } => {
                    Some(deadline)
                }
            },
        });
        rx.chain(tx).flatten().min()
    }

    fn on_cm(&mut self, id: J1939Id, cm: Cm, now: Timestamp) {
        let to_us = id.destination == self.local;
        match cm {
            Cm::Rts {
                size,
                packets,
                max_per_cts,
                pgn,
            } if to_us => self.on_rts(id, size, packets, max_per_cts, pgn, now),
            Cm::Bam { size, packets, pgn } if id.destination.is_global() => {
                self.on_bam(id, size, packets, pgn, now)
            }
            Cm::Cts {
                count, next, pgn, ..
            } if to_us => {
                let interval = cm.cts_interval_ms();
                self.on_cts(id.source, count, next, pgn, interval, now)
            }
            Cm::EndOfMsgAck { pgn, .. } if to_us => self.on_eoma(id.source, pgn),
            Cm::Abort { reason, pgn } if to_us => self.on_abort(id.source, reason, pgn),
            _ => {
                debug!(source = %id.source, destination = %id.destination, ?cm, "TP.CM with unfitting destination dropped")
            }
        }
    }

    fn on_rts(
        &mut self,
        id: J1939Id,
        size: u16,
        packets: u8,
        max_per_cts: u8,
        pgn: Pgn,
        now: Timestamp,
    ) {
        let source = id.source;
        if let Some(i) = self.rx_index(source, self.local) {
            if self.rx.get(i).is_some_and(|s| s.pgn == pgn) {
                // J1939-21: when RTSs for the same PGN repeat, the most recent
                // one is acted on and the earlier one abandoned, without an
                // Abort. The sender restarted, so we restart with it.
                self.remove_rx(i);
            } else {
                // Another PGN while a transfer from this node is open: keep the
                // open one and refuse the newcomer with reason 1, as J1939-21
                // allows one connection per node pair (the kernel does the same).
                self.refuse_rts(source, pgn, AbortReason::AlreadyInSession);
                return;
            }
        }
        if let Err(e) = validate_announce(size, packets) {
            debug!(%source, %pgn, error = %e, "RTS refused");
            let reason = match e {
                reassembly::AnnounceError::TooLarge { .. } => AbortReason::TooLarge,
                reassembly::AnnounceError::Inconsistent { .. } => AbortReason::ANY_OTHER,
            };
            self.refuse_rts(source, pgn, reason);
            return;
        }
        if !self.has_room_for(usize::from(size)) {
            self.refuse_rts(source, pgn, AbortReason::NoResources);
            return;
        }
        let Ok(buf) = Reassembly::new(size, packets) else {
            return;
        };
        // Byte 5 of 0 is not a valid limit; older stacks sent reserved bytes
        // there, so read it, like 0xFF, as "no limit".
        let peer_limit = if max_per_cts == 0 {
            NO_LIMIT
        } else {
            max_per_cts
        };
        let mut flow = CmdtRx {
            grant: self.config.packets_per_cts.min(peer_limit),
            retransmits: 0,
            state: RxState::Holding { repeat_at: now },
        };
        let cts = flow.open_window(&buf, pgn, self.hold, &self.config, now);
        self.buffered += buf.size();
        self.rx.push(RxSession {
            source,
            destination: self.local,
            pgn,
            priority: id.priority,
            buf,
            flow: RxFlow::Cmdt(flow),
        });
        self.queue_cm(source, cts);
    }

    fn on_bam(&mut self, id: J1939Id, size: u16, packets: u8, pgn: Pgn, now: Timestamp) {
        let source = id.source;
        // A node sends one BAM at a time, so a new announcement ends the old
        // one: silently for the same PGN (the sender restarted), otherwise
        // reported. No Abort exists for broadcasts; the local report uses the
        // reason that describes it (2: resources taken for another task).
        if let Some(i) = self.rx_index(source, Address::GLOBAL)
            && let Some(old) = self.remove_rx(i)
            && old.pgn != pgn
        {
            self.events.push_back(TpEvent::ReceiveAborted {
                pgn: old.pgn,
                source,
                reason: AbortReason::NoResources,
            });
        }
        // A BAM cannot be refused on the bus, so an unusable one is ignored.
        if let Err(e) = validate_announce(size, packets) {
            debug!(%source, %pgn, error = %e, "BAM ignored");
            return;
        }
        if !self.has_room_for_bam(usize::from(size)) {
            debug!(%source, %pgn, size, "BAM ignored: no session or buffer free");
            return;
        }
        let Ok(buf) = Reassembly::new(size, packets) else {
            return;
        };
        self.buffered += buf.size();
        self.rx.push(RxSession {
            source,
            destination: Address::GLOBAL,
            pgn,
            priority: id.priority,
            buf,
            flow: RxFlow::Bam {
                deadline: now + self.config.t1,
            },
        });
    }

    fn on_dt(&mut self, id: J1939Id, seq: u8, bytes: &[u8], now: Timestamp) {
        let Some(i) = self.rx_index(id.source, id.destination) else {
            return;
        };
        let Some(s) = self.rx.get_mut(i) else { return };
        let step = s.on_dt(seq, bytes, self.hold, &self.config, now);
        self.apply_rx_step(i, step);
    }

    fn on_cts(
        &mut self,
        source: Address,
        count: u8,
        next: u8,
        pgn: Option<Pgn>,
        interval_ms: Option<u16>,
        now: Timestamp,
    ) {
        let Some(i) = self.tx_index(source) else {
            return;
        };
        let Some(session_pgn) = self.tx.get(i).map(|s| s.pgn) else {
            return;
        };
        match pgn {
            Some(pgn) if pgn != session_pgn => {
                debug!(%source, %pgn, expected = %session_pgn, "CTS for another PGN ignored");
                return;
            }
            Some(_) => {}
            None => {
                let detail = format!(
                    "CTS from {source} without a PGN, during our transfer of PGN {session_pgn}"
                );
                if self.tx_deviation(i, Deviation::CtsWithoutPgn, detail) {
                    self.abort_tx(i, AbortReason::ANY_OTHER, true);
                    return;
                }
            }
        }
        let gap = match interval_ms {
            Some(ms) if count > 0 => {
                let detail = format!("CTS from {source} asks for {ms} ms between packets");
                if self.tx_deviation(i, Deviation::CtsPacketInterval, detail) {
                    self.abort_tx(i, AbortReason::ANY_OTHER, true);
                    return;
                }
                Some(Duration::from_millis(u64::from(ms)).min(MAX_CTS_GAP))
            }
            _ => None,
        };
        let Some(s) = self.tx.get_mut(i) else { return };
        let total = s.total;
        let TxFlow::Cmdt(c) = &mut s.flow else { return };
        if let CtsStep::Abort(reason) = c.on_cts(count, next, total, gap, &self.config, now) {
            self.abort_tx(i, reason, true);
        }
    }

    /// Reports deviation `d` of send session `i`'s peer, once per transfer.
    /// Returns whether the profile refuses it.
    fn tx_deviation(&mut self, i: usize, d: Deviation, detail: String) -> bool {
        let refused = self.config.profile.is_strict();
        let Some(s) = self.tx.get_mut(i) else {
            return refused;
        };
        if !s.reported.contains(&d) {
            s.reported.push(d);
            debug!(peer = %s.destination, deviation = %d, refused, "{detail}");
            self.events.push_back(TpEvent::Deviation {
                peer: s.destination,
                deviation: d,
                refused,
                detail,
            });
        }
        refused
    }

    fn on_eoma(&mut self, source: Address, pgn: Pgn) {
        let Some(i) = self.tx_index(source) else {
            return;
        };
        let acked = self.tx.get(i).is_some_and(|s| {
            // An EndOfMsgAck before we sent every packet cannot be for this
            // transfer (a stale or duplicated frame), so it is ignored.
            s.pgn == pgn && matches!(&s.flow, TxFlow::Cmdt(c) if c.highest_sent >= s.total)
        });
        if acked {
            let done = self.tx.swap_remove(i);
            self.events.push_back(TpEvent::Sent {
                pgn: done.pgn,
                destination: done.destination,
            });
        }
    }

    /// Abort frames carry no direction, so the PGN picks the session: ours
    /// to the peer, the peer's to us, or both.
    fn on_abort(&mut self, source: Address, reason: AbortReason, pgn: Pgn) {
        if let Some(i) = self.tx_index(source)
            && self.tx.get(i).is_some_and(|s| s.pgn == pgn)
        {
            self.abort_tx(i, reason, false);
        }
        if let Some(i) = self.rx_index(source, self.local)
            && self.rx.get(i).is_some_and(|s| s.pgn == pgn)
        {
            self.remove_rx(i);
            self.events.push_back(TpEvent::ReceiveAborted {
                pgn,
                source,
                reason,
            });
        }
    }

    /// Carries out a receive step for session `i`. Returns whether the
    /// session is still open.
    fn apply_rx_step(&mut self, i: usize, step: RxStep) -> bool {
        match step {
            RxStep::Nothing => true,
            RxStep::Send(cm) => {
                if let Some(s) = self.rx.get(i) {
                    let to = s.source;
                    self.queue_cm(to, cm);
                }
                true
            }
            RxStep::Complete => {
                let Some(s) = self.remove_rx(i) else {
                    return false;
                };
                if matches!(s.flow, RxFlow::Cmdt(_)) {
                    let ack = Cm::EndOfMsgAck {
                        size: u16::try_from(s.buf.size()).unwrap_or(u16::MAX),
                        packets: s.buf.total(),
                        pgn: s.pgn,
                    };
                    self.queue_cm(s.source, ack);
                }
                self.events.push_back(TpEvent::Received(J1939Message {
                    priority: s.priority,
                    pgn: s.pgn,
                    source: s.source,
                    destination: s.destination,
                    data: s.buf.into_data(),
                }));
                false
            }
            RxStep::Abort(reason) => {
                let Some(s) = self.remove_rx(i) else {
                    return false;
                };
                if matches!(s.flow, RxFlow::Cmdt(_)) {
                    self.queue_cm(s.source, Cm::Abort { reason, pgn: s.pgn });
                }
                self.events.push_back(TpEvent::ReceiveAborted {
                    pgn: s.pgn,
                    source: s.source,
                    reason,
                });
                false
            }
        }
    }

    /// Ends send session `i`, telling the peer when `notify` (not when the
    /// peer aborted first).
    fn abort_tx(&mut self, i: usize, reason: AbortReason, notify: bool) {
        if i >= self.tx.len() {
            return;
        }
        let s = self.tx.swap_remove(i);
        if notify {
            self.queue_cm(s.destination, Cm::Abort { reason, pgn: s.pgn });
        }
        self.events.push_back(TpEvent::SendAborted {
            pgn: s.pgn,
            destination: s.destination,
            reason,
        });
    }

    fn refuse_rts(&mut self, source: Address, pgn: Pgn, reason: AbortReason) {
        self.queue_cm(source, Cm::Abort { reason, pgn });
        self.events.push_back(TpEvent::ReceiveAborted {
            pgn,
            source,
            reason,
        });
    }

    /// Broadcasts may take at most half of the sessions and half of the
    /// buffer. A BAM costs its sender one frame, needs no answer and cannot
    /// be refused, so any node on the bus could otherwise fill the pool with
    /// BAM announcements from a few addresses, renewed within T1, and every
    /// RTS meant for us would be refused with `NoResources`.
    fn has_room_for_bam(&self, size: usize) -> bool {
        let (sessions, bytes) = self
            .rx
            .iter()
            .filter(|s| matches!(s.flow, RxFlow::Bam { .. }))
            .fold((0usize, 0usize), |(n, b), s| (n + 1, b + s.buf.size()));
        self.has_room_for(size)
            && sessions < (self.config.max_sessions / 2).max(1)
            && bytes.saturating_add(size) <= self.config.max_buffered_bytes / 2
    }

    fn has_room_for(&self, size: usize) -> bool {
        self.session_count() < self.config.max_sessions
            && self.buffered.saturating_add(size) <= self.config.max_buffered_bytes
    }

    fn rx_index(&self, source: Address, destination: Address) -> Option<usize> {
        self.rx
            .iter()
            .position(|s| s.source == source && s.destination == destination)
    }

    /// The connection-mode send session to `destination`. (Our BAM is keyed
    /// by the global address, which never sends CTS.)
    fn tx_index(&self, destination: Address) -> Option<usize> {
        self.tx.iter().position(|s| s.destination == destination)
    }

    /// Removes receive session `i` (normally just looked up).
    fn remove_rx(&mut self, i: usize) -> Option<RxSession> {
        if i >= self.rx.len() {
            return None;
        }
        let s = self.rx.swap_remove(i);
        self.buffered = self.buffered.saturating_sub(s.buf.size());
        Some(s)
    }

    fn queue_cm(&mut self, destination: Address, cm: Cm) {
        let frame = frame8(
            self.config.priority,
            TP_CM,
            self.local,
            destination,
            cm.encode(),
        );
        self.control.push_back(frame);
    }

    fn dt_frame(&self, destination: Address, payload: [u8; 8]) -> CanFrame {
        frame8(
            self.config.priority,
            TP_DT,
            self.local,
            destination,
            payload,
        )
    }
}

impl RxSession {
    fn on_dt(
        &mut self,
        seq: u8,
        bytes: &[u8],
        hold: bool,
        cfg: &TpConfig,
        now: Timestamp,
    ) -> RxStep {
        match self.buf.insert(seq, bytes) {
            Insert::New => {}
            // Duplicates are ignored rather than aborted (reason 8 is for
            // software that cannot recover; storing by sequence number can).
            // A short packet is treated as lost.
            Insert::Duplicate | Insert::Short => return RxStep::Nothing,
            Insert::OutOfRange => return RxStep::Abort(AbortReason::BadSequence),
        }
        if self.buf.is_complete() {
            return RxStep::Complete;
        }
        match &mut self.flow {
            RxFlow::Bam { deadline } => {
                *deadline = now + cfg.t1;
                RxStep::Nothing
            }
            RxFlow::Cmdt(c) => match c.state {
                RxState::Holding { .. } => RxStep::Nothing,
                RxState::Receiving { first, last, .. } => {
                    if self.buf.has_all(first, last) {
                        c.retransmits = 0;
                        RxStep::Send(c.open_window(&self.buf, self.pgn, hold, cfg, now))
                    } else if seq == last {
                        // The window's last packet is in but some before it
                        // are not: ask again from the first gap.
                        c.retransmits = c.retransmits.saturating_add(1);
                        if c.retransmits > cfg.max_retransmits {
                            RxStep::Abort(AbortReason::MaxRetransmit)
                        } else {
                            RxStep::Send(c.open_window(&self.buf, self.pgn, hold, cfg, now))
                        }
                    } else {
                        c.state = RxState::Receiving {
                            first,
                            last,
                            deadline: now + cfg.t1,
                        };
                        RxStep::Nothing
                    }
                }
            },
        }
    }
}

impl CmdtRx {
    /// Starts the next window (or a hold) and returns the CTS announcing it.
    ///
    /// The window starts at the first missing packet and ends at the last
    /// missing one within the grant, so its final packet is always new to us
    /// and its arrival reliably marks the end of the window.
    fn open_window(
        &mut self,
        buf: &Reassembly,
        pgn: Pgn,
        hold: bool,
        cfg: &TpConfig,
        now: Timestamp,
    ) -> Cm {
        let next = buf.first_missing().unwrap_or(1);
        if hold {
            self.state = RxState::Holding {
                repeat_at: now + cfg.th,
            };
            // The next-packet byte stays meaningful (and non-zero, which the
            // kernel's stack insists on) even in a hold.
            return Cm::cts(0, next, pgn);
        }
        let limit =
            (u16::from(next) + u16::from(self.grant.max(1)) - 1).min(u16::from(buf.total()));
        let limit = u8::try_from(limit).unwrap_or(u8::MAX);
        let last = buf.last_missing_in(next, limit).unwrap_or(next);
        self.state = RxState::Receiving {
            first: next,
            last,
            deadline: now + cfg.t2,
        };
        Cm::cts(last - next + 1, next, pgn)
    }
}

impl CmdtTx {
    fn on_cts(
        &mut self,
        count: u8,
        next: u8,
        total: u8,
        gap: Option<Duration>,
        cfg: &TpConfig,
        now: Timestamp,
    ) -> CtsStep {
        match self.state {
            TxState::Sending { cts, .. } => {
                if cts == (count, next) {
                    // The same CTS again (a duplicated frame): nothing new asked.
                    CtsStep::Nothing
                } else {
                    CtsStep::Abort(AbortReason::CtsWhileDt)
                }
            }
            TxState::Awaiting { .. } if count == 0 => {
                // Hold: the receiver repeats it within Th; give up after T4.
                self.state = TxState::Awaiting {
                    deadline: now + cfg.t4,
                };
                CtsStep::Nothing
            }
            TxState::Awaiting { .. } if next == 0 || next > total => {
                CtsStep::Abort(AbortReason::BadSequence)
            }
            TxState::Awaiting { .. } => {
                if next <= self.highest_sent {
                    self.retransmits = self.retransmits.saturating_add(1);
                    if self.retransmits > cfg.max_retransmits {
                        return CtsStep::Abort(AbortReason::MaxRetransmit);
                    }
                } else {
                    self.retransmits = 0;
                }
                // Whatever the receiver grants is honoured, even beyond our
                // RTS byte 5: we hold the whole message anyway.
                let last = (u16::from(next) + u16::from(count) - 1).min(u16::from(total));
                let last = u8::try_from(last).unwrap_or(total);
                // A paced window takes longer to hand out; T3 runs after it.
                let window = gap.map_or(Duration::ZERO, |g| g * u32::from(last - next + 1));
                self.state = TxState::Sending {
                    next,
                    last,
                    cts: (count, next),
                    deadline: now + window + cfg.t3,
                    paced: gap.map(|gap| Paced {
                        gap,
                        pacing: BamPacing::Released { at: now },
                    }),
                };
                CtsStep::Nothing
            }
        }
    }
}

impl TxSession {
    fn next_dt(&mut self, bam_gap: Duration) -> DtStep {
        match &mut self.flow {
            TxFlow::Bam(b) => {
                let BamPacing::Released { at } = b.pacing else {
                    return DtStep::None;
                };
                let payload = dt_payload(&self.data, b.next);
                if b.next >= self.total {
                    return DtStep::Last(payload);
                }
                b.next += 1;
                b.pacing = BamPacing::Waiting {
                    release_at: at + bam_gap,
                };
                DtStep::Frame(payload)
            }
            TxFlow::Cmdt(c) => {
                let TxState::Sending {
                    next,
                    last,
                    cts,
                    deadline,
                    paced,
                } = c.state
                else {
                    return DtStep::None;
                };
                let paced = match paced {
                    None => None,
                    Some(Paced {
                        pacing: BamPacing::Waiting { .. },
                        ..
                    }) => return DtStep::None,
                    Some(Paced {
                        gap,
                        pacing: BamPacing::Released { at },
                    }) => Some(Paced {
                        gap,
                        pacing: BamPacing::Waiting {
                            release_at: at + gap,
                        },
                    }),
                };
                c.highest_sent = c.highest_sent.max(next);
                c.state = if next >= last {
                    TxState::Awaiting { deadline }
                } else {
                    TxState::Sending {
                        next: next + 1,
                        last,
                        cts,
                        deadline,
                        paced,
                    }
                };
                DtStep::Frame(dt_payload(&self.data, next))
            }
        }
    }
}
