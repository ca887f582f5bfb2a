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
//!
//! **Field deviations** (docs/interop.md). Each side's whole messages, once
//! admitted, go through a [`PeerCheck`] with that side's profile
//! ([`FirewallConfig::bms_profile`], [`FirewallConfig::pile_profile`]), and
//! each side's transport meets that side's TP deviations. What crosses is
//! the standard's reading: a current counted positive is turned round, a
//! BCS in one 8-byte frame goes on as the standard's 9 bytes, a BEM
//! reporting a CCS timeout before any CCS was due is dropped. A message
//! that cannot be acted on (a deviation the strict profile refuses, a
//! current sign that cannot be settled, an implausible value) is not
//! forwarded, and its sender gets the standard's error message in the
//! other node's name: CEM to the BMS, BEM to the pile, with the message's
//! field set to "unreliable" (at most one per [`ERROR_REPEAT`]). A BCP the
//! BMS sends before CRM(0xAA) has reached it is held, and sent to the pile
//! once CRM(0xAA) has ([`BCP_REPLAYS`] times at BCP's period at most, until
//! the pile moves on or the BMS repeats it): the recognition gate is what
//! delays CRM(0xAA), and the pile sees BCP where the standard puts it. None of this forwards anything the
//! firewall did not admit: the checks run after the allowlist, the rate
//! limits and the decode, and the gate still decides CRM(0xAA).
//! Deviations are counted per side ([`Bridge::deviations`]) and reported
//! ([`Bridge::poll_event`]).

use std::collections::VecDeque;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::firewall::{
    Firewall, FirewallConfig, FirewallCounters, FrameClass, Side, side_deviations,
};
use crate::can::CanFrame;
use crate::gbt27930::field::{PeerCheck, PeerFault, Verdict};
use crate::gbt27930::{Bem, Bits2, Cem, Message, MessageKind, Recognition};
use crate::interop::{Deviation, LinkDeviations};
use crate::j1939::tp::{J1939Message, TpConfig, TpEvent, Transport};
use crate::time::Timestamp;

#[cfg(test)]
mod pump_tests;
#[cfg(test)]
mod tests;

/// How long a held CRM(0xAA) stays worth releasing when the pile is
/// authenticated: two CRM periods. Older, the pile has moved on or gone.
const HELD_CRM_FRESH: Duration = Duration::from_millis(500);
/// How often the error message for a refused message may go to its sender.
pub const ERROR_REPEAT: Duration = Duration::from_millis(250);
/// The most copies of an early BCP sent to the pile: ten BCP periods
/// cover the pile's 5 s BCP timeout.
pub const BCP_REPLAYS: u8 = 10;

/// What the bridge reports besides frames and messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BridgeEvent {
    /// `side`'s peer showed a known deviation: accepted, or refused.
    Deviation {
        side: Side,
        deviation: Deviation,
        refused: bool,
        detail: String,
    },
    /// A message of `side`'s peer was refused (see the module docs).
    Refused { side: Side, reason: String },
}

/// An early BCP being sent again to the pile.
#[derive(Debug)]
struct BcpReplay {
    msg: J1939Message,
    next_at: Timestamp,
    left: u8,
}

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
    /// Judges the BMS's messages, and the pile's.
    bms_check: PeerCheck,
    pile_check: PeerCheck,
    deviations: LinkDeviations,
    events: VecDeque<BridgeEvent>,
    /// The BMS's BCP seen before CRM(0xAA) reached it (field profile).
    early_bcp: Option<J1939Message>,
    /// Whether the BMS has been sent CRM(0xAA) in this session.
    bms_recognized: bool,
    bcp_replay: Option<BcpReplay>,
    /// When each side was last sent an error message for a refusal.
    error_sent: [Option<Timestamp>; 2],
}

impl Bridge {
    pub fn new(config: FirewallConfig) -> Self {
        let bms_tp = Transport::new(
            TpConfig::gbt27930().with_profile(config.bms_profile),
            config.pile,
        );
        let pile_tp = Transport::new(
            TpConfig::gbt27930().with_profile(config.pile_profile),
            config.bms,
        );
        Bridge {
            bms_check: PeerCheck::for_bms(config.bms_profile, None),
            pile_check: PeerCheck::for_charger(config.pile_profile, None),
            firewall: Firewall::new(config),
            bms_tp,
            pile_tp,
            messages: VecDeque::new(),
            held_crm: None,
            deviations: LinkDeviations::default(),
            events: VecDeque::new(),
            early_bcp: None,
            bms_recognized: false,
            bcp_replay: None,
            error_sent: [None; 2],
        }
    }

    /// The deviations of each side since the bridge started.
    pub fn deviations(&self) -> &LinkDeviations {
        &self.deviations
    }

    /// The next deviation or refusal to report.
    pub fn poll_event(&mut self) -> Option<BridgeEvent> {
        self.events.pop_front()
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
        self.replay_bcp(now);
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
        [
            self.bms_tp.poll_timeout(),
            self.pile_tp.poll_timeout(),
            self.bcp_replay.as_ref().map(|r| r.next_at),
        ]
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
            self.send(Side::Pile, crm, false, None, now);
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
        let Some((out, decoded)) = self.judge(from, out, now) else {
            return;
        };
        if let Some(crm) = held {
            self.held_crm = Some((crm, now));
        }
        if from == Side::Bms && MessageKind::from_pgn(out.pgn) == Some(MessageKind::Bcp) {
            if self.bms_recognized {
                // The BMS sends BCP after CRM(0xAA) itself.
                self.early_bcp = None;
                self.bcp_replay = None;
            } else {
                // Before CRM(0xAA) (the check let it through: field profile):
                // kept for the pile until CRM(0xAA) has reached the BMS, so
                // the pile sees BCP where the standard puts it.
                self.early_bcp = Some(out);
                return;
            }
        }
        self.send(from, out, via_tp, decoded, now);
    }

    /// The side's [`PeerCheck`] on an admitted message: the message to
    /// forward (the standard's reading of it) with its decoded form (none
    /// for a PGN that is not GB/T), or `None`.
    fn judge(
        &mut self,
        from: Side,
        mut msg: J1939Message,
        now: Timestamp,
    ) -> Option<(J1939Message, Option<Message>)> {
        // The firewall's decode rule passed, so a GB/T PGN decodes here.
        let decoded = match Message::decode(msg.pgn, &msg.data) {
            Ok(m) => m,
            Err(_) => return Some((msg, None)),
        };
        let len = msg.data.len();
        let single_frame_bcs = decoded.kind() == MessageKind::Bcs && len == 8;
        let verdict = self.check_mut(from).inbound(decoded.clone(), len, now);
        while let Some((deviation, detail)) = self.check_mut(from).poll_deviation() {
            self.note_deviation(from, deviation, false, detail);
        }
        match verdict {
            Verdict::Pass(m) => {
                if m != decoded || single_frame_bcs {
                    // Strict in what we send: the standard's form.
                    msg.data = m.encode();
                }
                Some((msg, Some(m)))
            }
            Verdict::Drop => {
                debug!(side = %from, pgn = %msg.pgn, "message dropped as a known deviation");
                None
            }
            Verdict::Refuse(fault) => {
                self.refuse(from, &fault, now);
                None
            }
        }
    }

    /// A refused message: counted, reported, and answered with the
    /// standard's error message in the other node's name.
    fn refuse(&mut self, from: Side, fault: &PeerFault, now: Timestamp) {
        let counters = self.firewall.counters_mut();
        counters.refused += 1;
        if let Some(d) = fault.reason.deviation() {
            side_deviations(&mut self.deviations, from).add(d, true);
            self.events.push_back(BridgeEvent::Deviation {
                side: from,
                deviation: d,
                refused: true,
                detail: fault.to_string(),
            });
        }
        warn!(side = %from, %fault, "message refused");
        self.events.push_back(BridgeEvent::Refused {
            side: from,
            reason: fault.to_string(),
        });
        let slot = &mut self.error_sent[usize::from(from == Side::Pile)];
        if slot.is_some_and(|at| now.saturating_since(at) < ERROR_REPEAT) {
            return;
        }
        *slot = Some(now);
        let (kind, body) = match from {
            Side::Bms => (
                MessageKind::Cem,
                Message::Cem(Cem::flagging(fault.kind, Bits2::ALT)),
            ),
            Side::Pile => (
                MessageKind::Bem,
                Message::Bem(Bem::flagging(fault.kind, true, Bits2::ALT)),
            ),
        };
        let config = self.config();
        let error = J1939Message {
            priority: kind.priority(),
            pgn: kind.pgn(),
            source: config.address(from.other()),
            destination: config.address(from),
            data: body.encode(),
        };
        // In the other node's name, on the refused side's bus. The observer
        // does not see it: the session ends when its two nodes end it (the
        // other one times out on what was refused), with the refusal as its
        // reason, and the gate stays as the session left it meanwhile.
        if let Err(e) = self.transport(from).send(error, now) {
            debug!(side = %from, error = %e, "error message not sent");
        }
    }

    fn note_deviation(&mut self, side: Side, deviation: Deviation, refused: bool, detail: String) {
        side_deviations(&mut self.deviations, side).add(deviation, refused);
        if !refused {
            info!(%side, %deviation, "{detail}");
        }
        self.events.push_back(BridgeEvent::Deviation {
            side,
            deviation,
            refused,
            detail,
        });
    }

    fn check_mut(&mut self, side: Side) -> &mut PeerCheck {
        match side {
            Side::Bms => &mut self.bms_check,
            Side::Pile => &mut self.pile_check,
        }
    }

    /// Keeps the other side's check, and the BCP replay, in step with what
    /// crossed from `from`.
    /// `decoded` when the caller has it already, else decoded here.
    fn after_forward(
        &mut self,
        from: Side,
        msg: &J1939Message,
        decoded: Option<Message>,
        now: Timestamp,
    ) {
        let Some(decoded) = decoded.or_else(|| Message::decode(msg.pgn, &msg.data).ok()) else {
            return;
        };
        self.check_mut(from.other()).context(&decoded, now);
        match (&decoded, from) {
            (Message::Chm(_), Side::Pile) if self.bms_recognized => {
                // A new session.
                self.bms_recognized = false;
                self.early_bcp = None;
                self.bcp_replay = None;
            }
            (Message::Crm(crm), Side::Pile) => {
                if crm.recognition == Recognition::Recognized && !self.bms_recognized {
                    self.bms_recognized = true;
                    if let Some(bcp) = self.early_bcp.take() {
                        debug!("CRM(0xAA) reached the BMS: sending its early BCP to the pile");
                        self.bcp_replay = Some(BcpReplay {
                            msg: bcp,
                            next_at: now,
                            left: BCP_REPLAYS,
                        });
                    }
                } else if crm.recognition == Recognition::NotRecognized && self.bms_recognized {
                    self.bms_recognized = false;
                    self.bcp_replay = None;
                }
            }
            // The pile is in configuration: it has its BCP.
            (Message::Cml(_) | Message::Cts(_), Side::Pile) => self.bcp_replay = None,
            _ => {}
        }
    }

    fn replay_bcp(&mut self, now: Timestamp) {
        let Some(r) = self.bcp_replay.as_mut() else {
            return;
        };
        if r.next_at > now {
            return;
        }
        let msg = r.msg.clone();
        r.left = r.left.saturating_sub(1);
        r.next_at = now + MessageKind::Bcp.period();
        if r.left == 0 {
            self.bcp_replay = None;
        }
        self.firewall.counters_mut().bcp_replayed += 1;
        self.send(Side::Bms, msg, false, None, now);
    }

    fn send(
        &mut self,
        from: Side,
        msg: J1939Message,
        via_tp: bool,
        decoded: Option<Message>,
        now: Timestamp,
    ) {
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
                self.after_forward(from, &msg, decoded, now);
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
                        // Each side's transport meets that side's peer.
                        TpEvent::Deviation {
                            deviation,
                            refused,
                            detail,
                            ..
                        } => {
                            if refused {
                                self.firewall.counters_mut().refused += 1;
                                self.events.push_back(BridgeEvent::Refused {
                                    side,
                                    reason: format!(
                                        "transport: {detail} ({deviation}, strict profile)"
                                    ),
                                });
                            }
                            self.note_deviation(side, deviation, refused, detail);
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
