//! The attack suite's world: the gateway daemon (`service::daemon::run_on`,
//! the code `bmsgw run` runs) in bridge mode between two in-process buses
//! with the 250 kbit/s timing model, a genuine pile and a BMS to run
//! sessions through it, and recorders on both buses.
//!
//! Lighter than the demo's world: no broker and no cloud. The cloud link is
//! off and the vehicle charges on vouchers issued by the reference cloud's
//! code and imported through the control socket, so the whole rig runs on
//! tokio's paused clock: a 60 s flood costs CPU time, not wall time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::{MemoryReplayStore, PileAuthConfig, PileKeys, RootKey, SystemRng};
use crate::can::virtual_bus::{NodeOptions, VirtualBus, VirtualNode};
use crate::can::{BusEvent, CanBus, CanFrame};
use crate::cloud::topics::VehicleId;
use crate::gbt27930::session::Summary;
use crate::gbt27930::{ChargerNumber, RegionCode};
use crate::service::config::{CanInterfaces, Config};
use crate::service::daemon::{Buses, Spawned};
use crate::service::status::Status;
use crate::sim::SimError;
use crate::sim::bms::BmsSimOptions;
use crate::sim::cloud::CloudConfig;
use crate::sim::pile::{PileAuthSetup, PileSimOptions};
use crate::sim::pki::{DevPki, DevPkiOptions, GatewayTomlOptions};

/// GB/T 27930's bit rate.
pub const BITRATE: u32 = 250_000;
/// The pile of the rig (its root key is in the dev PKI).
pub const CHARGER: u32 = 1;
const VEHICLE: &str = "veh-a";

#[derive(Clone, Debug)]
pub struct RigOptions {
    /// `[session] require_pile_auth`: the recognition gate.
    pub require_pile_auth: bool,
    /// Vouchers for pile [`CHARGER`] imported before the first session.
    pub vouchers: usize,
    /// `[interop]`: how the gateway meets each side's deviations.
    pub interop: crate::service::config::InteropConfig,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            require_pile_auth: true,
            vouchers: 4,
            interop: Default::default(),
        }
    }
}

/// Both simulators' results of one session: (BMS, pile).
pub type Outcomes = (Result<Summary, SimError>, Result<Summary, SimError>);

pub struct Rig {
    _dir: tempfile::TempDir,
    pki: DevPki,
    config: Config,
    pub bms_bus: VirtualBus,
    pub pile_bus: VirtualBus,
    /// The genuine pile's replay cache, kept across sessions as a real
    /// pile keeps it.
    replay: MemoryReplayStore,
    daemon: Option<Spawned>,
}

impl Rig {
    /// A dev PKI, the daemon running in bridge mode, and the vouchers
    /// imported.
    pub async fn start(opts: RigOptions) -> Result<Rig, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let pki = DevPki::generate(&DevPkiOptions::new(dir.path().join("pki")))
            .map_err(|e| format!("dev PKI: {e}"))?;
        // No broker listens: the link is off anyway.
        pki.write_cloud_toml(1)
            .map_err(|e| format!("cloud.toml: {e}"))?;
        let state = dir.path().join("state");
        let path = pki
            .write_gateway_toml(
                VEHICLE,
                &GatewayTomlOptions {
                    broker_port: 1,
                    can: CanInterfaces::Bridge {
                        bms: "rig-bms".into(),
                        pile: "rig-pile".into(),
                    },
                    state_dir: state.clone(),
                    control_socket: state.join("control.sock"),
                    request_timeout: Duration::from_secs(1),
                },
            )
            .map_err(|e| format!("gateway config: {e}"))?;
        let mut config = Config::load_with_env(&path, std::iter::empty())
            .map_err(|e| format!("gateway config: {e}"))?;
        config.cloud.enabled = false;
        config.session.require_pile_auth = opts.require_pile_auth;
        config.interop = opts.interop;
        let mut rig = Rig {
            _dir: dir,
            pki,
            config,
            bms_bus: VirtualBus::with_timing(BITRATE),
            pile_bus: VirtualBus::with_timing(BITRATE),
            replay: MemoryReplayStore::default(),
            daemon: None,
        };
        rig.start_daemon().await?;
        if opts.vouchers > 0 {
            rig.import_vouchers(opts.vouchers).await?;
        }
        Ok(rig)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    async fn start_daemon(&mut self) -> Result<(), String> {
        let config = self.config.clone();
        let buses = Buses::Bridge {
            bms: self.bms_bus.node(),
            pile: self.pile_bus.node(),
        };
        let mut daemon = Spawned::start(config, buses, None);
        let ready = daemon.ready(Duration::from_secs(10)).await;
        self.daemon = Some(daemon);
        if let Err(e) = ready {
            let _ = self.stop_daemon().await;
            return Err(e.to_string());
        }
        Ok(())
    }

    /// Stops the daemon as SIGTERM would; its error, if it failed.
    pub async fn stop_daemon(&mut self) -> Result<(), String> {
        let Some(daemon) = self.daemon.take() else {
            return Ok(());
        };
        daemon
            .stop()
            .await
            .map_err(|e| format!("daemon failed: {e}"))
    }

    /// Whether the daemon task is still running (it did not crash).
    pub fn daemon_running(&self) -> bool {
        self.daemon.as_ref().is_some_and(|d| !d.finished())
    }

    async fn import_vouchers(&self, count: usize) -> Result<(), String> {
        let cloud = CloudConfig::load(&self.pki.cloud_toml).map_err(|e| e.to_string())?;
        let vehicle = VehicleId::parse(VEHICLE).map_err(|e| e.to_string())?;
        let now_ms = u64::from(crate::time::unix_now()) * 1000;
        let ticket = crate::sim::cloud::issue::issue_vouchers(
            &cloud,
            &vehicle,
            CHARGER,
            count,
            now_ms,
            &mut SystemRng,
        )
        .map_err(|e| format!("issuing vouchers: {e}"))?;
        crate::service::control::import_ticket(&self.config.control.socket, &ticket)
            .await
            .map_err(|e| format!("importing vouchers: {e}"))?;
        Ok(())
    }

    /// The daemon's `status`, through its control socket.
    pub async fn status(&self) -> Option<Status> {
        crate::service::control::request_status(&self.config.control.socket)
            .await
            .ok()
    }

    /// One firewall counter from `status`, 0 when absent.
    pub async fn firewall_counter(&self, key: &str) -> u64 {
        self.status()
            .await
            .and_then(|s| s.firewall)
            .and_then(|f| f.get(key).and_then(serde_json::Value::as_u64))
            .unwrap_or(0)
    }

    /// The BMS for a short session.
    pub fn bms_options(&self) -> BmsSimOptions {
        BmsSimOptions {
            soc_start: 62.0,
            soc_end: 63.0,
            current: 120.0,
            duration: Duration::from_secs(2),
            charger_wait: Some(Duration::from_secs(30)),
            ..BmsSimOptions::default()
        }
    }

    /// The genuine pile: charger [`CHARGER`], authentication required, its
    /// replay cache kept across sessions.
    pub fn genuine_pile(&self) -> Result<PileSimOptions, String> {
        let key = crate::service::keyfile::load_key(&self.pki.pile_root_key(CHARGER))
            .map_err(|e| format!("pile root key: {e}"))?;
        Ok(PileSimOptions {
            charger_number: ChargerNumber(CHARGER),
            region_code: RegionCode(*b"310"),
            auth: Some(PileAuthSetup {
                keys: PileKeys {
                    root: RootKey::from_bytes(*key),
                    charger_number: CHARGER,
                    current_offset: 0,
                    previous_offset: None,
                },
                config: PileAuthConfig::default(),
                replay: self.replay.clone(),
            }),
            ..PileSimOptions::default()
        })
    }

    /// A pile that does not do authentication: it ignores AuthRequest and
    /// offers CRM(0xAA) at once, as a legacy pile (or one claiming to be
    /// legacy) does.
    pub fn pile_without_auth(&self) -> PileSimOptions {
        PileSimOptions {
            charger_number: ChargerNumber(CHARGER),
            region_code: RegionCode(*b"310"),
            auth: None,
            ..PileSimOptions::default()
        }
    }

    /// A whole session: the BMS on its bus, `pile` on the inlet bus.
    pub async fn session(&self, pile: PileSimOptions) -> Outcomes {
        let mut bms_node = self.bms_bus.node();
        let mut pile_node = self.pile_bus.node();
        let bms = self.bms_options();
        let never = std::future::pending::<()>;
        tokio::join!(
            crate::sim::bms::run(&mut bms_node, bms, never()),
            crate::sim::pile::run(&mut pile_node, pile, never()),
        )
    }

    pub async fn stop(mut self) -> Result<(), String> {
        self.stop_daemon().await
    }
}

/// Everything a bus carries, with the time it was delivered: a passive
/// recorder (a `candump` of the in-process bus).
pub struct Recorder {
    frames: Arc<Mutex<Vec<(tokio::time::Instant, CanFrame)>>>,
    task: JoinHandle<VirtualNode>,
    stop: oneshot::Sender<()>,
}

impl Recorder {
    /// Starts recording `bus`; its queue is large enough that it never drops
    /// a frame in the suite's runs (checked by [`Recorder::finish`]).
    pub fn start(bus: &VirtualBus) -> Recorder {
        let mut node = bus.node_with(NodeOptions {
            receive_own: false,
            rx_queue: 1 << 16,
        });
        let frames = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&frames);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return node,
                    ev = node.recv() => match ev {
                        Ok(BusEvent::Frame(f)) => {
                            if let Ok(mut v) = sink.lock() {
                                v.push((tokio::time::Instant::now(), f));
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return node,
                    },
                }
            }
        });
        Recorder { frames, task, stop }
    }

    /// Stops recording: the frames, and how many the recorder itself lost.
    pub async fn finish(self) -> (Vec<(tokio::time::Instant, CanFrame)>, u64) {
        let _ = self.stop.send(());
        let dropped = self.task.await.map(|n| n.rx_dropped()).unwrap_or(u64::MAX);
        let frames = self
            .frames
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        (frames, dropped)
    }
}

/// Sends `frames` on `bus` at their recorded spacing, starting now: a
/// `canplayer` of a capture.
pub async fn replay<B: CanBus>(bus: &mut B, frames: &[(tokio::time::Instant, CanFrame)]) -> u64 {
    let Some((t0, _)) = frames.first() else {
        return 0;
    };
    let start = tokio::time::Instant::now();
    let mut sent = 0;
    for (at, frame) in frames {
        tokio::time::sleep_until(start + at.saturating_duration_since(*t0)).await;
        if bus.send(frame).await.is_ok() {
            sent += 1;
        }
    }
    sent
}
