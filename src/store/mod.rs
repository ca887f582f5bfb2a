//! Durable state of the gateway, in one redb file: the outbox of session
//! records and events, the voucher wallet, the pile's replay cache and a few
//! counters.
//!
//! Why one file: a charging session touches several of them at once (a
//! voucher is spent, a record is queued), and one file means one lock, one
//! integrity check at start-up and one place on the ECU's state partition
//! (`/var/lib/bmsgw`, the systemd `StateDirectory`).
//!
//! Every write is a redb transaction committed with
//! [`redb::Durability::Immediate`] before the call returns: what the caller
//! was told is stored survives a crash, `kill -9` or a power cut.
//!
//! **The file is external input.** The SD card of an ECU can be taken out,
//! copied, edited and put back. Therefore:
//! - the file is created with mode 0600 and an existing file with a looser
//!   mode is refused, like a key file;
//! - redb verifies the checksum of every page on open
//!   ([`redb::Builder::set_check_integrity_on_open`]), so a damaged file is
//!   refused with an error rather than trusted (without it redb may panic on
//!   a file altered outside redb);
//! - every table maps bytes to bytes and this module parses them itself,
//!   bounds-checked, never with `unwrap` or indexing: redb's own integer and
//!   string codecs panic on a value of the wrong length;
//! - voucher secrets are sealed with a wallet key kept outside this file
//!   (see [`wallet`]).
//!
//! What this does not defend against: redb's page checksums are not a MAC,
//! so a file crafted with valid checksums reaches redb's B-tree code as
//! trusted input; and an attacker who restores an older copy of the file
//! brings back vouchers spent since (the pile's replay cache and the cloud's
//! reconciliation of session records catch a voucher spent twice).
//!
//! All calls block on file I/O (and on each other's write transactions);
//! from async code, call them through `tokio::task::spawn_blocking`.

mod codec;
mod counters;
mod db;
mod error;
pub mod journal;
pub mod outbox;
pub mod replay;
pub mod wallet;
#[doc(hidden)]
pub mod writer;

pub use db::{SCHEMA_VERSION, Store};
pub use error::{OutboxLimit, StoreError};
pub use outbox::{EntryKind, Outbox, OutboxEntry, OutboxPolicy, OutboxStats, Pushed};
pub use replay::DurableReplayStore;
pub use wallet::DurableWallet;
