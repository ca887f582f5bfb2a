//! The vehicle's identity client: one [`IdentityExchange`] carried over the
//! [`Link`].
//!
//! Every answer on the request's correlation is judged by the exchange; a
//! refused one (forged, replayed, for another vehicle) is counted and logged,
//! and the client keeps waiting for the genuine answer until its deadline.
//! `PendingApproval` extends the wait to the cloud's approval deadline.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::exchange::{
    ExchangeError, ExchangeEvent, ExchangeParams, IdentityExchange, VehicleKeys,
};
use super::exchange::{Grant, OutgoingEvent};
use super::link::{Link, LinkError};
use super::messages::{DenyReason, SessionRecord};
use crate::auth::Rng;
use crate::time::unix_now;

/// How a fetch ended without a grant.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the cloud denied the grant ({reason}): {detail}")]
    Denied { reason: DenyReason, detail: String },
    #[error(
        "no valid answer within {after:?}{}",
        last_refusal.as_ref().map(|r| format!(" ({refused} answer(s) refused, last: {r})")).unwrap_or_default()
    )]
    Timeout {
        after: Duration,
        refused: u32,
        last_refusal: Option<String>,
    },
    #[error("the owner did not approve by the cloud's deadline (unix {deadline})")]
    ApprovalTimeout { deadline: u32 },
    #[error("link: {0}")]
    Link(#[from] LinkError),
}

/// What the client saw besides the outcome, for status and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Answers refused by the exchange's checks.
    pub refused: u32,
    /// The approval deadline, if the cloud held the grant for the owner.
    pub pending_until: Option<u32>,
}

/// What happens while a fetch waits, as it happens.
#[derive(Debug)]
pub enum FetchProgress<'a> {
    /// The cloud holds the grant for the owner until `deadline` (Unix
    /// seconds).
    Pending { deadline: u32 },
    /// An answer was refused (forged, replayed, for another vehicle); the
    /// fetch goes on waiting for the genuine one.
    Refused(&'a ExchangeError),
}

/// The vehicle's side of the cloud link.
#[derive(Clone, Debug)]
pub struct IdentityClient {
    link: Link,
    keys: VehicleKeys,
}

impl IdentityClient {
    pub fn new(link: Link, keys: VehicleKeys) -> Self {
        IdentityClient { link, keys }
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    pub fn keys(&self) -> &VehicleKeys {
        &self.keys
    }

    /// Ask for a grant for one pile, waiting at most `timeout` for the first
    /// answer; a `PendingApproval` answer extends the wait to its deadline
    /// (plus `timeout`, for the final answer to travel).
    pub async fn fetch(
        &self,
        params: ExchangeParams,
        timeout: Duration,
        rng: &mut dyn Rng,
    ) -> Result<(Grant, FetchReport), (FetchError, FetchReport)> {
        self.fetch_with(params, timeout, rng, |_| {}).await
    }

    /// [`fetch`](Self::fetch), telling `on_progress` what happens while it
    /// waits: the approval deadline when the cloud holds the grant for the
    /// owner, and each refused answer (so the gateway can count them even
    /// if it stops waiting first).
    pub async fn fetch_with(
        &self,
        params: ExchangeParams,
        timeout: Duration,
        rng: &mut dyn Rng,
        mut on_progress: impl FnMut(FetchProgress<'_>) + Send,
    ) -> Result<(Grant, FetchReport), (FetchError, FetchReport)> {
        let (mut exchange, request) = IdentityExchange::start(params, &self.keys, unix_now(), rng);
        let mut report = FetchReport::default();
        let mut answers = match self
            .link
            .request_stream(
                &request.topic,
                &request.response_topic,
                request.correlation.to_vec(),
                request.payload,
            )
            .await
        {
            Ok(answers) => answers,
            Err(e) => return Err((e.into(), report)),
        };
        let mut give_up = tokio::time::Instant::now() + timeout;
        let mut last_refusal = None;
        loop {
            let answer = match tokio::time::timeout_at(give_up, answers.next()).await {
                Ok(Some(answer)) => answer,
                Ok(None) => return Err((LinkError::Stopped.into(), report)),
                Err(_) => {
                    let err = match report.pending_until {
                        Some(deadline) => FetchError::ApprovalTimeout { deadline },
                        None => FetchError::Timeout {
                            after: timeout,
                            refused: report.refused,
                            last_refusal,
                        },
                    };
                    return Err((err, report));
                }
            };
            let correlation = answer.correlation.as_deref().unwrap_or_default();
            match exchange.on_response(&answer.topic, correlation, &answer.payload, unix_now()) {
                Ok(ExchangeEvent::Granted(grant)) => {
                    info!(
                        vehicle = %self.keys.vehicle_id,
                        charger = grant.credential.charger_number,
                        not_after = grant.credential.not_after,
                        vouchers = grant.vouchers.len(),
                        "identity grant received"
                    );
                    return Ok((*grant, report));
                }
                Ok(ExchangeEvent::PendingApproval { deadline }) => {
                    info!(vehicle = %self.keys.vehicle_id, deadline, "awaiting owner approval");
                    report.pending_until = Some(deadline);
                    on_progress(FetchProgress::Pending { deadline });
                    give_up = instant_at_unix(deadline) + timeout;
                }
                Ok(ExchangeEvent::Denied { reason, detail }) => {
                    return Err((FetchError::Denied { reason, detail }, report));
                }
                Err(ExchangeError::AlreadyFinished) => {}
                Err(refusal) => {
                    warn!(vehicle = %self.keys.vehicle_id, error = %refusal, "answer refused");
                    report.refused += 1;
                    on_progress(FetchProgress::Refused(&refusal));
                    last_refusal = Some(refusal.to_string());
                }
            }
        }
    }

    /// Seal a session record for the events topic.
    pub fn seal_record(
        &self,
        record: &SessionRecord,
        rng: &mut dyn Rng,
    ) -> Result<OutgoingEvent, ExchangeError> {
        super::exchange::seal_record(record, &self.keys, rng)
    }
}

/// The tokio instant at which the wall clock reads `unix` seconds.
fn instant_at_unix(unix: u32) -> tokio::time::Instant {
    let now_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let wait = Duration::from_secs(u64::from(unix)).saturating_sub(now_wall);
    tokio::time::Instant::now() + wait
}
