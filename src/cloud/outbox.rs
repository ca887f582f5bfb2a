//! Reporting to the cloud through the durable outbox (`store::Outbox`).
//!
//! [`enqueue_record`] commits a session record before anything is sent; the
//! [`OutboxPublisher`] drains the outbox oldest first and removes an entry
//! only after the broker's PUBACK for it, so a crash, a `kill -9` or a broker
//! outage at any point leaves the record queued. A PUBACK saying that the
//! broker had no subscriber for it (the cloud not subscribed, e.g. after a
//! broker restart that lost its subscriptions) does not count: the broker
//! drops such a message, so the entry is kept and tried again. Delivery is
//! at least once: the cloud deduplicates by record id.
//!
//! The outbox holds the plain CBOR event (no secrets: pile, energy, times,
//! ticket id). It is sealed when published, so every attempt carries a fresh
//! envelope bound to the record id as correlation data.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::client::IdentityClient;
use super::link::{LinkError, PubAckReason};
use super::messages::{Event, Payload, SessionRecord};
use super::topics;
use crate::auth::SystemRng;
use crate::store::{EntryKind, Outbox, OutboxEntry, StoreError};

/// Entries published at once (each waits for its own PUBACK).
const WINDOW: usize = 16;
/// How long an entry the broker refused waits before it is tried again.
/// It is never dropped: records are kept until the cloud has them.
const REFUSED_RETRY: Duration = Duration::from_secs(30);
/// How long an entry that found no subscriber on the broker waits.
const NO_SUBSCRIBER_RETRY: Duration = Duration::from_secs(10);

/// Why reporting failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox: {0}")]
    Store(#[from] StoreError),
    #[error("outbox task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("session record does not fit the events payload: {0}")]
    Encode(#[from] super::messages::MessageError),
}

/// Commit `record` durably to the outbox; it is published later by the
/// [`OutboxPublisher`] woken through `wake`. Fails only when the record
/// cannot be stored (see `store::OutboxPolicy`), in which case the caller
/// must not start a session it cannot account for.
pub async fn enqueue_record(
    outbox: &Outbox,
    record: &SessionRecord,
    wake: &Notify,
) -> Result<u64, OutboxError> {
    let event = Event::SessionRecord(record.clone());
    event.check()?;
    let topic = topics::events(&record.vehicle_id);
    let payload = event.encode();
    let outbox = outbox.clone();
    let id = tokio::task::spawn_blocking(move || outbox.push_record(&topic, &payload)).await??;
    wake.notify_one();
    Ok(id)
}

/// What the publisher has done, for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublisherStats {
    pub published: u64,
    pub refused: u64,
    /// Publishes the broker acknowledged with "no matching subscribers"
    /// (kept and tried again).
    pub unheard: u64,
    /// Entries that could not be decoded (a damaged store): kept, skipped.
    pub undecodable: u64,
}

/// Drains the outbox over the vehicle's link.
pub struct OutboxPublisher {
    outbox: Outbox,
    client: IdentityClient,
    wake: Arc<Notify>,
    stats: PublisherStats,
    /// Entries not to try again before the given instant.
    hold: HashMap<u64, tokio::time::Instant>,
}

impl OutboxPublisher {
    pub fn new(outbox: Outbox, client: IdentityClient, wake: Arc<Notify>) -> Self {
        OutboxPublisher {
            outbox,
            client,
            wake,
            stats: PublisherStats::default(),
            hold: HashMap::new(),
        }
    }

    pub fn stats(&self) -> PublisherStats {
        self.stats
    }

    /// Publish until `shutdown` resolves or the link stops. Entries still
    /// waiting for a PUBACK at shutdown stay in the outbox.
    pub async fn run(
        &mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<PublisherStats, OutboxError> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let now = tokio::time::Instant::now();
            self.hold.retain(|_, until| *until > now);
            let outbox = self.outbox.clone();
            let limit = WINDOW + self.hold.len();
            let pending = tokio::task::spawn_blocking(move || outbox.pending(limit)).await??;
            let batch: Vec<OutboxEntry> = pending
                .into_iter()
                .filter(|e| !self.hold.contains_key(&e.id))
                .take(WINDOW)
                .collect();
            if batch.is_empty() {
                let next_hold = self.hold.values().min().copied();
                tokio::select! {
                    () = &mut shutdown => return Ok(self.stats),
                    () = self.wake.notified() => {}
                    () = crate::time::sleep_until(next_hold) => {}
                }
                continue;
            }
            tokio::select! {
                () = &mut shutdown => return Ok(self.stats),
                done = self.publish_batch(batch) => {
                    if done? {
                        return Ok(self.stats);
                    }
                }
            }
        }
    }

    /// Publish one batch; `Ok(true)` when the link has stopped.
    async fn publish_batch(&mut self, batch: Vec<OutboxEntry>) -> Result<bool, OutboxError> {
        let mut tasks = JoinSet::new();
        let mut rng = SystemRng;
        for entry in batch {
            let record = match decode(&entry) {
                Ok(record) => record,
                Err(e) => {
                    warn!(id = entry.id, error = %e, "outbox entry cannot be decoded; kept, skipped");
                    self.stats.undecodable += 1;
                    self.hold.insert(entry.id, far_future());
                    continue;
                }
            };
            let sealed = match self.client.seal_record(&record, &mut rng) {
                Ok(sealed) => sealed,
                Err(e) => {
                    warn!(id = entry.id, error = %e, "outbox entry cannot be sealed; kept, skipped");
                    self.stats.undecodable += 1;
                    self.hold.insert(entry.id, far_future());
                    continue;
                }
            };
            let link = self.client.link().clone();
            tasks.spawn(async move {
                let result = link
                    .publish_acked(
                        &sealed.topic,
                        sealed.payload,
                        Some(sealed.correlation.to_vec()),
                    )
                    .await;
                (entry.id, result)
            });
        }
        let mut stopped = false;
        let mut delivered = 0u64;
        while let Some(joined) = tasks.join_next().await {
            let (id, result) = joined?;
            match result {
                Ok(PubAckReason::NoMatchingSubscribers) => {
                    self.stats.unheard += 1;
                    warn!(
                        id,
                        retry_in = ?NO_SUBSCRIBER_RETRY,
                        "outbox entry reached the broker but no subscriber (is the cloud subscribed?); kept"
                    );
                    self.hold
                        .insert(id, tokio::time::Instant::now() + NO_SUBSCRIBER_RETRY);
                }
                Ok(_) => {
                    // Counted at the PUBACK, before the removal: a stop that
                    // cancels this batch after the removal (an empty outbox
                    // is what a caller waits for) must not lose the count.
                    self.stats.published += 1;
                    delivered += 1;
                    let outbox = self.outbox.clone();
                    tokio::task::spawn_blocking(move || outbox.remove(id)).await??;
                    debug!(id, "outbox entry delivered");
                }
                Err(LinkError::Stopped) => stopped = true,
                Err(e) => {
                    self.stats.refused += 1;
                    warn!(id, error = %e, retry_in = ?REFUSED_RETRY, "outbox entry not accepted; kept");
                    self.hold
                        .insert(id, tokio::time::Instant::now() + REFUSED_RETRY);
                }
            }
        }
        if delivered > 0 && !stopped {
            info!(
                delivered,
                total = self.stats.published,
                "outbox delivered a batch"
            );
        }
        Ok(stopped)
    }
}

fn decode(entry: &OutboxEntry) -> Result<SessionRecord, String> {
    if entry.kind != EntryKind::Record {
        return Err("only session records are published on the events topic".into());
    }
    match Event::decode(&entry.payload) {
        Ok(Event::SessionRecord(record)) => Ok(record),
        Err(e) => Err(e.to_string()),
    }
}

/// "Never again in this run": the entry stays in the store for an operator.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}
