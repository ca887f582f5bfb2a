//! A GB/T 27930 node: one role state machine on top of the J1939 transport,
//! still sans-IO. It turns CAN frames into typed messages for the role and
//! the role's messages back into frames (single frame or TP), so the async
//! shell only moves frames and sleeps until [`Node::poll_timeout`].
//!
//! Between the decoder and the role sits the role's [`PeerCheck`]: the role
//! only ever sees the standard's reading of the peer's messages, and the
//! peer's deviations (in its messages or its transport) are reported as
//! [`NodeEvent::Deviation`] and counted ([`Node::deviations`]).

use std::collections::VecDeque;

use super::codec::DecodeError;
use super::field::{PeerCheck, Verdict};
use super::messages::{Message, MessageKind};
use super::session::{FailureReason, Role, SessionEvent};
use crate::can::CanFrame;
use crate::interop::{Deviation, Refusal, SideDeviations};
use crate::j1939::tp::{J1939Message, TpConfig, TpError, TpEvent, Transport};
use crate::j1939::{Address, Pgn};
use crate::time::Timestamp;

/// What a node reports besides the frames it sends.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    Session(SessionEvent),
    /// A message from the peer that we decoded and handed to the role.
    Received(Message),
    /// A message we handed to the transport (single frame or TP started).
    Sent(Message),
    /// The peer sent bytes for a GB/T PGN that do not decode.
    Malformed {
        pgn: Pgn,
        error: DecodeError,
    },
    /// A TP transfer failed; the role's timeouts take it from here.
    TransportAborted(TpEvent),
    /// The transport was still busy with a previous long message to the
    /// peer; this period's copy was skipped and the next one will go.
    Skipped(MessageKind),
    /// A message addressed to us (or broadcast) that is not GB/T 27930, from
    /// any source: what the layer above (vehicle authentication) handles.
    Other(J1939Message),
    /// The peer showed a known deviation: accepted (field profile) or
    /// refused (strict; the session then fails with it).
    Deviation {
        deviation: Deviation,
        refused: bool,
        detail: String,
    },
    /// The peer's message could not be acted on; the session fails with it.
    Refused(super::field::PeerFault),
}

/// A role bound to its addresses and a J1939 transport.
#[derive(Debug)]
pub struct Node<R> {
    role: R,
    check: PeerCheck,
    deviations: SideDeviations,
    tp: Transport,
    local: Address,
    peer: Address,
    events: VecDeque<NodeEvent>,
}

impl<R: Role> Node<R> {
    pub fn new(role: R, local: Address, peer: Address, tp: TpConfig) -> Self {
        Node {
            check: role.peer_check(),
            deviations: SideDeviations::default(),
            role,
            tp: Transport::new(tp, local),
            local,
            peer,
            events: VecDeque::new(),
        }
    }

    pub fn role(&self) -> &R {
        &self.role
    }

    /// The peer's deviations so far, accepted and refused.
    pub fn deviations(&self) -> &SideDeviations {
        &self.deviations
    }

    /// Act on the role directly (start, stop requests); call
    /// [`Node::handle_timeout`] afterwards so its output is collected.
    pub fn role_mut(&mut self) -> &mut R {
        &mut self.role
    }

    pub fn handle_frame(&mut self, frame: &CanFrame, now: Timestamp) {
        self.tp.handle_frame(frame, now);
        self.process(now);
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.tp.handle_timeout(now);
        self.role.handle_timeout(now);
        self.process(now);
    }

    pub fn poll_transmit(&mut self) -> Option<CanFrame> {
        self.tp.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Timestamp> {
        [self.tp.poll_timeout(), self.role.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Move messages between the transport and the role until neither has
    /// anything more to say.
    fn process(&mut self, now: Timestamp) {
        loop {
            let mut progressed = false;
            while let Some(ev) = self.tp.poll_event() {
                progressed = true;
                match ev {
                    TpEvent::Received(m) => self.deliver(m, now),
                    TpEvent::Sent { .. } => {}
                    other @ (TpEvent::SendAborted { .. } | TpEvent::ReceiveAborted { .. }) => {
                        self.events.push_back(NodeEvent::TransportAborted(other));
                    }
                    TpEvent::Deviation {
                        peer,
                        deviation,
                        refused,
                        detail,
                    } if peer == self.peer => {
                        self.note_deviation(deviation, refused, detail.clone());
                        if refused {
                            let reason = FailureReason::Transport(Refusal::new(deviation, detail));
                            self.role.refuse(reason, now);
                        }
                    }
                    TpEvent::Deviation { .. } => {}
                }
            }
            while let Some(msg) = self.role.poll_message() {
                progressed = true;
                self.send(msg, now);
            }
            while let Some(ev) = self.role.poll_event() {
                progressed = true;
                // A deviation the role itself refused (a BMS that never sends
                // BCL): counted like the ones the check refused.
                if let SessionEvent::Finished(super::session::Outcome::Failed {
                    reason: FailureReason::Peer(fault),
                    ..
                }) = &ev
                    && let Some(d) = fault.reason.deviation()
                    && self.deviations.refused.get(d) == 0
                {
                    self.deviations.refused.add(d);
                }
                self.events.push_back(NodeEvent::Session(ev));
            }
            if !progressed {
                break;
            }
        }
    }

    /// Send a message that is not GB/T (single frame or TP), e.g. an
    /// authentication message, to `destination`.
    pub fn send_other(&mut self, msg: J1939Message, now: Timestamp) -> Result<(), TpError> {
        self.tp.send(msg, now)?;
        self.process(now);
        Ok(())
    }

    /// [`Self::send_other`] with [`Transport::send_replacing`]: a copy sent
    /// again replaces one whose transfer stalled.
    pub fn send_other_replacing(
        &mut self,
        msg: J1939Message,
        now: Timestamp,
    ) -> Result<(), TpError> {
        self.tp.send_replacing(msg, now)?;
        self.process(now);
        Ok(())
    }

    pub fn local(&self) -> Address {
        self.local
    }

    fn deliver(&mut self, m: J1939Message, now: Timestamp) {
        if MessageKind::from_pgn(m.pgn).is_none() {
            self.events.push_back(NodeEvent::Other(m));
            return;
        }
        // Only the peer speaks GB/T to us; anything else on the bus is not
        // part of this session.
        if m.source != self.peer {
            return;
        }
        let msg = match Message::decode(m.pgn, &m.data) {
            Ok(msg) => msg,
            Err(error) => {
                self.events
                    .push_back(NodeEvent::Malformed { pgn: m.pgn, error });
                return;
            }
        };
        let verdict = self.check.inbound(msg, m.data.len(), now);
        while let Some((deviation, detail)) = self.check.poll_deviation() {
            self.note_deviation(deviation, false, detail);
        }
        match verdict {
            Verdict::Pass(msg) => {
                self.events.push_back(NodeEvent::Received(msg.clone()));
                self.role.handle_message(msg, now);
            }
            Verdict::Drop => {}
            Verdict::Refuse(fault) => {
                if let Some(d) = fault.reason.deviation() {
                    self.deviations.refused.add(d);
                }
                self.events.push_back(NodeEvent::Refused(fault.clone()));
                self.role.refuse(FailureReason::Peer(fault), now);
            }
        }
    }

    fn note_deviation(&mut self, deviation: Deviation, refused: bool, detail: String) {
        self.deviations.add(deviation, refused);
        self.events.push_back(NodeEvent::Deviation {
            deviation,
            refused,
            detail,
        });
    }

    fn send(&mut self, msg: Message, now: Timestamp) {
        self.check.context(&msg, now);
        let kind = msg.kind();
        let out = J1939Message {
            priority: kind.priority(),
            pgn: kind.pgn(),
            source: self.local,
            destination: self.peer,
            data: msg.encode(),
        };
        match self.tp.send(out, now) {
            Ok(()) => self.events.push_back(NodeEvent::Sent(msg)),
            Err(TpError::Busy { .. }) => self.events.push_back(NodeEvent::Skipped(kind)),
            Err(e) => {
                // Our own messages are at most 1785 bytes by construction;
                // anything else is a bug worth seeing in the log.
                tracing::error!(message = %kind, error = %e, "transport refused a message");
            }
        }
    }
}
