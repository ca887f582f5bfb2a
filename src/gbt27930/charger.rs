//! The charger (pile) role of GB/T 27930-2015, sans-IO.
//!
//! Drives the session from the charger's side: CHM → CRM(0x00) → CRM(0xAA)
//! → CTS/CML → CRO → CCS while charging → CST → CSD, with the standard's
//! periods and receive timeouts, and CEM when the BMS falls silent.
//!
//! The BMS's messages reach it through a [`PeerCheck`] (see
//! [`super::field`]). With the field profile the charger also meets two
//! deviations of BMS behaviour:
//! - **BCP only before CRM(0xAA)**: an early BCP is kept, and acted on as
//!   soon as CRM(0xAA) has gone out, as if it had been repeated;
//! - **a BMS that waits for CCS before its first BCL**: after CRO(0xAA),
//!   [`CCS_NUDGE_AFTER`] without a BCL starts CCS with the output off, so
//!   a BMS of that kind starts too. The output stays off until a BCL.

use std::collections::VecDeque;
use std::time::Duration;

use super::field::{FaultReason, Limits, PeerCheck, PeerFault};
use super::messages::*;
use super::session::{
    FailureReason, Outcome, Phase, Role, RoleCore, SessionEvent, Summary, Timeouts,
};
use super::units::{Current, DeciKwh, DeciVolt};
use crate::interop::{Deviation, Profile, Refusal};
use crate::time::Timestamp;

/// Field profile: how long after CRO(0xAA) the charger waits for a first
/// BCL before it starts CCS (output off) to wake a BMS that waits for CCS.
/// Half the BMS's 1 s CCS timeout, and long after a standard BMS's first
/// BCL (it follows CRO(0xAA) within one 50 ms period).
pub const CCS_NUDGE_AFTER: Duration = Duration::from_millis(500);

/// What the charger offers and how it behaves.
#[derive(Clone, Debug)]
pub struct ChargerConfig {
    pub version: ProtocolVersion,
    pub charger_number: ChargerNumber,
    pub region_code: RegionCode,
    pub max_output_voltage: DeciVolt,
    pub min_output_voltage: DeciVolt,
    pub max_output_current: Current,
    pub min_output_current: Current,
    /// The charger stops by itself (CST "conditions reached") after this long
    /// in the charging phase.
    pub max_charging_time: Option<Duration>,
    /// Time sync sent in CTS, in local time as the charger's RTC has it.
    pub time: Cts,
    pub timeouts: Timeouts,
    /// Keep CRM at 0x00 after BRM until [`Charger::release_recognition`] is
    /// called. This is where vehicle authentication slots in.
    pub hold_recognition: bool,
    /// How the BMS's deviations are met (see the module docs).
    pub profile: Profile,
}

impl Default for ChargerConfig {
    fn default() -> Self {
        ChargerConfig {
            version: ProtocolVersion::V1_1,
            charger_number: ChargerNumber(1),
            region_code: RegionCode(*b"000"),
            max_output_voltage: DeciVolt(7500),
            min_output_voltage: DeciVolt(2000),
            max_output_current: Current::charging(250.0),
            min_output_current: Current::charging(0.0),
            max_charging_time: None,
            time: Cts {
                second: 0,
                minute: 0,
                hour: 0,
                day: 1,
                month: 1,
                year: 2026,
            },
            timeouts: Timeouts::default(),
            hold_recognition: false,
            profile: Profile::Field,
        }
    }
}

/// Why the charger ends charging on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChargerStopReason {
    /// Conditions set by the operator (time, energy) reached.
    ConditionsReached,
    /// Stopped by hand (the stop button, an operator command).
    Manual,
    Fault,
}

#[derive(Debug)]
enum State {
    /// Sending CHM, waiting for BHM.
    Handshake,
    /// Sending CRM(0x00), waiting for BRM; then CRM(0xAA), waiting for BCP.
    Recognition {
        identified: bool,
    },
    /// Sending CTS/CML, waiting for BRO(0xAA); then CRO(0xAA), waiting for
    /// BCL. `ready_at`: when BRO(0xAA) came (the CCS nudge counts from it).
    Configuration {
        bms_ready: bool,
        ready_at: Option<Timestamp>,
    },
    /// BCL is watched by the core's deadline (1 s); BCS by `bcs_by` (5 s).
    Charging {
        started: Timestamp,
        bcs_by: Timestamp,
    },
    /// Sending CST. `bst_seen` once the BMS has stopped too; then waiting for BSD.
    Stopping {
        bst_seen: bool,
    },
    /// Sending CSD a few times so the BMS hears it, then done.
    Statistics {
        csd_left: u8,
        bsd: Bsd,
    },
    Ended,
}

/// The charger state machine.
#[derive(Debug)]
pub struct Charger {
    config: ChargerConfig,
    core: RoleCore,
    state: State,
    out: VecDeque<Message>,
    recognition_released: bool,
    /// The BMS's latest demand and the charger's output, from BCL.
    demand: Option<Bcl>,
    last_ccs_at: Option<Timestamp>,
    /// Delivered energy in joules, integrated over CCS periods.
    energy_j: f64,
    charging_since: Option<Timestamp>,
    stop: Cst,
    bms_soc_percent: u8,
    /// The BMS's identity (BRM), once received.
    bms_identity: Option<Box<Brm>>,
    started: bool,
    /// A BCP that came before CRM(0xAA) (field profile), for when it goes out.
    early_bcp: Option<Bcp>,
    /// The BMS's maxima from BCP: the output never exceeds them.
    bms_max: Option<(DeciVolt, Current)>,
    /// CCS is being sent before the first BCL (field profile).
    nudging: bool,
    /// Anything heard from the BMS since CRO(0xAA): tells a BMS that waits
    /// for CCS from a silent one when BCL times out.
    heard_since_ready: bool,
}

impl Charger {
    pub fn new(config: ChargerConfig) -> Self {
        let core = RoleCore::new(config.timeouts);
        Charger {
            config,
            core,
            state: State::Handshake,
            out: VecDeque::new(),
            recognition_released: false,
            demand: None,
            last_ccs_at: None,
            energy_j: 0.0,
            charging_since: None,
            stop: Cst::default(),
            bms_soc_percent: 0,
            bms_identity: None,
            started: false,
            early_bcp: None,
            bms_max: None,
            nudging: false,
            heard_since_ready: false,
        }
    }

    /// Begin the session: start sending CHM.
    pub fn start(&mut self, now: Timestamp) {
        if self.started {
            return;
        }
        self.started = true;
        self.core.enter(Phase::Handshake, &[MessageKind::Chm], now);
        self.core.wait_for(MessageKind::Bhm, now);
    }

    /// Allow CRM(0xAA) once the BMS has been identified (see `hold_recognition`).
    pub fn release_recognition(&mut self, now: Timestamp) {
        self.recognition_released = true;
        if let State::Recognition { identified: true } = self.state {
            // Send CRM(0xAA) at once rather than at the next 250 ms tick.
            self.core.schedule.set(&[MessageKind::Crm], now);
            self.core.wait_for(MessageKind::Bcp, now);
        }
    }

    /// The charger's own output range, against which the BMS is judged.
    fn limits(&self) -> Limits {
        Limits {
            min_voltage: Some(self.config.min_output_voltage),
            max_voltage: Some(self.config.max_output_voltage),
            max_current: Some(self.config.max_output_current),
        }
    }

    /// BCP accepted: into configuration, or refused when the BMS's maximum
    /// voltage is below what this charger can give.
    fn configure(&mut self, bcp: Bcp, now: Timestamp) -> State {
        if bcp.max_charging_voltage < self.config.min_output_voltage {
            self.core.fail_with_error(
                MessageKind::Cem,
                FailureReason::Incompatible(format!(
                    "BMS max voltage {} is below the charger's minimum {}",
                    bcp.max_charging_voltage, self.config.min_output_voltage
                )),
                now,
            );
            return State::Ended;
        }
        self.bms_max = Some((bcp.max_charging_voltage, bcp.max_charging_current));
        self.core.enter(
            Phase::Configuration,
            &[MessageKind::Cts, MessageKind::Cml],
            now,
        );
        self.core.wait_for(MessageKind::Bro, now);
        State::Configuration {
            bms_ready: false,
            ready_at: None,
        }
    }

    /// The BMS's identification (BRM), once it has been received.
    pub fn bms_identity(&self) -> Option<&Brm> {
        self.bms_identity.as_deref()
    }

    /// Stop charging from the charger's side.
    pub fn request_stop(&mut self, reason: ChargerStopReason, now: Timestamp) {
        if !matches!(self.state, State::Charging { .. }) {
            return;
        }
        match reason {
            ChargerStopReason::ConditionsReached => self.stop.conditions_reached = Bits2::SET,
            ChargerStopReason::Manual => self.stop.manual_stop = Bits2::SET,
            ChargerStopReason::Fault => self.stop.fault_stop = Bits2::SET,
        }
        self.state = self.stopping(false, now);
    }

    pub fn config(&self) -> &ChargerConfig {
        &self.config
    }

    /// Whether CRM may say 0xAA once the BMS has identified itself.
    fn recognition_allowed(&self) -> bool {
        !self.config.hold_recognition || self.recognition_released
    }

    fn recognised(&self) -> bool {
        matches!(self.state, State::Recognition { identified: true }) && self.recognition_allowed()
    }

    /// Leave charging: the output goes off, CST starts. Returns the new state.
    fn stopping(&mut self, bst_seen: bool, now: Timestamp) -> State {
        self.accumulate_energy(now);
        self.last_ccs_at = None;
        self.core.enter(Phase::Stopping, &[MessageKind::Cst], now);
        self.core.wait_for(
            if bst_seen {
                MessageKind::Bsd
            } else {
                MessageKind::Bst
            },
            now,
        );
        State::Stopping { bst_seen }
    }

    fn output(&self) -> (DeciVolt, Current) {
        match &self.demand {
            Some(bcl) => {
                let (bms_v, bms_i) = self.bms_max.unwrap_or((
                    self.config.max_output_voltage,
                    self.config.max_output_current,
                ));
                let v = bcl
                    .voltage_demand
                    .min(self.config.max_output_voltage)
                    .min(bms_v);
                // Larger raw = smaller charging current: the demand, clamped
                // to what we can give and what the BMS said it takes.
                let i = Current(
                    bcl.current_demand
                        .0
                        .max(self.config.max_output_current.0)
                        .max(bms_i.0),
                );
                (v, i)
            }
            None => (DeciVolt(0), Current::charging(0.0)),
        }
    }

    /// Integrate delivered energy up to `now` while the output is on
    /// (`last_ccs_at` is set only in the charging phase).
    fn accumulate_energy(&mut self, now: Timestamp) {
        if let Some(last) = self.last_ccs_at {
            let (v, i) = self.output();
            let dt = now.saturating_since(last).as_secs_f64();
            self.energy_j += f64::from(v.volts()) * f64::from(i.charging_amps().max(0.0)) * dt;
            self.last_ccs_at = Some(now);
        }
    }

    fn charging_minutes(&self, now: Timestamp) -> u16 {
        self.charging_since
            .map(|s| u16::try_from(now.saturating_since(s).as_secs() / 60).unwrap_or(u16::MAX))
            .unwrap_or(0)
    }

    fn energy(&self) -> DeciKwh {
        let dkwh = self.energy_j / 360_000.0;
        DeciKwh(dkwh.round().clamp(0.0, f64::from(u16::MAX)) as u16)
    }

    fn build(&mut self, kind: MessageKind, now: Timestamp) -> Option<Message> {
        let c = &self.config;
        Some(match kind {
            MessageKind::Chm => Message::Chm(Chm { version: c.version }),
            MessageKind::Crm => Message::Crm(Crm {
                recognition: if self.recognised() {
                    Recognition::Recognized
                } else {
                    Recognition::NotRecognized
                },
                charger_number: c.charger_number,
                region_code: c.region_code,
            }),
            MessageKind::Cts => Message::Cts(c.time.clone()),
            MessageKind::Cml => Message::Cml(Cml {
                max_output_voltage: c.max_output_voltage,
                min_output_voltage: c.min_output_voltage,
                max_output_current: c.max_output_current,
                min_output_current: Some(c.min_output_current),
            }),
            MessageKind::Cro => Message::Cro(Cro {
                ready: Readiness::Ready,
            }),
            MessageKind::Ccs => {
                self.accumulate_energy(now);
                let (v, i) = self.output();
                Message::Ccs(Ccs {
                    output_voltage: v,
                    output_current: i,
                    charging_minutes: self.charging_minutes(now),
                    charging_permitted: Some(Bits2::SET),
                })
            }
            MessageKind::Cst => Message::Cst(self.stop.clone()),
            MessageKind::Csd => Message::Csd(Csd {
                charging_minutes: self.charging_minutes(now),
                energy: self.energy(),
                charger_number: c.charger_number,
            }),
            MessageKind::Cem => Message::Cem(self.cem_for_failure()),
            _ => return None,
        })
    }

    /// 01 for a timeout, 10 ("unreliable") for a message that came but
    /// cannot be acted on, in the field of the message at fault.
    fn cem_for_failure(&self) -> Cem {
        match &self.core.failure {
            Some((_, FailureReason::Timeout { waiting_for }, _)) => {
                Cem::flagging(*waiting_for, Bits2::SET)
            }
            Some((_, FailureReason::Peer(fault), _)) => Cem::flagging(fault.kind, Bits2::ALT),
            Some((_, FailureReason::Incompatible(_), _)) => {
                Cem::flagging(MessageKind::Bcp, Bits2::ALT)
            }
            _ => Cem::default(),
        }
    }

    /// When the field profile starts CCS for a BMS that waits for it.
    fn nudge_at(&self) -> Option<Timestamp> {
        match self.state {
            State::Configuration {
                bms_ready: true,
                ready_at: Some(at),
            } if self.config.profile == Profile::Field && !self.nudging => {
                Some(at + CCS_NUDGE_AFTER)
            }
            _ => None,
        }
    }

    fn on_timeout_expired(&mut self, kind: MessageKind, now: Timestamp) {
        let reason = if kind == MessageKind::Bcl
            && self.config.profile.is_strict()
            && self.heard_since_ready
            && matches!(
                self.state,
                State::Configuration {
                    bms_ready: true,
                    ..
                }
            ) {
            // Strict (the field profile would have started CCS): the BMS
            // is alive but sends no BCL, the mark of a BMS waiting for CCS.
            FailureReason::Peer(PeerFault {
                kind: MessageKind::Bcl,
                reason: FaultReason::Deviation(Refusal::new(
                    Deviation::BclWaitsForCcs,
                    "no BCL within 1 s of CRO(0xAA) while the BMS kept sending; probably a BMS that waits for the first CCS",
                )),
            })
        } else {
            FailureReason::Timeout { waiting_for: kind }
        };
        match kind {
            // No CEM field exists for a missing BHM: end without one.
            MessageKind::Bhm => self.core.fail(reason),
            _ => self.core.fail_with_error(MessageKind::Cem, reason, now),
        }
        self.state = State::Ended;
    }
}

impl Role for Charger {
    fn handle_message(&mut self, msg: Message, now: Timestamp) {
        if matches!(self.state, State::Ended) || !self.started {
            return;
        }
        let was_ready = matches!(
            self.state,
            State::Configuration {
                bms_ready: true,
                ..
            }
        );
        // Errors and early stops from the BMS end the session in any phase.
        match &msg {
            Message::Bem(bem) => {
                self.core.fail(FailureReason::BmsError(bem.clone()));
                self.state = State::Ended;
                return;
            }
            Message::Bst(_)
                if matches!(
                    self.state,
                    State::Handshake | State::Recognition { .. } | State::Configuration { .. }
                ) =>
            {
                self.core.fail(FailureReason::StoppedEarly {
                    by: MessageKind::Bst,
                });
                self.state = State::Ended;
                return;
            }
            _ => {}
        }
        let state = std::mem::replace(&mut self.state, State::Ended);
        self.state = match (state, msg) {
            (State::Handshake, Message::Bhm(_)) => {
                self.core
                    .enter(Phase::Recognition, &[MessageKind::Crm], now);
                self.core.wait_for(MessageKind::Brm, now);
                State::Recognition { identified: false }
            }
            (State::Recognition { identified: false }, Message::Brm(brm)) => {
                self.bms_identity = Some(Box::new(brm));
                if !self.recognition_allowed() {
                    // Authentication decides; the BCP deadline starts on release.
                    self.core.deadline = None;
                } else {
                    // Answer with CRM(0xAA) at once.
                    self.core.schedule.set(&[MessageKind::Crm], now);
                    self.core.wait_for(MessageKind::Bcp, now);
                }
                State::Recognition { identified: true }
            }
            (State::Recognition { identified: true }, Message::Bcp(bcp))
                if self.recognition_allowed() =>
            {
                self.early_bcp = None;
                self.configure(bcp, now)
            }
            // Before CRM(0xAA): the check let it through, so the field
            // profile keeps it for when CRM(0xAA) goes out.
            (state @ State::Recognition { .. }, Message::Bcp(bcp)) => {
                self.early_bcp = Some(bcp);
                state
            }
            (
                State::Configuration {
                    bms_ready: false, ..
                },
                Message::Bro(bro),
            ) => {
                if bro.ready == Readiness::Ready {
                    self.core.schedule.set(&[MessageKind::Cro], now);
                    self.core.wait_for(MessageKind::Bcl, now);
                    self.heard_since_ready = false;
                    State::Configuration {
                        bms_ready: true,
                        ready_at: Some(now),
                    }
                } else {
                    State::Configuration {
                        bms_ready: false,
                        ready_at: None,
                    }
                }
            }
            (
                State::Configuration {
                    bms_ready: true, ..
                },
                Message::Bcl(bcl),
            ) => {
                self.nudging = false;
                self.demand = Some(bcl);
                self.charging_since = Some(now);
                self.last_ccs_at = Some(now);
                self.core.enter(Phase::Charging, &[MessageKind::Ccs], now);
                self.core.wait_for(MessageKind::Bcl, now);
                State::Charging {
                    started: now,
                    bcs_by: now + self.config.timeouts.for_kind(MessageKind::Bcs),
                }
            }
            (State::Charging { started, bcs_by }, Message::Bcl(bcl)) => {
                self.accumulate_energy(now);
                self.demand = Some(bcl);
                self.core.wait_for(MessageKind::Bcl, now);
                State::Charging { started, bcs_by }
            }
            (State::Charging { started, .. }, Message::Bcs(bcs)) => {
                self.bms_soc_percent = bcs.soc_percent;
                State::Charging {
                    started,
                    bcs_by: now + self.config.timeouts.for_kind(MessageKind::Bcs),
                }
            }
            (State::Charging { .. }, Message::Bst(_)) => {
                self.stop.bms_stopped = Bits2::SET;
                self.stopping(true, now)
            }
            (State::Stopping { bst_seen: false }, Message::Bst(_)) => {
                self.core.wait_for(MessageKind::Bsd, now);
                State::Stopping { bst_seen: true }
            }
            (State::Stopping { .. }, Message::Bsd(bsd)) => {
                self.core.deadline = None;
                self.core.enter(Phase::Statistics, &[MessageKind::Csd], now);
                State::Statistics { csd_left: 3, bsd }
            }
            (state, _) => state,
        };
        if was_ready
            && let State::Configuration {
                bms_ready: true, ..
            } = self.state
        {
            self.heard_since_ready = true;
        }
        // Send what the new state starts with now, not at the next tick.
        self.handle_timeout(now);
    }

    fn refuse(&mut self, reason: FailureReason, now: Timestamp) {
        if matches!(self.state, State::Ended) || !self.started {
            return;
        }
        self.state = State::Ended;
        let kind = match &reason {
            FailureReason::Peer(fault) => fault.kind,
            _ => {
                // No CEM field for a transport that will not carry BRM or BCP.
                self.core.fail(reason);
                return;
            }
        };
        match kind {
            MessageKind::Bcp | MessageKind::Bcl | MessageKind::Bcs | MessageKind::Brm => {
                self.core.fail_with_error(MessageKind::Cem, reason, now);
            }
            // No CEM field for BHM; a refused BEM is itself the BMS's error.
            _ => self.core.fail(reason),
        }
        self.handle_timeout(now);
    }

    fn peer_check(&self) -> PeerCheck {
        PeerCheck::for_bms(self.config.profile, Some(self.limits()))
    }

    fn handle_timeout(&mut self, now: Timestamp) {
        if !self.started || self.core.phase == Phase::Done {
            return;
        }
        if self.nudge_at().is_some_and(|at| at <= now) {
            self.nudging = true;
            self.core
                .schedule
                .set(&[MessageKind::Cro, MessageKind::Ccs], now);
        }
        if self.core.finish_error_if_due(now) {
            return;
        }
        if let Some(kind) = self.core.expired(now) {
            self.on_timeout_expired(kind, now);
        } else if let State::Charging { bcs_by, .. } = self.state
            && bcs_by <= now
        {
            self.on_timeout_expired(MessageKind::Bcs, now);
        }
        if let State::Charging { started, .. } = self.state
            && let Some(limit) = self.config.max_charging_time
            && now.saturating_since(started) >= limit
        {
            self.request_stop(ChargerStopReason::ConditionsReached, now);
        }
        for kind in self.core.schedule.due(now) {
            if let Some(msg) = self.build(kind, now) {
                self.out.push_back(msg);
            }
            if kind == MessageKind::Crm
                && self.recognised()
                && let Some(bcp) = self.early_bcp.take()
            {
                // CRM(0xAA) is out: act on the BCP the BMS sent before it.
                self.state = self.configure(bcp, now);
                break;
            }
            if kind == MessageKind::Csd
                && let State::Statistics { csd_left, bsd } = &mut self.state
            {
                *csd_left = csd_left.saturating_sub(1);
                if *csd_left == 0 {
                    let summary = Summary {
                        final_soc_percent: bsd.soc_percent,
                        charging_minutes: self.charging_minutes(now),
                        energy_decikwh: self.energy().0,
                    };
                    self.core.finish(Outcome::Completed(summary));
                    self.state = State::Ended;
                    break;
                }
            }
        }
    }

    fn poll_message(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    fn poll_event(&mut self) -> Option<SessionEvent> {
        self.core.poll_event()
    }

    fn poll_timeout(&self) -> Option<Timestamp> {
        let mut next = self.core.next_timeout();
        if let Some(t) = self.nudge_at() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if let State::Charging { started, bcs_by } = &self.state {
            let mut t = *bcs_by;
            if let Some(limit) = self.config.max_charging_time {
                t = t.min(*started + limit);
            }
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next
    }

    fn phase(&self) -> Phase {
        self.core.phase
    }
}
