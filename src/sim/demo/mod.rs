//! `bmsgw demo`: the whole system in one process, on an embedded default.
//!
//! A development PKI generated on the spot, an embedded MQTT broker with
//! mutual TLS, the reference cloud identity service, the BMS simulator, a
//! pile simulator that requires authentication, and the gateway daemon
//! itself (`service::daemon::run_on`, the code `bmsgw run` runs) in bridge
//! mode between the BMS's bus and the pile's bus. By default both buses are
//! in-process with the 250 kbit/s timing model, so nothing needs to be
//! installed; `--can IF --can-pile IF` runs the same on SocketCAN, and
//! `--can IF` alone runs the gateway in single-bus mode.
//!
//! The scenarios, in order (see [`scenarios`]):
//! (a) an online session; (b) one that needs the owner's approval; (c) one
//! with the broker stopped, charged on a voucher, whose record is uploaded
//! once the broker is back; (d) attacks that must fail: a forged grant on
//! the broker, a replayed AuthRequest, a fake pile, and frames injected
//! from the pile's side towards the BMS.
//!
//! It prints a live timeline and a summary table, and fails unless every
//! scenario behaved as expected.

mod attacker;
mod scenarios;
pub(crate) mod world;

use std::future::Future;
use std::io::Write;
use std::time::Duration;

pub use scenarios::ScenarioResult;

use super::SimError;

/// GB/T 27930's bit rate.
pub const GBT_BITRATE: u32 = 250_000;

/// The pile the demo plays (its root key is in the dev PKI).
pub const DEMO_CHARGER: u32 = 1;

#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// SocketCAN interface for the BMS side (with `can_pile`), or the one
    /// shared bus (alone).
    pub can: Option<String>,
    /// SocketCAN interface for the pile side (bridge mode).
    pub can_pile: Option<String>,
    /// Also print every GB/T message the BMS exchanges.
    pub all_messages: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("setting up: {0}")]
    Setup(String),
    #[error("--can-pile needs --can for the BMS side")]
    PileWithoutBms,
    #[error("{failed} of {total} scenarios did not behave as expected: {names}")]
    Failed {
        failed: usize,
        total: usize,
        names: String,
    },
    #[error("stopped by a signal")]
    Interrupted,
    #[error("writing output failed: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Sim(#[from] SimError),
}

/// What the demo found, scenario by scenario.
#[derive(Debug)]
pub struct DemoReport {
    pub scenarios: Vec<ScenarioResult>,
}

impl DemoReport {
    pub fn all_passed(&self) -> bool {
        self.scenarios.iter().all(|s| s.passed)
    }
}

/// Run the demo, printing to `out`.
pub async fn run(
    opts: DemoOptions,
    out: &mut (impl Write + Send),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<DemoReport, DemoError> {
    let buses = match (&opts.can, &opts.can_pile) {
        (None, None) => world::BusSet::in_process(GBT_BITRATE),
        (Some(bms), Some(pile)) => world::BusSet::socketcan_bridge(bms, pile),
        (Some(bus), None) => world::BusSet::socketcan_single(bus),
        (None, Some(_)) => return Err(DemoError::PileWithoutBms),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let play = async {
        let mut world = world::World::start(buses, opts.all_messages, out).await?;
        let results = scenarios::play_all(&mut world).await;
        world.stop().await;
        results
    };
    let report = tokio::select! {
        r = play => r?,
        () = &mut shutdown => return Err(DemoError::Interrupted),
    };
    let failed: Vec<&str> = report
        .scenarios
        .iter()
        .filter(|s| !s.passed)
        .map(|s| s.name)
        .collect();
    if failed.is_empty() {
        Ok(report)
    } else {
        Err(DemoError::Failed {
            failed: failed.len(),
            total: report.scenarios.len(),
            names: failed.join(", "),
        })
    }
}

/// Seconds with millisecond precision, for the timeline and the table.
fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}
