//! The pile's replay cache on disk: [`crate::auth::ReplayCache`] mirrors
//! its spent ticket ids here, so a pile that restarts still refuses a ticket
//! it accepted before. Each id is committed durably before `insert` returns,
//! which is what makes "spent by its first use" hold across a power cut.

use redb::ReadableTable;

use crate::auth::{ReplayStore, ReplayStoreError};

use super::codec::Reader;
use super::db::{REPLAY, Store};
use super::error::StoreError;

/// A [`ReplayStore`] in the store's `replay` table (ticket id → `not_after`).
#[derive(Clone, Debug)]
pub struct DurableReplayStore {
    store: Store,
}

impl Store {
    /// The replay store, for `ReplayCache::open(Box::new(store.replay()), capacity)`.
    pub fn replay(&self) -> DurableReplayStore {
        DurableReplayStore {
            store: self.clone(),
        }
    }
}

fn backend(operation: &'static str) -> impl FnOnce(StoreError) -> ReplayStoreError {
    move |e| ReplayStoreError::Backend {
        operation,
        source: Box::new(e),
    }
}

fn parse_not_after(value: &[u8]) -> Option<u32> {
    let mut r = Reader::new(value);
    let v = r.u32()?;
    r.end().map(|()| v)
}

impl ReplayStore for DurableReplayStore {
    /// Every recorded id. An entry that does not parse makes the load fail:
    /// dropping it would let that ticket be replayed.
    fn load(&mut self) -> Result<Vec<([u8; 12], u32)>, ReplayStoreError> {
        let store = &self.store;
        let load = || -> Result<Vec<([u8; 12], u32)>, StoreError> {
            let txn = store.read("replay load", REPLAY)?;
            let table = store.read_table(&txn, REPLAY)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(store.db_err("replay load", REPLAY))? {
                let (k, v) = entry.map_err(store.db_err("replay load", REPLAY))?;
                let id = <[u8; 12]>::try_from(k.value()).map_err(|_| {
                    store.corrupt(REPLAY, k.value(), "key is not a 12-byte ticket id")
                })?;
                let not_after = parse_not_after(v.value())
                    .ok_or_else(|| store.corrupt(REPLAY, &id, "value is not a 4-byte time"))?;
                out.push((id, not_after));
            }
            Ok(out)
        };
        load().map_err(backend("load"))
    }

    fn insert(&mut self, id: [u8; 12], not_after: u32) -> Result<(), ReplayStoreError> {
        let store = &self.store;
        store
            .write("replay insert", REPLAY, |txn| {
                store
                    .table(txn, REPLAY)?
                    .insert(&id[..], &not_after.to_be_bytes()[..])
                    .map_err(store.db_err("replay insert", REPLAY))?;
                Ok(())
            })
            .map_err(backend("insert"))
    }

    /// Entries that do not parse are kept (the cache could not have loaded
    /// them, so they are reported there).
    fn remove_expired(&mut self, older_than: u32) -> Result<(), ReplayStoreError> {
        let store = &self.store;
        store
            .write("replay remove expired", REPLAY, |txn| {
                store
                    .table(txn, REPLAY)?
                    .retain(|_, v| parse_not_after(v).is_none_or(|na| na >= older_than))
                    .map_err(store.db_err("replay remove expired", REPLAY))
            })
            .map_err(backend("remove_expired"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ReplayCache, ReplayError, ResultCode};

    const NOW: u32 = 1_760_000_000;

    #[test]
    fn spent_ids_survive_a_restart_of_the_pile() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pile.redb");
        let store = Store::open(&path).expect("opens");
        let mut cache = ReplayCache::open(Box::new(store.replay()), 16).expect("loads");
        cache
            .check_and_insert([1; 12], NOW + 600, NOW, 300)
            .expect("first use");
        cache
            .check_and_insert([2; 12], NOW + 10, NOW, 300)
            .expect("first use");
        drop((cache, store));

        // "Restart": a new process opens the file again.
        let store = Store::open(&path).expect("reopens");
        let mut cache = ReplayCache::open(Box::new(store.replay()), 16).expect("loads");
        assert_eq!(cache.len(), 2);
        let err = cache
            .check_and_insert([1; 12], NOW + 600, NOW + 1, 300)
            .expect_err("replayed after restart");
        assert!(matches!(err, ReplayError::Replayed { .. }));
        assert_eq!(err.code(), ResultCode::Replayed);
        cache
            .check_and_insert([3; 12], NOW + 600, NOW + 1, 300)
            .expect("a new ticket is accepted");
    }

    #[test]
    fn remove_expired_forgets_only_old_ids_durably() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pile.redb");
        let mut replay = Store::open(&path).expect("opens").replay();
        replay.insert([1; 12], 100).expect("insert");
        replay.insert([2; 12], 200).expect("insert");
        replay.insert([3; 12], 300).expect("insert");
        replay.remove_expired(200).expect("purge");
        drop(replay);
        let mut replay = Store::open(&path).expect("reopens").replay();
        let mut left = replay.load().expect("loads");
        left.sort();
        assert_eq!(left, vec![([2; 12], 200), ([3; 12], 300)]);
    }

    #[test]
    fn a_damaged_entry_fails_the_load_instead_of_being_forgotten() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path().join("pile.redb")).expect("opens");
        store
            .write("test", REPLAY, |txn| {
                store
                    .table(txn, REPLAY)?
                    .insert(&[7u8; 12][..], &[1u8, 2][..])
                    .map_err(store.db_err("test", REPLAY))?;
                Ok(())
            })
            .expect("writes");
        let err = store.replay().load().expect_err("refused");
        let text = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(text.contains("070707070707070707070707"), "{text}");
        assert!(ReplayCache::open(Box::new(store.replay()), 4).is_err());
    }
}
