//! The charging pile simulator: the charger role of GB/T 27930, offering a
//! configurable output, optionally stopping by itself after `duration`.

use std::future::Future;
use std::time::Duration;

use super::driver::{SimError, run_node};
use crate::can::CanBus;
use crate::gbt27930::charger::{Charger, ChargerConfig};
use crate::gbt27930::node::Node;
use crate::gbt27930::session::{Summary, Timeouts};
use crate::gbt27930::units::{Current, DeciVolt};
use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS, ChargerNumber, RegionCode};
use crate::j1939::Address;
use crate::j1939::tp::TpConfig;
use crate::time::Clock;

#[derive(Clone, Debug)]
pub struct PileSimOptions {
    pub charger_number: ChargerNumber,
    pub region_code: RegionCode,
    /// Maximum output current in amps (CML).
    pub max_current: f32,
    /// Maximum output voltage in volts (CML).
    pub max_voltage: f32,
    /// Stop by itself after this long in the charging phase.
    pub duration: Option<Duration>,
    pub address: Address,
    pub bms_address: Address,
    pub timeouts: Timeouts,
}

impl Default for PileSimOptions {
    fn default() -> Self {
        PileSimOptions {
            charger_number: ChargerNumber(1),
            region_code: RegionCode(*b"000"),
            max_current: 250.0,
            max_voltage: 750.0,
            duration: None,
            address: Address(CHARGER_ADDRESS),
            bms_address: Address(BMS_ADDRESS),
            timeouts: Timeouts::default(),
        }
    }
}

/// Play the charger side of one session on `bus`.
pub async fn run<B: CanBus>(
    bus: &mut B,
    opts: PileSimOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, SimError> {
    let clock = Clock::new();
    let config = ChargerConfig {
        charger_number: opts.charger_number,
        region_code: opts.region_code,
        max_output_current: Current::charging(opts.max_current),
        max_output_voltage: DeciVolt::from_volts(opts.max_voltage),
        max_charging_time: opts.duration,
        time: super::wallclock::now_cts(),
        timeouts: opts.timeouts,
        ..ChargerConfig::default()
    };
    let mut node = Node::new(
        Charger::new(config),
        opts.address,
        opts.bms_address,
        TpConfig::gbt27930(),
    );
    let now = clock.now();
    node.role_mut().start(now);
    node.handle_timeout(now);
    let outcome = run_node(bus, &mut node, &clock, |_, _| {}, shutdown).await?;
    SimError::check(outcome)
}
