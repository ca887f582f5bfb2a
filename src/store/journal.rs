//! The session journal: which sessions spent a credential and have not
//! ended yet.
//!
//! A voucher is spent durably before it is used (see [`super::wallet`]), so
//! a crash or `kill -9` in the middle of a session must not lose the
//! session's record either: the cloud reconciles spent vouchers against
//! records. When a session gets its credential the daemon writes a *draft*
//! record here (the record as it would be if the session never finished);
//! when the session ends it queues the final record in the outbox and then
//! removes the draft. At start-up, [`Store::journal_recover`] moves every
//! draft left by a crash into the outbox.
//!
//! The two steps at the end are separate transactions on purpose: a crash
//! between them queues the draft as well as the final record, under the
//! same record id, and the cloud keeps the first it receives (the outbox is
//! published oldest first, so that is the final one). Nothing is lost
//! either way.

use redb::ReadableTable;

use super::codec::Reader;
use super::db::{OPEN_SESSIONS, Store};
use super::error::StoreError;
use super::outbox::Outbox;

/// A draft left in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub record_id: [u8; 16],
    /// Where the record goes (the vehicle's events topic).
    pub topic: String,
    /// The CBOR record to queue if the session never ends.
    pub payload: Vec<u8>,
}

impl Store {
    /// Note that the session `record_id` has spent a credential; `payload`
    /// is its draft record for `topic`. Writing the same id again replaces
    /// the draft.
    pub fn journal_open(
        &self,
        record_id: &[u8; 16],
        topic: &str,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        self.write("journal open", OPEN_SESSIONS, |txn| {
            self.journal_in(txn, record_id, topic, payload)
        })
    }

    /// [`Store::journal_open`] inside the caller's transaction (the wallet
    /// spends a voucher and journals its session's draft in one commit).
    pub(super) fn journal_in(
        &self,
        txn: &redb::WriteTransaction,
        record_id: &[u8; 16],
        topic: &str,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let topic_len = u16::try_from(topic.len()).map_err(|_| StoreError::TopicTooLong {
            path: self.path_buf(),
            len: topic.len(),
        })?;
        let mut value = Vec::with_capacity(2 + topic.len() + payload.len());
        value.extend_from_slice(&topic_len.to_be_bytes());
        value.extend_from_slice(topic.as_bytes());
        value.extend_from_slice(payload);
        self.table(txn, OPEN_SESSIONS)?
            .insert(&record_id[..], value.as_slice())
            .map_err(self.db_err("journal open", OPEN_SESSIONS))?;
        Ok(())
    }

    /// The session ended and its final record is queued: drop the draft.
    /// `false` if there was none.
    pub fn journal_close(&self, record_id: &[u8; 16]) -> Result<bool, StoreError> {
        self.write("journal close", OPEN_SESSIONS, |txn| {
            let removed = self
                .table(txn, OPEN_SESSIONS)?
                .remove(&record_id[..])
                .map_err(self.db_err("journal close", OPEN_SESSIONS))?
                .is_some();
            Ok(removed)
        })
    }

    /// Drafts of sessions that never ended, oldest id order not guaranteed.
    /// An entry that does not parse is reported as [`StoreError::Corrupt`].
    pub fn journal_drafts(&self) -> Result<Vec<Draft>, StoreError> {
        let txn = self.read("journal list", OPEN_SESSIONS)?;
        let table = self.read_table(&txn, OPEN_SESSIONS)?;
        let mut out = Vec::new();
        for entry in table
            .iter()
            .map_err(self.db_err("journal list", OPEN_SESSIONS))?
        {
            let (k, v) = entry.map_err(self.db_err("journal list", OPEN_SESSIONS))?;
            let record_id = <[u8; 16]>::try_from(k.value()).map_err(|_| {
                self.corrupt(OPEN_SESSIONS, k.value(), "key is not a 16-byte record id")
            })?;
            let mut r = Reader::new(v.value());
            let parsed = (|| {
                let len = r.u16()?;
                let topic = std::str::from_utf8(r.bytes(usize::from(len))?).ok()?;
                Some((topic.to_owned(), r.rest().to_vec()))
            })();
            let (topic, payload) = parsed
                .ok_or_else(|| self.corrupt(OPEN_SESSIONS, k.value(), "draft does not parse"))?;
            out.push(Draft {
                record_id,
                topic,
                payload,
            });
        }
        Ok(out)
    }

    /// Queue every draft left by a crash into `outbox` and clear it from the
    /// journal; returns how many. A draft the outbox refuses (full) stays in
    /// the journal for the next start.
    pub fn journal_recover(&self, outbox: &Outbox) -> Result<usize, StoreError> {
        let mut n = 0;
        for draft in self.journal_drafts()? {
            outbox.push_record(&draft.topic, &draft.payload)?;
            self.journal_close(&draft.record_id)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EntryKind, OutboxPolicy};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path().join("state.redb")).expect("store opens");
        (dir, store)
    }

    #[test]
    fn drafts_survive_a_reopen_and_recover_into_the_outbox() {
        let (dir, store) = store();
        store
            .journal_open(&[1; 16], "bmsgw/v1/veh-a/events", b"draft-1")
            .expect("open");
        store
            .journal_open(&[2; 16], "bmsgw/v1/veh-a/events", b"draft-2")
            .expect("open");
        assert!(store.journal_close(&[2; 16]).expect("close"));
        assert!(!store.journal_close(&[2; 16]).expect("close twice"));
        drop(store);

        let store = Store::open(dir.path().join("state.redb")).expect("reopens");
        let drafts = store.journal_drafts().expect("drafts");
        assert_eq!(
            drafts,
            vec![Draft {
                record_id: [1; 16],
                topic: "bmsgw/v1/veh-a/events".into(),
                payload: b"draft-1".to_vec(),
            }]
        );
        let outbox = store.outbox(OutboxPolicy::default());
        assert_eq!(store.journal_recover(&outbox).expect("recover"), 1);
        assert!(store.journal_drafts().expect("drafts").is_empty());
        let pending = outbox.pending(10).expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].kind, EntryKind::Record);
        assert_eq!(pending[0].payload, b"draft-1");
        assert_eq!(store.journal_recover(&outbox).expect("again"), 0);
    }
}
