//! The process behind the hidden `bmsgw store-writer` subcommand, which
//! `tests/system/outbox_kill.rs` kills with SIGKILL at random points to show the
//! outbox loses nothing it acknowledged.
//!
//! It pushes session records forever and reports on stdout, flushed, only
//! what has been committed: `committed <seq> <id>` after a push returned, and
//! `removed <id>` after a remove (every third record, standing in for a
//! PUBACK) returned. The payload of record `seq` is [`payload`]`(seq)`, so
//! the test can check it byte for byte.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::Store;
use super::error::StoreError;
use super::outbox::OutboxPolicy;

/// The topic the writer's records are queued on.
pub const TOPIC: &str = "bmsgw/v1/store-writer/events";

/// Why the writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store-writer {}: cannot write to stdout", .path.display())]
    Stdout {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Record `seq`'s payload: `seq` (u64 big-endian), then `seq % 97` bytes
/// derived from it, so lengths vary and any mix-up shows.
pub fn payload(seq: u64) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    let fill = (seq % 97) as u8;
    p.extend((0..fill).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i)));
    p
}

/// Push records `start, start + 1, …` into the outbox of the store at
/// `path` until killed (or an error stops it).
pub fn run(path: &Path, start: u64, out: &mut dyn Write) -> Result<(), WriterError> {
    let store = Store::open(path)?;
    let outbox = store.outbox(OutboxPolicy::default());
    let stdout = |source| WriterError::Stdout {
        path: path.to_path_buf(),
        source,
    };
    for seq in start.. {
        let id = outbox.push_record(TOPIC, &payload(seq))?;
        writeln!(out, "committed {seq} {id}")
            .and_then(|()| out.flush())
            .map_err(stdout)?;
        if seq % 3 == 0 && outbox.remove(id)? {
            writeln!(out, "removed {id}")
                .and_then(|()| out.flush())
                .map_err(stdout)?;
        }
    }
    Ok(())
}
