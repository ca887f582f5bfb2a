//! The pile's replay cache (`docs/protocol.md` §4.2 step 7).
//!
//! A ticket is spent by its first use: its id is recorded, durably, before
//! the handshake starts. The cache is bounded. An id is kept until its ticket
//! could no longer be accepted anyway (`not_after + skew` has passed); when
//! the cache is full of live ids it refuses new tickets rather than evict one,
//! because an evicted live id could be replayed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::messages::ResultCode;

/// A replay store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ReplayStoreError {
    #[error("replay store is unusable: a thread panicked while holding it")]
    Poisoned,
    #[error("replay store: {operation} failed")]
    Backend {
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where the cache persists ids, so a restarted pile still refuses them.
pub trait ReplayStore: Send {
    /// Every recorded `(ticket_id, not_after)`.
    fn load(&mut self) -> Result<Vec<([u8; 12], u32)>, ReplayStoreError>;
    /// Record an id durably before returning.
    fn insert(&mut self, id: [u8; 12], not_after: u32) -> Result<(), ReplayStoreError>;
    /// Forget every id whose `not_after < older_than`.
    fn remove_expired(&mut self, older_than: u32) -> Result<(), ReplayStoreError>;
}

/// An in-memory store. Clones share their contents, so a test can "restart"
/// a pile by building a new one on a clone.
#[derive(Clone, Debug, Default)]
pub struct MemoryReplayStore(Arc<Mutex<HashMap<[u8; 12], u32>>>);

impl MemoryReplayStore {
    fn lock(&self) -> Result<MutexGuard<'_, HashMap<[u8; 12], u32>>, ReplayStoreError> {
        self.0.lock().map_err(|_| ReplayStoreError::Poisoned)
    }
}

impl ReplayStore for MemoryReplayStore {
    fn load(&mut self) -> Result<Vec<([u8; 12], u32)>, ReplayStoreError> {
        Ok(self.lock()?.iter().map(|(id, na)| (*id, *na)).collect())
    }

    fn insert(&mut self, id: [u8; 12], not_after: u32) -> Result<(), ReplayStoreError> {
        self.lock()?.insert(id, not_after);
        Ok(())
    }

    fn remove_expired(&mut self, older_than: u32) -> Result<(), ReplayStoreError> {
        self.lock()?.retain(|_, not_after| *not_after >= older_than);
        Ok(())
    }
}

/// Why the cache refused a ticket.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("ticket {} has been used before", super::credential::to_hex(.id))]
    Replayed { id: [u8; 12] },
    #[error(
        "replay cache holds {capacity} live tickets; new tickets are refused until some expire"
    )]
    Full { capacity: usize },
    /// The id could not be recorded durably, so the ticket is refused: it
    /// cannot be spent without a record.
    #[error("cannot record ticket {}", super::credential::to_hex(.id))]
    Store {
        id: [u8; 12],
        #[source]
        source: ReplayStoreError,
    },
}

impl ReplayError {
    /// The code the pile answers with. A store failure is "cannot record
    /// more tickets", i.e. `ReplayCacheFull`.
    pub fn code(&self) -> ResultCode {
        match self {
            ReplayError::Replayed { .. } => ResultCode::Replayed,
            ReplayError::Full { .. } | ReplayError::Store { .. } => ResultCode::ReplayCacheFull,
        }
    }
}

impl From<ReplayError> for ResultCode {
    fn from(e: ReplayError) -> ResultCode {
        e.code()
    }
}

/// The bounded set of spent ticket ids, mirrored in a [`ReplayStore`].
pub struct ReplayCache {
    store: Box<dyn ReplayStore>,
    /// id → not_after: the same contents as the store.
    entries: HashMap<[u8; 12], u32>,
    capacity: usize,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("len", &self.entries.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl ReplayCache {
    /// Load every id the store holds. More than `capacity` may be loaded
    /// (after a capacity cut); all are kept until they expire.
    pub fn open(
        mut store: Box<dyn ReplayStore>,
        capacity: usize,
    ) -> Result<Self, ReplayStoreError> {
        let entries = store.load()?.into_iter().collect();
        Ok(ReplayCache {
            store,
            entries,
            capacity,
        })
    }

    /// Record `id` as spent unless it already is. Ids whose ticket is past
    /// `not_after + skew` are purged first when the cache is full.
    pub fn check_and_insert(
        &mut self,
        id: [u8; 12],
        not_after: u32,
        unix_now: u32,
        skew: u32,
    ) -> Result<(), ReplayError> {
        if self.entries.contains_key(&id) {
            return Err(ReplayError::Replayed { id });
        }
        if self.entries.len() >= self.capacity {
            self.purge(unix_now, skew)
                .map_err(|source| ReplayError::Store { id, source })?;
            if self.entries.len() >= self.capacity {
                return Err(ReplayError::Full {
                    capacity: self.capacity,
                });
            }
        }
        self.store
            .insert(id, not_after)
            .map_err(|source| ReplayError::Store { id, source })?;
        self.entries.insert(id, not_after);
        Ok(())
    }

    /// Forget ids whose ticket would now be refused as `Expired`:
    /// `unix_now > not_after + skew`.
    fn purge(&mut self, unix_now: u32, skew: u32) -> Result<(), ReplayStoreError> {
        let older_than = unix_now.saturating_sub(skew);
        self.store.remove_expired(older_than)?;
        self.entries.retain(|_, not_after| *not_after >= older_than);
        Ok(())
    }

    pub fn contains(&self, id: &[u8; 12]) -> bool {
        self.entries.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u32 = 1_000_000;

    fn id(n: u8) -> [u8; 12] {
        [n; 12]
    }

    #[test]
    fn second_use_is_replayed_also_after_restart() {
        let store = MemoryReplayStore::default();
        let mut cache = ReplayCache::open(Box::new(store.clone()), 8).expect("opens");
        cache
            .check_and_insert(id(1), NOW + 60, NOW, 300)
            .expect("first use");
        assert!(matches!(
            cache.check_and_insert(id(1), NOW + 60, NOW, 300),
            Err(ReplayError::Replayed { .. })
        ));
        drop(cache);
        let mut restarted = ReplayCache::open(Box::new(store), 8).expect("opens");
        assert_eq!(restarted.len(), 1);
        let err = restarted
            .check_and_insert(id(1), NOW + 60, NOW + 10, 300)
            .expect_err("still spent");
        assert_eq!(err.code(), ResultCode::Replayed);
    }

    #[test]
    fn full_cache_refuses_instead_of_evicting_live_ids() {
        let mut cache =
            ReplayCache::open(Box::new(MemoryReplayStore::default()), 2).expect("opens");
        cache
            .check_and_insert(id(1), NOW + 10, NOW, 300)
            .expect("1");
        cache
            .check_and_insert(id(2), NOW + 10, NOW, 300)
            .expect("2");
        let err = cache
            .check_and_insert(id(3), NOW + 10, NOW, 300)
            .expect_err("full");
        assert_eq!(err.code(), ResultCode::ReplayCacheFull);
        assert!(cache.contains(&id(1)) && cache.contains(&id(2)) && !cache.contains(&id(3)));
        // Still refused while the ids are within not_after + skew.
        let edge = NOW + 10 + 300;
        assert!(cache.check_and_insert(id(3), edge + 60, edge, 300).is_err());
    }

    #[test]
    fn full_cache_purges_expired_ids_first() {
        let store = MemoryReplayStore::default();
        let mut cache = ReplayCache::open(Box::new(store.clone()), 2).expect("opens");
        cache
            .check_and_insert(id(1), NOW + 10, NOW, 300)
            .expect("1");
        cache
            .check_and_insert(id(2), NOW + 5000, NOW, 300)
            .expect("2");
        let later = NOW + 10 + 301;
        cache
            .check_and_insert(id(3), later + 60, later, 300)
            .expect("room after purge");
        assert!(!cache.contains(&id(1)) && cache.contains(&id(2)) && cache.contains(&id(3)));
        // The store was purged too.
        let mut stored = store.clone().load().expect("loads");
        stored.sort();
        assert_eq!(stored, vec![(id(2), NOW + 5000), (id(3), later + 60)]);
    }

    struct FailingStore;
    impl ReplayStore for FailingStore {
        fn load(&mut self) -> Result<Vec<([u8; 12], u32)>, ReplayStoreError> {
            Ok(Vec::new())
        }
        fn insert(&mut self, _: [u8; 12], _: u32) -> Result<(), ReplayStoreError> {
            Err(ReplayStoreError::Backend {
                operation: "insert",
                source: "disk full".into(),
            })
        }
        fn remove_expired(&mut self, _: u32) -> Result<(), ReplayStoreError> {
            Ok(())
        }
    }

    #[test]
    fn unrecordable_ticket_is_refused_and_not_remembered() {
        let mut cache = ReplayCache::open(Box::new(FailingStore), 4).expect("opens");
        let err = cache
            .check_and_insert(id(1), NOW, NOW, 0)
            .expect_err("store fails");
        assert_eq!(err.code(), ResultCode::ReplayCacheFull);
        assert!(
            err.to_string().contains("cannot record ticket 0101"),
            "{err}"
        );
        assert!(cache.is_empty());
    }
}
