//! Opening the file, its schema version, and the transaction helpers the
//! other parts use.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

use super::codec::Reader;
use super::error::StoreError;

/// The layout this code reads and writes. A file with another version is
/// refused: an older bmsgw must not misread a newer layout.
pub const SCHEMA_VERSION: u32 = 1;

/// A table of the store. Every table maps bytes to bytes; see the module
/// docs for why.
#[derive(Clone, Copy, Debug)]
pub(super) struct Table(pub(super) &'static str);

impl Table {
    fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(self.0)
    }
}

/// Schema version and bookkeeping of the other tables.
pub(super) const META: Table = Table("meta");
/// Session records waiting for PUBACK, by id (u64 big-endian).
pub(super) const OUTBOX_RECORDS: Table = Table("outbox_records");
/// Events waiting for PUBACK, by id (one id sequence with the records).
pub(super) const OUTBOX_EVENTS: Table = Table("outbox_events");
/// Vouchers by ticket id (12 bytes).
pub(super) const WALLET: Table = Table("wallet");
/// Spent ticket ids of the pile's replay cache (12 bytes → not_after).
pub(super) const REPLAY: Table = Table("replay");
/// Named u64 counters.
pub(super) const COUNTERS: Table = Table("counters");
/// Sessions that spent a credential and have not ended yet, by record id.
pub(super) const OPEN_SESSIONS: Table = Table("open_sessions");

const ALL_TABLES: [Table; 7] = [
    META,
    OUTBOX_RECORDS,
    OUTBOX_EVENTS,
    WALLET,
    REPLAY,
    COUNTERS,
    OPEN_SESSIONS,
];

pub(super) const META_SCHEMA_VERSION: &[u8] = b"schema_version";

/// redb's file signature (its first bytes); checked before redb sees the
/// file, so a file that is not a database gets a plain answer.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// redb's page cache. The default (1 GiB) is sized for servers; the store of
/// an ECU is a few MiB.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The gateway's durable state: one redb file. Clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store {
    /// Open the store at `path`, creating it (mode 0600) and its parent
    /// directory (mode 0700) if missing.
    ///
    /// Refuses a file others may access, a file that is not a redb database,
    /// a damaged one, one open in another process, and one with another
    /// schema version, each with an error naming the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::CreateDir {
                    path: path.clone(),
                    source,
                })?;
        }
        // An existing file must already be a store: only a file this call
        // creates may start empty (see `check_file`).
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StoreError::OpenFile {
                path: path.clone(),
                source,
            })?;
        check_file(&path, &file, existed)?;
        let backend =
            redb::backends::FileBackend::new(file).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create_with_backend(backend)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::InUse { path: path.clone() }
                }
                source => StoreError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let store = Store {
            inner: Arc::new(Inner { db, path }),
        };
        store.init_schema()?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Create the tables of a new file, or check the version of an old one.
    fn init_schema(&self) -> Result<(), StoreError> {
        self.write("open", META, |txn| {
            let mut meta = self.table(txn, META)?;
            let found = match meta
                .get(META_SCHEMA_VERSION)
                .map_err(self.db_err("read schema version", META))?
            {
                Some(v) => Some(Reader::new(v.value()).u32().ok_or_else(|| {
                    self.corrupt(
                        META,
                        META_SCHEMA_VERSION,
                        "schema version is not a 4-byte integer",
                    )
                })?),
                None => None,
            };
            match found {
                Some(SCHEMA_VERSION) => {}
                Some(found) => {
                    return Err(StoreError::UnknownSchema {
                        path: self.inner.path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                None => {
                    meta.insert(META_SCHEMA_VERSION, &SCHEMA_VERSION.to_be_bytes()[..])
                        .map_err(self.db_err("write schema version", META))?;
                }
            }
            drop(meta);
            for table in ALL_TABLES {
                self.table(txn, table)?;
            }
            Ok(())
        })
    }

    /// Run `f` in a write transaction and commit it durably
    /// ([`Durability::Immediate`]) before returning. If `f` fails, nothing
    /// it wrote is kept.
    pub(super) fn write<T>(
        &self,
        operation: &'static str,
        table: Table,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let err = |source: redb::Error| StoreError::Db {
            path: self.inner.path.clone(),
            operation,
            table: table.0,
            source: Box::new(source),
        };
        let mut txn = self.inner.db.begin_write().map_err(|e| err(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| err(e.into()))?;
        let out = f(&txn)?;
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(out)
    }

    /// A read transaction: a consistent snapshot.
    pub(super) fn read(
        &self,
        operation: &'static str,
        table: Table,
    ) -> Result<ReadTransaction, StoreError> {
        self.inner.db.begin_read().map_err(|e| StoreError::Db {
            path: self.inner.path.clone(),
            operation,
            table: table.0,
            source: Box::new(e.into()),
        })
    }

    pub(super) fn table<'t>(
        &self,
        txn: &'t WriteTransaction,
        table: Table,
    ) -> Result<redb::Table<'t, &'static [u8], &'static [u8]>, StoreError> {
        txn.open_table(table.def())
            .map_err(self.db_err("open table", table))
    }

    pub(super) fn read_table(
        &self,
        txn: &ReadTransaction,
        table: Table,
    ) -> Result<redb::ReadOnlyTable<&'static [u8], &'static [u8]>, StoreError> {
        txn.open_table(table.def())
            .map_err(self.db_err("open table", table))
    }

    /// Map a redb error to [`StoreError::Db`] with its context.
    pub(super) fn db_err<E: Into<redb::Error>>(
        &self,
        operation: &'static str,
        table: Table,
    ) -> impl FnOnce(E) -> StoreError + '_ {
        move |e| StoreError::Db {
            path: self.inner.path.clone(),
            operation,
            table: table.0,
            source: Box::new(e.into()),
        }
    }

    pub(super) fn corrupt(&self, table: Table, key: &[u8], what: &'static str) -> StoreError {
        StoreError::Corrupt {
            path: self.inner.path.clone(),
            table: table.0,
            key: super::codec::show_key(key),
            what,
        }
    }

    pub(super) fn path_buf(&self) -> PathBuf {
        self.inner.path.clone()
    }
}

/// Refuse what is not a regular file of our own, or not a redb file.
fn check_file(path: &Path, mut file: &File, existed: bool) -> Result<(), StoreError> {
    let meta = file.metadata().map_err(|source| StoreError::OpenFile {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(StoreError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() == 0 {
        if existed {
            // A store truncated to nothing (a bad copy, a file system that
            // lost its data). Starting afresh would silently forget the
            // spent-voucher tombstones, and a voucher imported again would
            // then be spent twice: the operator decides (docs/operations.md).
            return Err(StoreError::NotAStore {
                path: path.to_path_buf(),
                what: "the file is empty: truncated or damaged",
            });
        }
        // Created just now: redb initialises it.
        return Ok(());
    }
    let mut head = Vec::with_capacity(REDB_MAGIC.len());
    Read::by_ref(&mut file)
        .take(REDB_MAGIC.len() as u64)
        .read_to_end(&mut head)
        .map_err(|source| StoreError::OpenFile {
            path: path.to_path_buf(),
            source,
        })?;
    if head != REDB_MAGIC {
        return Err(StoreError::NotAStore {
            path: path.to_path_buf(),
            what: "it does not start with the redb signature",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    fn flip_all(bytes: &mut [u8], needle: &[u8]) -> usize {
        let mut hits = 0;
        let mut at = 0;
        while let Some(pos) = bytes
            .get(at..)
            .and_then(|rest| rest.windows(needle.len()).position(|w| w == needle))
        {
            let start = at + pos;
            for b in &mut bytes[start..start + needle.len()] {
                *b ^= 0xA5;
            }
            hits += 1;
            at = start + needle.len();
        }
        hits
    }

    #[test]
    fn creates_the_file_0600_and_its_directory_0700() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("var/lib/bmsgw/state.redb");
        let store = Store::open(&path).expect("opens");
        assert_eq!(store.path(), path);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("var/lib/bmsgw")), 0o700);
        drop(store);
        // Reopening keeps it so.
        Store::open(&path).expect("reopens");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn refuses_a_file_others_can_access() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        drop(Store::open(&path).expect("opens"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = Store::open(&path).expect_err("loose mode");
        assert!(
            matches!(err, StoreError::Permissions { mode: 0o640, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("chmod 600") && text.contains("state.redb"),
            "{text}"
        );
    }

    #[test]
    fn garbage_and_short_files_are_refused_with_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, content) in [
            (
                "garbage.redb",
                (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            ),
            ("short.redb", b"red".to_vec()),
            ("text.redb", b"this is not a database\n".to_vec()),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, &content).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            let err = Store::open(&path).expect_err("not a store");
            assert!(matches!(err, StoreError::NotAStore { .. }), "{name}: {err}");
            assert!(err.to_string().contains(name), "{err}");
            // The file is left alone for inspection.
            assert_eq!(std::fs::read(&path).expect("read"), content);
        }
        let err = Store::open(dir.path()).expect_err("a directory");
        assert!(
            err.to_string().contains(&*dir.path().to_string_lossy()),
            "{err}"
        );
    }

    /// Regression (fault suite): an existing store truncated to 0 bytes was
    /// taken for a new one and silently reset, forgetting spent vouchers.
    #[test]
    fn an_existing_empty_file_is_refused_not_reset() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        drop(Store::open(&path).expect("opens"));
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("truncate");
        let err = Store::open(&path).expect_err("an empty store is not a new store");
        assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("empty") && text.contains("state.redb"),
            "{text}"
        );
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            0,
            "left alone"
        );
    }

    #[test]
    fn damaged_data_is_refused_at_open_not_trusted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let marker = b"<<session record payload>>";
        {
            let outbox = Store::open(&path)
                .expect("opens")
                .outbox(Default::default());
            for _ in 0..20 {
                outbox.push_record("t", marker).expect("push");
            }
        }
        let mut bytes = std::fs::read(&path).expect("read");
        assert!(
            flip_all(&mut bytes, marker) > 0,
            "the payload is in the file"
        );
        std::fs::write(&path, &bytes).expect("write");
        let err = Store::open(&path).expect_err("checksums catch it");
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(err.to_string().contains("state.redb"), "{err}");
    }

    #[test]
    fn no_single_damaged_region_makes_open_panic() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        {
            let store = Store::open(&path).expect("opens");
            let outbox = store.outbox(Default::default());
            for i in 0..30u8 {
                outbox.push_record("t", &[i; 200]).expect("push");
            }
            store.counter_add("c", 1).expect("count");
        }
        let clean = std::fs::read(&path).expect("read");
        let mut refused = 0;
        for offset in (9..clean.len()).step_by(251) {
            let mut bad = clean.clone();
            for b in bad.iter_mut().skip(offset).take(8) {
                *b ^= 0x5A;
            }
            std::fs::write(&path, &bad).expect("write");
            let outcome = std::panic::catch_unwind(|| {
                Store::open(&path).and_then(|s| s.outbox(Default::default()).pending(100))
            });
            match outcome {
                Err(_) => panic!("damage at offset {offset} made the store panic"),
                Ok(Err(_)) => refused += 1,
                Ok(Ok(_)) => {}
            }
        }
        assert!(refused > 0, "some damage hit live pages and was refused");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let store = Store::open(&path).expect("opens");
        store
            .write("test", META, |txn| {
                store
                    .table(txn, META)?
                    .insert(META_SCHEMA_VERSION, &7u32.to_be_bytes()[..])
                    .map_err(store.db_err("test", META))?;
                Ok(())
            })
            .expect("writes");
        drop(store);
        let err = Store::open(&path).expect_err("future version");
        assert!(
            matches!(
                err,
                StoreError::UnknownSchema {
                    found: 7,
                    supported: SCHEMA_VERSION,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("schema version 7"), "{err}");
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused_while_in_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let store = Store::open(&path).expect("opens");
        let err = Store::open(&path).expect_err("locked");
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        drop(store);
        Store::open(&path).expect("free again");
    }
}
