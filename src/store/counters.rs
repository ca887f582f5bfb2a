//! Named counters that survive restarts: events the outbox dropped, and
//! whatever else the daemon wants to report in `bmsgw status`. Counters
//! saturate at `u64::MAX` rather than wrap.

use redb::{ReadableTable, WriteTransaction};

use super::codec::u64_value;
use super::db::{COUNTERS, Store};
use super::error::StoreError;

/// Longest counter name, in bytes.
const MAX_NAME: usize = 255;

impl Store {
    /// Add `n` to counter `name` (created at 0) and return its new value,
    /// committed durably.
    pub fn counter_add(&self, name: &str, n: u64) -> Result<u64, StoreError> {
        self.check_counter_name(name)?;
        self.write("counter add", COUNTERS, |txn| {
            self.counter_add_in(txn, name, n)
        })
    }

    /// The value of counter `name`; 0 if it was never added to.
    pub fn counter(&self, name: &str) -> Result<u64, StoreError> {
        self.check_counter_name(name)?;
        let txn = self.read("counter read", COUNTERS)?;
        let table = self.read_table(&txn, COUNTERS)?;
        let value = table
            .get(name.as_bytes())
            .map_err(self.db_err("counter read", COUNTERS))?;
        match value {
            None => Ok(0),
            Some(v) => u64_value(v.value()).ok_or_else(|| {
                self.corrupt(COUNTERS, name.as_bytes(), "value is not an 8-byte integer")
            }),
        }
    }

    /// Every counter, by name. Entries that do not parse are left out.
    pub fn counters(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.read("counters list", COUNTERS)?;
        let table = self.read_table(&txn, COUNTERS)?;
        let mut out = Vec::new();
        for entry in table
            .iter()
            .map_err(self.db_err("counters list", COUNTERS))?
        {
            let (k, v) = entry.map_err(self.db_err("counters list", COUNTERS))?;
            if let (Ok(name), Some(value)) = (std::str::from_utf8(k.value()), u64_value(v.value()))
            {
                out.push((name.to_owned(), value));
            }
        }
        Ok(out)
    }

    /// [`Store::counter_add`] inside a caller's transaction, so a counter
    /// moves atomically with what it counts.
    pub(super) fn counter_add_in(
        &self,
        txn: &WriteTransaction,
        name: &str,
        n: u64,
    ) -> Result<u64, StoreError> {
        let mut table = self.table(txn, COUNTERS)?;
        let old = match table
            .get(name.as_bytes())
            .map_err(self.db_err("counter read", COUNTERS))?
        {
            None => 0,
            Some(v) => u64_value(v.value()).ok_or_else(|| {
                self.corrupt(COUNTERS, name.as_bytes(), "value is not an 8-byte integer")
            })?,
        };
        let new = old.saturating_add(n);
        table
            .insert(name.as_bytes(), &new.to_be_bytes()[..])
            .map_err(self.db_err("counter add", COUNTERS))?;
        Ok(new)
    }

    fn check_counter_name(&self, name: &str) -> Result<(), StoreError> {
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(StoreError::CounterName {
                path: self.path_buf(),
                len: name.len(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_persist_and_saturate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let store = Store::open(&path).expect("opens");
        assert_eq!(store.counter("link.reconnects").expect("reads"), 0);
        assert_eq!(store.counter_add("link.reconnects", 2).expect("adds"), 2);
        assert_eq!(store.counter_add("link.reconnects", 3).expect("adds"), 5);
        assert_eq!(
            store.counter_add("big", u64::MAX - 1).expect("adds"),
            u64::MAX - 1
        );
        assert_eq!(store.counter_add("big", 5).expect("adds"), u64::MAX);
        drop(store);
        let store = Store::open(&path).expect("reopens");
        assert_eq!(store.counter("link.reconnects").expect("reads"), 5);
        let mut all = store.counters().expect("lists");
        all.sort();
        assert_eq!(
            all,
            vec![("big".into(), u64::MAX), ("link.reconnects".into(), 5)]
        );
        assert!(matches!(
            store.counter_add("", 1),
            Err(StoreError::CounterName { len: 0, .. })
        ));
        assert!(store.counter(&"x".repeat(256)).is_err());
    }
}
