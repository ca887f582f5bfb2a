//! The bridge: GB/T 27930 between two CAN buses, through the firewall, sans-IO.
//!
//! In bridge mode the BMS and the pile are on different buses and only the
//! gateway joins them. [`Bridge`] takes a frame from one side, asks the
//! [firewall](super::firewall) about it, and queues what may pass for the
//! other side. The shell owns the two sockets: it feeds
//! [`Bridge::handle_frame`] with the side a frame came from, calls
//! [`Bridge::handle_timeout`] at [`Bridge::poll_timeout`], and after every
//! input drains [`Bridge::poll_transmit`] (frames, each with the side to send
//! it on) and [`Bridge::poll_message`] (what the session observer watches).
//!
//! **Transport termination.** The bridge does not pass TP frames through. On
//! the BMS bus it runs a J1939 [`Transport`] at the pile's address, on the
//! pile bus one at the BMS's address, so each node completes its RTS/CTS or
//! BAM with the bridge as if with its peer. A reassembled message is judged
//! whole (allowlist, rate, decode, rewrite) and the other side's transport
//! sends it again, with the original source and destination: sending as the
//! node we stand in for is exactly that transport's local address. So the
//! firewall always judges whole messages, a rewrite such as the blanked VIN
//! cannot be undone by a DT that slips past, and no TP.DT crafted by the pile
//! ever reaches the BMS: the BMS only sees packets our transport cut. The
//! cost is that a sender's EndOfMsgAck now means "the bridge has it", not
//! "the peer has it"; GB/T repeats every message periodically, so a copy
//! lost on the far side is replaced by the next one.
//!
//! When the far side's transport is still sending the previous long message
//! to the same node, the new one is dropped (`dropped_busy`) rather than
//! queued: the next period brings a fresher copy, and a queue would only
//! add latency.
//!
//! **Recognition gate.** With `gate_recognition`, the pile's CRM(0xAA)
//! reaches the BMS as CRM(0x00) until the gateway has authenticated the pile
//! ([`Bridge::set_pile_authenticated`]), so a pile that cannot prove itself
//! never gets the BMS past recognition. When authentication succeeds, the
//! latest held CRM(0xAA), if younger than two CRM periods, is forwarded at
//! once instead of waiting for the pile's next one: a pile typically sends
//! CRM(0xAA) right after its AuthResult, often before the gateway has
//! processed that result.

use std::collections::VecDeque;
use std::time::Duration;

use tracing::debug;

use super::firewall::{Firewall, FirewallConfig, FirewallCounters, FrameClass, Side};
use crate::can::CanFrame;
use crate::j1939::tp::{J1939Message, TpConfig, TpEvent, Transport};
use crate::time::Timestamp;

#[cfg(test)]
mod pump_tests;
#[cfg(test)]
mod tests;

/// How long a held CRM(0xAA) stays worth releasing when the pile is
/// authenticated: two CRM periods. Older, the pile has moved on or gone.
const HELD_CRM_FRESH: Duration = Duration::from_millis(500);

/// What the bridge holds at one moment: the state an attacker could try to
/// grow. Bounded by the transports' `max_sessions` and
/// `max_buffered_bytes` on each side, and by what one input can queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeLoad {
    /// Open transport sessions, receive and send, on both sides.
    pub tp_sessions: usize,
    /// Bytes held by open reassemblies on both sides.
    pub tp_buffered_bytes: usize,
    /// Frames, transport events and forwarded messages waiting for the shell.
    pub queued: usize,
}

/// The CAN firewall between the BMS bus and the pile bus.
#[derive(Debug)]
pub struct Bridge {
    firewall: Firewall,
    /// On the BMS bus, at the pile's address.
    bms_tp: Transport,
    /// On the pile bus, at the BMS's address.
    pile_tp: Transport,
    /// Forwarded messages, with the side they came from, for the observer.
    messages: VecDeque<(Side, J1939Message)>,
    /// The pile's latest CRM(0xAA) (as it sent it) that went out as
    /// CRM(0x00), and when.
    held_crm: Option<(J1939Message, Timestamp)>,
}

impl Bridge {
    pub fn new(config: FirewallConfig) -> Self {
        let bms_tp = Transport::new(TpConfig::gbt27930(), config.pile);
        let pile_tp = Transport::new(TpConfig::gbt27930(), config.bms);
        Bridge {
            firewall: Firewall::new(config),
            bms_tp,
            pile_tp,
            messages: VecDeque::new(),
            held_crm: None,
        }
    }

    pub fn config(&self) -> &FirewallConfig {
        self.firewall.config()
    }

    /// A frame received on `from`'s bus.
    pub fn handle_frame(&mut self, from: Side, frame: &CanFrame, now: Timestamp) {
        match self.firewall.classify(from, frame) {
            FrameClass::Transport => self.transport(from).handle_frame(frame, now),
            FrameClass::Single(id) => {
                let msg = J1939Message {
                    priority: id.priority,
                    pgn: id.pgn,
                    source: id.source,
                    destination: id.destination,
                    data: frame.data().to_vec(),
                };
                self.forward(from, msg, false, now);
            }
            FrameClass::Refused(_) => {}
        }
        self.process(now);
        self.track_load();
    }

    /// Runs the transports' timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.bms_tp.handle_timeout(now);
        self.pile_tp.handle_timeout(now);
        self.process(now);
        self.track_load();
    }

    /// The next frame to send, with the side to send it on.
    pub fn poll_transmit(&mut self) -> Option<(Side, CanFrame)> {
        if let Some(f) = self.bms_tp.poll_transmit() {
            return Some((Side::Bms, f));
        }
        self.pile_tp.poll_transmit().map(|f| (Side::Pile, f))
    }

    /// Every GB/T message the firewall accepted and forwarded (after
    /// rewriting), with the side it came from: what the session observer
    /// watches.
    pub fn poll_message(&mut self) -> Option<(Side, J1939Message)> {
        self.messages.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Timestamp> {
        [self.bms_tp.poll_timeout(), self.pile_tp.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the pile has proved itself to the gateway. Also call with
    /// `false` when a new session starts. Becoming authenticated releases a
    /// fresh held CRM(0xAA) at once (see the module docs).
    pub fn set_pile_authenticated(&mut self, yes: bool, now: Timestamp) {
        let was_holding = self.firewall.holds_recognition();
        self.firewall.set_pile_authenticated(yes);
        let held = self.held_crm.take();
        if !yes || !was_holding {
            return;
        }
        if let Some((crm, at)) = held
            && now.saturating_since(at) <= HELD_CRM_FRESH
        {
            debug!("pile authenticated: releasing the held CRM(0xAA)");
            // Already judged when it arrived; only the rewrite is undone.
            self.send(Side::Pile, crm, false, now);
        }
    }

    pub fn pile_authenticated(&self) -> bool {
        self.firewall.pile_authenticated()
    }

    pub fn counters(&self) -> &FirewallCounters {
        self.firewall.counters()
    }

    /// What the bridge holds right now (see [`BridgeLoad`]).
    pub fn load(&self) -> BridgeLoad {
        let tps = [&self.bms_tp, &self.pile_tp];
        BridgeLoad {
            tp_sessions: tps.iter().map(|t| t.session_count()).sum(),
            tp_buffered_bytes: tps.iter().map(|t| t.buffered_bytes()).sum(),
            queued: tps.iter().map(|t| t.queued()).sum::<usize>() + self.messages.len(),
        }
    }

    /// Raises the high-water marks in the counters to the current load.
    fn track_load(&mut self) {
        let load = self.load();
        let c = self.firewall.counters_mut();
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        c.peak_tp_sessions = c.peak_tp_sessions.max(as_u64(load.tp_sessions));
        c.peak_tp_buffered_bytes = c.peak_tp_buffered_bytes.max(as_u64(load.tp_buffered_bytes));
        c.peak_queued = c.peak_queued.max(as_u64(load.queued));
    }

    fn transport(&mut self, side: Side) -> &mut Transport {
        match side {
            Side::Bms => &mut self.bms_tp,
            Side::Pile => &mut self.pile_tp,
        }
    }

    /// Judges a whole message from `from` and sends what passes on the
    /// other side.
    fn forward(&mut self, from: Side, msg: J1939Message, via_tp: bool, now: Timestamp) {
        let held = (self.firewall.holds_recognition()
            && self.firewall.is_crm_recognized(from, &msg))
        .then(|| msg.clone());
        let Ok(out) = self.firewall.admit(from, msg, now) else {
            return;
        };
        if let Some(crm) = held {
            self.held_crm = Some((crm, now));
        }
        self.send(from, out, via_tp, now);
    }

    fn send(&mut self, from: Side, msg: J1939Message, via_tp: bool, now: Timestamp) {
        match self.transport(from.other()).send(msg.clone(), now) {
            Ok(()) => {
                let c = self.firewall.counters_mut();
                match from {
                    Side::Bms => c.forwarded_bms_to_pile += 1,
                    Side::Pile => c.forwarded_pile_to_bms += 1,
                }
                if via_tp {
                    c.resegmented += 1;
                }
                self.messages.push_back((from, msg));
            }
            Err(e) => {
                // Busy with the previous long message to that node, or out of
                // sessions: GB/T repeats periodically, the next copy goes.
                debug!(side = %from, error = %e, "message dropped: transport busy");
                self.firewall.counters_mut().dropped_busy += 1;
            }
        }
    }

    /// Hands reassembled messages to the firewall until both transports
    /// are quiet.
    fn process(&mut self, now: Timestamp) {
        loop {
            let mut progressed = false;
            for side in [Side::Bms, Side::Pile] {
                while let Some(ev) = self.transport(side).poll_event() {
                    progressed = true;
                    match ev {
                        TpEvent::Received(m) => self.forward(side, m, true, now),
                        TpEvent::Sent { .. } => {}
                        TpEvent::SendAborted { .. } | TpEvent::ReceiveAborted { .. } => {
                            debug!(%side, event = ?ev, "transfer aborted");
                        }
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }
}
