//! The charging pile simulator: the charger role of GB/T 27930, offering a
//! configurable output, optionally stopping by itself after `duration`, and
//! optionally requiring vehicle authentication before CRM(0xAA).

use std::future::Future;
use std::time::Duration;

use tracing::{info, warn};

use super::driver::{DeviationLog, Hooks, SimError, run_node};
use crate::auth::{
    AUTH_PGN, AcceptedTicket, MemoryReplayStore, PileAuth, PileAuthConfig, PileAuthEvent, PileKeys,
    ReplayCache, ResultCode, SystemRng,
};
use crate::can::CanBus;
use crate::gateway::vehicle_auth::auth_priority;
use crate::gbt27930::charger::{Charger, ChargerConfig};
use crate::gbt27930::node::{Node, NodeEvent};
use crate::gbt27930::session::{Outcome, Summary, Timeouts};
use crate::gbt27930::units::{Current, DeciVolt};
use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS, ChargerNumber, RegionCode};
use crate::interop::Profile;
use crate::j1939::tp::{J1939Message, TpConfig};
use crate::j1939::{Address, Pgn};
use crate::time::{Clock, Timestamp, unix_now};

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
    /// Require vehicle authentication before CRM(0xAA).
    pub auth: Option<PileAuthSetup>,
    /// How the BMS's deviations are met (see [`crate::interop`]).
    pub profile: Profile,
    /// Where the BMS's deviations are left when the session ends.
    pub deviations: DeviationLog,
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
            auth: None,
            profile: Profile::Field,
            deviations: DeviationLog::default(),
        }
    }
}

/// What `--require-auth` sets up: the pile's keys, its policy, and where its
/// replay cache lives (in memory here; it survives a restart of the session
/// loop as long as the store handle is kept).
#[derive(Clone)]
pub struct PileAuthSetup {
    pub keys: PileKeys,
    pub config: PileAuthConfig,
    pub replay: MemoryReplayStore,
}

impl std::fmt::Debug for PileAuthSetup {
    /// Never prints the root key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PileAuthSetup")
            .field("charger_number", &self.keys.charger_number)
            .field("current_offset", &self.keys.current_offset)
            .field("previous_offset", &self.keys.previous_offset)
            .finish_non_exhaustive()
    }
}

/// Feeds authentication messages to [`PileAuth`] and releases CRM(0xAA)
/// when it accepts.
struct AuthHooks {
    auth: PileAuth,
    /// Where the AuthRequest came from: the vehicle side's address.
    vehicle: Option<Address>,
    accepted: Option<AcceptedTicket>,
    last_rejection: Option<ResultCode>,
}

impl AuthHooks {
    fn flush(&mut self, node: &mut Node<Charger>, now: Timestamp) {
        while let Some(data) = self.auth.poll_transmit() {
            let Some(dst) = self.vehicle else { continue };
            let msg = J1939Message {
                priority: auth_priority(),
                pgn: Pgn::from_const(AUTH_PGN),
                source: node.local(),
                destination: dst,
                data,
            };
            // An answer sent again replaces a copy whose transfer stalled.
            if let Err(e) = node.send_other_replacing(msg, now) {
                warn!(error = %e, "cannot send an authentication message");
            }
        }
        while let Some(ev) = self.auth.poll_event() {
            match ev {
                PileAuthEvent::Accepted(ticket) => {
                    info!(
                        voucher = ticket.voucher,
                        energy_cap_wh = ticket.energy_cap_wh,
                        // The pile's side of reconciliation: every ticket a
                        // pile accepted must reach the cloud in a record.
                        ticket = %hex::encode(ticket.ticket_id),
                        "vehicle authenticated; releasing CRM(0xAA)"
                    );
                    self.accepted = Some(ticket);
                    node.role_mut().release_recognition(now);
                    node.handle_timeout(now);
                }
                PileAuthEvent::Rejected(code) => {
                    warn!(%code, "vehicle authentication refused");
                    self.last_rejection = Some(code);
                }
            }
        }
    }
}

impl Hooks<Charger> for AuthHooks {
    fn on_tick(&mut self, node: &mut Node<Charger>, now: Timestamp) {
        self.auth.handle_timeout(now);
        self.flush(node, now);
    }

    fn on_event(&mut self, node: &mut Node<Charger>, event: &NodeEvent, now: Timestamp) {
        if let NodeEvent::Other(m) = event
            && m.pgn.raw() == AUTH_PGN
            && m.destination == node.local()
        {
            self.vehicle = Some(m.source);
            self.auth.handle_message(&m.data, now, unix_now());
            self.flush(node, now);
        }
    }

    fn poll_timeout(&self) -> Option<Timestamp> {
        self.auth.poll_timeout()
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
        hold_recognition: opts.auth.is_some(),
        profile: opts.profile,
        ..ChargerConfig::default()
    };
    let mut node = Node::new(
        Charger::new(config),
        opts.address,
        opts.bms_address,
        TpConfig::gbt27930().with_profile(opts.profile),
    );
    let log = opts.deviations.clone();
    let now = clock.now();
    node.role_mut().start(now);
    node.handle_timeout(now);
    let Some(setup) = opts.auth else {
        let outcome = run_node(
            bus,
            &mut node,
            &clock,
            &mut super::driver::NoHooks,
            shutdown,
        )
        .await;
        log.set(node.deviations());
        return SimError::check(outcome?);
    };
    let replay = ReplayCache::open(Box::new(setup.replay), setup.config.replay_capacity)
        .map_err(|e| SimError::Setup(format!("replay cache: {e}")))?;
    let mut hooks = AuthHooks {
        auth: PileAuth::new(setup.keys, setup.config, replay, Box::new(SystemRng)),
        vehicle: None,
        accepted: None,
        last_rejection: None,
    };
    let outcome = run_node(bus, &mut node, &clock, &mut hooks, shutdown).await;
    log.set(node.deviations());
    let outcome = outcome?;
    match (&outcome, &hooks.accepted) {
        (Outcome::Completed(_), Some(_)) => SimError::check(outcome),
        (Outcome::Completed(_), None) => Err(SimError::Setup(
            "session completed without authentication; this is a bug".to_string(),
        )),
        (Outcome::Failed { .. }, None) => Err(SimError::Unauthenticated {
            last_rejection: hooks.last_rejection,
            outcome,
        }),
        (Outcome::Failed { .. }, Some(_)) => SimError::check(outcome),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::auth::{Credential, RootKey};
    use crate::can::virtual_bus::VirtualBus;
    use crate::can::{BusEvent, CanFrame};
    use crate::gateway::vehicle_auth::{VehicleAuthOptions, authenticate};
    use crate::gbt27930::MessageKind;
    use crate::j1939::J1939Id;
    use crate::j1939::tp::TP_DT;
    use crate::sim::bms::{self, BmsSimOptions};

    const CHARGER: u32 = 31;

    fn root() -> RootKey {
        RootKey::from_bytes([0x24; 32])
    }

    /// A whole authenticated session on the 250 kbit/s timing model, with
    /// every frame on the bus and when it finished transmitting.
    async fn capture_session() -> Vec<(Instant, CanFrame)> {
        let bus = VirtualBus::with_timing(250_000);
        let (mut b, mut p, mut v, mut monitor) = (bus.node(), bus.node(), bus.node(), bus.node());
        let pile = PileSimOptions {
            charger_number: ChargerNumber(CHARGER),
            auth: Some(PileAuthSetup {
                keys: PileKeys {
                    root: root(),
                    charger_number: CHARGER,
                    current_offset: 0,
                    previous_offset: None,
                },
                config: PileAuthConfig::default(),
                replay: MemoryReplayStore::default(),
            }),
            ..PileSimOptions::default()
        };
        let bms_opts = BmsSimOptions {
            duration: Duration::from_millis(500),
            ..BmsSimOptions::default()
        };
        let now = unix_now();
        let credential = Credential::issue(
            &root(),
            0,
            CHARGER,
            [9; 16],
            now - 60,
            now + 600,
            0,
            false,
            &mut SystemRng,
        );
        let never = std::future::pending::<()>;
        let mut frames = Vec::new();
        let session = async {
            tokio::join!(
                bms::run(&mut b, bms_opts, never()),
                run(&mut p, pile, never()),
                authenticate(&mut v, credential, VehicleAuthOptions::default(), never()),
            )
        };
        let record = async {
            while let Ok(ev) = monitor.recv().await {
                if let BusEvent::Frame(f) = ev {
                    frames.push((Instant::now(), f));
                }
            }
        };
        let (bms, pile, vehicle) = tokio::select! {
            r = session => r,
            () = record => panic!("the monitor's bus closed"),
        };
        vehicle.expect("vehicle authenticated");
        bms.expect("BMS session completes");
        pile.expect("pile session completes");
        frames
    }

    fn id(frame: &CanFrame) -> J1939Id {
        J1939Id::from_can_id(frame.id()).expect("every frame in the session is J1939")
    }

    /// The pile sends CRM(0xAA) as soon as it accepts AuthConfirm, not at
    /// its next 250 ms CRM period: between the vehicle's last AuthConfirm
    /// packet and CRM(0xAA) there is room only for the frames the pile
    /// queued first (EndOfMsgAck, the AuthResult's first frame).
    #[tokio::test(start_paused = true)]
    async fn crm_aa_follows_the_accepted_auth_confirm_at_once() {
        let frames = capture_session().await;
        let (crm_at, crm_index) = frames
            .iter()
            .enumerate()
            .find(|(_, (_, f))| {
                id(f).pgn == MessageKind::Crm.pgn() && f.data().first() == Some(&0xAA)
            })
            .map(|(i, (t, _))| (*t, i))
            .expect("the pile sent CRM(0xAA)");
        let vehicle = Address(crate::gateway::vehicle_auth::DEFAULT_VEHICLE_ADDRESS);
        let (confirm_at, confirm_index) = frames[..crm_index]
            .iter()
            .enumerate()
            .rev()
            .find(|(_, (_, f))| id(f).pgn == TP_DT && id(f).source == vehicle)
            .map(|(i, (t, _))| (*t, i))
            .expect("the vehicle's AuthConfirm went by TP before CRM(0xAA)");
        let between = crm_index - confirm_index - 1;
        let gap = crm_at - confirm_at;
        assert!(
            between <= 3 && gap < Duration::from_millis(5),
            "CRM(0xAA) came {gap:?} and {between} frame(s) after AuthConfirm: {:#?}",
            &frames[confirm_index..=crm_index]
        );
    }
}
