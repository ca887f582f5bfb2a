//! The BMS role of GB/T 27930-2015, sans-IO.
//!
//! Answers the charger: BHM → BRM → BCP → BRO → BCL/BCS/BSM while charging →
//! BST → BSD, with the standard's periods and receive timeouts, and BEM when
//! the charger falls silent. The battery itself is outside: the shell reports
//! its state with [`Bms::set_battery`] and asks for a stop with
//! [`Bms::request_stop`].
//!
//! The charger's messages reach it through a [`PeerCheck`] (see
//! [`super::field`]): a charger that counts current positive is read the
//! standard's way, and CML/CCS values that cannot be right end the session
//! with BEM.

use std::collections::VecDeque;
use std::time::Duration;

use super::field::{Limits, PeerCheck};
use super::messages::*;
use super::session::{
    FailureReason, Outcome, Phase, Role, RoleCore, SessionEvent, Summary, Timeouts,
};
use super::units::{CentiVolt, Current, DeciKwh, DeciPercent, DeciVolt, Temperature};
use crate::interop::Profile;
use crate::time::Timestamp;

/// What the BMS announces about its battery, and how it behaves.
#[derive(Clone, Debug)]
pub struct BmsConfig {
    /// Sent in BHM.
    pub max_charging_voltage: DeciVolt,
    /// Sent in BRM as is.
    pub identity: Brm,
    pub max_cell_voltage: CentiVolt,
    pub max_charging_current: Current,
    pub nominal_energy: DeciKwh,
    pub max_temperature: Temperature,
    pub timeouts: Timeouts,
    /// How long to wait for the charger's first CHM or CRM. `None` waits for
    /// ever, as a plugged-in vehicle does.
    pub charger_wait: Option<Duration>,
    /// Send BMV and BMT (every 10 s) while charging.
    pub send_cell_details: bool,
    /// How the charger's deviations are met (see [`super::field`]).
    pub profile: Profile,
}

impl Default for BmsConfig {
    fn default() -> Self {
        BmsConfig {
            max_charging_voltage: DeciVolt(4200),
            identity: Brm {
                version: ProtocolVersion::V1_1,
                battery_type: 0x03,
                rated_capacity: super::units::DeciAh(1500),
                rated_voltage: DeciVolt(3500),
                manufacturer: *b"BMSG",
                pack_serial: [0, 0, 0, 1],
                production_year: 41,
                production_month: 1,
                production_day: 1,
                charge_count: 0,
                ownership: 1,
                vin: *b"LSIMULATEDVIN0001",
                software_version: Some([1, 1, 1, 0xEA, 0x07, 0xFF, 0xFF, 0xFF]),
            },
            max_cell_voltage: CentiVolt(420),
            max_charging_current: Current::charging(200.0),
            nominal_energy: DeciKwh(600),
            max_temperature: Temperature::from_celsius(60),
            timeouts: Timeouts::default(),
            charger_wait: None,
            send_cell_details: true,
            profile: Profile::Field,
        }
    }
}

/// The battery as the BMS measures it right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatteryState {
    /// State of charge in 0.1 %.
    pub soc: DeciPercent,
    pub voltage: DeciVolt,
    pub voltage_demand: DeciVolt,
    pub current_demand: Current,
    pub mode: ChargeMode,
    pub measured_current: Current,
    pub max_cell: CellVoltage,
    pub min_cell_voltage: CentiVolt,
    pub max_temperature: Temperature,
    pub min_temperature: Temperature,
    pub remaining_minutes: u16,
    /// Cell voltages for BMV (may be empty).
    pub cells: Vec<CellVoltage>,
}

impl Default for BatteryState {
    fn default() -> Self {
        BatteryState {
            soc: DeciPercent(500),
            voltage: DeciVolt(3600),
            voltage_demand: DeciVolt(4000),
            current_demand: Current::charging(100.0),
            mode: ChargeMode::ConstantCurrent,
            measured_current: Current::charging(0.0),
            max_cell: CellVoltage {
                voltage: CentiVolt(375),
                group: 1,
            },
            min_cell_voltage: CentiVolt(370),
            max_temperature: Temperature::from_celsius(30),
            min_temperature: Temperature::from_celsius(25),
            remaining_minutes: 60,
            cells: Vec::new(),
        }
    }
}

/// Why the BMS ends charging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BmsStopReason {
    SocTarget,
    TotalVoltageReached,
    CellVoltageReached,
    Fault,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the charger's CHM (or a 2011 charger's CRM).
    Idle,
    /// Sending BHM, waiting for CRM(0x00).
    Handshake,
    /// Sending BRM, waiting for CRM(0xAA).
    Recognition,
    /// Sending BCP, waiting for CML; then BRO(0xAA), waiting for CRO(0xAA).
    Configuration {
        cml_seen: bool,
    },
    Charging,
    /// Sending BST. Once CST is heard, BST is repeated `bst_left` more times
    /// so the charger hears it, then statistics begin.
    Stopping {
        cst_seen: bool,
        bst_left: u8,
    },
    /// Sending BSD, waiting for CSD.
    Statistics,
    Ended,
}

/// How many BSTs go out after CST before switching to BSD.
const BST_AFTER_CST: u8 = 3;

/// The BMS state machine.
#[derive(Debug)]
pub struct Bms {
    config: BmsConfig,
    core: RoleCore,
    state: State,
    out: VecDeque<Message>,
    battery: BatteryState,
    stop: Bst,
    /// The charger's number and region from CRM.
    charger: Option<(ChargerNumber, RegionCode)>,
    /// The charger's latest output (CCS).
    charger_output: Option<Ccs>,
    started_at: Option<Timestamp>,
}

impl Bms {
    pub fn new(config: BmsConfig) -> Self {
        let core = RoleCore::new(config.timeouts);
        Bms {
            config,
            core,
            state: State::Idle,
            out: VecDeque::new(),
            battery: BatteryState::default(),
            stop: Bst::default(),
            charger: None,
            charger_output: None,
            started_at: None,
        }
    }

    /// Begin listening for a charger.
    pub fn start(&mut self, now: Timestamp) {
        if self.started_at.is_some() {
            return;
        }
        self.started_at = Some(now);
    }

    pub fn set_battery(&mut self, battery: BatteryState) {
        self.battery = battery;
    }

    /// The BCP this BMS sends: its charging parameters as they stand now.
    pub fn charging_parameters(&self) -> Option<Bcp> {
        match self.build(MessageKind::Bcp) {
            Some(Message::Bcp(bcp)) => Some(bcp),
            _ => None,
        }
    }

    pub fn battery(&self) -> &BatteryState {
        &self.battery
    }

    /// The charger's number and region code (from CRM), once seen.
    pub fn charger(&self) -> Option<(ChargerNumber, RegionCode)> {
        self.charger
    }

    /// The charger's latest output (from CCS).
    pub fn charger_output(&self) -> Option<&Ccs> {
        self.charger_output.as_ref()
    }

    /// Stop charging from the BMS's side.
    pub fn request_stop(&mut self, reason: BmsStopReason, now: Timestamp) {
        if self.state != State::Charging {
            return;
        }
        match reason {
            BmsStopReason::SocTarget => self.stop.soc_target_reached = Bits2::SET,
            BmsStopReason::TotalVoltageReached => self.stop.total_voltage_reached = Bits2::SET,
            BmsStopReason::CellVoltageReached => self.stop.cell_voltage_reached = Bits2::SET,
            BmsStopReason::Fault => self.stop.other_fault = Bits2::SET,
        }
        self.enter_stopping(false, now);
        self.handle_timeout(now);
    }

    fn enter_stopping(&mut self, cst_seen: bool, now: Timestamp) {
        self.state = State::Stopping {
            cst_seen,
            bst_left: BST_AFTER_CST,
        };
        self.core.enter(Phase::Stopping, &[MessageKind::Bst], now);
        if cst_seen {
            self.core.deadline = None;
        } else {
            self.core.wait_for(MessageKind::Cst, now);
        }
    }

    fn enter_statistics(&mut self, now: Timestamp) {
        self.state = State::Statistics;
        self.core.enter(Phase::Statistics, &[MessageKind::Bsd], now);
        self.core.wait_for(MessageKind::Csd, now);
    }

    fn build(&self, kind: MessageKind) -> Option<Message> {
        let c = &self.config;
        let b = &self.battery;
        Some(match kind {
            MessageKind::Bhm => Message::Bhm(Bhm {
                max_charging_voltage: c.max_charging_voltage,
            }),
            MessageKind::Brm => Message::Brm(c.identity.clone()),
            MessageKind::Bcp => Message::Bcp(Bcp {
                max_cell_voltage: c.max_cell_voltage,
                max_charging_current: c.max_charging_current,
                nominal_energy: c.nominal_energy,
                max_charging_voltage: c.max_charging_voltage,
                max_temperature: c.max_temperature,
                soc: b.soc,
                battery_voltage: b.voltage,
            }),
            MessageKind::Bro => Message::Bro(Bro {
                ready: Readiness::Ready,
            }),
            MessageKind::Bcl => Message::Bcl(Bcl {
                voltage_demand: b.voltage_demand,
                current_demand: b.current_demand,
                mode: b.mode,
            }),
            MessageKind::Bcs => Message::Bcs(Bcs {
                measured_voltage: b.voltage,
                measured_current: b.measured_current,
                max_cell: b.max_cell,
                soc_percent: soc_percent(b.soc),
                remaining_minutes: b.remaining_minutes,
            }),
            MessageKind::Bsm => Message::Bsm(Bsm {
                max_cell_voltage_index: 1,
                max_temperature: b.max_temperature,
                max_temperature_index: 1,
                min_temperature: b.min_temperature,
                min_temperature_index: 2,
                cell_voltage_status: Bits2::NORMAL,
                soc_status: Bits2::NORMAL,
                overcurrent: Bits2::NORMAL,
                over_temperature: Bits2::NORMAL,
                insulation: Bits2::NORMAL,
                connector: Bits2::NORMAL,
                charging_allowed: Bits2::SET,
            }),
            MessageKind::Bmv if !b.cells.is_empty() => Message::Bmv(Bmv {
                cells: b.cells.clone(),
            }),
            MessageKind::Bmt => Message::Bmt(Bmt {
                temperatures: vec![b.min_temperature, b.max_temperature],
            }),
            MessageKind::Bst => Message::Bst(self.stop.clone()),
            MessageKind::Bsd => Message::Bsd(Bsd {
                soc_percent: soc_percent(b.soc),
                min_cell_voltage: b.min_cell_voltage,
                max_cell_voltage: b.max_cell.voltage,
                min_temperature: b.min_temperature,
                max_temperature: b.max_temperature,
            }),
            MessageKind::Bem => Message::Bem(self.bem_for_failure()),
            _ => return None,
        })
    }

    /// 01 for a timeout, 10 ("unreliable") for a message that came but
    /// cannot be acted on.
    fn bem_for_failure(&self) -> Bem {
        let recognized = self.state == State::Recognition;
        match &self.core.failure {
            Some((_, FailureReason::Timeout { waiting_for }, _)) => {
                Bem::flagging(*waiting_for, recognized, Bits2::SET)
            }
            Some((_, FailureReason::Peer(fault), _)) => {
                Bem::flagging(fault.kind, recognized, Bits2::ALT)
            }
            _ => Bem::default(),
        }
    }

    fn on_timeout_expired(&mut self, kind: MessageKind, now: Timestamp) {
        let reason = FailureReason::Timeout { waiting_for: kind };
        if kind == MessageKind::Chm {
            // No BEM field exists for a charger that never appeared.
            self.core.fail(reason);
            self.state = State::Ended;
        } else {
            // Keep `state` so the BEM can tell CRM(0x00) from CRM(0xAA).
            self.core.fail_with_error(MessageKind::Bem, reason, now);
        }
    }
}

fn soc_percent(soc: DeciPercent) -> u8 {
    u8::try_from((soc.0 + 5) / 10).unwrap_or(u8::MAX)
}

impl Role for Bms {
    fn handle_message(&mut self, msg: Message, now: Timestamp) {
        if self.started_at.is_none() || self.state == State::Ended || self.core.failure.is_some() {
            return;
        }
        if let Message::Cem(cem) = &msg {
            self.core.fail(FailureReason::ChargerError(cem.clone()));
            self.state = State::Ended;
            return;
        }
        if let Message::Ccs(ccs) = &msg {
            self.charger_output = Some(ccs.clone());
        }
        self.state = match (self.state, msg) {
            (State::Idle, Message::Chm(_)) => {
                self.core.enter(Phase::Handshake, &[MessageKind::Bhm], now);
                self.core.wait_for(MessageKind::Crm, now);
                State::Handshake
            }
            // A 2011-edition charger skips CHM and starts with CRM(0x00).
            (State::Idle | State::Handshake, Message::Crm(crm))
                if crm.recognition == Recognition::NotRecognized =>
            {
                self.charger = Some((crm.charger_number, crm.region_code));
                self.core
                    .enter(Phase::Recognition, &[MessageKind::Brm], now);
                self.core.wait_for(MessageKind::Crm, now);
                State::Recognition
            }
            (State::Recognition, Message::Crm(crm))
                if crm.recognition == Recognition::Recognized =>
            {
                self.charger = Some((crm.charger_number, crm.region_code));
                self.core
                    .enter(Phase::Configuration, &[MessageKind::Bcp], now);
                self.core.wait_for(MessageKind::Cml, now);
                State::Configuration { cml_seen: false }
            }
            (State::Configuration { cml_seen: false }, Message::Cml(cml)) => {
                if cml.max_output_voltage
                    < self
                        .config
                        .max_charging_voltage
                        .min(self.battery.voltage_demand)
                {
                    tracing::debug!(
                        charger_max = %cml.max_output_voltage,
                        "charger cannot reach our voltage demand; continuing at its maximum"
                    );
                }
                self.core.schedule.set(&[MessageKind::Bro], now);
                self.core.wait_for(MessageKind::Cro, now);
                State::Configuration { cml_seen: true }
            }
            (State::Configuration { cml_seen: true }, Message::Cro(cro))
                if cro.ready == Readiness::Ready =>
            {
                let mut kinds = vec![MessageKind::Bcl, MessageKind::Bcs, MessageKind::Bsm];
                if self.config.send_cell_details {
                    kinds.extend([MessageKind::Bmv, MessageKind::Bmt]);
                }
                self.core.enter(Phase::Charging, &kinds, now);
                self.core.wait_for(MessageKind::Ccs, now);
                State::Charging
            }
            (State::Charging, Message::Ccs(_)) => {
                self.core.wait_for(MessageKind::Ccs, now);
                State::Charging
            }
            (State::Charging, Message::Cst(_)) => {
                self.stop.charger_stopped = Bits2::SET;
                self.enter_stopping(true, now);
                self.state
            }
            (
                State::Stopping {
                    cst_seen: false,
                    bst_left,
                },
                Message::Cst(_),
            ) => {
                self.core.deadline = None;
                State::Stopping {
                    cst_seen: true,
                    bst_left,
                }
            }
            (State::Statistics, Message::Csd(csd)) => {
                let summary = Summary {
                    final_soc_percent: soc_percent(self.battery.soc),
                    charging_minutes: csd.charging_minutes,
                    energy_decikwh: csd.energy.0,
                };
                self.core.finish(Outcome::Completed(summary));
                State::Ended
            }
            (
                State::Handshake | State::Recognition | State::Configuration { .. },
                Message::Cst(_),
            ) => {
                self.core.fail(FailureReason::StoppedEarly {
                    by: MessageKind::Cst,
                });
                State::Ended
            }
            (state, _) => state,
        };
        // Send what the new state starts with now, not at the next tick.
        self.handle_timeout(now);
    }

    fn refuse(&mut self, reason: FailureReason, now: Timestamp) {
        if self.started_at.is_none() || self.state == State::Ended || self.core.failure.is_some() {
            return;
        }
        match &reason {
            FailureReason::Peer(fault)
                if matches!(fault.kind, MessageKind::Cml | MessageKind::Ccs) =>
            {
                self.core.fail_with_error(MessageKind::Bem, reason, now);
                self.handle_timeout(now);
            }
            _ => {
                self.core.fail(reason);
                self.state = State::Ended;
            }
        }
    }

    fn peer_check(&self) -> PeerCheck {
        PeerCheck::for_charger(
            self.config.profile,
            Some(Limits {
                min_voltage: None,
                max_voltage: Some(self.config.max_charging_voltage),
                max_current: Some(self.config.max_charging_current),
            }),
        )
    }

    fn handle_timeout(&mut self, now: Timestamp) {
        let Some(started) = self.started_at else {
            return;
        };
        if self.core.phase == Phase::Done || self.core.finish_error_if_due(now) {
            self.state = State::Ended;
            return;
        }
        if self.state == State::Idle
            && let Some(wait) = self.config.charger_wait
            && now.saturating_since(started) >= wait
        {
            self.on_timeout_expired(MessageKind::Chm, now);
            return;
        }
        if let Some(kind) = self.core.expired(now) {
            self.on_timeout_expired(kind, now);
        }
        // Entering statistics schedules BSD for `now`; the outer loop sends
        // it at once rather than at the next wake-up.
        'schedule: loop {
            let due = self.core.schedule.due(now);
            if due.is_empty() {
                break;
            }
            for kind in due {
                if let Some(msg) = self.build(kind) {
                    self.out.push_back(msg);
                }
                if kind == MessageKind::Bst
                    && let State::Stopping {
                        cst_seen: true,
                        bst_left,
                    } = &mut self.state
                {
                    *bst_left = bst_left.saturating_sub(1);
                    if *bst_left == 0 {
                        self.enter_statistics(now);
                        continue 'schedule;
                    }
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
        if self.state == State::Idle
            && let (Some(started), Some(wait)) = (self.started_at, self.config.charger_wait)
        {
            let t = started + wait;
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next
    }

    fn phase(&self) -> Phase {
        self.core.phase
    }
}
