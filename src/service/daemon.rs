//! `bmsgw run`: the daemon. It wires the parts together and owns every
//! task; the decisions are made by the sans-IO cores it drives
//! ([`Bridge`], [`SessionObserver`], [`Orchestrator`], [`AuthNode`]).
//!
//! Tasks:
//! - the **CAN loop** owns the bus(es) and every core, and is the only task
//!   that touches CAN. It never awaits the cloud or the store: both are
//!   other tasks it talks to through channels, so a slow broker or a slow
//!   SD card never delays a frame. It also pings the systemd watchdog, and
//!   only while the daemon is healthy;
//! - a **cloud request** per session the orchestrator asks the cloud for,
//!   which reports what the cloud answered (or refused, or that it failed)
//!   and decides nothing: the orchestrator owns the timeout, the voucher
//!   fallback and every other rule of the credential policy;
//! - the **store writer**, which does the orchestrator's store actions in
//!   order (spend a voucher with its session's draft in one commit, keep a
//!   grant's vouchers, journal a draft, queue a record) and answers each
//!   one; at shutdown the CAN loop waits for every answer, so a voucher
//!   spent as the gateway stops still gets its record;
//! - the **outbox publisher** and the **push handler** on the cloud link;
//! - the **control socket**.
//!
//! Start-up order: keys, store (with recovery of sessions a crash left
//! open), CAN, control socket, then READY to systemd. The cloud link starts
//! last and connects on its own schedule; the daemon does not wait for it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};
use zeroize::Zeroizing;

use super::config::{CanInterfaces, Config};
use super::control::{ControlHandler, ControlServer, ImportReport};
use super::status::{
    CanLinkStatus, CloudStatus, ErrorEntry, OutboxStatus, ProfileStatus, SessionStatus, Status,
    VoucherCount,
};
use super::systemd::Systemd;
use crate::auth::{Rng, SystemRng, VoucherWallet};
use crate::can::{BusError, BusEvent, CanBus, SocketCanBus, SocketCanOptions};
use crate::cloud::client::{FetchError, FetchProgress, IdentityClient};
use crate::cloud::envelope::{KeyPair, PublicKey};
use crate::cloud::exchange::{ExchangeParams, PushEvent, VehicleKeys, open_push};
use crate::cloud::link::{Incoming, Link, LinkState};
use crate::cloud::messages::{CredentialKind, Event, Payload, SessionRecord};
use crate::cloud::outbox::OutboxPublisher;
use crate::cloud::ticket_file::TicketFile;
use crate::cloud::topics;
use crate::gateway::bridge::{Bridge, BridgeEvent};
use crate::gateway::firewall::{FirewallConfig, RateLimit, Side};
use crate::gateway::observer::{ObserverConfig, SessionObserver};
use crate::gateway::orchestrator::{
    Action, CloudAnswer, CloudLink, CredentialPolicy, DraftBasis, Notice, Orchestrator,
    SessionView, VoucherAnswer,
};
use crate::gateway::vehicle_auth::AuthNode;
use crate::j1939::Pgn;
use crate::j1939::monitor::{Monitor, MonitorEvent};
use crate::store::journal::Draft;
use crate::store::{DurableWallet, Outbox, OutboxPolicy, Store, StoreError};
use crate::time::{Clock, Timestamp, unix_now};

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("vehicle key {path}: {source}")]
    VehicleKey {
        path: std::path::PathBuf,
        #[source]
        source: crate::cloud::envelope::KeyError,
    },
    #[error("cloud public key {path}: {source}")]
    CloudKey {
        path: std::path::PathBuf,
        #[source]
        source: crate::cloud::envelope::KeyError,
    },
    #[error("wallet key {path}: {source}")]
    WalletKey {
        path: std::path::PathBuf,
        #[source]
        source: super::keyfile::KeyFileError,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("CAN: {0}")]
    Can(#[from] BusError),
    #[error("control socket: {0}")]
    Control(#[from] super::control::ControlError),
    #[error("cloud link: {0}")]
    Link(#[from] crate::cloud::link::LinkError),
    #[error("firewall config: PGN {0:#x} is not a valid PGN")]
    Pgn(u32),
    #[error("a task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the store stopped taking writes ({0}); exiting so that systemd restarts the daemon")]
    Unhealthy(String),
}

/// The bus(es) the daemon runs on.
pub enum Buses<B> {
    /// One bus shared with the BMS and the pile.
    Single(B),
    /// The BMS's bus and the pile's bus, with the firewall between.
    Bridge { bms: B, pile: B },
}

/// Extra outputs for an embedding program (the demo): every [`Notice`] as
/// it happens, stamped with the daemon's monotonic time.
#[derive(Clone, Default)]
pub struct Observe {
    pub notices: Option<mpsc::UnboundedSender<(Timestamp, Notice)>>,
}

/// Run the daemon on SocketCAN as `config` says, until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    let opts = SocketCanOptions {
        error_frames: true,
        ..SocketCanOptions::default()
    };
    let buses = match &config.can.interfaces {
        CanInterfaces::SingleBus { interface } => {
            Buses::Single(SocketCanBus::open(interface, opts)?)
        }
        CanInterfaces::Bridge { bms, pile } => Buses::Bridge {
            bms: SocketCanBus::open(bms, opts.clone())?,
            pile: SocketCanBus::open(pile, opts)?,
        },
    };
    run_on(&config, buses, Observe::default(), shutdown).await
}

/// Run the daemon on the given buses (SocketCAN, or the in-process bus of
/// the demo and the tests).
pub async fn run_on<B: CanBus + 'static>(
    config: &Config,
    buses: Buses<B>,
    observe: Observe,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    let keys = load_keys(config)?;
    let (store, wallet, outbox) = open_store(config, &keys).await?;
    let systemd = Systemd::from_env();

    let (mode, can_names) = match &config.can.interfaces {
        CanInterfaces::SingleBus { interface } => {
            ("single-bus", vec![("bus".to_string(), interface.clone())])
        }
        CanInterfaces::Bridge { bms, pile } => (
            "bridge",
            vec![
                ("bms".to_string(), bms.clone()),
                ("pile".to_string(), pile.clone()),
            ],
        ),
    };
    let shared = Arc::new(Shared {
        started: Instant::now(),
        mode,
        keys: keys.clone(),
        store: store.clone(),
        wallet: Arc::new(Mutex::new(wallet)),
        outbox: outbox.clone(),
        link: std::sync::OnceLock::new(),
        cloud_enabled: config.cloud.enabled,
        profiles: config.interop,
        cloud: CloudCounters::default(),
        snapshot: Mutex::new(Snapshot {
            can: can_names
                .iter()
                .map(|(role, interface)| CanLinkStatus {
                    role: role.clone(),
                    interface: interface.clone(),
                    up: true,
                    ..CanLinkStatus::default()
                })
                .collect(),
            ..Snapshot::default()
        }),
        errors: Mutex::new(VecDeque::new()),
        healthy: AtomicBool::new(true),
        unhealthy_reason: Mutex::new(None),
    });

    // Under systemd the RuntimeDirectory exists already; elsewhere (tests,
    // the demo, a bench) the socket's directory is made here.
    if let Some(dir) = config.control.socket.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir);
    }
    let control = ControlServer::bind(&config.control.socket, config.control.group.as_deref())?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    {
        let handler = shared.clone();
        let stop = stopped();
        tasks.spawn(async move {
            if let Err(e) = control.run(handler, stop).await {
                error!(error = %e, "control socket failed");
            }
        });
    }

    // The store writer: drafts and records, in the order the CAN loop sent
    // them.
    let wake = Arc::new(Notify::new());
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel::<StoreJob>();
    // Facts for the CAN loop: the store writer's answers and the cloud's.
    let (facts_tx, facts_rx) = mpsc::unbounded_channel::<LoopMsg>();
    let writer = tokio::spawn(store_writer(
        shared.clone(),
        jobs_rx,
        facts_tx.clone(),
        wake.clone(),
    ));

    systemd.status(&format!("{mode}: CAN and store up; cloud connecting"));
    systemd.ready();
    info!(mode, vehicle = %keys.vehicle_id, "bmsgw running");

    // The cloud link: started after READY, connects on its own schedule.
    let client = if config.cloud.enabled {
        let (link, incoming) = Link::start(config.link_config())?;
        let _ = shared.link.set(link.clone());
        let client = IdentityClient::new(link, keys.clone());
        let mut publisher = OutboxPublisher::new(outbox.clone(), client.clone(), wake.clone());
        let stop = stopped();
        tasks.spawn(async move {
            if let Err(e) = publisher.run(stop).await {
                error!(error = %e, "outbox publisher failed");
            }
        });
        let s = shared.clone();
        let stop = stopped();
        tasks.spawn(push_handler(s, incoming, stop));
        Some(client)
    } else {
        info!("cloud link disabled in the config: vouchers and imported tickets only");
        None
    };

    let ctx = LoopCtx {
        config,
        shared: shared.clone(),
        client: client.clone(),
        jobs: jobs_tx,
        facts: (facts_tx, facts_rx),
        observe,
        systemd: &systemd,
    };
    let result = can_loop(ctx, buses, shutdown).await;

    systemd.stopping();
    info!("stopping: flushing the store");
    // The CAN loop dropped its job sender; the writer ends after the last
    // job (the final record of an interrupted session).
    let _ = writer.await;
    let _ = stop_tx.send(true);
    if let Some(client) = &client {
        client.link().shutdown().await;
    }
    while tasks.join_next().await.is_some() {}
    drop(shared);
    drop(store);
    info!("stopped");
    result
}

fn load_keys(config: &Config) -> Result<VehicleKeys, DaemonError> {
    let own =
        KeyPair::load(&config.vehicle.hpke_key).map_err(|source| DaemonError::VehicleKey {
            path: config.vehicle.hpke_key.clone(),
            source,
        })?;
    let cloud = PublicKey::load(&config.vehicle.cloud_public_key).map_err(|source| {
        DaemonError::CloudKey {
            path: config.vehicle.cloud_public_key.clone(),
            source,
        }
    })?;
    Ok(VehicleKeys {
        vehicle_id: config.vehicle.id.clone(),
        own,
        cloud,
    })
}

/// Open the store, the wallet (creating its key on first start) and the
/// outbox, and queue the records of sessions a crash left open.
async fn open_store(
    config: &Config,
    keys: &VehicleKeys,
) -> Result<(Store, DurableWallet, Outbox), DaemonError> {
    let path = config.store.path.clone();
    let key_path = config.store.wallet_key.clone();
    let vehicle = keys.vehicle_id.clone();
    tokio::task::spawn_blocking(move || {
        let store = Store::open(&path)?;
        let key = load_or_create_wallet_key(&key_path)?;
        let wallet = store.wallet(key)?;
        let outbox = store.outbox(OutboxPolicy::default());
        let recovered = store.journal_recover(&outbox)?;
        if recovered > 0 {
            warn!(
                recovered,
                vehicle = %vehicle,
                "sessions interrupted by a crash were queued as failed records"
            );
        }
        Ok((store, wallet, outbox))
    })
    .await?
}

fn load_or_create_wallet_key(path: &Path) -> Result<Zeroizing<[u8; 32]>, DaemonError> {
    let err = |source| DaemonError::WalletKey {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        let mut key = Zeroizing::new([0u8; 32]);
        SystemRng.fill(&mut key[..]);
        super::keyfile::write_key(path, &key).map_err(err)?;
        info!(path = %path.display(), "created a new wallet key (first start)");
    }
    super::keyfile::load_key(path).map_err(err)
}

// ---------------------------------------------------------------------------
// Shared state and the control socket

#[derive(Default)]
struct CloudCounters {
    grants: AtomicU64,
    denials: AtomicU64,
    timeouts: AtomicU64,
    refused: AtomicU64,
}

/// What the CAN loop publishes for `status`.
#[derive(Default, Clone)]
struct Snapshot {
    can: Vec<CanLinkStatus>,
    session: Option<SessionStatus>,
    last_session: Option<SessionStatus>,
    firewall: Option<crate::gateway::firewall::FirewallCounters>,
    deviations: crate::interop::LinkDeviations,
    awaiting_approval: bool,
}

struct Shared {
    started: Instant,
    mode: &'static str,
    profiles: super::config::InteropConfig,
    keys: VehicleKeys,
    store: Store,
    wallet: Arc<Mutex<DurableWallet>>,
    outbox: Outbox,
    /// Set once the cloud link has started (after READY).
    link: std::sync::OnceLock<Link>,
    cloud_enabled: bool,
    cloud: CloudCounters,
    snapshot: Mutex<Snapshot>,
    errors: Mutex<VecDeque<ErrorEntry>>,
    healthy: AtomicBool,
    unhealthy_reason: Mutex<Option<String>>,
}

/// How many errors `status` keeps.
const LAST_ERRORS: usize = 16;

impl Shared {
    fn error(&self, message: impl Into<String>) {
        let message = message.into();
        if let Ok(mut errors) = self.errors.lock() {
            if errors.len() == LAST_ERRORS {
                errors.pop_front();
            }
            errors.push_back(ErrorEntry {
                at: unix_now(),
                message,
            });
        }
    }

    fn unhealthy(&self, why: String) {
        error!(%why, "unhealthy: the watchdog will no longer be pinged");
        self.error(why.clone());
        if let Ok(mut r) = self.unhealthy_reason.lock() {
            r.get_or_insert(why);
        }
        self.healthy.store(false, Ordering::SeqCst);
    }

    fn snapshot(&self) -> Snapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn link(&self) -> Option<Link> {
        self.link.get().cloned()
    }

    /// Vouchers and revocations, from MQTT or from a ticket file, once
    /// their envelope has been checked (the same check for both).
    async fn apply_push(&self, event: PushEvent) -> Result<ImportReport, String> {
        let wallet = self.wallet.clone();
        tokio::task::spawn_blocking(move || {
            let mut wallet = wallet.lock().map_err(|_| "wallet lock poisoned".to_string())?;
            match event {
                PushEvent::Vouchers { vouchers, .. } => {
                    let mut report = ImportReport::default();
                    let mut duplicates = 0;
                    for v in vouchers {
                        let charger = v.charger_number;
                        match wallet.add(v) {
                            Ok(()) => {
                                report.vouchers += 1;
                                if !report.charger_numbers.contains(&charger) {
                                    report.charger_numbers.push(charger);
                                }
                            }
                            Err(crate::auth::WalletError::Duplicate { .. }) => duplicates += 1,
                            Err(e) => return Err(format!("wallet: {e}")),
                        }
                    }
                    report.charger_numbers.sort_unstable();
                    if report.vouchers == 0 && duplicates > 0 {
                        return Err(format!(
                            "all {duplicates} voucher(s) are already in the wallet (imported before?)"
                        ));
                    }
                    Ok(report)
                }
                PushEvent::Revocation(r) => {
                    let revoked = wallet
                        .revoke(&r.ticket_ids)
                        .map_err(|e| format!("wallet: {e}"))?;
                    Ok(ImportReport {
                        vouchers: 0,
                        charger_numbers: Vec::new(),
                        revoked,
                    })
                }
            }
        })
        .await
        .map_err(|e| format!("wallet task: {e}"))?
    }
}

impl ControlHandler for Shared {
    async fn status(&self) -> Status {
        let snap = self.snapshot();
        let wallet = self.wallet.clone();
        let outbox = self.outbox.clone();
        let store = self.store.clone();
        let (vouchers, outbox_stats) = tokio::task::spawn_blocking(move || {
            let vouchers = wallet
                .lock()
                .ok()
                .and_then(|w| w.remaining_by_pile(unix_now()).ok())
                .unwrap_or_default();
            let _ = &store;
            (vouchers, outbox.stats().ok())
        })
        .await
        .unwrap_or_default();
        let link = self.link();
        let counters = link.as_ref().map(|l| l.counters());
        let state = match (&link, self.cloud_enabled) {
            (_, false) => "disabled".to_string(),
            (None, true) => "starting".to_string(),
            (Some(l), true) => link_state_name(l.state()).to_string(),
        };
        let mut session = snap.session.clone();
        if let Some(s) = session.as_mut() {
            s.awaiting_approval = snap.awaiting_approval;
        }
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            mode: self.mode.to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            can: snap.can.clone(),
            cloud: CloudStatus {
                enabled: self.cloud_enabled,
                state,
                connects: counters.map_or(0, |c| c.connects),
                connection_errors: counters.map_or(0, |c| c.connection_errors),
                refused_answers: self.cloud.refused.load(Ordering::Relaxed),
                grants: self.cloud.grants.load(Ordering::Relaxed),
                denials: self.cloud.denials.load(Ordering::Relaxed),
                timeouts: self.cloud.timeouts.load(Ordering::Relaxed),
            },
            session,
            last_session: snap.last_session.clone(),
            vouchers: vouchers
                .into_iter()
                .map(|(charger_number, remaining)| VoucherCount {
                    charger_number,
                    remaining,
                })
                .collect(),
            outbox: outbox_stats.map_or_else(OutboxStatus::default, |s| OutboxStatus {
                records: s.records,
                events: s.events,
                bytes: s.bytes,
                dropped_events: s.dropped_events,
            }),
            firewall: snap
                .firewall
                .as_ref()
                .and_then(|f| serde_json::to_value(f).ok()),
            profiles: ProfileStatus {
                bms: self.profiles.bms.to_string(),
                pile: self.profiles.pile.to_string(),
            },
            deviations: snap.deviations.clone(),
            last_errors: self
                .errors
                .lock()
                .map(|e| e.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    async fn import_ticket(&self, ticket: TicketFile) -> Result<ImportReport, String> {
        let result = match ticket.open(&self.keys) {
            Ok(event) => self.apply_push(event).await,
            Err(e) => Err(format!("refused: {e}")),
        };
        match &result {
            Ok(r) => info!(
                vouchers = r.vouchers,
                revoked = r.revoked,
                "ticket file imported through the control socket"
            ),
            Err(e) => {
                warn!(error = %e, "ticket file refused");
                self.error(format!("ticket import refused: {e}"));
            }
        }
        result
    }
}

fn link_state_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Connecting => "connecting",
        LinkState::Connected => "connected",
        LinkState::Backoff { .. } => "backoff",
        LinkState::Stopped => "stopped",
    }
}

/// Pushes from the cloud on the vehicle's `vouchers` topic.
async fn push_handler(
    shared: Arc<Shared>,
    mut incoming: mpsc::Receiver<Incoming>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let vouchers_topic = topics::vouchers(&shared.keys.vehicle_id);
    loop {
        let msg = tokio::select! {
            () = &mut shutdown => return,
            msg = incoming.recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
        };
        if msg.topic != vouchers_topic {
            debug!(topic = %msg.topic, "ignoring a message on an unexpected topic");
            continue;
        }
        let applied = match open_push(&shared.keys, &msg.topic, &msg.payload) {
            Ok(event) => shared.apply_push(event).await,
            Err(e) => Err(e.to_string()),
        };
        match applied {
            Ok(r) => info!(
                vouchers = r.vouchers,
                revoked = r.revoked,
                "push from the cloud applied"
            ),
            Err(e) => {
                warn!(error = %e, "push refused");
                shared.error(format!("push refused: {e}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The store writer

/// The orchestrator's store actions, done in order. Each job answers the
/// CAN loop with exactly one [`LoopMsg`], which is how the loop knows, at
/// shutdown, that nothing it asked for is still in flight.
enum StoreJob {
    /// Spend a voucher and journal its session's draft in one commit.
    Spend {
        session: u64,
        draft: DraftBasis,
    },
    /// Vouchers that came with a grant.
    AddVouchers(Vec<crate::auth::Credential>),
    Journal(SessionRecord),
    Record(SessionRecord),
}

async fn store_writer(
    shared: Arc<Shared>,
    mut jobs: mpsc::UnboundedReceiver<StoreJob>,
    facts: mpsc::UnboundedSender<LoopMsg>,
    wake: Arc<Notify>,
) {
    while let Some(job) = jobs.recv().await {
        let s = shared.clone();
        let done = tokio::task::spawn_blocking(move || run_store_job(&s, job)).await;
        let msg = match done {
            Ok(msg) => msg,
            Err(e) => {
                shared.unhealthy(format!("store task failed: {e}"));
                LoopMsg::Stored
            }
        };
        if matches!(msg, LoopMsg::Journaled { .. } | LoopMsg::Stored) {
            wake.notify_one();
        }
        let _ = facts.send(msg);
    }
}

/// One store job, on a blocking thread; its answer for the loop.
fn run_store_job(shared: &Shared, job: StoreJob) -> LoopMsg {
    match job {
        StoreJob::Spend { session, draft } => LoopMsg::Voucher {
            session,
            answer: spend_voucher(shared, &draft),
        },
        StoreJob::AddVouchers(vouchers) => {
            let stored = match shared.wallet.lock() {
                Ok(mut w) => vouchers
                    .into_iter()
                    .filter(|v| match w.add(v.clone()) {
                        Ok(()) => true,
                        Err(e) => {
                            warn!(error = %e, "voucher from the grant not stored");
                            false
                        }
                    })
                    .count(),
                Err(_) => 0,
            };
            debug!(stored, "vouchers from the grant stored");
            LoopMsg::Stored
        }
        StoreJob::Journal(draft) => {
            let (topic, payload) = encode(&draft);
            match shared
                .store
                .journal_open(&draft.record_id, &topic, &payload)
            {
                // Info, with the record id, once committed: an operator (and
                // the VM lane's kill -9 check) can match every record the
                // daemon owes the cloud against what the cloud received.
                Ok(()) => {
                    info!(record = %hex::encode(draft.record_id), "draft journaled");
                    LoopMsg::Journaled {
                        record_id: draft.record_id,
                    }
                }
                // Not journaled: the session never presents its credential
                // (the BMS times out).
                Err(e) => {
                    shared.unhealthy(format!("store write failed: {}", super::logging::chain(&e)));
                    LoopMsg::Stored
                }
            }
        }
        StoreJob::Record(record) => {
            let (topic, payload) = encode(&record);
            let queued = shared
                .outbox
                .push_record(&topic, &payload)
                .and_then(|_| shared.store.journal_close(&record.record_id));
            match queued {
                Ok(_) => info!(record = %hex::encode(record.record_id), "record queued"),
                // The whole chain: "outbox push failed" alone does not say
                // that the disk is full.
                Err(e) => {
                    shared.unhealthy(format!("store write failed: {}", super::logging::chain(&e)))
                }
            }
            LoopMsg::Stored
        }
    }
}

/// Spends a voucher for the draft's pile with the draft record in the same
/// commit: a voucher is spent exactly when its session has a record.
fn spend_voucher(shared: &Shared, draft: &DraftBasis) -> VoucherAnswer {
    let Ok(mut wallet) = shared.wallet.lock() else {
        return VoucherAnswer::Failed("wallet lock poisoned".into());
    };
    let now = unix_now();
    let taken = wallet.take_journaled(draft.charger_number, now, |credential| {
        let record = draft.draft(CredentialKind::Voucher, credential.ticket_id(), now);
        let (topic, payload) = encode(&record);
        Draft {
            record_id: record.record_id,
            topic,
            payload: payload.to_vec(),
        }
    });
    match taken {
        Ok(Some(credential)) => {
            // Greppable like the journal's: the VM lane's kill -9 check
            // matches every record owed against the cloud's.
            info!(record = %hex::encode(draft.record_id), "draft journaled");
            VoucherAnswer::Taken(credential)
        }
        Ok(None) => VoucherAnswer::None,
        Err(e) => {
            let e = super::logging::chain(&e);
            shared.error(format!("wallet: {e}"));
            VoucherAnswer::Failed(e)
        }
    }
}

fn encode(record: &SessionRecord) -> (String, Zeroizing<Vec<u8>>) {
    let topic = topics::events(&record.vehicle_id);
    (topic, Event::SessionRecord(record.clone()).encode())
}

// ---------------------------------------------------------------------------
// The cloud

/// A fact for the CAN loop, from the store writer or a cloud task.
enum LoopMsg {
    Cloud {
        session: u64,
        answer: CloudAnswer,
    },
    Voucher {
        session: u64,
        answer: VoucherAnswer,
    },
    /// The draft `record_id` is committed.
    Journaled {
        record_id: [u8; 16],
    },
    /// A store job with nothing to tell the orchestrator is done.
    Stored,
}

impl LoopMsg {
    /// Whether this answers a store job.
    fn answers_a_store_job(&self) -> bool {
        !matches!(self, LoopMsg::Cloud { .. })
    }
}

/// Asks the cloud for `session`'s grant and reports what happened: the
/// answer, or why there is none. The orchestrator decides what follows.
async fn ask_cloud(
    session: u64,
    client: IdentityClient,
    shared: Arc<Shared>,
    params: ExchangeParams,
    timeout: Duration,
    tx: mpsc::UnboundedSender<LoopMsg>,
) {
    let started = Instant::now();
    let progress_tx = tx.clone();
    let counters = &shared.cloud;
    let fetched = client
        .fetch_with(params, timeout, &mut SystemRng, |progress| {
            let answer = match progress {
                FetchProgress::Pending { deadline } => CloudAnswer::Pending { deadline },
                // Counted as it happens: the orchestrator may stop waiting
                // before the fetch ends.
                FetchProgress::Refused(why) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    CloudAnswer::Refused(why.to_string())
                }
            };
            let _ = progress_tx.send(LoopMsg::Cloud { session, answer });
        })
        .await;
    let answer = match fetched {
        Ok((grant, report)) => {
            counters.grants.fetch_add(1, Ordering::Relaxed);
            CloudAnswer::Granted {
                credential: grant.credential,
                vouchers: grant.vouchers,
                elapsed: started.elapsed(),
                refused: report.refused,
            }
        }
        Err((FetchError::Denied { reason, detail }, _)) => {
            counters.denials.fetch_add(1, Ordering::Relaxed);
            CloudAnswer::Denied(format!("the cloud denied the grant ({reason}): {detail}"))
        }
        Err((FetchError::ApprovalTimeout { .. }, _)) => {
            counters.denials.fetch_add(1, Ordering::Relaxed);
            CloudAnswer::Denied("the owner did not approve in time".into())
        }
        Err((e, _)) => {
            counters.timeouts.fetch_add(1, Ordering::Relaxed);
            CloudAnswer::Failed(e.to_string())
        }
    };
    let _ = tx.send(LoopMsg::Cloud { session, answer });
}

/// The link's state as the orchestrator needs it.
fn cloud_link(state: LinkState) -> CloudLink {
    match state {
        LinkState::Connected | LinkState::Connecting => CloudLink::Usable,
        other => CloudLink::Down(link_state_name(other).to_string()),
    }
}

async fn link_changed(watch: &mut Option<watch::Receiver<LinkState>>) -> Option<LinkState> {
    match watch {
        Some(w) => match w.changed().await {
            Ok(()) => Some(*w.borrow_and_update()),
            Err(_) => {
                // The link is gone (shutdown): no more changes.
                *watch = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------
// The CAN loop

struct LoopCtx<'a> {
    config: &'a Config,
    shared: Arc<Shared>,
    client: Option<IdentityClient>,
    jobs: mpsc::UnboundedSender<StoreJob>,
    /// Where the store writer and the cloud tasks report facts.
    facts: (
        mpsc::UnboundedSender<LoopMsg>,
        mpsc::UnboundedReceiver<LoopMsg>,
    ),
    observe: Observe,
    systemd: &'a Systemd,
}

/// Frames in and out per bus, for `status`.
#[derive(Default, Clone, Copy)]
struct BusCounters {
    frames_in: u64,
    frames_out: u64,
    errors: u64,
    up: bool,
}

async fn recv_opt<B: CanBus>(bus: &mut Option<B>) -> Result<BusEvent, BusError> {
    match bus {
        Some(b) => b.recv().await,
        None => std::future::pending().await,
    }
}

async fn can_loop<B: CanBus>(
    ctx: LoopCtx<'_>,
    buses: Buses<B>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let config = ctx.config;
    let shared = ctx.shared.clone();
    let clock = Clock::new();
    let can = &config.can;
    let (mut bms_bus, mut pile_bus) = match buses {
        Buses::Single(bus) => (None, bus),
        Buses::Bridge { bms, pile } => (Some(bms), pile),
    };
    let mut bridge = if bms_bus.is_some() {
        let fw = &config.firewall;
        let pgns = |list: &[u32]| -> Result<_, DaemonError> {
            list.iter()
                .map(|&p| Pgn::new(p).map_err(|_| DaemonError::Pgn(p)))
                .collect()
        };
        Some(Bridge::new(FirewallConfig {
            bms: can.bms_address,
            pile: can.pile_address,
            gateway: can.address,
            bms_to_pile: pgns(&fw.bms_to_pile)?,
            pile_to_bms: pgns(&fw.pile_to_bms)?,
            rate: RateLimit {
                per_second: fw.rate_per_second,
                burst: fw.burst,
            },
            blank_vin: fw.blank_vin,
            gate_recognition: config.session.require_pile_auth,
            bms_profile: config.interop.bms,
            pile_profile: config.interop.pile,
        }))
    } else {
        None
    };
    // Single-bus: watch the BMS and the pile without taking part, and
    // count their deviations as a receiver would find them (the gateway
    // relays nothing here, so it refuses nothing either).
    let mut monitor = bridge.is_none().then(|| Monitor::new(16));
    let mut watch = crate::gbt27930::field::LinkWatch::default();
    let mut watched = crate::interop::LinkDeviations::default();
    let mut observer = SessionObserver::new(ObserverConfig {
        bms: can.bms_address,
        pile: can.pile_address,
        silence: config.session.bus_silence,
    });
    let mut orch = Orchestrator::new(
        config.vehicle.id.clone(),
        CredentialPolicy {
            want_vouchers: config.cloud.want_vouchers,
            request_timeout: config.cloud.request_timeout,
        },
    )
    .with_throttle(config.session.throttle);
    let mut link_watch = ctx.client.as_ref().map(|c| c.link().state_watch());
    orch.on_cloud_link(match &link_watch {
        Some(w) => cloud_link(*w.borrow()),
        None => CloudLink::Disabled,
    });
    let mut auth: Option<AuthNode> = None;
    let auth_config = crate::auth::VehicleAuthConfig {
        challenge_timeout: config.session.auth_timeout,
        result_timeout: config.session.auth_timeout,
        ..crate::auth::VehicleAuthConfig::default()
    };
    let (tx, mut rx) = ctx.facts;
    let mut counters = [BusCounters {
        up: true,
        ..Default::default()
    }; 2]; // [pile/bus, bms]
    let mut span = tracing::Span::none();
    let mut watchdog = ctx
        .systemd
        .watchdog_interval()
        .map(|every| tokio::time::interval(every.max(Duration::from_millis(100))));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut stopping = false;
    let mut rng = SystemRng;
    // Cloud requests in flight, by session: the orchestrator cancels them.
    let mut cloud_tasks = tokio::task::JoinSet::new();
    let mut asking: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    // Store jobs sent and not yet answered: the loop ends only when none is
    // left, so that a voucher spent as the gateway stops gets its record.
    let mut store_in_flight = 0usize;

    loop {
        // Move everything along until nothing moves.
        loop {
            let now = clock.now();
            let mut moved = false;
            if let Some(b) = bridge.as_mut() {
                while let Some((side, frame)) = b.poll_transmit() {
                    moved = true;
                    let (bus_ok, i) = match side {
                        Side::Pile => (pile_bus.send(&frame).await, 0),
                        Side::Bms => match bms_bus.as_mut() {
                            Some(bus) => (bus.send(&frame).await, 1),
                            None => (Ok(()), 1),
                        },
                    };
                    match bus_ok {
                        Ok(()) => counters[i].frames_out += 1,
                        Err(e) => {
                            counters[i].errors += 1;
                            debug!(error = %e, "send failed");
                        }
                    }
                }
                while let Some((_, msg)) = b.poll_message() {
                    moved = true;
                    observer.handle_message(&msg, now);
                }
                // Before the observer's events: a refusal explains the
                // session's end better than the error message it caused.
                while let Some(ev) = b.poll_event() {
                    moved = true;
                    let _g = span.enter();
                    match ev {
                        BridgeEvent::Deviation {
                            side,
                            deviation,
                            refused,
                            ..
                        } => orch.on_deviation(side, deviation, refused),
                        BridgeEvent::Refused { side, reason } => orch.on_refusal(side, &reason),
                    }
                }
            }
            if let Some(m) = monitor.as_mut() {
                while let Some(ev) = m.poll_event() {
                    moved = true;
                    match ev {
                        MonitorEvent::Message(msg) => {
                            let (found, ignored) = watch_message(&mut watch, can, &msg, now);
                            for (side, deviation) in found {
                                crate::gateway::firewall::side_deviations(&mut watched, side)
                                    .add(deviation, false);
                                orch.on_deviation(side, deviation, false);
                            }
                            // As the pile reads it: an early BEM(CCS) ends nothing.
                            if !ignored {
                                observer.handle_message(&msg, now);
                            }
                        }
                        MonitorEvent::Deviation {
                            by,
                            deviation,
                            detail,
                            ..
                        } => {
                            let side = if by == can.bms_address {
                                Side::Bms
                            } else {
                                Side::Pile
                            };
                            if by == can.bms_address || by == can.pile_address {
                                info!(%side, %deviation, "{detail}");
                                crate::gateway::firewall::side_deviations(&mut watched, side)
                                    .add(deviation, false);
                                orch.on_deviation(side, deviation, false);
                            }
                        }
                        MonitorEvent::Incomplete { .. } => {}
                    }
                }
            }
            if let Some(a) = auth.as_mut() {
                while let Some(frame) = a.poll_transmit() {
                    moved = true;
                    match pile_bus.send(&frame).await {
                        Ok(()) => counters[0].frames_out += 1,
                        Err(e) => {
                            counters[0].errors += 1;
                            debug!(error = %e, "send failed");
                        }
                    }
                }
                if let Some(outcome) = a.poll_outcome() {
                    moved = true;
                    let _g = span.enter();
                    orch.on_auth(outcome, now);
                }
            }
            while let Some(ev) = observer.poll_event() {
                moved = true;
                if orch.starts_session(&ev) {
                    span = info_span!("session", id = orch.next_session_id());
                }
                let _g = span.enter();
                orch.on_observer(ev, now, unix_now(), &mut rng);
            }
            while let Some(action) = orch.poll_action() {
                moved = true;
                let _g = span.enter();
                match action {
                    Action::AskCloud { session, params } => {
                        // The orchestrator asks only while the link is usable.
                        let Some(client) = ctx.client.clone() else {
                            continue;
                        };
                        let task = ask_cloud(
                            session,
                            client,
                            shared.clone(),
                            params,
                            config.cloud.request_timeout,
                            tx.clone(),
                        );
                        let handle = cloud_tasks.spawn(task.instrument(span.clone()));
                        asking.insert(session, handle);
                    }
                    Action::CancelCloud { session, timed_out } => {
                        if let Some(handle) = asking.remove(&session) {
                            handle.abort();
                        }
                        if timed_out {
                            shared.cloud.timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Action::SpendVoucher { session, draft } => {
                        if ctx.jobs.send(StoreJob::Spend { session, draft }).is_ok() {
                            store_in_flight += 1;
                        }
                    }
                    Action::StoreVouchers { vouchers } => {
                        if ctx.jobs.send(StoreJob::AddVouchers(vouchers)).is_ok() {
                            store_in_flight += 1;
                        }
                    }
                    Action::Journal { draft } => {
                        // The loop goes on meanwhile; the commit comes back
                        // as a fact and releases the credential.
                        if ctx.jobs.send(StoreJob::Journal(draft)).is_ok() {
                            store_in_flight += 1;
                        }
                    }
                    Action::StartAuth { credential, pile } => {
                        let mut node = AuthNode::new(credential, can.address, auth_config);
                        node.start(pile, now);
                        auth = Some(node);
                    }
                    Action::OpenGate => {
                        if let Some(b) = bridge.as_mut() {
                            b.set_pile_authenticated(true, now);
                        }
                    }
                    Action::CloseGate => {
                        if let Some(b) = bridge.as_mut() {
                            b.set_pile_authenticated(false, now);
                        }
                        auth = None;
                    }
                    Action::Record { record } => {
                        if ctx.jobs.send(StoreJob::Record(record)).is_ok() {
                            store_in_flight += 1;
                        }
                    }
                }
            }
            while let Some(notice) = orch.poll_notice() {
                moved = true;
                on_notice(&shared, &notice);
                if let Some(sink) = &ctx.observe.notices {
                    let _ = sink.send((now, notice));
                }
            }
            if !moved {
                break;
            }
        }
        publish_snapshot(&shared, &orch, bridge.as_ref(), &counters, &watched);
        while cloud_tasks.try_join_next().is_some() {}
        asking.retain(|_, h| !h.is_finished());
        if stopping && store_in_flight > 0 {
            // Stopping: nothing is asked of the cloud any more, but what
            // the store was asked to do is answered first (a voucher spent
            // for the session just interrupted gets its record).
            cloud_tasks.abort_all();
            match rx.recv().await {
                Some(msg) => {
                    let _g = span.enter();
                    if msg.answers_a_store_job() {
                        store_in_flight -= 1;
                    }
                    on_fact(&mut orch, msg, clock.now());
                }
                None => store_in_flight = 0,
            }
            continue;
        }
        if stopping {
            return match shared.unhealthy_reason.lock().ok().and_then(|r| r.clone()) {
                Some(why) if !shared.healthy.load(Ordering::SeqCst) => {
                    Err(DaemonError::Unhealthy(why))
                }
                _ => Ok(()),
            };
        }

        let deadline = [
            bridge.as_ref().and_then(Bridge::poll_timeout),
            monitor.as_ref().and_then(Monitor::poll_timeout),
            observer.poll_timeout(),
            auth.as_ref().and_then(AuthNode::poll_timeout),
            orch.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            biased;
            () = &mut shutdown => {
                info!("shutdown requested");
                let _g = span.enter();
                orch.on_shutdown(unix_now());
                stopping = true;
            }
            ev = pile_bus.recv() => {
                let now = clock.now();
                match ev? {
                    BusEvent::Frame(frame) => {
                        counters[0].frames_in += 1;
                        if let Some(b) = bridge.as_mut() {
                            b.handle_frame(Side::Pile, &frame, now);
                        }
                        if let Some(m) = monitor.as_mut() {
                            m.handle_frame(&frame, now);
                        }
                        if let Some(a) = auth.as_mut() {
                            a.handle_frame(&frame, now);
                        }
                    }
                    BusEvent::Error(e) => {
                        counters[0].errors += 1;
                        debug!(error = ?e, "CAN error frame (pile side)");
                    }
                    BusEvent::Link(state) => {
                        counters[0].up = state == crate::can::LinkState::Up;
                        warn!(?state, "CAN link (pile side)");
                        shared.error(format!("CAN {} link {state:?}", if bridge.is_some() { "pile" } else { "bus" }));
                    }
                }
            }
            ev = recv_opt(&mut bms_bus) => {
                let now = clock.now();
                match ev? {
                    BusEvent::Frame(frame) => {
                        counters[1].frames_in += 1;
                        if let Some(b) = bridge.as_mut() {
                            b.handle_frame(Side::Bms, &frame, now);
                        }
                    }
                    BusEvent::Error(e) => {
                        counters[1].errors += 1;
                        debug!(error = ?e, "CAN error frame (BMS side)");
                    }
                    BusEvent::Link(state) => {
                        counters[1].up = state == crate::can::LinkState::Up;
                        warn!(?state, "CAN link (BMS side)");
                        shared.error(format!("CAN bms link {state:?}"));
                    }
                }
            }
            Some(msg) = rx.recv() => {
                let _g = span.enter();
                if msg.answers_a_store_job() {
                    store_in_flight = store_in_flight.saturating_sub(1);
                }
                on_fact(&mut orch, msg, clock.now());
            }
            Some(state) = link_changed(&mut link_watch) => {
                orch.on_cloud_link(cloud_link(state));
            }
            () = clock.sleep_until(deadline) => {
                let now = clock.now();
                if let Some(b) = bridge.as_mut() {
                    b.handle_timeout(now);
                }
                if let Some(m) = monitor.as_mut() {
                    m.handle_timeout(now);
                }
                observer.handle_timeout(now);
                if let Some(a) = auth.as_mut() {
                    a.handle_timeout(now);
                }
                let _g = span.enter();
                orch.handle_timeout(now);
            }
            _ = tick(&mut watchdog) => {
                if shared.healthy.load(Ordering::SeqCst) {
                    ctx.systemd.ping();
                }
            }
        }
    }
}

/// A fact from the store writer or a cloud task, for the orchestrator.
fn on_fact(orch: &mut Orchestrator, msg: LoopMsg, now: Timestamp) {
    match msg {
        LoopMsg::Cloud { session, answer } => orch.on_cloud(session, answer, now, unix_now()),
        LoopMsg::Voucher { session, answer } => orch.on_voucher(session, answer, unix_now()),
        LoopMsg::Journaled { record_id } => orch.on_journaled(&record_id),
        LoopMsg::Stored => {}
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn on_notice(shared: &Shared, notice: &Notice) {
    match notice {
        Notice::NoCredential { reason } => shared.error(format!("no credential: {reason}")),
        Notice::PileRefused { reason } => shared.error(format!("pile authentication: {reason}")),
        Notice::Refused { reason } => shared.error(reason.clone()),
        _ => {}
    }
}

fn session_status(v: &SessionView) -> SessionStatus {
    SessionStatus {
        id: v.session.to_string(),
        phase: v.phase.to_string(),
        charger_number: v.charger_number,
        credential: v.credential.map(|k| match k {
            CredentialKind::Online => "online".to_string(),
            CredentialKind::Voucher => "voucher".to_string(),
        }),
        pile_authenticated: v.pile_authenticated,
        awaiting_approval: false,
        started_at: v.started_at,
        ended_at: None,
        result: None,
        energy_wh: None,
        request_to_recognized_ms: v
            .request_to_recognized
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

/// What the receiver of a watched message would find in it (single-bus
/// mode): each deviation with the side that showed it, and whether the
/// receiver acts as if the message had not come.
fn watch_message(
    watch: &mut crate::gbt27930::field::LinkWatch,
    can: &super::config::CanConfig,
    msg: &crate::j1939::tp::J1939Message,
    now: crate::time::Timestamp,
) -> (Vec<(Side, crate::interop::Deviation)>, bool) {
    use crate::gbt27930::field::Finding;
    use crate::gbt27930::{Message, MessageKind, Sender};
    let Some(kind) = MessageKind::from_pgn(msg.pgn) else {
        return (Vec::new(), false);
    };
    let (by, side) = match kind.sender() {
        Sender::Bms if msg.source == can.bms_address => (Sender::Bms, Side::Bms),
        Sender::Charger if msg.source == can.pile_address => (Sender::Charger, Side::Pile),
        _ => return (Vec::new(), false),
    };
    let Ok(decoded) = Message::decode(msg.pgn, &msg.data) else {
        return (Vec::new(), false);
    };
    let mut ignored = false;
    let found = watch
        .message(by, &decoded, msg.data.len(), now)
        .into_iter()
        .filter_map(|f| match f {
            Finding::Deviation {
                deviation, detail, ..
            } => {
                info!(%side, %deviation, "{detail}");
                Some((side, deviation))
            }
            Finding::Fault { fault, .. } => {
                warn!(%side, %fault, "a message the receiver would refuse");
                None
            }
            Finding::Ignored { .. } => {
                ignored = true;
                None
            }
        })
        .collect();
    (found, ignored)
}

fn publish_snapshot(
    shared: &Shared,
    orch: &Orchestrator,
    bridge: Option<&Bridge>,
    counters: &[BusCounters; 2],
    watched: &crate::interop::LinkDeviations,
) {
    let Ok(mut snap) = shared.snapshot.lock() else {
        return;
    };
    let current = orch.current().map(session_status);
    if let (Some(prev), None) = (&snap.session, &current) {
        let mut last = prev.clone();
        last.ended_at = Some(unix_now());
        last.result = orch.last_result().map(str::to_owned);
        last.energy_wh = orch.last_energy_wh();
        snap.last_session = Some(last);
    }
    snap.session = current;
    snap.awaiting_approval = orch.awaiting_approval();
    // `status` lists the BMS side first in bridge mode; the loop counts
    // the pile side (or the single bus) at index 0.
    let order = if bridge.is_some() {
        [counters[1], counters[0]]
    } else {
        [counters[0], counters[1]]
    };
    for (status, c) in snap.can.iter_mut().zip(order) {
        status.frames_in = c.frames_in;
        status.frames_out = c.frames_out;
        status.errors = c.errors;
        status.up = c.up;
    }
    snap.firewall = bridge.map(|b| b.counters().clone());
    snap.deviations = bridge.map_or_else(|| watched.clone(), |b| b.deviations().clone());
}
