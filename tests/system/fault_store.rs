//! Fault suite: the store file is corrupted (issue 6, deliverable 3). The
//! daemon must refuse to start with an error that names the file and the
//! recovery path (docs/operations.md, "Store recovery"), and must leave
//! the file as it found it: never a silent reset, which would forget the
//! spent-voucher tombstones and let an old voucher be spent again.

use crate::fault_support::{Rig, no_faults};
use bmsgw::service::daemon::DaemonError;
use bmsgw::store::StoreError;

/// A rig whose store holds three vouchers; the daemon is not running.
async fn used_store() -> Rig {
    let mut rig = Rig::new(None);
    rig.add_vouchers(3);
    rig
}

async fn start_refused(rig: &mut Rig) -> DaemonError {
    rig.start_daemon(no_faults());
    match rig.stop_daemon().await {
        Ok(()) => panic!("the daemon started on a damaged store"),
        Err(e) => e,
    }
}

fn assert_clear(e: &DaemonError, rig: &Rig) {
    let text = bmsgw::service::logging::chain(e);
    let path = rig.config.store.path.display().to_string();
    assert!(
        matches!(
            e,
            DaemonError::Store(StoreError::Open { .. } | StoreError::NotAStore { .. })
        ),
        "{text}"
    );
    assert!(text.contains(&path), "names the file: {text}");
    assert!(
        text.contains("Store recovery") && text.contains("docs/operations.md"),
        "names the recovery path: {text}"
    );
}

#[tokio::test]
async fn a_damaged_store_stops_the_daemon_with_the_recovery_path_and_is_left_alone() {
    let mut rig = used_store().await;
    let path = rig.config.store.path.clone();
    let mut bytes = std::fs::read(&path).expect("read");
    // Damage every page after the header: whatever the layout, live pages
    // are hit and their checksums no longer match.
    for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
        if i % 512 < 16 {
            *b ^= 0x5A;
        }
    }
    std::fs::write(&path, &bytes).expect("write");
    let e = start_refused(&mut rig).await;
    assert_clear(&e, &rig);
    assert_eq!(std::fs::read(&path).expect("read"), bytes, "left as found");
}

#[tokio::test]
async fn an_emptied_store_is_not_taken_for_a_new_one() {
    let mut rig = used_store().await;
    let path = rig.config.store.path.clone();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("truncate");
    let e = start_refused(&mut rig).await;
    assert_clear(&e, &rig);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        0,
        "not reset"
    );
}

#[tokio::test]
async fn the_documented_recovery_gives_a_working_daemon() {
    let mut rig = used_store().await;
    let path = rig.config.store.path.clone();
    std::fs::write(&path, b"garbage").expect("write");
    let e = start_refused(&mut rig).await;
    assert_clear(&e, &rig);
    // docs/operations.md: move the file aside (keep it), start again.
    let aside = path.with_extension("redb.damaged");
    std::fs::rename(&path, &aside).expect("move aside");
    rig.start_daemon(no_faults());
    // READY comes after the store is open: the daemon runs on a new store.
    rig.daemon_ready()
        .await
        .expect("the daemon starts on a new store");
    rig.stop_daemon().await.expect("clean stop");
    assert_eq!(std::fs::read(&aside).expect("kept"), b"garbage");
    assert_eq!(rig.ledger().remaining, 0, "a new, empty store");
}
