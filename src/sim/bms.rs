//! The BMS simulator: a battery that charges from `soc_start` to `soc_end`
//! over `duration` at the requested current, then stops with BST "SOC target
//! reached" and exchanges statistics.

use std::future::Future;
use std::time::Duration;

use super::driver::{DeviationLog, OnTick, SimError, run_node};
use crate::can::CanBus;
use crate::gbt27930::bms::{BatteryState, Bms, BmsConfig, BmsStopReason};
use crate::gbt27930::node::Node;
use crate::gbt27930::session::{Phase, Role, Summary, Timeouts};
use crate::gbt27930::units::{Current, DeciPercent, DeciVolt};
use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS, CellVoltage};
use crate::interop::Profile;
use crate::j1939::Address;
use crate::j1939::tp::TpConfig;
use crate::time::{Clock, Timestamp};

/// How the simulated battery behaves.
#[derive(Clone, Debug)]
pub struct BmsSimOptions {
    /// State of charge when the session starts, in percent.
    pub soc_start: f32,
    /// State of charge at which the BMS stops, in percent.
    pub soc_end: f32,
    /// Charging current requested in BCL, in amps.
    pub current: f32,
    /// Time in the charging phase to go from `soc_start` to `soc_end`.
    pub duration: Duration,
    pub address: Address,
    pub pile_address: Address,
    /// How long to wait for a charger to appear; `None` waits for ever.
    pub charger_wait: Option<Duration>,
    pub timeouts: Timeouts,
    /// How the charger's deviations are met (see [`crate::interop`]).
    pub profile: Profile,
    /// Where the charger's deviations are left when the session ends.
    pub deviations: DeviationLog,
}

impl Default for BmsSimOptions {
    fn default() -> Self {
        BmsSimOptions {
            soc_start: 50.0,
            soc_end: 80.0,
            current: 100.0,
            duration: Duration::from_secs(10),
            address: Address(BMS_ADDRESS),
            pile_address: Address(CHARGER_ADDRESS),
            charger_wait: Some(Duration::from_secs(60)),
            timeouts: Timeouts::default(),
            profile: Profile::Field,
            deviations: DeviationLog::default(),
        }
    }
}

/// Why the options cannot describe a charge.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BmsOptionsError {
    #[error("--soc-start {0} and --soc-end {1} must satisfy 0 <= start < end <= 100")]
    Soc(f32, f32),
    #[error("--current {0} must be between 0 and 400 A")]
    Current(f32),
}

impl BmsSimOptions {
    pub fn validate(&self) -> Result<(), BmsOptionsError> {
        let ok = (0.0..=100.0).contains(&self.soc_start)
            && (0.0..=100.0).contains(&self.soc_end)
            && self.soc_start < self.soc_end;
        if !ok {
            return Err(BmsOptionsError::Soc(self.soc_start, self.soc_end));
        }
        if !(self.current > 0.0 && self.current <= 400.0) {
            return Err(BmsOptionsError::Current(self.current));
        }
        Ok(())
    }
}

/// The battery model: SOC rises linearly with time spent charging.
struct Battery {
    opts: BmsSimOptions,
    charging_since: Option<Timestamp>,
}

impl Battery {
    fn soc_at(&self, now: Timestamp) -> f32 {
        let Some(since) = self.charging_since else {
            return self.opts.soc_start;
        };
        let frac = if self.opts.duration.is_zero() {
            1.0
        } else {
            (now.saturating_since(since).as_secs_f32() / self.opts.duration.as_secs_f32()).min(1.0)
        };
        self.opts.soc_start + (self.opts.soc_end - self.opts.soc_start) * frac
    }

    fn state(&self, soc: f32, charger_current: Option<Current>) -> BatteryState {
        // A 96-cell pack: about 3.3 V/cell empty to 4.1 V/cell full.
        let cell_v = 3.3 + 0.8 * soc / 100.0;
        let pack = DeciVolt::from_volts(cell_v * 96.0);
        let cell = CellVoltage {
            voltage: crate::gbt27930::units::CentiVolt((cell_v * 100.0).round() as u16),
            group: 1,
        };
        let remaining = (self.opts.soc_end - soc).max(0.0)
            / (self.opts.soc_end - self.opts.soc_start).max(0.1)
            * self.opts.duration.as_secs_f32()
            / 60.0;
        BatteryState {
            soc: DeciPercent((soc * 10.0).round() as u16),
            voltage: pack,
            voltage_demand: DeciVolt::from_volts(4.15 * 96.0),
            current_demand: Current::charging(self.opts.current),
            measured_current: charger_current.unwrap_or(Current::charging(0.0)),
            max_cell: cell,
            min_cell_voltage: crate::gbt27930::units::CentiVolt(cell.voltage.0.saturating_sub(3)),
            remaining_minutes: remaining.ceil() as u16,
            cells: vec![cell; 8],
            ..BatteryState::default()
        }
    }
}

/// Play the BMS side of one session on `bus`.
pub async fn run<B: CanBus>(
    bus: &mut B,
    opts: BmsSimOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, SimError> {
    let clock = Clock::new();
    let config = BmsConfig {
        charger_wait: opts.charger_wait,
        timeouts: opts.timeouts,
        max_charging_current: Current::charging(opts.current.max(1.0)),
        profile: opts.profile,
        ..BmsConfig::default()
    };
    let mut battery = Battery {
        opts: opts.clone(),
        charging_since: None,
    };
    let mut bms = Bms::new(config);
    bms.set_battery(battery.state(opts.soc_start, None));
    let mut node = Node::new(
        bms,
        opts.address,
        opts.pile_address,
        TpConfig::gbt27930().with_profile(opts.profile),
    );
    let now = clock.now();
    node.role_mut().start(now);
    node.handle_timeout(now);
    let outcome = run_node(
        bus,
        &mut node,
        &clock,
        &mut OnTick(move |node: &mut Node<Bms>, now| {
            let bms = node.role_mut();
            if bms.phase() == Phase::Charging && battery.charging_since.is_none() {
                battery.charging_since = Some(now);
            }
            let soc = battery.soc_at(now);
            let current = bms.charger_output().map(|c| c.output_current);
            bms.set_battery(battery.state(soc, current));
            if bms.phase() == Phase::Charging && soc >= battery.opts.soc_end {
                bms.request_stop(BmsStopReason::SocTarget, now);
            }
        }),
        shutdown,
    )
    .await;
    opts.deviations.set(node.deviations());
    SimError::check(outcome?)
}
