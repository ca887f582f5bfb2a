//! The durable outbox: what the gateway must tell the cloud, kept until the
//! broker has acknowledged it.
//!
//! The publisher reads [`Outbox::pending`], publishes each entry at QoS 1 and
//! calls [`Outbox::remove`] only after its PUBACK. An entry is committed
//! durably before [`Outbox::push`] returns, so it survives a crash, `kill -9`
//! or a power cut; delivery is at least once (an entry published just before
//! a crash is published again), and the cloud deduplicates by record id.
//!
//! # Bounds (the written policy)
//! An ECU has little flash, and the link may be down for days, so the outbox
//! is bounded by an [`OutboxPolicy`]:
//! - at most `max_records` session records, `max_events` events, and
//!   `max_bytes` bytes in all (the stored size of an entry: its topic, its
//!   payload and 10 bytes of header);
//! - **session records are never dropped.** A session record is how the
//!   cloud reconciles a charge (and a spent voucher); losing one loses money
//!   or hides fraud. At `max_records`, or when a record does not fit in
//!   `max_bytes` even with every event dropped, [`Outbox::push`] refuses it
//!   with [`StoreError::OutboxFull`], and the caller must not start a
//!   session it could not record;
//! - **events are dropped, oldest first,** to make room for a new record or
//!   event, and each drop is counted (the persisted `outbox.dropped_events`
//!   counter, also in [`OutboxStats`]). A new event that cannot fit even
//!   with every older event dropped (records fill the budget, or it is larger
//!   than the whole budget) is itself dropped and counted, and no older event
//!   is dropped for it.
//!
//! Ids come from one persisted sequence (records and events share it), so
//! they increase in the order entries were pushed and are never reused, not
//! even after the entries before them are removed.

use std::fmt;

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::codec::{Reader, u64_value};
use super::db::{COUNTERS, META, OUTBOX_EVENTS, OUTBOX_RECORDS, Store, Table};
use super::error::{OutboxLimit, StoreError};

/// Counter of events dropped by the policy.
pub const DROPPED_EVENTS_COUNTER: &str = "outbox.dropped_events";

const META_NEXT_ID: &[u8] = b"outbox.next_id";
const META_RECORD_BYTES: &[u8] = b"outbox.record_bytes";
const META_EVENT_BYTES: &[u8] = b"outbox.event_bytes";

/// Stored header of an entry: enqueued_at (u64) and the topic length (u16).
const ENTRY_HEADER: usize = 10;

/// The outbox bounds; see the module docs for what happens at each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxPolicy {
    /// Cap on session records; they are never dropped, so at the cap new
    /// sessions must not start.
    pub max_records: u64,
    /// Cap on events; the oldest are dropped beyond it.
    pub max_events: u64,
    /// Cap on the stored size of all entries together.
    pub max_bytes: u64,
}

impl Default for OutboxPolicy {
    /// Sized for an ECU: a session record is a few hundred bytes, so 10 000
    /// records (weeks of charging offline) fit in well under the 16 MiB.
    fn default() -> Self {
        OutboxPolicy {
            max_records: 10_000,
            max_events: 5_000,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

impl fmt::Display for OutboxPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at most {} session records, {} events and {} bytes; the oldest events are dropped \
             to make room, session records are never dropped",
            self.max_records, self.max_events, self.max_bytes
        )
    }
}

/// What an entry is, which decides whether the policy may drop it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A session record: critical, never dropped.
    Record,
    /// Anything else: dropped oldest-first when the outbox is full.
    Event,
}

impl EntryKind {
    fn table(self) -> Table {
        match self {
            EntryKind::Record => OUTBOX_RECORDS,
            EntryKind::Event => OUTBOX_EVENTS,
        }
    }
}

/// One queued message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: u64,
    pub kind: EntryKind,
    /// The MQTT topic to publish on.
    pub topic: String,
    pub payload: Vec<u8>,
    /// Unix time (seconds) of [`Outbox::push`].
    pub enqueued_at: u64,
}

/// The outcome of [`Outbox::push`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored durably under `id`; `dropped_events` older events were
    /// dropped to make room.
    Queued { id: u64, dropped_events: u64 },
    /// An event that could not fit even with every older event dropped: it
    /// was dropped (and counted) instead of stored.
    Dropped,
}

impl Pushed {
    /// The id, if the entry was stored.
    pub fn id(self) -> Option<u64> {
        match self {
            Pushed::Queued { id, .. } => Some(id),
            Pushed::Dropped => None,
        }
    }
}

/// What the outbox holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub records: u64,
    pub events: u64,
    /// Stored size of all entries, as the policy counts it.
    pub bytes: u64,
    /// Events dropped by the policy since the store was created.
    pub dropped_events: u64,
}

/// The outbox of a [`Store`] under a policy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    store: Store,
    policy: OutboxPolicy,
}

impl Store {
    /// The outbox, bounded by `policy`. The policy is not stored: a smaller
    /// one applies to new pushes only (nothing queued is dropped for it,
    /// except events when room is needed).
    pub fn outbox(&self, policy: OutboxPolicy) -> Outbox {
        Outbox {
            store: self.clone(),
            policy,
        }
    }
}

/// The running totals kept in the meta table, read and written inside the
/// transaction that changes the entries.
struct Totals {
    next_id: u64,
    record_bytes: u64,
    event_bytes: u64,
}

impl Outbox {
    pub fn policy(&self) -> OutboxPolicy {
        self.policy
    }

    /// Store an entry durably and return its id, applying the policy (see
    /// the module docs). A session record the policy cannot take is refused
    /// with [`StoreError::OutboxFull`]; nothing is changed then.
    pub fn push(&self, kind: EntryKind, topic: &str, payload: &[u8]) -> Result<Pushed, StoreError> {
        let topic_len = u16::try_from(topic.len()).map_err(|_| StoreError::TopicTooLong {
            path: self.store.path_buf(),
            len: topic.len(),
        })?;
        let mut value = Vec::with_capacity(ENTRY_HEADER + topic.len() + payload.len());
        value.extend_from_slice(&unix_now().to_be_bytes());
        value.extend_from_slice(&topic_len.to_be_bytes());
        value.extend_from_slice(topic.as_bytes());
        value.extend_from_slice(payload);
        let size = value.len() as u64;
        let store = &self.store;
        let policy = self.policy;

        store.write("outbox push", kind.table(), |txn| {
            let mut totals = self.totals(txn)?;
            let mut records = store.table(txn, OUTBOX_RECORDS)?;
            let mut events = store.table(txn, OUTBOX_EVENTS)?;
            let len = |t: &redb::Table<&[u8], &[u8]>, table| {
                t.len().map_err(store.db_err("outbox count", table))
            };
            let room_beside_records = policy.max_bytes.saturating_sub(totals.record_bytes);
            let mut dropped = 0u64;
            match kind {
                EntryKind::Record => {
                    let limit = if len(&records, OUTBOX_RECORDS)? >= policy.max_records {
                        Some(OutboxLimit::Records)
                    } else if size > room_beside_records {
                        Some(OutboxLimit::Bytes)
                    } else {
                        None
                    };
                    if let Some(limit) = limit {
                        return Err(StoreError::OutboxFull {
                            path: store.path_buf(),
                            limit,
                            policy,
                        });
                    }
                }
                EntryKind::Event => {
                    if size > room_beside_records || policy.max_events == 0 {
                        drop((records, events));
                        store.counter_add_in(txn, DROPPED_EVENTS_COUNTER, 1)?;
                        return Ok(Pushed::Dropped);
                    }
                    while len(&events, OUTBOX_EVENTS)? >= policy.max_events {
                        if !self.drop_oldest_event(&mut events, &mut totals)? {
                            break;
                        }
                        dropped += 1;
                    }
                }
            }
            while totals
                .record_bytes
                .saturating_add(totals.event_bytes)
                .saturating_add(size)
                > policy.max_bytes
            {
                if !self.drop_oldest_event(&mut events, &mut totals)? {
                    break;
                }
                dropped += 1;
            }

            // Never reuse an id, even if the stored sequence were behind.
            let after = |t: &redb::Table<&[u8], &[u8]>, table| -> Result<u64, StoreError> {
                let last = t.last().map_err(store.db_err("outbox last id", table))?;
                Ok(last
                    .and_then(|(k, _)| u64_value(k.value()))
                    .map_or(0, |id| id.saturating_add(1)))
            };
            let id = totals
                .next_id
                .max(after(&records, OUTBOX_RECORDS)?)
                .max(after(&events, OUTBOX_EVENTS)?)
                .max(1);
            let target = match kind {
                EntryKind::Record => {
                    totals.record_bytes = totals.record_bytes.saturating_add(size);
                    &mut records
                }
                EntryKind::Event => {
                    totals.event_bytes = totals.event_bytes.saturating_add(size);
                    &mut events
                }
            };
            target
                .insert(&id.to_be_bytes()[..], value.as_slice())
                .map_err(store.db_err("outbox insert", kind.table()))?;
            totals.next_id = id.saturating_add(1);
            drop((records, events));
            self.save_totals(txn, &totals)?;
            if dropped > 0 {
                store.counter_add_in(txn, DROPPED_EVENTS_COUNTER, dropped)?;
            }
            Ok(Pushed::Queued {
                id,
                dropped_events: dropped,
            })
        })
    }

    /// Push a session record; its id, or [`StoreError::OutboxFull`].
    pub fn push_record(&self, topic: &str, payload: &[u8]) -> Result<u64, StoreError> {
        match self.push(EntryKind::Record, topic, payload)? {
            Pushed::Queued { id, .. } => Ok(id),
            // A record is refused with an error, never dropped.
            Pushed::Dropped => Err(StoreError::OutboxFull {
                path: self.store.path_buf(),
                limit: OutboxLimit::Bytes,
                policy: self.policy,
            }),
        }
    }

    /// Up to `limit` of the oldest entries, records and events together, in
    /// id order. An entry that does not parse is reported as
    /// [`StoreError::Corrupt`]; [`Outbox::remove_damaged`] clears it.
    pub fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let store = &self.store;
        let txn = store.read("outbox pending", OUTBOX_RECORDS)?;
        let mut out = Vec::new();
        for kind in [EntryKind::Record, EntryKind::Event] {
            let table = store.read_table(&txn, kind.table())?;
            let iter = table
                .iter()
                .map_err(store.db_err("outbox pending", kind.table()))?;
            for entry in iter.take(limit) {
                let (k, v) = entry.map_err(store.db_err("outbox pending", kind.table()))?;
                out.push(self.decode(kind, k.value(), v.value())?);
            }
        }
        out.sort_unstable_by_key(|e| e.id);
        out.truncate(limit);
        Ok(out)
    }

    /// Remove entry `id` (after its PUBACK), durably. `false` if there was
    /// no such entry (already removed).
    pub fn remove(&self, id: u64) -> Result<bool, StoreError> {
        let store = &self.store;
        let key = id.to_be_bytes();
        store.write("outbox remove", OUTBOX_RECORDS, |txn| {
            let mut totals = self.totals(txn)?;
            let mut removed = false;
            for kind in [EntryKind::Record, EntryKind::Event] {
                let mut table = store.table(txn, kind.table())?;
                let size = table
                    .remove(&key[..])
                    .map_err(store.db_err("outbox remove", kind.table()))?
                    .map(|v| v.value().len() as u64);
                if let Some(size) = size {
                    let bytes = match kind {
                        EntryKind::Record => &mut totals.record_bytes,
                        EntryKind::Event => &mut totals.event_bytes,
                    };
                    *bytes = bytes.saturating_sub(size);
                    removed = true;
                    break;
                }
            }
            if removed {
                self.save_totals(txn, &totals)?;
            }
            Ok(removed)
        })
    }

    /// Remove every entry that does not parse (a damaged or altered file),
    /// so that the entries after it can still be published. Returns how many
    /// were removed; they are added to the `outbox.damaged` counter.
    pub fn remove_damaged(&self) -> Result<u64, StoreError> {
        let store = &self.store;
        store.write("outbox remove damaged", OUTBOX_RECORDS, |txn| {
            let mut totals = self.totals(txn)?;
            let mut removed = 0u64;
            for kind in [EntryKind::Record, EntryKind::Event] {
                let mut table = store.table(txn, kind.table())?;
                let mut freed = 0u64;
                table
                    .retain(|k, v| {
                        let ok = self.decode(kind, k, v).is_ok();
                        if !ok {
                            removed += 1;
                            freed = freed.saturating_add(v.len() as u64);
                        }
                        ok
                    })
                    .map_err(store.db_err("outbox remove damaged", kind.table()))?;
                let bytes = match kind {
                    EntryKind::Record => &mut totals.record_bytes,
                    EntryKind::Event => &mut totals.event_bytes,
                };
                *bytes = bytes.saturating_sub(freed);
            }
            if removed > 0 {
                self.save_totals(txn, &totals)?;
                store.counter_add_in(txn, "outbox.damaged", removed)?;
            }
            Ok(removed)
        })
    }

    /// Counts, size and the dropped-event counter, from one snapshot.
    pub fn stats(&self) -> Result<OutboxStats, StoreError> {
        let store = &self.store;
        let txn = store.read("outbox stats", OUTBOX_RECORDS)?;
        let count = |table| -> Result<u64, StoreError> {
            store
                .read_table(&txn, table)?
                .len()
                .map_err(store.db_err("outbox count", table))
        };
        let records = count(OUTBOX_RECORDS)?;
        let events = count(OUTBOX_EVENTS)?;
        let meta = store.read_table(&txn, META)?;
        let read = |key: &[u8]| read_u64(store, &meta, META, key);
        let bytes = read(META_RECORD_BYTES)?.saturating_add(read(META_EVENT_BYTES)?);
        let counters = store.read_table(&txn, COUNTERS)?;
        let dropped_events = read_u64(
            store,
            &counters,
            COUNTERS,
            DROPPED_EVENTS_COUNTER.as_bytes(),
        )?;
        Ok(OutboxStats {
            records,
            events,
            bytes,
            dropped_events,
        })
    }

    fn decode(&self, kind: EntryKind, key: &[u8], value: &[u8]) -> Result<OutboxEntry, StoreError> {
        decode(kind, key, value).map_err(|what| self.store.corrupt(kind.table(), key, what))
    }

    /// Drop the oldest event; `false` if there is none.
    fn drop_oldest_event(
        &self,
        events: &mut redb::Table<&[u8], &[u8]>,
        totals: &mut Totals,
    ) -> Result<bool, StoreError> {
        let popped = events
            .pop_first()
            .map_err(self.store.db_err("outbox drop event", OUTBOX_EVENTS))?
            .map(|(_, v)| v.value().len() as u64);
        match popped {
            Some(size) => {
                totals.event_bytes = totals.event_bytes.saturating_sub(size);
                Ok(true)
            }
            None => {
                // No events: whatever the total said, they take no room.
                totals.event_bytes = 0;
                Ok(false)
            }
        }
    }

    fn totals(&self, txn: &WriteTransaction) -> Result<Totals, StoreError> {
        let meta = self.store.table(txn, META)?;
        let read = |key: &[u8]| read_u64(&self.store, &meta, META, key);
        Ok(Totals {
            next_id: read(META_NEXT_ID)?,
            record_bytes: read(META_RECORD_BYTES)?,
            event_bytes: read(META_EVENT_BYTES)?,
        })
    }

    fn save_totals(&self, txn: &WriteTransaction, totals: &Totals) -> Result<(), StoreError> {
        let mut meta = self.store.table(txn, META)?;
        for (key, value) in [
            (META_NEXT_ID, totals.next_id),
            (META_RECORD_BYTES, totals.record_bytes),
            (META_EVENT_BYTES, totals.event_bytes),
        ] {
            meta.insert(key, &value.to_be_bytes()[..])
                .map_err(self.store.db_err("outbox totals", META))?;
        }
        Ok(())
    }
}

/// Parse a stored entry; the error says what is wrong with it.
fn decode(kind: EntryKind, key: &[u8], value: &[u8]) -> Result<OutboxEntry, &'static str> {
    let id = u64_value(key).ok_or("key is not an 8-byte id")?;
    let mut r = Reader::new(value);
    let enqueued_at = r.u64().ok_or("entry is shorter than its header")?;
    let topic_len = r.u16().ok_or("entry is shorter than its header")?;
    let topic = r
        .bytes(usize::from(topic_len))
        .ok_or("entry is shorter than its topic")?;
    let topic = std::str::from_utf8(topic).map_err(|_| "topic is not UTF-8")?;
    Ok(OutboxEntry {
        id,
        kind,
        topic: topic.to_owned(),
        payload: r.rest().to_vec(),
        enqueued_at,
    })
}

/// A u64 value of `table`, 0 when absent.
fn read_u64(
    store: &Store,
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: Table,
    key: &[u8],
) -> Result<u64, StoreError> {
    match table.get(key).map_err(store.db_err("read", name))? {
        None => Ok(0),
        Some(v) => u64_value(v.value())
            .ok_or_else(|| store.corrupt(name, key, "value is not an 8-byte integer")),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            key in proptest::collection::vec(any::<u8>(), 0..12),
            value in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = decode(EntryKind::Event, &key, &value);
        }
    }

    fn open() -> (tempfile::TempDir, std::path::PathBuf, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let store = Store::open(&path).expect("opens");
        (dir, path, store)
    }

    fn ids(entries: &[OutboxEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.id).collect()
    }

    /// Stored size of an entry with this topic and payload.
    fn size(topic: &str, payload: &[u8]) -> u64 {
        (ENTRY_HEADER + topic.len() + payload.len()) as u64
    }

    #[test]
    fn entries_come_back_in_push_order_and_survive_reopen() {
        let (_dir, path, store) = open();
        let outbox = store.outbox(OutboxPolicy::default());
        let a = outbox
            .push_record("bmsgw/v1/veh-a/events", b"record a")
            .expect("a");
        let b = outbox
            .push(EntryKind::Event, "bmsgw/v1/veh-a/events", b"event b")
            .expect("b")
            .id()
            .expect("stored");
        let c = outbox.push_record("bmsgw/v1/veh-a/events", b"").expect("c");
        assert!(a < b && b < c, "{a} {b} {c}");
        drop((outbox, store));

        let outbox = Store::open(&path)
            .expect("reopens")
            .outbox(OutboxPolicy::default());
        let pending = outbox.pending(10).expect("pending");
        assert_eq!(ids(&pending), vec![a, b, c]);
        assert_eq!(pending[0].kind, EntryKind::Record);
        assert_eq!(pending[0].topic, "bmsgw/v1/veh-a/events");
        assert_eq!(pending[0].payload, b"record a");
        assert_eq!(pending[1].kind, EntryKind::Event);
        assert_eq!(pending[1].payload, b"event b");
        assert!(pending[2].payload.is_empty());
        assert!(pending[0].enqueued_at > 1_700_000_000);
        assert_eq!(ids(&outbox.pending(2).expect("pending")), vec![a, b]);

        assert!(outbox.remove(b).expect("remove"));
        assert!(!outbox.remove(b).expect("already gone"));
        let stats = outbox.stats().expect("stats");
        assert_eq!((stats.records, stats.events), (2, 0));
        assert_eq!(
            stats.bytes,
            size("bmsgw/v1/veh-a/events", b"record a") + size("bmsgw/v1/veh-a/events", b"")
        );
        drop(outbox);

        let outbox = Store::open(&path)
            .expect("reopens")
            .outbox(OutboxPolicy::default());
        assert_eq!(ids(&outbox.pending(10).expect("pending")), vec![a, c]);
        assert!(outbox.remove(c).expect("remove"));
        assert!(outbox.remove(a).expect("remove"));
        assert!(outbox.pending(10).expect("pending").is_empty());
        assert_eq!(outbox.stats().expect("stats").bytes, 0);
        // Ids are never reused, even once the outbox is empty.
        assert!(outbox.push_record("t", b"d").expect("d") > c);
    }

    #[test]
    fn full_of_events_drops_the_oldest_and_counts_them() {
        let (_dir, path, store) = open();
        let policy = OutboxPolicy {
            max_records: 10,
            max_events: 3,
            max_bytes: 1 << 20,
        };
        let outbox = store.outbox(policy);
        let mut events = Vec::new();
        for i in 0..5u8 {
            let pushed = outbox.push(EntryKind::Event, "e", &[i]).expect("event");
            let expected_drops = u64::from(i >= 3);
            match pushed {
                Pushed::Queued { id, dropped_events } => {
                    assert_eq!(dropped_events, expected_drops, "push {i}");
                    events.push(id);
                }
                Pushed::Dropped => panic!("event {i} fits"),
            }
        }
        let pending = outbox.pending(10).expect("pending");
        assert_eq!(ids(&pending), events[2..].to_vec(), "the two oldest went");
        assert_eq!(pending[0].payload, [2]);
        let stats = outbox.stats().expect("stats");
        assert_eq!((stats.events, stats.dropped_events), (3, 2));
        drop((outbox, store));
        // The count is persisted, in the outbox stats and as a counter.
        let store = Store::open(&path).expect("reopens");
        assert_eq!(
            store.outbox(policy).stats().expect("stats").dropped_events,
            2
        );
        assert_eq!(store.counter(DROPPED_EVENTS_COUNTER).expect("counter"), 2);
    }

    #[test]
    fn records_are_never_dropped_and_the_cap_refuses_new_ones() {
        let (_dir, _path, store) = open();
        let policy = OutboxPolicy {
            max_records: 3,
            max_events: 100,
            max_bytes: 1 << 20,
        };
        let outbox = store.outbox(policy);
        let records: Vec<u64> = (0..3u8)
            .map(|i| outbox.push_record("r", &[i]).expect("record"))
            .collect();
        let event = outbox.push(EntryKind::Event, "e", b"x").expect("event");
        let err = outbox
            .push_record("r", b"one too many")
            .expect_err("at the cap");
        match &err {
            StoreError::OutboxFull {
                limit, policy: p, ..
            } => {
                assert_eq!(*limit, OutboxLimit::Records);
                assert_eq!(*p, policy);
            }
            other => panic!("expected OutboxFull, got {other}"),
        }
        let text = err.to_string();
        assert!(text.contains("at most 3 session records"), "{text}");
        assert!(text.contains("session records are never dropped"), "{text}");
        // Nothing was dropped or changed by the refusal.
        let mut expected = records.clone();
        expected.push(event.id().expect("stored"));
        assert_eq!(ids(&outbox.pending(10).expect("pending")), expected);
        assert_eq!(outbox.stats().expect("stats").dropped_events, 0);
        // After a PUBACK there is room again.
        assert!(outbox.remove(records[0]).expect("remove"));
        outbox.push_record("r", b"now fits").expect("room again");
    }

    #[test]
    fn byte_budget_drops_events_for_records_but_never_records() {
        let (_dir, _path, store) = open();
        let unit = size("t", &[0; 90]); // 100 bytes
        let policy = OutboxPolicy {
            max_records: 100,
            max_events: 100,
            max_bytes: 4 * unit,
        };
        let outbox = store.outbox(policy);
        let r1 = outbox.push_record("t", &[1; 90]).expect("r1");
        let e1 = outbox.push(EntryKind::Event, "t", &[2; 90]).expect("e1");
        let e2 = outbox.push(EntryKind::Event, "t", &[3; 90]).expect("e2");
        let e3 = outbox.push(EntryKind::Event, "t", &[4; 90]).expect("e3");
        assert!(matches!(
            e3,
            Pushed::Queued {
                dropped_events: 0,
                ..
            }
        ));
        assert_eq!(outbox.stats().expect("stats").bytes, 4 * unit);

        // A record takes the room of the oldest event.
        let r2 = outbox.push_record("t", &[5; 90]).expect("r2");
        let left = ids(&outbox.pending(10).expect("pending"));
        assert_eq!(
            left,
            vec![r1, e2.id().expect("e2"), e3.id().expect("e3"), r2],
            "e1 ({e1:?}) dropped"
        );
        // An event larger than the room beside the records is dropped itself,
        // and no older event is dropped for it.
        let big = outbox.push(EntryKind::Event, "t", &[6; 290]).expect("big");
        assert_eq!(big, Pushed::Dropped);
        assert_eq!(ids(&outbox.pending(10).expect("pending")), left);
        // Larger than the whole budget: dropped too.
        assert_eq!(
            outbox
                .push(EntryKind::Event, "t", &[7; 1000])
                .expect("huge"),
            Pushed::Dropped
        );
        let stats = outbox.stats().expect("stats");
        assert_eq!(stats.dropped_events, 3);
        assert_eq!((stats.records, stats.events, stats.bytes), (2, 2, 4 * unit));

        // Records then fill the budget, dropping every event, and then are
        // refused rather than dropped.
        let r3 = outbox.push_record("t", &[8; 90]).expect("r3");
        let r4 = outbox.push_record("t", &[9; 90]).expect("r4");
        assert_eq!(
            ids(&outbox.pending(10).expect("pending")),
            vec![r1, r2, r3, r4]
        );
        let err = outbox.push_record("t", &[10; 90]).expect_err("no room");
        assert!(
            matches!(
                err,
                StoreError::OutboxFull {
                    limit: OutboxLimit::Bytes,
                    ..
                }
            ),
            "{err}"
        );
        // With records filling the budget, every new event is dropped.
        assert_eq!(
            outbox.push(EntryKind::Event, "t", b"x").expect("event"),
            Pushed::Dropped
        );
        let stats = outbox.stats().expect("stats");
        assert_eq!(
            (stats.records, stats.events, stats.dropped_events),
            (4, 0, 6)
        );
    }

    #[test]
    fn a_topic_longer_than_mqtt_allows_is_refused() {
        let (_dir, _path, store) = open();
        let outbox = store.outbox(OutboxPolicy::default());
        let err = outbox
            .push_record(&"t".repeat(70_000), b"")
            .expect_err("too long");
        assert!(
            matches!(err, StoreError::TopicTooLong { len: 70_000, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_entry_is_reported_and_can_be_cleared() {
        let (_dir, _path, store) = open();
        let outbox = store.outbox(OutboxPolicy::default());
        let good = outbox.push_record("t", b"good").expect("push");
        store
            .write("test", OUTBOX_RECORDS, |txn| {
                let mut t = store.table(txn, OUTBOX_RECORDS)?;
                // Topic length says 500, but the entry ends after 2 bytes.
                t.insert(
                    &u64::MAX.to_be_bytes()[..],
                    &[0, 0, 0, 0, 0, 0, 0, 0, 1, 244, 1, 2][..],
                )
                .map_err(store.db_err("test", OUTBOX_RECORDS))?;
                t.insert(&[1, 2, 3][..], &[0; 12][..])
                    .map_err(store.db_err("test", OUTBOX_RECORDS))?;
                Ok(())
            })
            .expect("writes");
        let err = outbox.pending(10).expect_err("damaged");
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    table: "outbox_records",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(outbox.remove_damaged().expect("cleared"), 2);
        assert_eq!(ids(&outbox.pending(10).expect("pending")), vec![good]);
        assert_eq!(store.counter("outbox.damaged").expect("counter"), 2);
    }
}
