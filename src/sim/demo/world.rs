//! The demo's world: the buses, the PKI, the broker, the cloud service, the
//! gateway daemon, and the live timeline they print to.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{DEMO_CHARGER, DemoError, secs};
use crate::auth::{MemoryReplayStore, PileAuthConfig, PileKeys, RootKey};
use crate::can::virtual_bus::{VirtualBus, VirtualNode};
use crate::can::{BusError, BusEvent, CanBus, CanFrame, SocketCanBus, SocketCanOptions};
use crate::gateway::orchestrator::Notice;
use crate::gbt27930::timeline::{Timeline, TimelineOptions};
use crate::gbt27930::{ChargerNumber, RegionCode};
use crate::service::config::{CanInterfaces, Config};
use crate::service::daemon::{Buses, Spawned};
use crate::service::status::Status;
use crate::sim::bms::BmsSimOptions;
use crate::sim::broker::EmbeddedBroker;
use crate::sim::cloud::CloudConfig;
use crate::sim::cloud::run::{CloudMonitor, CloudStats};
use crate::sim::pile::{PileAuthSetup, PileSimOptions};
use crate::sim::pki::{DevPki, DevPkiOptions, GatewayTomlOptions};

/// A bus of either kind, so the demo runs the same code on both.
pub(crate) enum DemoBus {
    Virtual(VirtualNode),
    Socket(SocketCanBus),
}

impl CanBus for DemoBus {
    async fn send(&mut self, frame: &CanFrame) -> Result<(), BusError> {
        match self {
            DemoBus::Virtual(n) => n.send(frame).await,
            DemoBus::Socket(s) => s.send(frame).await,
        }
    }

    fn try_send(&mut self, frame: &CanFrame) -> Result<bool, BusError> {
        match self {
            DemoBus::Virtual(n) => n.try_send(frame),
            DemoBus::Socket(s) => s.try_send(frame),
        }
    }

    fn try_recv(&mut self) -> Option<BusEvent> {
        match self {
            DemoBus::Virtual(n) => CanBus::try_recv(n),
            DemoBus::Socket(s) => s.try_recv(),
        }
    }

    async fn recv(&mut self) -> Result<BusEvent, BusError> {
        match self {
            DemoBus::Virtual(n) => n.recv().await,
            DemoBus::Socket(s) => s.recv().await,
        }
    }
}

/// Where the BMS and the pile are.
pub(crate) enum BusSet {
    InProcess { bms: VirtualBus, pile: VirtualBus },
    SocketCanBridge { bms: String, pile: String },
    SocketCanSingle(String),
}

impl BusSet {
    pub(crate) fn in_process(bitrate: u32) -> Self {
        BusSet::InProcess {
            bms: VirtualBus::with_timing(bitrate),
            pile: VirtualBus::with_timing(bitrate),
        }
    }

    pub(crate) fn socketcan_bridge(bms: &str, pile: &str) -> Self {
        BusSet::SocketCanBridge {
            bms: bms.to_owned(),
            pile: pile.to_owned(),
        }
    }

    pub(crate) fn socketcan_single(bus: &str) -> Self {
        BusSet::SocketCanSingle(bus.to_owned())
    }

    pub(crate) fn is_bridge(&self) -> bool {
        !matches!(self, BusSet::SocketCanSingle(_))
    }

    fn open(iface: &str) -> Result<DemoBus, DemoError> {
        SocketCanBus::open(iface, SocketCanOptions::default())
            .map(DemoBus::Socket)
            .map_err(|e| DemoError::Setup(format!("CAN {iface}: {e}")))
    }

    /// A node on the BMS's bus.
    pub(crate) fn bms_node(&self) -> Result<DemoBus, DemoError> {
        match self {
            BusSet::InProcess { bms, .. } => Ok(DemoBus::Virtual(bms.node())),
            BusSet::SocketCanBridge { bms, .. } => Self::open(bms),
            BusSet::SocketCanSingle(bus) => Self::open(bus),
        }
    }

    /// A node on the pile's bus.
    pub(crate) fn pile_node(&self) -> Result<DemoBus, DemoError> {
        match self {
            BusSet::InProcess { pile, .. } => Ok(DemoBus::Virtual(pile.node())),
            BusSet::SocketCanBridge { pile, .. } => Self::open(pile),
            BusSet::SocketCanSingle(bus) => Self::open(bus),
        }
    }

    fn interfaces(&self) -> CanInterfaces {
        match self {
            BusSet::InProcess { .. } => CanInterfaces::Bridge {
                bms: "demo-bms".into(),
                pile: "demo-pile".into(),
            },
            BusSet::SocketCanBridge { bms, pile } => CanInterfaces::Bridge {
                bms: bms.clone(),
                pile: pile.clone(),
            },
            BusSet::SocketCanSingle(bus) => CanInterfaces::SingleBus {
                interface: bus.clone(),
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            BusSet::InProcess { .. } => format!(
                "bridge mode between two in-process CAN buses ({} kbit/s timing model)",
                super::GBT_BITRATE / 1000
            ),
            BusSet::SocketCanBridge { bms, pile } => {
                format!("bridge mode between SocketCAN {bms} (BMS side) and {pile} (pile side)")
            }
            BusSet::SocketCanSingle(bus) => format!("single-bus mode on SocketCAN {bus}"),
        }
    }

    fn daemon_buses(&self) -> Result<Buses<DemoBus>, DemoError> {
        Ok(if self.is_bridge() {
            Buses::Bridge {
                bms: self.bms_node()?,
                pile: self.pile_node()?,
            }
        } else {
            Buses::Single(self.pile_node()?)
        })
    }
}

/// The reference cloud, running.
struct CloudRun {
    monitor: CloudMonitor,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Which vehicle's gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vehicle {
    /// `veh-a`: no owner approval.
    A,
    /// `veh-b`: the owner must approve every grant.
    B,
}

impl Vehicle {
    pub(crate) fn id(self) -> &'static str {
        match self {
            Vehicle::A => "veh-a",
            Vehicle::B => "veh-b",
        }
    }
}

pub(crate) struct World<'o, W: Write + Send> {
    out: &'o mut W,
    _dir: tempfile::TempDir,
    pub(crate) pki: DevPki,
    pub(crate) broker: EmbeddedBroker,
    cloud: Option<CloudRun>,
    pub(crate) buses: BusSet,
    daemon: Option<(Vehicle, Spawned)>,
    configs: [Config; 2],
    notices_tx: mpsc::UnboundedSender<(crate::time::Timestamp, Notice)>,
    notices: mpsc::UnboundedReceiver<(crate::time::Timestamp, Notice)>,
    pub(crate) replay: MemoryReplayStore,
    /// Listens on the BMS's bus: what reached the BMS.
    bms_monitor: DemoBus,
    /// Listens on the pile's bus.
    pile_monitor: DemoBus,
    /// Frames seen on each bus since the scenario began.
    pub(crate) bms_seen: Vec<CanFrame>,
    pub(crate) pile_seen: Vec<CanFrame>,
    timeline: Option<Timeline>,
    t0: Instant,
    /// Notices since the scenario began.
    pub(crate) seen: Vec<Notice>,
}

impl<'o, W: Write + Send> World<'o, W> {
    pub(crate) async fn start(
        buses: BusSet,
        all_messages: bool,
        out: &'o mut W,
    ) -> Result<World<'o, W>, DemoError> {
        let setup =
            |what: &str, e: &dyn std::fmt::Display| DemoError::Setup(format!("{what}: {e}"));
        let dir = tempfile::tempdir().map_err(|e| setup("temporary directory", &e))?;
        writeln!(out, "bmsgw demo: the whole system in one process")?;
        let pki = DevPki::generate(&DevPkiOptions::new(dir.path().join("pki")))
            .map_err(|e| setup("dev PKI", &e))?;
        writeln!(
            out,
            "  dev PKI generated in {} (CA, broker, cloud, vehicles veh-a and veh-b, pile root keys)",
            pki.dir.display()
        )?;
        let broker = EmbeddedBroker::start(&pki).map_err(|e| setup("embedded broker", &e))?;
        writeln!(
            out,
            "  embedded MQTT v5 broker with mutual TLS on {}:{}",
            broker.host(),
            broker.port()
        )?;
        pki.write_cloud_toml(broker.port())
            .map_err(|e| setup("cloud.toml", &e))?;

        let mut configs = Vec::new();
        for v in [Vehicle::A, Vehicle::B] {
            let state = dir.path().join(format!("state-{}", v.id()));
            let path = pki
                .write_gateway_toml(
                    v.id(),
                    &GatewayTomlOptions {
                        broker_port: broker.port(),
                        can: buses.interfaces(),
                        state_dir: state.clone(),
                        control_socket: state.join("control.sock"),
                        request_timeout: Duration::from_secs(2),
                    },
                )
                .map_err(|e| setup("gateway config", &e))?;
            let mut config = Config::load_with_env(&path, std::iter::empty())
                .map_err(|e| setup("gateway config", &e))?;
            // Reconnects within 1–2 s, so scenario (c) does not wait for
            // a long backoff once the broker is back, yet leaves the cloud
            // time to subscribe again first (the embedded broker keeps no
            // session over a restart, so a record published before the
            // cloud is back would have no subscriber).
            config.cloud.reconnect_min = Duration::from_secs(1);
            config.cloud.reconnect_max = Duration::from_secs(2);
            config.cloud.keep_alive = Duration::from_secs(5);
            configs.push(config);
        }
        let configs: [Config; 2] = configs
            .try_into()
            .map_err(|_| DemoError::Setup("two gateway configs".into()))?;
        let (notices_tx, notices) = mpsc::unbounded_channel();
        let bms_monitor = buses.bms_node()?;
        let pile_monitor = buses.pile_node()?;
        writeln!(
            out,
            "  gateway daemon (the code of `bmsgw run`) in {}",
            buses.describe()
        )?;
        writeln!(
            out,
            "  BMS simulator, and a pile simulator (charger {DEMO_CHARGER}) that requires authentication"
        )?;
        let mut world = World {
            out,
            _dir: dir,
            pki,
            broker,
            cloud: None,
            buses,
            daemon: None,
            configs,
            notices_tx,
            notices,
            replay: MemoryReplayStore::default(),
            bms_monitor,
            pile_monitor,
            bms_seen: Vec::new(),
            pile_seen: Vec::new(),
            timeline: all_messages.then(|| {
                Timeline::new(TimelineOptions {
                    changes_only: false,
                })
            }),
            t0: Instant::now(),
            seen: Vec::new(),
        };
        world.start_cloud().await?;
        Ok(world)
    }

    pub(crate) fn out(&mut self) -> &mut W {
        self.out
    }

    /// Begin a scenario: a heading, a fresh clock and fresh captures.
    pub(crate) fn begin(&mut self, title: &str) -> Result<(), DemoError> {
        writeln!(self.out)?;
        // Every heading ends in a rule, however long its title (counted in
        // characters: titles hold non-ASCII).
        writeln!(
            self.out,
            "── {title} {}",
            "─".repeat(72usize.saturating_sub(title.chars().count()).max(3))
        )?;
        self.t0 = Instant::now();
        self.bms_seen.clear();
        self.pile_seen.clear();
        self.seen.clear();
        Ok(())
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    /// One line of the timeline.
    pub(crate) fn say(&mut self, who: &str, what: impl std::fmt::Display) {
        let t = self.t0.elapsed().as_secs_f64();
        let _ = writeln!(self.out, "  {t:>7.3}  {who:<8} {what}");
    }

    /// Run `fut` while printing the timeline and recording what crosses
    /// both buses.
    pub(crate) async fn drive<T>(&mut self, fut: impl Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => {
                    // What was already on its way.
                    let settle = tokio::time::Instant::now() + Duration::from_millis(50);
                    loop {
                        tokio::select! {
                            Some((_, n)) = self.notices.recv() => self.on_notice(n),
                            ev = self.bms_monitor.recv() => self.on_bms(ev),
                            ev = self.pile_monitor.recv() => self.on_pile(ev),
                            () = tokio::time::sleep_until(settle) => break,
                        }
                    }
                    return r;
                }
                Some((_, n)) = self.notices.recv() => self.on_notice(n),
                ev = self.bms_monitor.recv() => self.on_bms(ev),
                ev = self.pile_monitor.recv() => self.on_pile(ev),
            }
        }
    }

    /// Let `d` pass with the timeline running.
    pub(crate) async fn pause(&mut self, d: Duration) {
        self.drive(tokio::time::sleep(d)).await;
    }

    fn on_bms(&mut self, ev: Result<BusEvent, BusError>) {
        if let Ok(BusEvent::Frame(frame)) = ev {
            if let Some(t) = self.timeline.as_mut() {
                let lines = t.feed(self.t0.elapsed(), &frame);
                for line in lines {
                    let _ = writeln!(self.out, "           BMS bus  {line}");
                }
            }
            self.bms_seen.push(frame);
        }
    }

    fn on_pile(&mut self, ev: Result<BusEvent, BusError>) {
        if let Ok(BusEvent::Frame(frame)) = ev {
            self.pile_seen.push(frame);
        }
    }

    fn on_notice(&mut self, n: Notice) {
        let line = match &n {
            Notice::SessionStarted { session } => {
                format!("session {session}: the pile is talking to the BMS")
            }
            Notice::ChargeRequest {
                charger_number,
                region_code,
            } => format!(
                "charge request at pile {charger_number} (region {}): asking for a credential",
                String::from_utf8_lossy(region_code)
            ),
            Notice::AwaitingApproval { .. } => {
                "the cloud holds the grant: awaiting the owner's approval".into()
            }
            Notice::Credential {
                kind,
                elapsed,
                refused,
                detail,
            } => {
                let mut s = match kind {
                    crate::cloud::messages::CredentialKind::Online => {
                        format!("online ticket from the cloud in {}", secs(*elapsed))
                    }
                    crate::cloud::messages::CredentialKind::Voucher => {
                        format!("offline: using a {detail}")
                    }
                };
                if *refused > 0 {
                    s.push_str(&format!(" ({refused} forged answer(s) refused)"));
                }
                s
            }
            Notice::NoCredential { reason } => format!("no credential: {reason}"),
            Notice::PileAuthenticated { since_request } => format!(
                "pile proved its key and accepted the vehicle ({} after the request)",
                secs(*since_request)
            ),
            Notice::PileRefused { reason } => format!("pile NOT authenticated: {reason}"),
            Notice::Refused { reason } => format!("REFUSED: {reason}"),
            Notice::Recognized { since_request } => match since_request {
                Some(d) => format!("CRM(0xAA): recognised {} after the request", secs(*d)),
                None => "CRM(0xAA): recognised".into(),
            },
            Notice::Phase(p) => format!("phase: {p}"),
            Notice::SessionEnded {
                result,
                energy_wh,
                recorded,
            } => format!(
                "session ended: {result}{}{}",
                energy_wh.map_or(String::new(), |e| if e == 0 {
                    // The demo charges for 2 s, and the pile reports its
                    // energy (CSD) in steps of 0.1 kWh.
                    ", under 0.1 kWh delivered (the pile reports energy in 0.1 kWh steps)"
                        .to_string()
                } else {
                    format!(", {:.1} kWh", f64::from(e) / 1000.0)
                }),
                if *recorded {
                    "; record queued for the cloud"
                } else {
                    ""
                }
            ),
        };
        self.say("gateway", line);
        self.seen.push(n);
    }

    // --- parts that scenarios switch ---------------------------------------

    pub(crate) async fn start_cloud(&mut self) -> Result<(), DemoError> {
        if self.cloud.is_some() {
            return Ok(());
        }
        let mut config = CloudConfig::load(&self.pki.cloud_toml)
            .map_err(|e| DemoError::Setup(format!("cloud config: {e}")))?;
        config.broker.port = self.broker.port();
        config.settings.vouchers_per_grant = 4;
        config.settings.approval_deadline_s = 20;
        let monitor = CloudMonitor::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let m = monitor.clone();
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = stopped.await;
            };
            if let Err(e) = crate::sim::cloud::run::run(&config, m, stop).await {
                tracing::error!(error = %e, "cloud service failed");
            }
        });
        if !monitor.connected(Duration::from_secs(20)).await {
            return Err(DemoError::Setup(
                "the cloud service did not connect to the broker".into(),
            ));
        }
        self.cloud = Some(CloudRun {
            monitor,
            stop,
            task,
        });
        Ok(())
    }

    pub(crate) async fn stop_cloud(&mut self) {
        if let Some(c) = self.cloud.take() {
            let _ = c.stop.send(());
            let _ = c.task.await;
        }
    }

    pub(crate) fn cloud_stats(&self) -> CloudStats {
        self.cloud
            .as_ref()
            .map(|c| c.monitor.stats())
            .unwrap_or_default()
    }

    pub(crate) fn cloud_monitor(&self) -> Option<CloudMonitor> {
        self.cloud.as_ref().map(|c| c.monitor.clone())
    }

    pub(crate) fn config(&self, v: Vehicle) -> &Config {
        &self.configs[v as usize]
    }

    /// `v`'s gateway config, to change before its daemon starts.
    pub(crate) fn config_mut(&mut self, v: Vehicle) -> &mut Config {
        &mut self.configs[v as usize]
    }

    /// Start `v`'s gateway (stopping another one first) and wait until it
    /// is ready.
    pub(crate) async fn start_daemon(&mut self, v: Vehicle) -> Result<(), DemoError> {
        if self.daemon.as_ref().is_some_and(|(cur, _)| *cur == v) {
            return Ok(());
        }
        self.stop_daemon().await?;
        let config = self.config(v).clone();
        let buses = self.buses.daemon_buses()?;
        let mut daemon = Spawned::start(config, buses, Some(self.notices_tx.clone()));
        let ready = daemon.ready(Duration::from_secs(20)).await;
        self.daemon = Some((v, daemon));
        ready.map_err(|e| DemoError::Setup(format!("gateway of {}: {e}", v.id())))
    }

    /// Stop the running gateway as SIGTERM would.
    pub(crate) async fn stop_daemon(&mut self) -> Result<(), DemoError> {
        if let Some((v, d)) = self.daemon.take() {
            d.stop()
                .await
                .map_err(|e| DemoError::Setup(format!("gateway of {} failed: {e}", v.id())))?;
        }
        Ok(())
    }

    /// The running gateway's `status`, through its control socket.
    pub(crate) async fn status(&self) -> Option<Status> {
        let (v, _) = self.daemon.as_ref()?;
        crate::service::control::request_status(&self.config(*v).control.socket)
            .await
            .ok()
    }

    /// Wait (with the timeline running) until `check` holds on the gateway's
    /// status, or `within` passes.
    pub(crate) async fn wait_status(
        &mut self,
        within: Duration,
        check: impl Fn(&Status) -> bool,
    ) -> Option<Status> {
        self.wait_status_every(within, Duration::from_millis(50), check)
            .await
    }

    /// [`wait_status`](Self::wait_status), asking every `poll`.
    pub(crate) async fn wait_status_every(
        &mut self,
        within: Duration,
        poll: Duration,
        check: impl Fn(&Status) -> bool,
    ) -> Option<Status> {
        let give_up = Instant::now() + within;
        loop {
            if let Some(s) = self.status().await
                && check(&s)
            {
                return Some(s);
            }
            if Instant::now() > give_up {
                return None;
            }
            self.pause(poll).await;
        }
    }

    pub(crate) fn bms_options(&self) -> BmsSimOptions {
        BmsSimOptions {
            soc_start: 62.0,
            soc_end: 64.0,
            current: 120.0,
            duration: Duration::from_secs(2),
            charger_wait: Some(Duration::from_secs(30)),
            ..BmsSimOptions::default()
        }
    }

    /// The genuine pile: charger 1, authentication required, its replay
    /// cache kept across sessions.
    pub(crate) fn pile_options(&self) -> Result<PileSimOptions, DemoError> {
        let key = crate::service::keyfile::load_key(&self.pki.pile_root_key(DEMO_CHARGER))
            .map_err(|e| DemoError::Setup(format!("pile root key: {e}")))?;
        Ok(PileSimOptions {
            charger_number: ChargerNumber(DEMO_CHARGER),
            region_code: RegionCode(*b"310"),
            auth: Some(PileAuthSetup {
                keys: PileKeys {
                    root: RootKey::from_bytes(*key),
                    charger_number: DEMO_CHARGER,
                    current_offset: 0,
                    previous_offset: None,
                },
                config: PileAuthConfig::default(),
                replay: self.replay.clone(),
            }),
            ..PileSimOptions::default()
        })
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.stop_daemon().await;
        self.stop_cloud().await;
        self.broker.stop();
    }
}
