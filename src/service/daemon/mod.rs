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

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, mpsc, watch};
use tracing::{error, info, warn};
use zeroize::Zeroizing;

use super::config::{CanInterfaces, Config};
use super::control::ControlServer;
use super::status::CanLinkStatus;
use super::systemd::Systemd;
use crate::auth::{Rng, SystemRng};
use crate::can::{BusError, CanBus, SocketCanBus, SocketCanOptions};
use crate::cloud::client::IdentityClient;
use crate::cloud::envelope::{KeyPair, PublicKey};
use crate::cloud::exchange::VehicleKeys;
use crate::cloud::link::Link;
use crate::cloud::outbox::OutboxPublisher;
use crate::gateway::orchestrator::Notice;
use crate::store::{DurableWallet, Outbox, OutboxPolicy, Store, StoreError};
use crate::time::Timestamp;

mod can_loop;
mod cloud;
mod shared;
mod spawned;
mod store_writer;
mod tx_queue;

pub use spawned::{SpawnError, Spawned};

use can_loop::{LoopCtx, can_loop};
use cloud::{LoopMsg, push_handler};
use shared::{CloudCounters, Shared, Snapshot};
use store_writer::{StoreJob, store_writer};

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

/// Extra outputs for an embedding program (the demo, the test rigs).
#[derive(Clone, Default)]
pub struct Observe {
    /// Every [`Notice`] as it happens, stamped with the daemon's monotonic
    /// time.
    pub notices: Option<mpsc::UnboundedSender<(Timestamp, Notice)>>,
    /// Told once, when the daemon tells systemd READY=1: keys loaded, store
    /// open, buses and control socket up. Dropped unsent if it fails first.
    pub ready: Option<mpsc::UnboundedSender<()>>,
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
    if let Some(ready) = &observe.ready {
        let _ = ready.send(());
    }
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
