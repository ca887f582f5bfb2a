//! The CAN loop: the buses and every sans-IO core, driven in one task.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::SystemRng;
use crate::can::{BusError, BusEvent, CanBus};
use crate::cloud::client::IdentityClient;
use crate::cloud::messages::CredentialKind;
use crate::gateway::bridge::{Bridge, BridgeEvent};
use crate::gateway::firewall::{FirewallConfig, RateLimit, Side};
use crate::gateway::observer::{ObserverConfig, SessionObserver};
use crate::gateway::orchestrator::{
    Action, CloudLink, CredentialPolicy, Notice, Orchestrator, SessionView,
};
use crate::gateway::vehicle_auth::AuthNode;
use crate::j1939::Pgn;
use crate::j1939::monitor::{Monitor, MonitorEvent};
use crate::service::config::Config;
use crate::service::status::SessionStatus;
use crate::service::systemd::Systemd;
use crate::time::{Clock, Timestamp, sleep_until, unix_now};

use super::cloud::{LoopMsg, ask_cloud, cloud_link, link_changed};
use super::shared::Shared;
use super::store_writer::StoreJob;
use super::tx_queue::TxQueue;
use super::{Buses, DaemonError, Observe};

pub(super) struct LoopCtx<'a> {
    pub(super) config: &'a Config,
    pub(super) shared: Arc<Shared>,
    pub(super) client: Option<IdentityClient>,
    pub(super) jobs: mpsc::UnboundedSender<StoreJob>,
    /// Where the store writer and the cloud tasks report facts.
    pub(super) facts: (
        mpsc::UnboundedSender<LoopMsg>,
        mpsc::UnboundedReceiver<LoopMsg>,
    ),
    pub(super) observe: Observe,
    pub(super) systemd: &'a Systemd,
}

/// Frames in and out per bus, for `status`.
#[derive(Default, Clone, Copy)]
pub(super) struct BusCounters {
    pub(super) frames_in: u64,
    pub(super) frames_out: u64,
    pub(super) errors: u64,
    /// Frames dropped because the bus's transmit queue was full.
    pub(super) tx_dropped: u64,
    pub(super) up: bool,
}

/// Events taken from one bus in one go (see the loop).
const RX_BATCH: usize = 64;

/// How stale the published frame counters may be (see the loop).
const STATUS_EVERY: Duration = Duration::from_millis(50);

/// `first`, then what `bus` already holds, up to [`RX_BATCH`] events in
/// all: a burst is handled before the loop moves the cores along.
fn burst<B: CanBus>(first: BusEvent, bus: &mut B, mut each: impl FnMut(BusEvent)) {
    each(first);
    for _ in 1..RX_BATCH {
        match bus.try_recv() {
            Some(ev) => each(ev),
            None => break,
        }
    }
}

pub(super) async fn recv_opt<B: CanBus>(bus: &mut Option<B>) -> Result<BusEvent, BusError> {
    match bus {
        Some(b) => b.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn can_loop<B: CanBus>(
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
    // What each bus could not take yet ([pile/bus, bms]): the loop never
    // waits for a bus.
    let mut out = [TxQueue::new("pile"), TxQueue::new("bms")];
    // What the last published status showed of the session, and when.
    let mut published: Option<(Option<SessionView>, bool, tokio::time::Instant)> = None;
    let mut status_due: Option<tokio::time::Instant> = None;
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
                    match side {
                        Side::Pile => out[0].send(&mut pile_bus, frame, &mut counters[0]),
                        Side::Bms => {
                            if let Some(bus) = bms_bus.as_mut() {
                                out[1].send(bus, frame, &mut counters[1]);
                            }
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
                    out[0].send(&mut pile_bus, frame, &mut counters[0]);
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
        // The status is published at once when the session changes, and
        // otherwise at most every STATUS_EVERY: at full bus load the frame
        // counters change with every frame.
        let view = orch.current().cloned();
        let approval = orch.awaiting_approval();
        let at = tokio::time::Instant::now();
        let (session_changed, stale) = match &published {
            None => (true, true),
            Some((v, a, t)) => (*v != view || *a != approval, at >= *t + STATUS_EVERY),
        };
        if session_changed || stale || stopping {
            publish_snapshot(&shared, &orch, bridge.as_ref(), &counters, &watched);
            published = Some((view, approval, at));
            status_due = None;
        } else if status_due.is_none() {
            status_due = published.as_ref().map(|(_, _, t)| *t + STATUS_EVERY);
        }
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
            // A last chance for what the buses have not taken yet.
            out[0].flush(&mut pile_bus, &mut counters[0]);
            if let Some(bus) = bms_bus.as_mut() {
                out[1].flush(bus, &mut counters[1]);
            }
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
                let now = clock.now(); // once per burst
                burst(ev?, &mut pile_bus, |ev| match ev {
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
                });
            }
            ev = recv_opt(&mut bms_bus) => {
                let now = clock.now(); // once per burst
                let ev = ev?;
                // `recv_opt` answers only with a bus.
                if let Some(bus) = bms_bus.as_mut() {
                    burst(ev, bus, |ev| match ev {
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
                    });
                }
            }
            () = sleep_until(out[0].retry_at()) => {
                out[0].flush(&mut pile_bus, &mut counters[0]);
            }
            () = sleep_until(out[1].retry_at()) => {
                if let Some(bus) = bms_bus.as_mut() {
                    out[1].flush(bus, &mut counters[1]);
                }
            }
            // Only wakes the loop: the status is published above.
            () = sleep_until(status_due) => {}
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
pub(super) fn on_fact(orch: &mut Orchestrator, msg: LoopMsg, now: Timestamp) {
    match msg {
        LoopMsg::Cloud { session, answer } => orch.on_cloud(session, answer, now, unix_now()),
        LoopMsg::Voucher { session, answer } => orch.on_voucher(session, answer, unix_now()),
        LoopMsg::Journaled { record_id } => orch.on_journaled(&record_id),
        LoopMsg::Stored => {}
    }
}

pub(super) async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

pub(super) fn on_notice(shared: &Shared, notice: &Notice) {
    match notice {
        Notice::NoCredential { reason } => shared.error(format!("no credential: {reason}")),
        Notice::PileRefused { reason } => shared.error(format!("pile authentication: {reason}")),
        Notice::Refused { reason } => shared.error(reason.clone()),
        // The time from the charge request to the credential: the figure
        // of a wake-up (tests/vcan/guest.sh, daemon-wake).
        Notice::Credential {
            kind,
            elapsed,
            refused,
            ..
        } => info!(
            credential = match kind {
                CredentialKind::Online => "online",
                CredentialKind::Voucher => "voucher",
            },
            elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            refused,
            "credential for the session"
        ),
        _ => {}
    }
}

pub(super) fn session_status(v: &SessionView) -> SessionStatus {
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
pub(super) fn watch_message(
    watch: &mut crate::gbt27930::field::LinkWatch,
    can: &crate::service::config::CanConfig,
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

pub(super) fn publish_snapshot(
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
        status.tx_dropped = c.tx_dropped;
        status.up = c.up;
    }
    snap.firewall = bridge.map(|b| b.counters().clone());
    snap.deviations = bridge.map_or_else(|| watched.clone(), |b| b.deviations().clone());
}
