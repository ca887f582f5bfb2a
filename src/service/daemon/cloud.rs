//! The cloud: requests that report facts, the link's state, and pushes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::auth::SystemRng;
use crate::cloud::client::{FetchError, FetchProgress, IdentityClient};
use crate::cloud::exchange::{ExchangeParams, open_push};
use crate::cloud::link::{Incoming, LinkState};
use crate::cloud::topics;
use crate::gateway::orchestrator::{CloudAnswer, CloudLink, VoucherAnswer};

use super::shared::Shared;

/// A fact for the CAN loop, from the store writer or a cloud task.
pub(super) enum LoopMsg {
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
    pub(super) fn answers_a_store_job(&self) -> bool {
        !matches!(self, LoopMsg::Cloud { .. })
    }
}

/// Asks the cloud for `session`'s grant and reports what happened: the
/// answer, or why there is none. The orchestrator decides what follows.
pub(super) async fn ask_cloud(
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
pub(super) fn cloud_link(state: LinkState) -> CloudLink {
    match state {
        LinkState::Connected | LinkState::Connecting => CloudLink::Usable,
        // Lost just now (after a freeze, say): a request makes the link
        // reconnect at once (`cloud::link`, "Waking up"). Only a failed
        // reconnect makes it known down.
        LinkState::Backoff { attempt: 1, .. } => CloudLink::Usable,
        other => CloudLink::Down(link_state_name(other).to_string()),
    }
}

pub(super) async fn link_changed(
    watch: &mut Option<watch::Receiver<LinkState>>,
) -> Option<LinkState> {
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

pub(super) fn link_state_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Connecting => "connecting",
        LinkState::Connected => "connected",
        LinkState::Backoff { .. } => "backoff",
        LinkState::Stopped => "stopped",
    }
}

/// Pushes from the cloud on the vehicle's `vouchers` topic.
pub(super) async fn push_handler(
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
