//! The store writer: the orchestrator's store actions, in order, each answered.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::auth::VoucherWallet;
use crate::cloud::messages::{CredentialKind, Event, Payload, SessionRecord};
use crate::cloud::topics;
use crate::gateway::orchestrator::{DraftBasis, VoucherAnswer};
use crate::store::journal::Draft;
use crate::time::unix_now;

use super::cloud::LoopMsg;
use super::shared::Shared;

/// The orchestrator's store actions, done in order. Each job answers the
/// CAN loop with exactly one [`LoopMsg`], which is how the loop knows, at
/// shutdown, that nothing it asked for is still in flight.
pub(super) enum StoreJob {
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

pub(super) async fn store_writer(
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
pub(super) fn run_store_job(shared: &Shared, job: StoreJob) -> LoopMsg {
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
                    shared.unhealthy(format!(
                        "store write failed: {}",
                        crate::service::logging::chain(&e)
                    ));
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
                Err(e) => shared.unhealthy(format!(
                    "store write failed: {}",
                    crate::service::logging::chain(&e)
                )),
            }
            LoopMsg::Stored
        }
    }
}

/// Spends a voucher for the draft's pile with the draft record in the same
/// commit: a voucher is spent exactly when its session has a record.
pub(super) fn spend_voucher(shared: &Shared, draft: &DraftBasis) -> VoucherAnswer {
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
            let e = crate::service::logging::chain(&e);
            shared.error(format!("wallet: {e}"));
            VoucherAnswer::Failed(e)
        }
    }
}

pub(super) fn encode(record: &SessionRecord) -> (String, Zeroizing<Vec<u8>>) {
    let topic = topics::events(&record.vehicle_id);
    (topic, Event::SessionRecord(record.clone()).encode())
}
