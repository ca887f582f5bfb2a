//! The fault suite's rig: the gateway daemon (`service::daemon::run_on`,
//! the code of `bmsgw run`) in bridge mode between two in-process buses
//! with the 250 kbit/s timing model, the BMS and pile simulators (the pile
//! requires authentication), a dev PKI, and a ledger read from the daemon's
//! own store after it stopped.
//!
//! Every bus node, the daemon's included, goes through
//! [`FaultyBus`](bmsgw::can::fault::FaultyBus), fault-free unless a test
//! asks for faults.

#![allow(dead_code)] // each test file uses a part

use std::collections::BTreeSet;
use std::time::Duration;

use bmsgw::auth::{
    Credential, MemoryReplayStore, PileAuthConfig, PileKeys, Rng, RootKey, SystemRng, VoucherWallet,
};
use bmsgw::can::fault::{FaultConfig, FaultyBus};
use bmsgw::can::virtual_bus::{VirtualBus, VirtualNode};
use bmsgw::cloud::messages::{CredentialKind, Event, Payload, SessionRecord};
use bmsgw::gateway::orchestrator::Notice;
use bmsgw::gbt27930::session::Summary;
use bmsgw::gbt27930::{ChargerNumber, RegionCode};
use bmsgw::service::config::{CanInterfaces, Config};
use bmsgw::service::daemon::{Buses, DaemonError, SpawnError, Spawned};
use bmsgw::sim::SimError;
use bmsgw::sim::bms::{self, BmsSimOptions};
use bmsgw::sim::pile::{self, PileAuthSetup, PileSimOptions};
use bmsgw::sim::pki::{DevPki, DevPkiOptions, GatewayTomlOptions};
use bmsgw::store::{OutboxPolicy, Store};
use bmsgw::time::{Timestamp, unix_now};
use tokio::sync::mpsc;

pub const BITRATE: u32 = 250_000;
pub const CHARGER: u32 = 1;

pub type Node = FaultyBus<VirtualNode>;
pub type SimResult = Result<Summary, SimError>;

pub fn no_faults() -> FaultConfig {
    FaultConfig {
        loss_ppm: 0,
        corruption_ppm: 0,
        seed: 0,
    }
}

pub struct Rig {
    _dir: tempfile::TempDir,
    pub pki: DevPki,
    pub config: Config,
    pub bms: VirtualBus,
    pub pile: VirtualBus,
    notices_tx: mpsc::UnboundedSender<(Timestamp, Notice)>,
    pub notices: mpsc::UnboundedReceiver<(Timestamp, Notice)>,
    daemon: Option<Spawned>,
    /// Ticket ids of the vouchers put in the wallet.
    pub issued: BTreeSet<[u8; 12]>,
    /// The pile's replay cache, kept across sessions as a real pile's is.
    pub replay: MemoryReplayStore,
}

impl Rig {
    /// A rig whose daemon talks to a broker on `broker_port`, or has its
    /// cloud link disabled (vouchers only) with `None`.
    pub fn new(broker_port: Option<u16>) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = DevPki::generate(&DevPkiOptions::new(dir.path().join("pki"))).expect("dev PKI");
        let state = dir.path().join("state");
        let path = pki
            .write_gateway_toml(
                "veh-a",
                &GatewayTomlOptions {
                    broker_port: broker_port.unwrap_or(1),
                    can: CanInterfaces::Bridge {
                        bms: "fault-bms".into(),
                        pile: "fault-pile".into(),
                    },
                    state_dir: state.clone(),
                    control_socket: state.join("control.sock"),
                    request_timeout: Duration::from_secs(2),
                },
            )
            .expect("gateway config");
        let mut config = Config::load_with_env(&path, std::iter::empty()).expect("config loads");
        config.cloud.enabled = broker_port.is_some();
        config.cloud.reconnect_min = Duration::from_millis(500);
        config.cloud.reconnect_max = Duration::from_secs(1);
        config.cloud.keep_alive = Duration::from_secs(5);
        let (notices_tx, notices) = mpsc::unbounded_channel();
        Rig {
            _dir: dir,
            pki,
            config,
            bms: VirtualBus::with_timing(BITRATE),
            pile: VirtualBus::with_timing(BITRATE),
            notices_tx,
            notices,
            daemon: None,
            issued: BTreeSet::new(),
            replay: MemoryReplayStore::default(),
        }
    }

    fn root_key(&self) -> RootKey {
        let key = bmsgw::service::keyfile::load_key(&self.pki.pile_root_key(CHARGER))
            .expect("pile root key");
        RootKey::from_bytes(*key)
    }

    fn wallet_key(&self) -> zeroize::Zeroizing<[u8; 32]> {
        let path = &self.config.store.wallet_key;
        if !path.exists() {
            let mut key = [0u8; 32];
            SystemRng.fill(&mut key);
            bmsgw::service::keyfile::write_key(path, &key).expect("wallet key");
        }
        bmsgw::service::keyfile::load_key(path).expect("wallet key loads")
    }

    /// Put `n` vouchers for the pile into the daemon's wallet, as a grant
    /// or a ticket import would. Only while the daemon is stopped (the
    /// store is locked while it runs).
    pub fn add_vouchers(&mut self, n: usize) {
        assert!(self.daemon.is_none(), "stop the daemon first");
        let store = Store::open(&self.config.store.path).expect("store opens");
        let mut wallet = store.wallet(self.wallet_key()).expect("wallet");
        let root = self.root_key();
        let now = unix_now();
        for _ in 0..n {
            let mut pseudonym = [0u8; 16];
            SystemRng.fill(&mut pseudonym);
            let v = Credential::issue(
                &root,
                0,
                CHARGER,
                pseudonym,
                now - 60,
                now + 86_400,
                100_000,
                true,
                &mut SystemRng,
            );
            self.issued.insert(v.ticket_id());
            wallet.add(v).expect("voucher added");
        }
    }

    /// Start the daemon on fresh nodes of both buses, with `faults` on its
    /// receive paths (both sides; the pile side's stream is derived from
    /// the seed).
    pub fn start_daemon(&mut self, faults: FaultConfig) {
        let bms = FaultyBus::new(self.bms.node(), faults);
        let pile = FaultyBus::new(
            self.pile.node(),
            FaultConfig {
                seed: faults.seed ^ 0xD1A6,
                ..faults
            },
        );
        self.start_daemon_on(bms, pile);
    }

    /// Start the daemon on the given nodes of the BMS's and the pile's bus.
    pub fn start_daemon_on(&mut self, bms: Node, pile: Node) {
        assert!(self.daemon.is_none(), "already running");
        let buses = Buses::Bridge { bms, pile };
        self.daemon = Some(Spawned::start(
            self.config.clone(),
            buses,
            Some(self.notices_tx.clone()),
        ));
    }

    /// Waits until the daemon is ready (READY, as systemd would see it).
    pub async fn daemon_ready(&mut self) -> Result<(), SpawnError> {
        match self.daemon.as_mut() {
            Some(d) => d.ready(Duration::from_secs(20)).await,
            None => Err(SpawnError::Stopped),
        }
    }

    /// Stop the daemon as SIGTERM does; its result.
    pub async fn stop_daemon(&mut self) -> Result<(), DaemonError> {
        let Some(d) = self.daemon.take() else {
            return Ok(());
        };
        d.stop().await
    }

    /// Kill the daemon as `kill -9` would, as far as one process can:
    /// its task is aborted at whatever await it was in, with no shutdown
    /// path run. (A real `kill -9` is in the VM lane.)
    pub async fn abort_daemon(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.abort().await;
        }
    }

    pub fn daemon_finished(&self) -> bool {
        self.daemon.as_ref().is_none_or(Spawned::finished)
    }

    pub fn pile_options(&self) -> PileSimOptions {
        PileSimOptions {
            charger_number: ChargerNumber(CHARGER),
            region_code: RegionCode(*b"310"),
            auth: Some(PileAuthSetup {
                keys: PileKeys {
                    root: RootKey::from_bytes(
                        *bmsgw::service::keyfile::load_key(&self.pki.pile_root_key(CHARGER))
                            .expect("pile root key"),
                    ),
                    charger_number: CHARGER,
                    current_offset: 0,
                    previous_offset: None,
                },
                config: PileAuthConfig::default(),
                replay: self.replay.clone(),
            }),
            ..PileSimOptions::default()
        }
    }

    /// Run the BMS and the pile simulator to their ends, on fresh nodes
    /// with `faults` (each its own stream).
    pub async fn session(
        &self,
        faults: FaultConfig,
        bms_opts: BmsSimOptions,
        pile_opts: PileSimOptions,
    ) -> (SimResult, SimResult) {
        let mut b = FaultyBus::new(
            self.bms.node(),
            FaultConfig {
                seed: faults.seed ^ 0xB0B,
                ..faults
            },
        );
        let mut p = FaultyBus::new(
            self.pile.node(),
            FaultConfig {
                seed: faults.seed ^ 0x9113,
                ..faults
            },
        );
        let never = std::future::pending::<()>;
        tokio::join!(
            bms::run(&mut b, bms_opts, never()),
            pile::run(&mut p, pile_opts, never()),
        )
    }

    /// The next `SessionEnded` notice within `within`, skipping others.
    pub async fn session_ended(&mut self, within: Duration) -> Option<(String, bool)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.notices.recv()).await {
                Ok(Some((
                    _,
                    Notice::SessionEnded {
                        result, recorded, ..
                    },
                ))) => return Some((result, recorded)),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Drain the notices seen so far.
    pub fn drain_notices(&mut self) -> Vec<Notice> {
        let mut out = Vec::new();
        while let Ok((_, n)) = self.notices.try_recv() {
            out.push(n);
        }
        out
    }

    /// What the daemon's store holds (the daemon must be stopped).
    pub fn ledger(&self) -> Ledger {
        assert!(self.daemon.is_none(), "stop the daemon first");
        let store = Store::open(&self.config.store.path).expect("store opens");
        let wallet = store.wallet(self.wallet_key()).expect("wallet");
        let remaining = wallet.remaining_for(CHARGER, unix_now());
        let entries = store
            .outbox(OutboxPolicy::default())
            .pending(10_000)
            .expect("outbox readable");
        let records = entries
            .iter()
            .filter_map(|e| match Event::decode(&e.payload) {
                Ok(Event::SessionRecord(r)) => Some(r),
                Err(_) => None,
            })
            .collect();
        Ledger { remaining, records }
    }
}

/// The daemon's view after a run: vouchers left and records queued.
#[derive(Debug)]
pub struct Ledger {
    pub remaining: usize,
    pub records: Vec<SessionRecord>,
}

impl Ledger {
    /// Ticket ids of the voucher sessions among `records`.
    pub fn voucher_tickets(records: &[SessionRecord]) -> Vec<[u8; 12]> {
        records
            .iter()
            .filter(|r| r.credential.kind == CredentialKind::Voucher)
            .map(|r| r.credential.ticket_id)
            .collect()
    }

    /// The double-spend and lost-record counts against the vouchers
    /// `issued`, with `records` being every record that reached the cloud
    /// (or the outbox): (spent twice, spent without a record).
    pub fn audit(
        issued: &BTreeSet<[u8; 12]>,
        remaining: usize,
        records: &[SessionRecord],
    ) -> (usize, usize) {
        let tickets = Self::voucher_tickets(records);
        let distinct: BTreeSet<_> = tickets.iter().copied().collect();
        let twice = tickets.len() - distinct.len();
        let spent = issued.len() - remaining;
        let recorded = distinct.iter().filter(|t| issued.contains(*t)).count();
        (twice, spent.saturating_sub(recorded))
    }
}
