//! Shared state: what the tasks share, and the control socket's view of it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{error, info, warn};

use crate::auth::VoucherWallet;
use crate::cloud::exchange::{PushEvent, VehicleKeys};
use crate::cloud::link::Link;
use crate::cloud::ticket_file::TicketFile;
use crate::service::control::{ControlHandler, ImportReport};
use crate::service::status::{
    CanLinkStatus, CloudStatus, ErrorEntry, OutboxStatus, ProfileStatus, SessionStatus, Status,
    VoucherCount,
};
use crate::store::{DurableWallet, Outbox, Store};
use crate::time::unix_now;

use super::cloud::link_state_name;

#[derive(Default)]
pub(super) struct CloudCounters {
    pub(super) grants: AtomicU64,
    pub(super) denials: AtomicU64,
    pub(super) timeouts: AtomicU64,
    pub(super) refused: AtomicU64,
}

/// What the CAN loop publishes for `status`.
#[derive(Default, Clone)]
pub(super) struct Snapshot {
    pub(super) can: Vec<CanLinkStatus>,
    pub(super) session: Option<SessionStatus>,
    pub(super) last_session: Option<SessionStatus>,
    pub(super) firewall: Option<crate::gateway::firewall::FirewallCounters>,
    pub(super) deviations: crate::interop::LinkDeviations,
    pub(super) awaiting_approval: bool,
}

pub(super) struct Shared {
    pub(super) started: Instant,
    pub(super) mode: &'static str,
    pub(super) profiles: crate::service::config::InteropConfig,
    pub(super) keys: VehicleKeys,
    pub(super) store: Store,
    pub(super) wallet: Arc<Mutex<DurableWallet>>,
    pub(super) outbox: Outbox,
    /// Set once the cloud link has started (after READY).
    pub(super) link: std::sync::OnceLock<Link>,
    pub(super) cloud_enabled: bool,
    pub(super) cloud: CloudCounters,
    pub(super) snapshot: Mutex<Snapshot>,
    pub(super) errors: Mutex<VecDeque<ErrorEntry>>,
    pub(super) healthy: AtomicBool,
    pub(super) unhealthy_reason: Mutex<Option<String>>,
}

/// How many errors `status` keeps.
pub(super) const LAST_ERRORS: usize = 16;

impl Shared {
    pub(super) fn error(&self, message: impl Into<String>) {
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

    pub(super) fn unhealthy(&self, why: String) {
        error!(%why, "unhealthy: the watchdog will no longer be pinged");
        self.error(why.clone());
        if let Ok(mut r) = self.unhealthy_reason.lock() {
            r.get_or_insert(why);
        }
        self.healthy.store(false, Ordering::SeqCst);
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(super) fn link(&self) -> Option<Link> {
        self.link.get().cloned()
    }

    /// Vouchers and revocations, from MQTT or from a ticket file, once
    /// their envelope has been checked (the same check for both).
    pub(super) async fn apply_push(&self, event: PushEvent) -> Result<ImportReport, String> {
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
