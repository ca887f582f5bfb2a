//! The store's one error type.

use std::fmt;
use std::path::PathBuf;

use super::outbox::OutboxPolicy;

/// Which outbox bound refused a session record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxLimit {
    /// `max_records` session records are queued.
    Records,
    /// The record does not fit in `max_bytes`, even with every event dropped.
    Bytes,
}

impl fmt::Display for OutboxLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutboxLimit::Records => "the session-record cap is reached",
            OutboxLimit::Bytes => "the record does not fit in the byte budget",
        })
    }
}

/// Why the store refused or failed. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {p}: cannot create its directory", p = .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store {p}: cannot open or create the file", p = .path.display())]
    OpenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store {p} is not a regular file", p = .path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "store {p} has mode {mode:04o}; it must be accessible by its owner only (run: chmod 600 {p})",
        p = .path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "store {p} is not a bmsgw store ({what}); bmsgw does not start on it. \
         To recover, see \"Store recovery\" in docs/operations.md \
         (/usr/share/doc/bmsgw/operations.md from the .deb)",
        p = .path.display()
    )]
    NotAStore { path: PathBuf, what: &'static str },
    #[error("store {p} is open in another process", p = .path.display())]
    InUse { path: PathBuf },
    #[error(
        "store {p} cannot be opened (damaged?); bmsgw does not start on it. \
         To recover, see \"Store recovery\" in docs/operations.md \
         (/usr/share/doc/bmsgw/operations.md from the .deb)",
        p = .path.display()
    )]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error(
        "store {p} has schema version {found}, but this bmsgw knows only version {supported}; \
         run the bmsgw that wrote it, or move the file aside",
        p = .path.display()
    )]
    UnknownSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("store {p}: {operation} on table `{table}` failed", p = .path.display())]
    Db {
        path: PathBuf,
        operation: &'static str,
        table: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored value does not parse. The entry is named so that the caller
    /// can remove it (an outbox entry) or so that it can be reported.
    #[error("store {p}: table `{table}`, entry {key}: {what}", p = .path.display())]
    Corrupt {
        path: PathBuf,
        table: &'static str,
        key: String,
        what: &'static str,
    },
    /// The outbox refuses a session record; the caller must not start a
    /// session it could not record.
    #[error("outbox of store {p} is full: {limit} (policy: {policy})", p = .path.display())]
    OutboxFull {
        path: PathBuf,
        limit: OutboxLimit,
        policy: OutboxPolicy,
    },
    #[error("outbox of store {p}: topic of {len} bytes is longer than 65535", p = .path.display())]
    TopicTooLong { path: PathBuf, len: usize },
    #[error("store {p}: counter name must be 1..=255 bytes, not {len}", p = .path.display())]
    CounterName { path: PathBuf, len: usize },
    #[error(
        "store {p}: the wallet key is not the key this store's vouchers are sealed with \
         (check the wallet key file; a new key cannot open the old vouchers)",
        p = .path.display()
    )]
    WalletKeyMismatch { path: PathBuf },
    /// A voucher failed authentication: the file was altered or damaged. The
    /// voucher has been set aside as spent and will not be offered again.
    #[error("store {p}: voucher {ticket_id} is damaged or was tampered with; it was set aside", p = .path.display())]
    VoucherTampered { path: PathBuf, ticket_id: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_send_and_sync_for_boxing_into_trait_errors() {
        fn assert_bounds<T: Send + Sync + 'static>() {}
        assert_bounds::<StoreError>();
        let e = StoreError::InUse {
            path: "/var/lib/bmsgw/state.redb".into(),
        };
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
        assert!(boxed.to_string().contains("/var/lib/bmsgw/state.redb"));
    }
}
