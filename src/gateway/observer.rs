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
//! - **Phase** follows the phase each message belongs to ([`phase_of`]),
//!   only forward and one phase at a time (the start message may open the
//!   session in recognition). A late repeat of an earlier phase's message (a
//!   CRM(0xAA) after BCP, CCS after BST) changes nothing. A message from two
//!   or more phases ahead is ignored but for keeping the session alive: after
//!   a pile restart the BMS keeps sending BCL until it times out, and that
//!   must not push the new session into charging.
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
//! - **Recognition first**: no message of a later phase counts (it keeps
//!   the session alive, nothing more) until CRM(0xAA) was seen, so a pile
//!   that plays its whole part to a BMS still in recognition (a replay, a
//!   pile the gate holds back) cannot complete a session.
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
        if s.phase != Phase::Idle && phase > step_after(s.phase) {
            // A leftover of the previous session (the BMS still sends BCL
            // after the pile restarted) or out of place: it proves the bus
            // is alive, nothing more.
            debug!(%kind, phase = %s.phase, "GB/T message ahead of the session ignored");
            return;
        }
        if phase > Phase::Recognition && !s.recognized {
            // Nothing follows recognition until the pile offered CRM(0xAA)
            // (in bridge mode: until the gate let it through). A pile, or a
            // replay of one, that runs through its later messages while the
            // BMS is still waiting must not make a session look charged and
            // completed.
            debug!(%kind, "GB/T message before recognition ignored");
            return;
        }
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

/// The phase a session can move to next; sessions advance one at a time.
fn step_after(phase: Phase) -> Phase {
    match phase {
        Phase::Idle => Phase::Handshake,
        Phase::Handshake => Phase::Recognition,
        Phase::Recognition => Phase::Configuration,
        Phase::Configuration => Phase::Charging,
        Phase::Charging => Phase::Stopping,
        Phase::Stopping | Phase::Statistics | Phase::Error | Phase::Done => Phase::Statistics,
    }
}

/// The messages that open a session when none is running.
fn starts_session(msg: &Message) -> bool {
    matches!(msg, Message::Chm(_) | Message::Bhm(_) | Message::Crm(_))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::gbt27930::bms::{Bms, BmsConfig, BmsStopReason};
    use crate::gbt27930::charger::{Charger, ChargerConfig};
    use crate::gbt27930::messages::*;
    use crate::gbt27930::node::{Node, NodeEvent};
    use crate::gbt27930::session::{Outcome, Role, SessionEvent};
    use crate::gbt27930::units::*;
    use crate::j1939::monitor::{Monitor, MonitorEvent};
    use crate::j1939::tp::TpConfig;
    use crate::j1939::{Pgn, Priority};

    const BMS: Address = Address(BMS_ADDRESS);
    const PILE: Address = Address(CHARGER_ADDRESS);

    fn charger_node(config: ChargerConfig, now: Timestamp) -> Node<Charger> {
        let mut node = Node::new(Charger::new(config), PILE, BMS, TpConfig::gbt27930());
        node.role_mut().start(now);
        node.handle_timeout(now);
        node
    }

    /// A BMS node and a charger node on one in-memory bus, with a passive
    /// monitor listening and the observer fed from it: the single-bus setup.
    struct Bus {
        charger: Node<Charger>,
        bms: Node<Bms>,
        monitor: Monitor,
        observer: SessionObserver,
        now: Timestamp,
        events: Vec<(Timestamp, ObserverEvent)>,
        /// Every GB/T message the monitor saw, in order.
        seen: Vec<(Timestamp, Message)>,
        /// The charger's frames no longer reach the bus.
        mute_charger: bool,
        /// No frame reaches anyone (cable pulled).
        cut: bool,
        charger_outcome: Option<Outcome>,
        bms_outcome: Option<Outcome>,
    }

    impl Bus {
        fn new(charger: ChargerConfig) -> Self {
            let now = Timestamp::ZERO;
            let mut bms = Node::new(
                Bms::new(BmsConfig::default()),
                BMS,
                PILE,
                TpConfig::gbt27930(),
            );
            bms.role_mut().start(now);
            bms.handle_timeout(now);
            let mut bus = Bus {
                charger: charger_node(charger, now),
                bms,
                monitor: Monitor::new(16),
                observer: SessionObserver::new(ObserverConfig::default()),
                now,
                events: Vec::new(),
                seen: Vec::new(),
                mute_charger: false,
                cut: false,
                charger_outcome: None,
                bms_outcome: None,
            };
            bus.flush();
            bus
        }

        /// Move frames, messages and events at `now` until nothing moves.
        fn flush(&mut self) {
            let now = self.now;
            loop {
                let mut moved = false;
                while let Some(f) = self.charger.poll_transmit() {
                    moved = true;
                    if !self.cut && !self.mute_charger {
                        self.bms.handle_frame(&f, now);
                        self.monitor.handle_frame(&f, now);
                    }
                }
                while let Some(f) = self.bms.poll_transmit() {
                    moved = true;
                    if !self.cut {
                        self.charger.handle_frame(&f, now);
                        self.monitor.handle_frame(&f, now);
                    }
                }
                while let Some(ev) = self.monitor.poll_event() {
                    if let MonitorEvent::Message(m) = ev {
                        moved = true;
                        if let Ok(msg) = Message::decode(m.pgn, &m.data) {
                            self.seen.push((now, msg));
                        }
                        self.observer.handle_message(&m, now);
                    }
                }
                while let Some(ev) = self.charger.poll_event() {
                    if let NodeEvent::Session(SessionEvent::Finished(o)) = ev {
                        self.charger_outcome = Some(o);
                    }
                }
                while let Some(ev) = self.bms.poll_event() {
                    if let NodeEvent::Session(SessionEvent::Finished(o)) = ev {
                        self.bms_outcome = Some(o);
                    }
                }
                while let Some(ev) = self.observer.poll_event() {
                    self.events.push((now, ev));
                }
                if !moved {
                    break;
                }
            }
        }

        /// Run until nothing has a deadline before `limit`. `tick` may act
        /// on the bus at every wake-up.
        fn run(&mut self, limit: Duration, mut tick: impl FnMut(&mut Bus)) {
            let end = Timestamp::ZERO + limit;
            loop {
                let next = [
                    self.charger.poll_timeout(),
                    self.bms.poll_timeout(),
                    self.monitor.poll_timeout(),
                    self.observer.poll_timeout(),
                ]
                .into_iter()
                .flatten()
                .min();
                let Some(next) = next.filter(|&t| t <= end) else {
                    return;
                };
                self.now = next.max(self.now);
                let now = self.now;
                tick(self);
                self.charger.handle_timeout(now);
                self.bms.handle_timeout(now);
                self.monitor.handle_timeout(now);
                self.observer.handle_timeout(now);
                self.flush();
            }
        }

        fn observed(&self) -> Vec<ObserverEvent> {
            self.events.iter().map(|(_, e)| e.clone()).collect()
        }

        fn ends(&self) -> Vec<(Timestamp, SessionEnd)> {
            self.events
                .iter()
                .filter_map(|(t, e)| match e {
                    ObserverEvent::Ended(end) => Some((*t, end.clone())),
                    _ => None,
                })
                .collect()
        }

        fn first_seen(&self, kind: MessageKind) -> Option<(Timestamp, Message)> {
            self.seen.iter().find(|(_, m)| m.kind() == kind).cloned()
        }
    }

    /// Calls `act` once, the first time the BMS has been charging for `after`.
    fn once_charging_for(after: Duration, act: impl Fn(&mut Bus)) -> impl FnMut(&mut Bus) {
        let mut since = None;
        let mut done = false;
        move |bus: &mut Bus| {
            if done || bus.bms.role().phase() != Phase::Charging {
                return;
            }
            let since = *since.get_or_insert(bus.now);
            if bus.now.saturating_since(since) >= after {
                done = true;
                act(bus);
            }
        }
    }

    fn charge_request(charger_number: u32) -> ObserverEvent {
        ObserverEvent::ChargeRequest {
            charger_number,
            region_code: *b"000",
            pile: PILE,
        }
    }

    #[test]
    fn full_session_between_nodes() {
        let mut bus = Bus::new(ChargerConfig::default());
        bus.run(
            Duration::from_secs(300),
            once_charging_for(Duration::from_secs(90), |bus| {
                let now = bus.now;
                bus.bms
                    .role_mut()
                    .request_stop(BmsStopReason::SocTarget, now);
            }),
        );
        assert!(
            bus.charger_outcome
                .as_ref()
                .is_some_and(Outcome::is_completed)
        );
        assert!(bus.bms_outcome.as_ref().is_some_and(Outcome::is_completed));
        let Some((csd_at, Message::Csd(csd))) = bus.first_seen(MessageKind::Csd) else {
            panic!("no CSD seen");
        };
        assert!(csd.energy.0 > 0, "{csd:?}");
        assert_eq!(
            bus.observed(),
            [
                ObserverEvent::Started,
                ObserverEvent::PhaseChanged(Phase::Handshake),
                ObserverEvent::PhaseChanged(Phase::Recognition),
                charge_request(1),
                ObserverEvent::BmsIdentified,
                ObserverEvent::Recognized,
                ObserverEvent::PhaseChanged(Phase::Configuration),
                ObserverEvent::PhaseChanged(Phase::Charging),
                ObserverEvent::PhaseChanged(Phase::Stopping),
                ObserverEvent::PhaseChanged(Phase::Statistics),
                ObserverEvent::Ended(SessionEnd {
                    result: EndResult::Completed,
                    energy_wh: Some(u32::from(csd.energy.0) * 100),
                    charging_minutes: Some(csd.charging_minutes),
                    final_soc_percent: Some(50),
                    phase_reached: Phase::Statistics,
                }),
            ]
        );
        assert_eq!(csd.charging_minutes, 1);
        // The session ends on the first CSD, not on a later repeat.
        assert_eq!(bus.ends()[0].0, csd_at);
        // The charge request comes with the first CRM, long before BRM.
        let (crm_at, _) = bus.first_seen(MessageKind::Crm).unwrap();
        let request_at = bus
            .events
            .iter()
            .find(|(_, e)| *e == charge_request(1))
            .unwrap()
            .0;
        assert_eq!(request_at, crm_at);
        assert_eq!(bus.observer.phase(), Phase::Idle);
        assert_eq!(bus.observer.poll_timeout(), None);
        assert_eq!(bus.observer.malformed(), 0);
    }

    #[test]
    fn bem_ends_the_session_once() {
        // The pile goes mute while charging: the BMS times out on CCS.
        let mut bus = Bus::new(ChargerConfig::default());
        bus.run(
            Duration::from_secs(60),
            once_charging_for(Duration::from_secs(2), |bus| bus.mute_charger = true),
        );
        let ends = bus.ends();
        assert_eq!(ends.len(), 1, "{:?}", bus.events);
        let (at, end) = &ends[0];
        assert_eq!(end.result, EndResult::BmsError("BEM timeout=CCS".into()));
        assert_eq!(end.phase_reached, Phase::Charging);
        assert_eq!(end.energy_wh, None);
        assert_eq!(end.final_soc_percent, Some(50));
        assert_eq!(bus.first_seen(MessageKind::Bem).map(|(t, _)| t), Some(*at));
        // BEM keeps coming for its linger time without a new session.
        let bems = bus
            .seen
            .iter()
            .filter(|(_, m)| m.kind() == MessageKind::Bem);
        assert!(bems.count() > 1);
        assert_eq!(
            bus.events.last().map(|(_, e)| e),
            Some(&ObserverEvent::Ended(end.clone()))
        );
    }

    #[test]
    fn pulled_cable_ends_the_session_by_silence() {
        let mut bus = Bus::new(ChargerConfig::default());
        bus.run(
            Duration::from_secs(60),
            once_charging_for(Duration::from_secs(2), |bus| bus.cut = true),
        );
        let last_message = bus.seen.last().unwrap().0;
        let ends = bus.ends();
        assert_eq!(ends.len(), 1, "{:?}", bus.events);
        let (at, end) = &ends[0];
        assert_eq!(*at, last_message + Duration::from_secs(5));
        assert_eq!(
            *end,
            SessionEnd {
                result: EndResult::Silence(Duration::from_secs(5)),
                energy_wh: None,
                charging_minutes: Some(0),
                final_soc_percent: Some(50),
                phase_reached: Phase::Charging,
            }
        );
        assert_eq!(bus.observer.phase(), Phase::Idle);
    }

    #[test]
    fn pile_restarting_mid_charging_ends_the_session_and_starts_another() {
        let mut bus = Bus::new(ChargerConfig::default());
        bus.run(
            Duration::from_secs(60),
            once_charging_for(Duration::from_secs(2), |bus| {
                bus.charger = charger_node(ChargerConfig::default(), bus.now);
            }),
        );
        let events = bus.observed();
        let restarted = events
            .iter()
            .position(|e| matches!(e, ObserverEvent::Ended(end) if end.result == EndResult::PileRestarted))
            .unwrap_or_else(|| panic!("{events:?}"));
        match &events[restarted] {
            ObserverEvent::Ended(end) => assert_eq!(end.phase_reached, Phase::Charging),
            _ => unreachable!(),
        }
        assert_eq!(
            events[restarted + 1..restarted + 3],
            [
                ObserverEvent::Started,
                ObserverEvent::PhaseChanged(Phase::Handshake)
            ]
        );
        // The BMS is still charging: it does not answer the new CHM and keeps
        // sending BCL, which must not carry the new session into charging,
        // until it times out on CCS and its BEM ends the new session.
        assert!(
            matches!(
                &events[restarted + 3..],
                [ObserverEvent::Ended(SessionEnd {
                    result: EndResult::BmsError(m),
                    phase_reached: Phase::Handshake,
                    ..
                })] if m == "BEM timeout=CCS"
            ),
            "{:?}",
            bus.events
        );
        let bcl_after_restart = bus
            .seen
            .iter()
            .filter(|(t, m)| *t > bus.ends()[0].0 && m.kind() == MessageKind::Bcl)
            .count();
        assert!(bcl_after_restart > 5, "{bcl_after_restart}");
    }

    #[test]
    fn repeated_crm00_asks_once() {
        // Recognition held and never released: CRM(0x00) repeats every
        // 250 ms until the BMS gives up waiting for CRM(0xAA).
        let mut bus = Bus::new(ChargerConfig {
            hold_recognition: true,
            ..ChargerConfig::default()
        });
        bus.run(Duration::from_secs(60), |_| {});
        let crm00 = bus
            .seen
            .iter()
            .filter(|(_, m)| {
                matches!(m, Message::Crm(c) if c.recognition == Recognition::NotRecognized)
            })
            .count();
        assert!(crm00 > 10, "{crm00}");
        assert_eq!(
            bus.observed(),
            [
                ObserverEvent::Started,
                ObserverEvent::PhaseChanged(Phase::Handshake),
                ObserverEvent::PhaseChanged(Phase::Recognition),
                charge_request(1),
                ObserverEvent::BmsIdentified,
                ObserverEvent::Ended(SessionEnd {
                    result: EndResult::BmsError("BEM timeout=CRMAA".into()),
                    energy_wh: None,
                    charging_minutes: None,
                    final_soc_percent: None,
                    phase_reached: Phase::Recognition,
                }),
            ]
        );
    }

    // Hand-fed messages from here on.

    fn j1939(from: Address, to: Address, msg: &Message) -> J1939Message {
        J1939Message {
            priority: msg.kind().priority(),
            pgn: msg.kind().pgn(),
            source: from,
            destination: to,
            data: msg.encode(),
        }
    }

    fn crm(recognition: Recognition, number: u32) -> Message {
        Message::Crm(Crm {
            recognition,
            charger_number: ChargerNumber(number),
            region_code: RegionCode(*b"000"),
        })
    }

    /// One message of each kind up to charging, as the two roles send them.
    fn up_to_charging() -> Vec<Message> {
        let bms = BmsConfig::default();
        vec![
            Message::Chm(Chm {
                version: ProtocolVersion::V1_1,
            }),
            Message::Bhm(Bhm {
                max_charging_voltage: DeciVolt(4200),
            }),
            crm(Recognition::NotRecognized, 1),
            Message::Brm(bms.identity),
            crm(Recognition::Recognized, 1),
            Message::Bcp(Bcp {
                max_cell_voltage: CentiVolt(420),
                max_charging_current: Current::charging(200.0),
                nominal_energy: DeciKwh(600),
                max_charging_voltage: DeciVolt(4200),
                max_temperature: Temperature::from_celsius(60),
                soc: DeciPercent(500),
                battery_voltage: DeciVolt(3600),
            }),
            Message::Cml(Cml {
                max_output_voltage: DeciVolt(7500),
                min_output_voltage: DeciVolt(2000),
                max_output_current: Current::charging(250.0),
                min_output_current: None,
            }),
            Message::Bro(Bro {
                ready: Readiness::Ready,
            }),
            Message::Cro(Cro {
                ready: Readiness::Ready,
            }),
            Message::Bcl(Bcl {
                voltage_demand: DeciVolt(4000),
                current_demand: Current::charging(100.0),
                mode: ChargeMode::ConstantCurrent,
            }),
            Message::Bcs(Bcs {
                measured_voltage: DeciVolt(3600),
                measured_current: Current::charging(100.0),
                max_cell: CellVoltage {
                    voltage: CentiVolt(375),
                    group: 1,
                },
                soc_percent: 61,
                remaining_minutes: 30,
            }),
            Message::Ccs(Ccs {
                output_voltage: DeciVolt(3600),
                output_current: Current::charging(100.0),
                charging_minutes: 12,
                charging_permitted: Some(Bits2::SET),
            }),
        ]
    }

    fn stop_messages() -> Vec<Message> {
        vec![
            Message::Bst(Bst {
                soc_target_reached: Bits2::SET,
                ..Bst::default()
            }),
            Message::Cst(Cst {
                bms_stopped: Bits2::SET,
                ..Cst::default()
            }),
        ]
    }

    fn bsd(soc_percent: u8) -> Message {
        Message::Bsd(Bsd {
            soc_percent,
            min_cell_voltage: CentiVolt(400),
            max_cell_voltage: CentiVolt(410),
            min_temperature: Temperature::from_celsius(25),
            max_temperature: Temperature::from_celsius(30),
        })
    }

    fn csd() -> Message {
        Message::Csd(Csd {
            charging_minutes: 13,
            energy: DeciKwh(123),
            charger_number: ChargerNumber(1),
        })
    }

    /// Feeds messages 100 ms apart, each from the side that sends its kind.
    struct Feed {
        observer: SessionObserver,
        now: Timestamp,
    }

    impl Feed {
        fn new() -> Self {
            Feed {
                observer: SessionObserver::new(ObserverConfig::default()),
                now: Timestamp::ZERO,
            }
        }

        fn send(&mut self, msgs: impl IntoIterator<Item = Message>) -> Vec<ObserverEvent> {
            for m in msgs {
                self.now = self.now + Duration::from_millis(100);
                let (from, to) = match m.kind().sender() {
                    Sender::Bms => (BMS, PILE),
                    Sender::Charger => (PILE, BMS),
                };
                self.observer.handle_message(&j1939(from, to, &m), self.now);
            }
            self.drain()
        }

        fn drain(&mut self) -> Vec<ObserverEvent> {
            std::iter::from_fn(|| self.observer.poll_event()).collect()
        }
    }

    /// Regression (attack suite): the pile's half of a captured session,
    /// replayed at the inlet while the gate held its CRM(0xAA) (the
    /// observer saw CRM(0x00)), walked the session phase by phase to CSD and
    /// recorded it "completed" although the BMS never left recognition.
    #[test]
    fn a_pile_running_ahead_of_recognition_completes_nothing() {
        let mut feed = Feed::new();
        let pile_only = [
            Message::Chm(Chm {
                version: ProtocolVersion::V1_1,
            }),
            crm(Recognition::NotRecognized, 1),
            Message::Cml(Cml {
                max_output_voltage: DeciVolt(7500),
                min_output_voltage: DeciVolt(2000),
                max_output_current: Current::charging(250.0),
                min_output_current: None,
            }),
            Message::Cro(Cro {
                ready: Readiness::Ready,
            }),
            Message::Ccs(Ccs {
                output_voltage: DeciVolt(3600),
                output_current: Current::charging(100.0),
                charging_minutes: 12,
                charging_permitted: Some(Bits2::SET),
            }),
            Message::Cst(Cst {
                bms_stopped: Bits2::SET,
                ..Cst::default()
            }),
            csd(),
        ];
        let mut events = feed.send(pile_only);
        feed.now = feed.now + STATISTICS_GRACE + Duration::from_millis(1);
        feed.observer.handle_timeout(feed.now);
        events.extend(feed.drain());
        assert!(
            !events.iter().any(|e| matches!(
                e,
                ObserverEvent::PhaseChanged(p) if *p > Phase::Recognition
            )),
            "{events:?}"
        );
        // CST while in recognition is an early stop, not a completion.
        let ends: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                ObserverEvent::Ended(end) => Some((&end.result, end.phase_reached)),
                _ => None,
            })
            .collect();
        assert!(
            matches!(
                ends[..],
                [(EndResult::StoppedBeforeCharging(_), Phase::Recognition)]
            ),
            "{ends:?}"
        );
    }

    #[test]
    fn crm00_after_configuration_restarts_with_a_new_charge_request() {
        let mut feed = Feed::new();
        feed.send(up_to_charging());
        assert_eq!(feed.observer.phase(), Phase::Charging);
        assert_eq!(
            feed.send([crm(Recognition::NotRecognized, 1)]),
            [
                ObserverEvent::Ended(SessionEnd {
                    result: EndResult::PileRestarted,
                    energy_wh: None,
                    charging_minutes: Some(12),
                    final_soc_percent: Some(61),
                    phase_reached: Phase::Charging,
                }),
                ObserverEvent::Started,
                ObserverEvent::PhaseChanged(Phase::Recognition),
                charge_request(1),
            ]
        );
    }

    #[test]
    fn chm_restarts_only_from_configuration_on() {
        let mut feed = Feed::new();
        let msgs = up_to_charging();
        // CHM again during recognition: a repeat, not a restart.
        feed.send(msgs[..3].iter().cloned());
        let chm = msgs[0].clone();
        assert_eq!(feed.send([chm.clone()]), []);
        feed.send(msgs[3..6].iter().cloned());
        assert_eq!(feed.observer.phase(), Phase::Configuration);
        let events = feed.send([chm]);
        assert!(
            matches!(
                &events[..],
                [
                    ObserverEvent::Ended(SessionEnd {
                        result: EndResult::PileRestarted,
                        phase_reached: Phase::Configuration,
                        ..
                    }),
                    ObserverEvent::Started,
                    ObserverEvent::PhaseChanged(Phase::Handshake),
                ]
            ),
            "{events:?}"
        );
    }

    #[test]
    fn another_charger_number_is_another_session() {
        let mut feed = Feed::new();
        feed.send(up_to_charging()[..3].iter().cloned());
        let events = feed.send([crm(Recognition::NotRecognized, 2)]);
        assert!(
            matches!(
                &events[..],
                [
                    ObserverEvent::Ended(SessionEnd {
                        result: EndResult::PileRestarted,
                        phase_reached: Phase::Recognition,
                        ..
                    }),
                    ObserverEvent::Started,
                    ObserverEvent::PhaseChanged(Phase::Recognition),
                    ObserverEvent::ChargeRequest {
                        charger_number: 2,
                        ..
                    },
                ]
            ),
            "{events:?}"
        );
    }

    #[test]
    fn late_repeats_do_not_move_the_phase_back() {
        let mut feed = Feed::new();
        feed.send(up_to_charging());
        let events = feed.send([
            crm(Recognition::Recognized, 1),
            Message::Bhm(Bhm {
                max_charging_voltage: DeciVolt(4200),
            }),
            up_to_charging()[3].clone(),
        ]);
        assert_eq!(events, []);
        assert_eq!(feed.observer.phase(), Phase::Charging);
    }

    #[test]
    fn messages_ahead_of_the_session_only_keep_it_alive() {
        let mut feed = Feed::new();
        feed.send(up_to_charging()[..1].iter().cloned());
        let bcl = up_to_charging()[9].clone();
        assert_eq!(feed.send([bcl.clone(), bcl]), []);
        assert_eq!(feed.observer.phase(), Phase::Handshake);
        assert_eq!(
            feed.observer.poll_timeout(),
            Some(feed.now + Duration::from_secs(5))
        );
    }

    #[test]
    fn stop_before_charging_ends_the_session() {
        let mut feed = Feed::new();
        feed.send(up_to_charging()[..6].iter().cloned());
        let events = feed.send([Message::Cst(Cst {
            fault_stop: Bits2::SET,
            ..Cst::default()
        })]);
        assert_eq!(
            events,
            [ObserverEvent::Ended(SessionEnd {
                result: EndResult::StoppedBeforeCharging("CST reason=fault".into()),
                energy_wh: None,
                charging_minutes: None,
                final_soc_percent: None,
                phase_reached: Phase::Configuration,
            })]
        );
    }

    #[test]
    fn cem_ends_the_session_as_charger_error() {
        let mut feed = Feed::new();
        feed.send(up_to_charging()[..4].iter().cloned());
        let events = feed.send([Message::Cem(Cem {
            bcp_timeout: Bits2::SET,
            ..Cem::default()
        })]);
        assert!(
            matches!(
                &events[..],
                [ObserverEvent::Ended(SessionEnd { result: EndResult::ChargerError(m), phase_reached: Phase::Recognition, .. })]
                    if m == "CEM timeout=BCP"
            ),
            "{events:?}"
        );
    }

    #[test]
    fn csd_before_bsd_waits_briefly_for_it() {
        let mut feed = Feed::new();
        feed.send(up_to_charging().into_iter().chain(stop_messages()));
        assert_eq!(
            feed.send([csd()]),
            [ObserverEvent::PhaseChanged(Phase::Statistics)]
        );
        let csd_at = feed.now;
        assert_eq!(
            feed.observer.poll_timeout(),
            Some(csd_at + STATISTICS_GRACE)
        );
        // A CSD repeat does not push the deadline out.
        feed.send([csd()]);
        assert_eq!(
            feed.observer.poll_timeout(),
            Some(csd_at + STATISTICS_GRACE)
        );
        let events = feed.send([bsd(95)]);
        assert_eq!(
            events,
            [ObserverEvent::Ended(SessionEnd {
                result: EndResult::Completed,
                energy_wh: Some(12_300),
                charging_minutes: Some(13),
                final_soc_percent: Some(95),
                phase_reached: Phase::Statistics,
            })]
        );
        // More statistics after the end start nothing.
        assert_eq!(feed.send([csd(), bsd(95)]), []);
        assert_eq!(feed.observer.poll_timeout(), None);
    }

    #[test]
    fn csd_without_bsd_completes_after_the_grace() {
        let mut feed = Feed::new();
        feed.send(
            up_to_charging()
                .into_iter()
                .chain(stop_messages())
                .chain([csd()]),
        );
        let deadline = feed.observer.poll_timeout().unwrap();
        feed.observer
            .handle_timeout(Timestamp::from_micros(deadline.as_micros() - 1));
        assert_eq!(feed.drain(), []);
        feed.observer.handle_timeout(deadline);
        assert_eq!(
            feed.drain(),
            [ObserverEvent::Ended(SessionEnd {
                result: EndResult::Completed,
                energy_wh: Some(12_300),
                charging_minutes: Some(13),
                final_soc_percent: Some(61),
                phase_reached: Phase::Statistics,
            })]
        );
        // The next session starts with the pile's CHM.
        let chm = up_to_charging()[0].clone();
        assert_eq!(
            feed.send([chm]),
            [
                ObserverEvent::Started,
                ObserverEvent::PhaseChanged(Phase::Handshake)
            ]
        );
    }

    #[test]
    fn only_start_messages_open_a_session() {
        let mut feed = Feed::new();
        // Joining mid-session: charging messages alone start nothing.
        assert_eq!(feed.send(up_to_charging()[9..].iter().cloned()), []);
        assert_eq!(feed.observer.poll_timeout(), None);
        assert_eq!(feed.observer.phase(), Phase::Idle);
        // A BHM does; a first CRM(0xAA) too, without a charge request.
        assert_eq!(
            feed.send([crm(Recognition::Recognized, 1)]),
            [
                ObserverEvent::Started,
                ObserverEvent::PhaseChanged(Phase::Recognition),
                ObserverEvent::Recognized,
            ]
        );
    }

    #[test]
    fn silence_is_measured_from_the_last_counted_message() {
        let mut feed = Feed::new();
        feed.send(up_to_charging()[..2].iter().cloned());
        let last = feed.now;
        assert_eq!(
            feed.observer.poll_timeout(),
            Some(last + Duration::from_secs(5))
        );
        // Traffic that does not count does not keep the session alive.
        let other = J1939Message {
            priority: Priority::new(6).unwrap(),
            pgn: Pgn::new(crate::auth::AUTH_PGN).unwrap(),
            source: PILE,
            destination: Address(0xF5),
            data: vec![1, 2, 3],
        };
        feed.observer
            .handle_message(&other, last + Duration::from_secs(1));
        // A message seen late ends the session first, and is then judged
        // on its own: a BCL starts nothing.
        let bcl = up_to_charging()[9].clone();
        feed.observer
            .handle_message(&j1939(BMS, PILE, &bcl), last + Duration::from_secs(7));
        assert_eq!(
            feed.drain(),
            [ObserverEvent::Ended(SessionEnd {
                result: EndResult::Silence(Duration::from_secs(7)),
                energy_wh: None,
                charging_minutes: None,
                final_soc_percent: None,
                phase_reached: Phase::Handshake,
            })]
        );
    }

    #[test]
    fn messages_not_between_bms_and_pile_are_ignored() {
        let mut obs = SessionObserver::new(ObserverConfig::default());
        let chm = Message::Chm(Chm {
            version: ProtocolVersion::V1_1,
        });
        let t = Timestamp::from_millis(1);
        // Another node, or the pile talking to someone else.
        obs.handle_message(&j1939(Address(0x10), BMS, &chm), t);
        obs.handle_message(&j1939(PILE, Address(0xF5), &chm), t);
        obs.handle_message(
            &j1939(
                BMS,
                BMS,
                &Message::Bhm(Bhm {
                    max_charging_voltage: DeciVolt(1),
                }),
            ),
            t,
        );
        assert_eq!(obs.poll_event(), None);
        assert_eq!(obs.malformed(), 0);
        // The right nodes, but a charger message from the BMS.
        obs.handle_message(&j1939(BMS, PILE, &chm), t);
        // A CRM that does not decode.
        let mut short = j1939(PILE, BMS, &crm(Recognition::NotRecognized, 1));
        short.data.truncate(2);
        obs.handle_message(&short, t);
        assert_eq!(obs.poll_event(), None);
        assert_eq!(obs.malformed(), 2);
        // Broadcast from the pile counts.
        obs.handle_message(&j1939(PILE, Address::GLOBAL, &chm), t);
        assert_eq!(obs.poll_event(), Some(ObserverEvent::Started));
    }

    /// One input for the property test: a message with its addressing, or a
    /// wake-up at the observer's deadline.
    #[derive(Debug, Clone)]
    enum Input {
        Message { msg: J1939Message, after_ms: u16 },
        Timeout,
    }

    fn addressed(msg: Message, route: u8) -> J1939Message {
        let natural = match msg.kind().sender() {
            Sender::Bms => (BMS, PILE),
            Sender::Charger => (PILE, BMS),
        };
        let (from, to) = match route {
            0..6 => natural,
            6 => (natural.0, Address::GLOBAL),
            7 => (natural.1, natural.0),
            _ => (Address(route), natural.1),
        };
        j1939(from, to, &msg)
    }

    fn input() -> impl Strategy<Value = Input> {
        let kinds = proptest::sample::select(MessageKind::ALL.to_vec());
        prop_oneof![
            // Plausible sessions need the same charger number most of the time.
            3 => (prop_oneof![Just(Recognition::NotRecognized), Just(Recognition::Recognized)], 1u32..3, 0u8..8, 0u16..400)
                .prop_map(|(r, n, route, after_ms)| Input::Message { msg: addressed(crm(r, n), route), after_ms }),
            6 => (any::<Message>(), 0u8..10, 0u16..3000)
                .prop_map(|(m, route, after_ms)| Input::Message { msg: addressed(m, route), after_ms }),
            1 => (kinds, proptest::collection::vec(any::<u8>(), 0..20), 0u16..1000)
                .prop_map(|(k, data, after_ms)| {
                    let (source, destination) = match k.sender() {
                        Sender::Bms => (BMS, PILE),
                        Sender::Charger => (PILE, BMS),
                    };
                    Input::Message {
                        msg: J1939Message { priority: k.priority(), pgn: k.pgn(), source, destination, data },
                        after_ms,
                    }
                }),
            1 => Just(Input::Timeout),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_traffic_keeps_the_event_stream_well_formed(
            inputs in proptest::collection::vec(input(), 0..200)
        ) {
            let mut obs = SessionObserver::new(ObserverConfig::default());
            let mut now = Timestamp::ZERO;
            let mut in_session = false;
            let mut requests = 0;
            for input in inputs {
                match input {
                    Input::Message { msg, after_ms } => {
                        now = now + Duration::from_millis(u64::from(after_ms));
                        obs.handle_message(&msg, now);
                    }
                    Input::Timeout => {
                        if let Some(t) = obs.poll_timeout() {
                            now = now.max(t);
                            obs.handle_timeout(now);
                        }
                    }
                }
                while let Some(ev) = obs.poll_event() {
                    match ev {
                        ObserverEvent::Started => {
                            prop_assert!(!in_session, "Started twice without Ended");
                            in_session = true;
                            requests = 0;
                        }
                        ObserverEvent::Ended(end) => {
                            prop_assert!(in_session, "Ended without Started");
                            prop_assert!(end.phase_reached >= Phase::Handshake && end.phase_reached <= Phase::Statistics);
                            in_session = false;
                        }
                        ObserverEvent::ChargeRequest { pile, .. } => {
                            prop_assert!(in_session);
                            prop_assert_eq!(pile, PILE);
                            requests += 1;
                            prop_assert!(requests <= 1, "two charge requests in one session");
                        }
                        _ => prop_assert!(in_session),
                    }
                }
                prop_assert_eq!(in_session, obs.phase() != Phase::Idle);
                prop_assert_eq!(in_session, obs.poll_timeout().is_some());
                if let Some(t) = obs.poll_timeout() {
                    prop_assert!(t > now, "a deadline already passed was not applied");
                }
            }
        }
    }
}
