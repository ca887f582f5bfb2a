//! The GB/T 27930 session observer: where the session between the BMS and
//! the pile is, seen from the side, without taking part.
//!
//! The gateway is not one of the two GB/T roles; it needs to know when a pile
//! asks to charge (to fetch a grant from the cloud), when the BMS and the
//! pile have recognised each other, and how the session ended (for the
//! session record). [`SessionObserver`] answers that from the whole messages
//! it is fed: in bridge mode the ones the firewall accepted and forwarded, in
//! single-bus mode the ones a passive [`Monitor`](crate::j1939::monitor::Monitor)
//! reassembles. Like the role state machines it is sans-IO: the shell feeds
//! messages and the time, drains [`SessionObserver::poll_event`] and wakes it
//! at [`SessionObserver::poll_timeout`].
//!
//! # Rules
//! - Only GB/T messages between the two configured nodes count: from the BMS
//!   to the pile (or global) and from the pile to the BMS (or global), each
//!   kind from the side the standard sends it. Other PGNs (authentication,
//!   anything else) and other nodes are ignored. A GB/T message that does not
//!   decode, or comes from the side that never sends its kind, is ignored
//!   and counted in [`SessionObserver::malformed`]; it does not keep a
//!   session alive either.
//! - **Start.** Between sessions only CHM, BHM or CRM start one (`Started`).
//!   Anything else is ignored: a gateway that comes up in the middle of a
//!   session has nothing to authenticate and waits for the next one.
//! - **Phase** follows the phase each message belongs to
//!   ([`phase_of`]) and only moves forward, so late repeats of an earlier
//!   phase's message (a CRM(0xAA) after BCP, CCS after BST) change nothing.
//! - **ChargeRequest** on the pile's first CRM(0x00) of a session; its
//!   periodic repeats do not repeat the event. **BmsIdentified** on the first
//!   BRM, **Recognized** on the first CRM(0xAA).
//! - **Completed** when the statistics exchange is seen: CSD, plus BSD if
//!   it comes. The BMS normally sends BSD first, and then CSD completes the
//!   session at once; a CSD seen first waits up to [`STATISTICS_GRACE`] for
//!   BSD (for the final SOC) and completes anyway. Within the grace, BSD,
//!   BEM, CEM or a start message completes it at once.
//! - **Errors**: the first BEM or CEM ends the session (`BmsError` /
//!   `ChargerError`, with the message's flags as text).
//! - **Early stop**: BST or CST before the charging phase ends the session
//!   as `StoppedBeforeCharging`. During and after charging they are the
//!   normal stop.
//! - **Silence**: no counted message for [`ObserverConfig::silence`] ends a
//!   started session (cable pulled, pile switched off).
//! - **Restart**: a CHM or CRM(0x00) once the session reached configuration
//!   or later, or a CRM naming another charger number or region than the
//!   session's first CRM, ends it as `PileRestarted` and starts a new session
//!   with the same message, so `Started` (and `ChargeRequest` for a CRM(0x00))
//!   follows at once.
//! - After `Ended` the phase is [`Phase::Idle`] (no `PhaseChanged` for it).
//!   Messages of the old session that keep coming (CSD repeats, BEM for its
//!   linger time) are ignored; only the start messages above open a new one.
//! - [`SessionEnd`] carries energy and time from CSD; without CSD the last
//!   CCS's charging time and the last BCS's SOC, so a pulled cable still
//!   leaves a useful record. BSD's SOC wins over BCS's.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tracing::debug;

use crate::gbt27930::messages::{
    BMS_ADDRESS, CHARGER_ADDRESS, ChargerNumber, Crm, Csd, Message, MessageKind, Recognition,
    RegionCode, Sender,
};
use crate::gbt27930::session::Phase;
use crate::gbt27930::timeline::phase_of;
use crate::j1939::Address;
use crate::j1939::tp::J1939Message;
use crate::time::Timestamp;

/// How long a CSD seen before any BSD waits for it: two BSD periods.
pub const STATISTICS_GRACE: Duration = Duration::from_millis(500);

/// Which two nodes make the session, and when silence ends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObserverConfig {
    pub bms: Address,
    pub pile: Address,
    /// No GB/T message for this long ends a started session (cable pulled,
    /// pile off).
    pub silence: Duration,
}

impl Default for ObserverConfig {
    /// The standard's addresses and the standard's default receive timeout.
    fn default() -> Self {
        ObserverConfig {
            bms: Address(BMS_ADDRESS),
            pile: Address(CHARGER_ADDRESS),
            silence: Duration::from_secs(5),
        }
    }
}

/// What the observer tells the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObserverEvent {
    /// First sign of a session (CHM, BHM or a first CRM).
    Started,
    /// The pile's first CRM(0x00) of this session: who it is. The gateway
    /// asks the cloud now.
    ChargeRequest {
        charger_number: u32,
        region_code: [u8; 3],
        pile: Address,
    },
    /// The BMS identified itself (BRM seen).
    BmsIdentified,
    /// CRM(0xAA) seen from the pile.
    Recognized,
    PhaseChanged(Phase),
    Ended(SessionEnd),
}

/// How a session ended and what it delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEnd {
    pub result: EndResult,
    /// From CSD (0.1 kWh -> Wh), if seen.
    pub energy_wh: Option<u32>,
    /// From CSD, else the last CCS.
    pub charging_minutes: Option<u16>,
    /// From BSD, else the last BCS.
    pub final_soc_percent: Option<u8>,
    /// The furthest phase the session got to.
    pub phase_reached: Phase,
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndResult {
    /// The statistics exchange was seen.
    Completed,
    /// The BMS sent BEM; its flags as text.
    BmsError(String),
    /// The pile sent CEM; its flags as text.
    ChargerError(String),
    /// No message for this long.
    Silence(Duration),
    /// The pile began a new session (CHM or CRM(0x00) late, another charger).
    PileRestarted,
    /// BST or CST before charging began; the stop message as text.
    StoppedBeforeCharging(String),
}

impl fmt::Display for EndResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndResult::Completed => f.write_str("completed"),
            EndResult::BmsError(m) => write!(f, "BMS error: {m}"),
            EndResult::ChargerError(m) => write!(f, "charger error: {m}"),
            EndResult::Silence(d) => write!(f, "bus silent for {:.1} s", d.as_secs_f64()),
            EndResult::PileRestarted => f.write_str("pile restarted the session"),
            EndResult::StoppedBeforeCharging(m) => write!(f, "stopped before charging: {m}"),
        }
    }
}

/// What the observer remembers about the session in progress.
#[derive(Debug)]
struct Session {
    phase: Phase,
    last_seen: Timestamp,
    /// Charger number and region from the session's first CRM.
    charger: Option<(ChargerNumber, RegionCode)>,
    charge_requested: bool,
    bms_identified: bool,
    recognized: bool,
    csd: Option<Csd>,
    /// Set when CSD came before BSD: complete at this time at the latest.
    complete_by: Option<Timestamp>,
    bsd_soc: Option<u8>,
    last_bcs_soc: Option<u8>,
    last_ccs_minutes: Option<u16>,
}

impl Session {
    fn new(now: Timestamp) -> Self {
        Session {
            phase: Phase::Idle,
            last_seen: now,
            charger: None,
            charge_requested: false,
            bms_identified: false,
            recognized: false,
            csd: None,
            complete_by: None,
            bsd_soc: None,
            last_bcs_soc: None,
            last_ccs_minutes: None,
        }
    }

    fn end(self, result: EndResult) -> SessionEnd {
        SessionEnd {
            result,
            energy_wh: self.csd.as_ref().map(|c| u32::from(c.energy.0) * 100),
            charging_minutes: self
                .csd
                .as_ref()
                .map(|c| c.charging_minutes)
                .or(self.last_ccs_minutes),
            final_soc_percent: self.bsd_soc.or(self.last_bcs_soc),
            phase_reached: self.phase,
        }
    }

    /// Whether `msg` opens a new session rather than continuing this one.
    fn restarted_by(&self, msg: &Message) -> bool {
        match msg {
            Message::Chm(_) => self.phase >= Phase::Configuration,
            Message::Crm(crm) => {
                let other_charger = self
                    .charger
                    .is_some_and(|known| known != (crm.charger_number, crm.region_code));
                other_charger
                    || (crm.recognition == Recognition::NotRecognized
                        && self.phase >= Phase::Configuration)
            }
            _ => false,
        }
    }
}

/// Watches GB/T messages between one BMS and one pile and reports the
/// session's progress. See the module docs for the rules.
#[derive(Debug)]
pub struct SessionObserver {
    config: ObserverConfig,
    session: Option<Session>,
    events: VecDeque<ObserverEvent>,
    malformed: u64,
}

impl SessionObserver {
    pub fn new(config: ObserverConfig) -> Self {
        SessionObserver {
            config,
            session: None,
            events: VecDeque::new(),
            malformed: 0,
        }
    }

    /// A whole message (single frame or reassembled TP) seen on the bus, any
    /// direction. Deadlines that passed before `now` are applied first.
    pub fn handle_message(&mut self, msg: &J1939Message, now: Timestamp) {
        self.handle_timeout(now);
        let Some(kind) = MessageKind::from_pgn(msg.pgn) else {
            return;
        };
        let Some(from) = self.sender(msg) else {
            return;
        };
        if from != kind.sender() {
            self.malformed += 1;
            debug!(%kind, source = %msg.source, "GB/T message from the side that never sends it");
            return;
        }
        match Message::decode(msg.pgn, &msg.data) {
            Ok(decoded) => self.on_message(decoded, now),
            Err(error) => {
                self.malformed += 1;
                debug!(%kind, source = %msg.source, %error, "undecodable GB/T message ignored");
            }
        }
    }

    /// Apply the silence and statistics deadlines due at `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let Some(s) = &self.session else {
            return;
        };
        if s.complete_by.is_some_and(|t| t <= now) {
            self.end(EndResult::Completed);
        } else if s.last_seen + self.config.silence <= now {
            let silent_for = now.saturating_since(s.last_seen);
            self.end(EndResult::Silence(silent_for));
        }
    }

    pub fn poll_event(&mut self) -> Option<ObserverEvent> {
        self.events.pop_front()
    }

    /// When [`SessionObserver::handle_timeout`] is next needed; `None`
    /// between sessions.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let s = self.session.as_ref()?;
        let silence = s.last_seen + self.config.silence;
        Some(s.complete_by.map_or(silence, |t| t.min(silence)))
    }

    /// The session's phase; [`Phase::Idle`] between sessions.
    pub fn phase(&self) -> Phase {
        self.session.as_ref().map_or(Phase::Idle, |s| s.phase)
    }

    /// GB/T messages between the two nodes that were ignored because they
    /// did not decode or came from the wrong side.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Which side sent `msg`, if it travels between the two nodes.
    fn sender(&self, msg: &J1939Message) -> Option<Sender> {
        let (bms, pile) = (self.config.bms, self.config.pile);
        let to = |peer: Address| msg.destination == peer || msg.destination.is_global();
        if msg.source == bms && to(pile) {
            Some(Sender::Bms)
        } else if msg.source == pile && to(bms) {
            Some(Sender::Charger)
        } else {
            None
        }
    }

    fn on_message(&mut self, msg: Message, now: Timestamp) {
        if let Some(s) = &self.session {
            let restart = s.restarted_by(&msg);
            if s.complete_by.is_some() {
                // CSD was seen: the session is complete, whatever comes now.
                match &msg {
                    Message::Bsd(bsd) => {
                        let soc = bsd.soc_percent;
                        if let Some(s) = &mut self.session {
                            s.bsd_soc = Some(soc);
                        }
                        self.end(EndResult::Completed);
                        return;
                    }
                    Message::Bem(_) | Message::Cem(_) => {
                        self.end(EndResult::Completed);
                        return;
                    }
                    m if starts_session(m) => self.end(EndResult::Completed),
                    _ => {}
                }
            } else if restart {
                self.end(EndResult::PileRestarted);
            }
        }
        if self.session.is_none() {
            if !starts_session(&msg) {
                return;
            }
            self.session = Some(Session::new(now));
            self.events.push_back(ObserverEvent::Started);
        }
        self.apply(msg, now);
    }

    /// Fold one message into the running session.
    fn apply(&mut self, msg: Message, now: Timestamp) {
        let pile = self.config.pile;
        let Some(s) = &mut self.session else {
            return;
        };
        s.last_seen = now;
        let kind = msg.kind();
        let ends = match &msg {
            Message::Bem(_) => Some(EndResult::BmsError(msg.to_string())),
            Message::Cem(_) => Some(EndResult::ChargerError(msg.to_string())),
            Message::Bst(_) | Message::Cst(_) if s.phase < Phase::Charging => {
                Some(EndResult::StoppedBeforeCharging(msg.to_string()))
            }
            _ => None,
        };
        if let Some(result) = ends {
            self.end(result);
            return;
        }
        let phase = phase_of(kind);
        if phase > s.phase {
            s.phase = phase;
            self.events.push_back(ObserverEvent::PhaseChanged(phase));
        }
        match msg {
            Message::Crm(Crm {
                recognition,
                charger_number,
                region_code,
            }) => {
                s.charger.get_or_insert((charger_number, region_code));
                match recognition {
                    Recognition::NotRecognized if !s.charge_requested => {
                        s.charge_requested = true;
                        self.events.push_back(ObserverEvent::ChargeRequest {
                            charger_number: charger_number.0,
                            region_code: region_code.0,
                            pile,
                        });
                    }
                    Recognition::Recognized if !s.recognized => {
                        s.recognized = true;
                        self.events.push_back(ObserverEvent::Recognized);
                    }
                    _ => {}
                }
            }
            Message::Brm(_) if !s.bms_identified => {
                s.bms_identified = true;
                self.events.push_back(ObserverEvent::BmsIdentified);
            }
            Message::Bcs(bcs) => s.last_bcs_soc = Some(bcs.soc_percent),
            Message::Ccs(ccs) => s.last_ccs_minutes = Some(ccs.charging_minutes),
            Message::Bsd(bsd) => s.bsd_soc = Some(bsd.soc_percent),
            Message::Csd(csd) => {
                s.csd = Some(csd);
                if s.bsd_soc.is_some() {
                    self.end(EndResult::Completed);
                } else {
                    // CSD repeats do not push the deadline out.
                    s.complete_by.get_or_insert(now + STATISTICS_GRACE);
                }
            }
            _ => {}
        }
    }

    fn end(&mut self, result: EndResult) {
        if let Some(s) = self.session.take() {
            let end = s.end(result);
            debug!(result = %end.result, phase = %end.phase_reached, "GB/T session ended");
            self.events.push_back(ObserverEvent::Ended(end));
        }
    }
}

/// The messages that open a session when none is running.
fn starts_session(msg: &Message) -> bool {
    matches!(msg, Message::Chm(_) | Message::Bhm(_) | Message::Crm(_))
}

