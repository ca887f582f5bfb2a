//! The voucher wallet on disk: [`crate::auth::VoucherWallet`] for offline
//! charging, where a voucher must be spent at most once even across crashes.
//!
//! **Spend before use.** [`DurableWallet::take_for`] commits the voucher as
//! spent (durably) before it returns it. A crash after that loses the
//! voucher, never spends it twice. A spent, revoked or already-seen ticket id
//! stays in the table as a tombstone, so it is neither returned nor accepted
//! again, also after a restart.
//!
//! **Sealed secrets.** A voucher holds a session key, and the SD card of an
//! ECU can be copied. Each voucher's ticket and session key are sealed with
//! ChaCha20-Poly1305 under a 32-byte *wallet key* that is not in this file:
//! the daemon loads it with [`crate::service::keyfile::load_key`] from
//! protected storage (a 0600 file on a separate, ideally hardware-backed or
//! encrypted, partition; not next to the store). Each entry has a random
//! nonce; the associated data binds the ticket id and the plaintext fields
//! used to pick a voucher (pile, validity, energy cap), so an entry cannot be
//! moved to another id or have its validity stretched. An entry that fails
//! to open is reported with its ticket id, set aside as spent, and never
//! returned.
//!
//! The first [`Store::wallet`] call records a check value sealed under the
//! key; a later call with another key is refused up front
//! ([`StoreError::WalletKeyMismatch`]) instead of failing on, and setting
//! aside, every voucher.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use redb::ReadableTable;
use zeroize::Zeroizing;

use crate::auth::{Credential, Rng, SessionKey, SystemRng, TICKET_LEN, VoucherWallet, WalletError};

use super::codec::Reader;
use super::db::{META, Store, WALLET};
use super::error::StoreError;
use super::journal::Draft;

const TAG_UNSPENT: u8 = 1;
const TAG_SPENT: u8 = 2;
/// Tag, charger number, not_before, not_after, energy cap.
const HEADER_LEN: usize = 17;
const SEALED_LEN: usize = TICKET_LEN + 32 + 16;
/// Domain separation for the AEAD's associated data.
const AAD_VOUCHER: &[u8] = b"bmsgw wallet voucher v1";
const AAD_KEY_CHECK: &[u8] = b"bmsgw wallet key check v1";
const META_KEY_CHECK: &[u8] = b"wallet.key_check";
/// `not_after` of a tombstone for a revocation of a voucher never seen.
const UNKNOWN_NOT_AFTER: u32 = u32::MAX;

/// A [`VoucherWallet`] in the store's `wallet` table.
pub struct DurableWallet {
    store: Store,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for DurableWallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableWallet")
            .field("store", &self.store)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Store {
    /// The wallet, sealed under `key` (load it with `keyfile::load_key`).
    /// Refuses a key other than the one this store's wallet was first
    /// opened with.
    pub fn wallet(&self, key: Zeroizing<[u8; 32]>) -> Result<DurableWallet, StoreError> {
        let wallet = DurableWallet {
            store: self.clone(),
            key,
        };
        wallet.check_key()?;
        Ok(wallet)
    }
}

/// The plaintext fields of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Unspent {
        charger_number: u32,
        not_before: u32,
        not_after: u32,
        energy_cap_wh: u32,
    },
    Spent {
        not_after: u32,
    },
}

impl Entry {
    fn parse(value: &[u8]) -> Option<Entry> {
        let mut r = Reader::new(value);
        match r.u8()? {
            TAG_UNSPENT => Some(Entry::Unspent {
                charger_number: r.u32()?,
                not_before: r.u32()?,
                not_after: r.u32()?,
                energy_cap_wh: r.u32()?,
            }),
            TAG_SPENT => {
                let not_after = r.u32()?;
                r.end()?;
                Some(Entry::Spent { not_after })
            }
            _ => None,
        }
    }

    fn usable(self, charger: u32, unix_now: u32) -> Option<u32> {
        match self {
            Entry::Unspent {
                charger_number,
                not_before,
                not_after,
                ..
            } if charger_number == charger && not_before <= unix_now && unix_now <= not_after => {
                Some(not_after)
            }
            _ => None,
        }
    }
}

fn tombstone(not_after: u32) -> [u8; 5] {
    let [a, b, c, d] = not_after.to_be_bytes();
    [TAG_SPENT, a, b, c, d]
}

fn voucher_aad(ticket_id: &[u8; 12], header: &[u8; HEADER_LEN]) -> Vec<u8> {
    [AAD_VOUCHER, ticket_id, header].concat()
}

fn cipher(key: &[u8; 32]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(key))
}

/// Open an unspent entry; `None` if it fails authentication or parsing.
fn open_entry(key: &[u8; 32], ticket_id: &[u8; 12], value: &[u8]) -> Option<Credential> {
    let (header, rest) = value.split_first_chunk::<HEADER_LEN>()?;
    let Entry::Unspent {
        charger_number,
        not_before,
        not_after,
        energy_cap_wh,
    } = Entry::parse(header)?
    else {
        return None;
    };
    let mut r = Reader::new(rest);
    let nonce = r.array::<12>()?;
    let mut buf = Zeroizing::new(r.rest().to_vec());
    if buf.len() != SEALED_LEN {
        return None;
    }
    cipher(key)
        .decrypt_in_place(
            Nonce::from_slice(&nonce),
            &voucher_aad(ticket_id, header),
            &mut *buf,
        )
        .ok()?;
    let mut plain = Reader::new(&buf);
    let ticket = plain.array::<TICKET_LEN>()?;
    let session_key = Zeroizing::new(plain.array::<32>()?);
    plain.end()?;
    let credential = Credential {
        ticket,
        session_key: SessionKey::from_bytes(*session_key),
        charger_number,
        not_before,
        not_after,
        energy_cap_wh,
        voucher: true,
    };
    (credential.ticket_id() == *ticket_id).then_some(credential)
}

/// A voucher that would not open, or whose entry does not parse.
struct Damaged {
    key: Vec<u8>,
    not_after: u32,
}

impl DurableWallet {
    fn cipher(&self) -> ChaCha20Poly1305 {
        cipher(&self.key)
    }

    /// Record the key check on first use; compare it afterwards.
    fn check_key(&self) -> Result<(), StoreError> {
        let store = &self.store;
        store.write("wallet key check", META, |txn| {
            let mut meta = store.table(txn, META)?;
            let stored = meta
                .get(META_KEY_CHECK)
                .map_err(store.db_err("wallet key check", META))?
                .map(|v| v.value().to_vec());
            match stored {
                Some(check) => {
                    let mut r = Reader::new(&check);
                    let opened = r.array::<12>().and_then(|nonce| {
                        let mut buf = r.rest().to_vec();
                        self.cipher()
                            .decrypt_in_place(Nonce::from_slice(&nonce), AAD_KEY_CHECK, &mut buf)
                            .ok()
                    });
                    opened.ok_or_else(|| StoreError::WalletKeyMismatch {
                        path: store.path_buf(),
                    })
                }
                None => {
                    let mut nonce = [0u8; 12];
                    SystemRng.fill(&mut nonce);
                    let mut buf = Vec::with_capacity(16);
                    self.cipher()
                        .encrypt_in_place(Nonce::from_slice(&nonce), AAD_KEY_CHECK, &mut buf)
                        // Invariant: only plaintexts over 256 GiB are refused.
                        .expect("an empty plaintext is within ChaCha20-Poly1305's limit");
                    let value = [&nonce[..], &buf].concat();
                    meta.insert(META_KEY_CHECK, value.as_slice())
                        .map_err(store.db_err("wallet key check", META))?;
                    Ok(())
                }
            }
        })
    }

    /// Revoke vouchers (a `Revocation` from the cloud): each becomes spent.
    /// An id not in the wallet is recorded too, so the voucher is refused if
    /// it arrives later. Returns how many unspent vouchers were revoked.
    pub fn revoke(&mut self, ticket_ids: &[[u8; 12]]) -> Result<usize, StoreError> {
        let store = &self.store;
        store.write("wallet revoke", WALLET, |txn| {
            let mut table = store.table(txn, WALLET)?;
            let mut revoked = 0;
            for id in ticket_ids {
                let entry = table
                    .get(&id[..])
                    .map_err(store.db_err("wallet revoke", WALLET))?
                    .map(|v| Entry::parse(v.value()));
                let not_after = match entry {
                    Some(Some(Entry::Spent { .. })) => continue,
                    Some(Some(Entry::Unspent { not_after, .. })) => {
                        revoked += 1;
                        not_after
                    }
                    Some(None) | None => UNKNOWN_NOT_AFTER,
                };
                table
                    .insert(&id[..], &tombstone(not_after)[..])
                    .map_err(store.db_err("wallet revoke", WALLET))?;
            }
            Ok(revoked)
        })
    }

    /// Unspent vouchers for any pile, valid or not.
    pub fn unspent_count(&self) -> Result<usize, StoreError> {
        let store = &self.store;
        let txn = store.read("wallet count", WALLET)?;
        let table = store.read_table(&txn, WALLET)?;
        let mut n = 0;
        for entry in table.iter().map_err(store.db_err("wallet count", WALLET))? {
            let (_, v) = entry.map_err(store.db_err("wallet count", WALLET))?;
            if matches!(Entry::parse(v.value()), Some(Entry::Unspent { .. })) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Unspent vouchers valid at `unix_now`, counted per pile (charger
    /// number), in charger order: what `bmsgw status` shows.
    pub fn remaining_by_pile(&self, unix_now: u32) -> Result<Vec<(u32, usize)>, StoreError> {
        let store = &self.store;
        let txn = store.read("wallet count", WALLET)?;
        let table = store.read_table(&txn, WALLET)?;
        let mut counts = std::collections::BTreeMap::<u32, usize>::new();
        for entry in table.iter().map_err(store.db_err("wallet count", WALLET))? {
            let (_, v) = entry.map_err(store.db_err("wallet count", WALLET))?;
            if let Some(e @ Entry::Unspent { charger_number, .. }) = Entry::parse(v.value())
                && e.usable(charger_number, unix_now).is_some()
            {
                *counts.entry(charger_number).or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    /// Spend the voucher for `charger_number` that expires first; with
    /// `journal`, also journal the draft record it builds for that voucher,
    /// in the same transaction.
    fn take(
        &self,
        charger_number: u32,
        unix_now: u32,
        journal: Option<&dyn Fn(&Credential) -> Draft>,
    ) -> Result<Option<Credential>, StoreError> {
        let store = &self.store;
        store.write("wallet take", WALLET, |txn| {
            let mut table = store.table(txn, WALLET)?;
            let mut best: Option<(u32, [u8; 12], Vec<u8>)> = None;
            let mut damaged = Vec::new();
            for entry in table.iter().map_err(store.db_err("wallet take", WALLET))? {
                let (k, v) = entry.map_err(store.db_err("wallet take", WALLET))?;
                let (key, value) = (k.value(), v.value());
                let (Ok(id), Some(parsed)) = (<[u8; 12]>::try_from(key), Entry::parse(value))
                else {
                    damaged.push(Damaged {
                        key: key.to_vec(),
                        not_after: UNKNOWN_NOT_AFTER,
                    });
                    continue;
                };
                if let Some(not_after) = parsed.usable(charger_number, unix_now)
                    && best.as_ref().is_none_or(|(b, _, _)| not_after < *b)
                {
                    best = Some((not_after, id, value.to_vec()));
                }
            }
            let opened = best.map(|(not_after, id, value)| {
                let credential = open_entry(&self.key, &id, &value);
                (not_after, id, credential)
            });
            if let Some((not_after, id, None)) = &opened {
                damaged.push(Damaged {
                    key: id.to_vec(),
                    not_after: *not_after,
                });
            }
            if let Some(first) = damaged.first() {
                // Set every damaged entry aside and report; a good voucher
                // found alongside stays unspent for the next call.
                for d in &damaged {
                    if d.key.len() == 12 {
                        table
                            .insert(d.key.as_slice(), &tombstone(d.not_after)[..])
                            .map_err(store.db_err("wallet set aside", WALLET))?;
                    } else {
                        // Not a ticket id, so it can never match a voucher.
                        table
                            .remove(d.key.as_slice())
                            .map_err(store.db_err("wallet set aside", WALLET))?;
                    }
                }
                tracing::warn!(
                    count = damaged.len(),
                    "wallet: damaged vouchers set aside as spent"
                );
                return Ok(Err(StoreError::VoucherTampered {
                    path: store.path_buf(),
                    ticket_id: super::codec::show_key(&first.key),
                }));
            }
            let Some((not_after, id, Some(credential))) = opened else {
                return Ok(Ok(None));
            };
            // Spent in this transaction, committed before it is returned.
            table
                .insert(&id[..], &tombstone(not_after)[..])
                .map_err(store.db_err("wallet spend", WALLET))?;
            if let Some(journal) = journal {
                let draft = journal(&credential);
                store.journal_in(txn, &draft.record_id, &draft.topic, &draft.payload)?;
            }
            Ok(Ok(Some(credential)))
        })?
    }

    fn seal_and_insert(&self, voucher: &Credential) -> Result<(), WalletError> {
        let ticket_id = voucher.ticket_id();
        let store = &self.store;
        let mut header = [0u8; HEADER_LEN];
        header[0] = TAG_UNSPENT;
        for (slot, v) in header[1..].chunks_exact_mut(4).zip([
            voucher.charger_number,
            voucher.not_before,
            voucher.not_after,
            voucher.energy_cap_wh,
        ]) {
            slot.copy_from_slice(&v.to_be_bytes());
        }
        let mut nonce = [0u8; 12];
        SystemRng.fill(&mut nonce);
        let mut sealed = Zeroizing::new(Vec::with_capacity(SEALED_LEN));
        sealed.extend_from_slice(&voucher.ticket);
        sealed.extend_from_slice(voucher.session_key.expose());
        self.cipher()
            .encrypt_in_place(
                Nonce::from_slice(&nonce),
                &voucher_aad(&ticket_id, &header),
                &mut *sealed,
            )
            // Invariant: only plaintexts over 256 GiB are refused.
            .expect("a 133-byte plaintext is within ChaCha20-Poly1305's limit");
        let value = [&header[..], &nonce, &sealed].concat();
        let outcome = store.write("wallet add", WALLET, |txn| {
            let mut table = store.table(txn, WALLET)?;
            let seen = table
                .get(&ticket_id[..])
                .map_err(store.db_err("wallet add", WALLET))?
                .is_some();
            if seen {
                return Ok(false);
            }
            table
                .insert(&ticket_id[..], value.as_slice())
                .map_err(store.db_err("wallet add", WALLET))?;
            Ok(true)
        });
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => Err(WalletError::Duplicate { ticket_id }),
            Err(e) => Err(store_error("add", e)),
        }
    }
}

impl DurableWallet {
    /// [`VoucherWallet::take_for`], and in the same committed transaction
    /// the session's draft record (see [`super::journal`]) that `draft`
    /// builds for the voucher taken: a voucher is spent exactly when its
    /// session has a record to report, whatever crashes when. It also saves
    /// the session one commit before it can present the voucher.
    pub fn take_journaled(
        &mut self,
        charger_number: u32,
        unix_now: u32,
        draft: impl Fn(&Credential) -> Draft,
    ) -> Result<Option<Credential>, WalletError> {
        self.take(charger_number, unix_now, Some(&draft))
            .map_err(|e| store_error("take_journaled", e))
    }
}

fn store_error(operation: &'static str, e: StoreError) -> WalletError {
    WalletError::Store {
        operation,
        source: Box::new(e),
    }
}

impl VoucherWallet for DurableWallet {
    /// Marks the voucher spent in a committed transaction before returning
    /// it. A voucher that fails to open is set aside and reported with its
    /// ticket id ([`StoreError::VoucherTampered`] inside
    /// [`WalletError::Store`]); call again for the next one.
    fn take_for(
        &mut self,
        charger_number: u32,
        unix_now: u32,
    ) -> Result<Option<Credential>, WalletError> {
        self.take(charger_number, unix_now, None)
            .map_err(|e| store_error("take_for", e))
    }

    /// 0 if the store cannot be read (logged): the caller then goes without
    /// a voucher, which is safe.
    fn remaining_for(&self, charger_number: u32, unix_now: u32) -> usize {
        let count = || -> Result<usize, StoreError> {
            let store = &self.store;
            let txn = store.read("wallet remaining", WALLET)?;
            let table = store.read_table(&txn, WALLET)?;
            let mut n = 0;
            for entry in table
                .iter()
                .map_err(store.db_err("wallet remaining", WALLET))?
            {
                let (_, v) = entry.map_err(store.db_err("wallet remaining", WALLET))?;
                if Entry::parse(v.value())
                    .and_then(|e| e.usable(charger_number, unix_now))
                    .is_some()
                {
                    n += 1;
                }
            }
            Ok(n)
        };
        count().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "wallet: cannot count vouchers");
            0
        })
    }

    fn add(&mut self, voucher: Credential) -> Result<(), WalletError> {
        if !voucher.voucher {
            return Err(WalletError::NotAVoucher {
                ticket_id: voucher.ticket_id(),
            });
        }
        self.seal_and_insert(&voucher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_entries_never_panic_or_open(
            value in proptest::collection::vec(any::<u8>(), 0..200),
            id: [u8; 12],
        ) {
            let _ = Entry::parse(&value);
            prop_assert!(open_entry(&KEY, &id, &value).is_none());
        }
    }
    use crate::auth::RootKey;
    use crate::auth::rng::StreamRng;

    const NOW: u32 = 1_760_000_000;
    const KEY: [u8; 32] = [0x42; 32];

    fn voucher(charger: u32, not_after: u32, rng: &mut StreamRng) -> Credential {
        Credential::issue(
            &RootKey::from_bytes([1; 32]),
            1,
            charger,
            [9; 16],
            NOW - 100,
            not_after,
            7_000,
            true,
            rng,
        )
    }

    fn open(path: &std::path::Path) -> DurableWallet {
        Store::open(path)
            .expect("opens")
            .wallet(Zeroizing::new(KEY))
            .expect("wallet")
    }

    fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        (dir, path)
    }

    /// Rewrite the stored value of `id` with `f`.
    fn tamper(path: &std::path::Path, id: [u8; 12], f: impl FnOnce(&mut Vec<u8>)) {
        let store = Store::open(path).expect("opens");
        store
            .write("test", WALLET, |txn| {
                let mut table = store.table(txn, WALLET)?;
                let mut value = table
                    .get(&id[..])
                    .map_err(store.db_err("test", WALLET))?
                    .map(|v| v.value().to_vec())
                    .expect("entry exists");
                f(&mut value);
                table
                    .insert(&id[..], value.as_slice())
                    .map_err(store.db_err("test", WALLET))?;
                Ok(())
            })
            .expect("writes");
    }

    fn take_error_text(wallet: &mut DurableWallet, charger: u32) -> String {
        let err = wallet.take_for(charger, NOW).expect_err("refused");
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    #[test]
    fn a_voucher_is_spent_before_it_is_returned_and_stays_spent_after_restart() {
        let (_dir, path) = setup();
        let mut rng = StreamRng::new(1);
        let late = voucher(7, NOW + 7200, &mut rng);
        let soon = voucher(7, NOW + 600, &mut rng);
        let other = voucher(8, NOW + 600, &mut rng);
        let expired = voucher(7, NOW - 1, &mut rng);
        let mut wallet = open(&path);
        for v in [&late, &soon, &other, &expired] {
            wallet.add(v.clone()).expect("added");
        }
        assert_eq!(wallet.remaining_for(7, NOW), 2);
        assert_eq!(wallet.unspent_count().expect("count"), 4);

        let first = wallet.take_for(7, NOW).expect("ok").expect("a voucher");
        assert_eq!(first.ticket_id(), soon.ticket_id());
        assert_eq!(first.ticket, soon.ticket);
        assert_eq!(first.session_key.expose(), soon.session_key.expose());
        assert_eq!(
            (
                first.not_before,
                first.not_after,
                first.energy_cap_wh,
                first.voucher
            ),
            (soon.not_before, soon.not_after, soon.energy_cap_wh, true)
        );
        // "Crash" right after take_for returned: the spend was committed.
        drop(wallet);
        let mut wallet = open(&path);
        assert_eq!(wallet.remaining_for(7, NOW), 1);
        let second = wallet.take_for(7, NOW).expect("ok").expect("a voucher");
        assert_eq!(second.ticket_id(), late.ticket_id());
        assert!(wallet.take_for(7, NOW).expect("ok").is_none());
        drop(wallet);

        // A spent voucher is never accepted or returned again.
        let mut wallet = open(&path);
        for v in [&soon, &late] {
            let err = wallet.add(v.clone()).expect_err("seen before");
            assert!(
                matches!(err, WalletError::Duplicate { ticket_id } if ticket_id == v.ticket_id())
            );
        }
        assert!(wallet.take_for(7, NOW).expect("ok").is_none());
        assert_eq!(wallet.remaining_for(8, NOW), 1);
        assert_eq!(wallet.unspent_count().expect("count"), 2);
    }

    #[test]
    fn duplicates_and_online_tickets_are_refused() {
        let (_dir, path) = setup();
        let mut rng = StreamRng::new(2);
        let v = voucher(7, NOW + 600, &mut rng);
        let mut wallet = open(&path);
        wallet.add(v.clone()).expect("added");
        assert!(matches!(
            wallet.add(v.clone()),
            Err(WalletError::Duplicate { .. })
        ));
        let mut online = voucher(7, NOW + 600, &mut rng);
        online.voucher = false;
        assert!(matches!(
            wallet.add(online),
            Err(WalletError::NotAVoucher { .. })
        ));
        assert_eq!(wallet.unspent_count().expect("count"), 1);
    }

    #[test]
    fn revoked_vouchers_are_spent_even_before_they_arrive() {
        let (_dir, path) = setup();
        let mut rng = StreamRng::new(3);
        let a = voucher(7, NOW + 600, &mut rng);
        let b = voucher(7, NOW + 700, &mut rng);
        let later = voucher(7, NOW + 800, &mut rng);
        let mut wallet = open(&path);
        wallet.add(a.clone()).expect("a");
        wallet.add(b.clone()).expect("b");
        let revoked = wallet
            .revoke(&[a.ticket_id(), later.ticket_id()])
            .expect("revoke");
        assert_eq!(revoked, 1, "one unspent voucher revoked");
        assert_eq!(wallet.revoke(&[a.ticket_id()]).expect("again"), 0);
        drop(wallet);
        let mut wallet = open(&path);
        assert!(matches!(
            wallet.add(later),
            Err(WalletError::Duplicate { .. })
        ));
        let got = wallet.take_for(7, NOW).expect("ok").expect("b is left");
        assert_eq!(got.ticket_id(), b.ticket_id());
        assert!(wallet.take_for(7, NOW).expect("ok").is_none());
    }

    #[test]
    fn a_voucher_and_its_draft_are_one_commit() {
        let (_dir, path) = setup();
        let mut rng = StreamRng::new(5);
        let v = voucher(7, NOW + 600, &mut rng);
        let mut wallet = open(&path);
        wallet.add(v.clone()).expect("added");
        let draft = |c: &Credential| Draft {
            record_id: [0x11; 16],
            topic: "bmsgw/v1/veh-a/events".into(),
            payload: c.ticket_id().to_vec(),
        };
        let got = wallet
            .take_journaled(7, NOW, draft)
            .expect("taken")
            .expect("a voucher");
        assert_eq!(got.ticket_id(), v.ticket_id());
        drop(wallet);
        // After a restart: spent, and its draft is there to recover.
        let store = Store::open(&path).expect("opens");
        let drafts = store.journal_drafts().expect("drafts");
        assert_eq!(drafts.len(), 1);
        assert_eq!(drafts[0].record_id, [0x11; 16]);
        assert_eq!(drafts[0].payload, v.ticket_id().to_vec());
        let mut wallet = store.wallet(Zeroizing::new(KEY)).expect("wallet");
        assert!(wallet.take_for(7, NOW).expect("reads").is_none(), "spent");

        // A draft that cannot be written undoes the spend with it.
        let w = voucher(7, NOW + 600, &mut rng);
        wallet.add(w.clone()).expect("added");
        let too_long = |_: &Credential| Draft {
            record_id: [0x22; 16],
            topic: "t".repeat(70_000),
            payload: Vec::new(),
        };
        let err = wallet
            .take_journaled(7, NOW, too_long)
            .expect_err("the draft fails");
        assert!(err.to_string().contains("take_journaled"), "{err}");
        assert_eq!(wallet.remaining_for(7, NOW), 1, "the voucher is not spent");
        assert_eq!(store.journal_drafts().expect("drafts").len(), 1);
        let again = wallet
            .take_for(7, NOW)
            .expect("reads")
            .expect("still there");
        assert_eq!(again.ticket_id(), w.ticket_id());
    }

    #[test]
    fn the_file_holds_no_session_key_in_the_clear() {
        let (_dir, path) = setup();
        let v = voucher(7, NOW + 600, &mut StreamRng::new(4));
        open(&path).add(v.clone()).expect("added");
        let bytes = std::fs::read(&path).expect("read");
        let key = v.session_key.expose();
        assert!(!bytes.windows(key.len()).any(|w| w == key));
        assert!(!bytes.windows(v.ticket.len()).any(|w| w == v.ticket));
    }

    #[test]
    fn a_tampered_ciphertext_is_refused_by_ticket_id_and_set_aside() {
        let (_dir, path) = setup();
        let mut rng = StreamRng::new(5);
        let victim = voucher(7, NOW + 600, &mut rng);
        let spare = voucher(7, NOW + 900, &mut rng);
        let mut wallet = open(&path);
        wallet.add(victim.clone()).expect("added");
        wallet.add(spare.clone()).expect("added");
        drop(wallet);
        tamper(&path, victim.ticket_id(), |v| {
            if let Some(last) = v.last_mut() {
                *last ^= 1;
            }
        });
        let mut wallet = open(&path);
        let text = take_error_text(&mut wallet, 7);
        assert!(text.contains(&hex::encode(victim.ticket_id())), "{text}");
        assert!(text.contains("tampered"), "{text}");
        // Set aside: the next call moves on to the good voucher.
        assert_eq!(wallet.unspent_count().expect("count"), 1);
        let got = wallet.take_for(7, NOW).expect("ok").expect("spare");
        assert_eq!(got.ticket_id(), spare.ticket_id());
        assert!(wallet.take_for(7, NOW).expect("ok").is_none());
    }

    #[test]
    fn stretched_validity_or_a_moved_entry_fails_authentication() {
        let (_dir, path) = setup();
        let mut rng = StreamRng::new(6);
        let v = voucher(7, NOW + 600, &mut rng);
        let w = voucher(7, NOW + 600, &mut rng);
        let mut wallet = open(&path);
        wallet.add(v.clone()).expect("added");
        wallet.add(w.clone()).expect("added");
        drop(wallet);
        // Stretch v's not_after (bytes 9..13 of the header) by a year.
        tamper(&path, v.ticket_id(), |value| {
            value[9..13].copy_from_slice(&(NOW + 365 * 86_400).to_be_bytes());
        });
        let mut wallet = open(&path);
        // w now expires sooner, so it is picked first and opens fine.
        let got = wallet.take_for(7, NOW).expect("ok").expect("w");
        assert_eq!(got.ticket_id(), w.ticket_id());
        let text = take_error_text(&mut wallet, 7);
        assert!(text.contains(&hex::encode(v.ticket_id())), "{text}");
        drop(wallet);

        // An entry copied under another ticket id does not open either.
        let (_dir2, path2) = setup();
        let mut rng = StreamRng::new(7);
        let a = voucher(7, NOW + 600, &mut rng);
        let b = voucher(7, NOW + 600, &mut rng);
        let mut wallet = open(&path2);
        wallet.add(a.clone()).expect("a");
        wallet.add(b.clone()).expect("b");
        drop(wallet);
        let store = Store::open(&path2).expect("opens");
        store
            .write("test", WALLET, |txn| {
                let mut t = store.table(txn, WALLET)?;
                let a_value = t
                    .get(&a.ticket_id()[..])
                    .map_err(store.db_err("test", WALLET))?
                    .map(|v| v.value().to_vec())
                    .expect("a");
                t.insert(&b.ticket_id()[..], a_value.as_slice())
                    .map_err(store.db_err("test", WALLET))?;
                t.remove(&a.ticket_id()[..])
                    .map_err(store.db_err("test", WALLET))?;
                Ok(())
            })
            .expect("writes");
        let mut wallet = store.wallet(Zeroizing::new(KEY)).expect("wallet");
        let text = take_error_text(&mut wallet, 7);
        assert!(text.contains(&hex::encode(b.ticket_id())), "{text}");
        assert!(wallet.take_for(7, NOW).expect("ok").is_none());
    }

    #[test]
    fn garbage_entries_never_panic_and_never_yield_a_credential() {
        let (_dir, path) = setup();
        let store = Store::open(&path).expect("opens");
        let mut wallet = store.wallet(Zeroizing::new(KEY)).expect("wallet");
        let values: [&[u8]; 5] = [
            &[],
            &[TAG_UNSPENT, 0, 0, 0, 7],
            &[
                TAG_UNSPENT,
                0,
                0,
                0,
                7,
                0,
                0,
                0,
                0,
                255,
                255,
                255,
                255,
                0,
                0,
                0,
                0,
                1,
                2,
                3,
            ],
            &[9, 9, 9],
            &[TAG_SPENT],
        ];
        store
            .write("test", WALLET, |txn| {
                let mut t = store.table(txn, WALLET)?;
                for (i, v) in values.iter().enumerate() {
                    t.insert(&[i as u8; 12][..], *v)
                        .map_err(store.db_err("test", WALLET))?;
                }
                t.insert(&[0xEE; 5][..], &[TAG_SPENT, 0, 0, 0, 0][..])
                    .map_err(store.db_err("test", WALLET))?;
                Ok(())
            })
            .expect("writes");
        assert_eq!(
            wallet.remaining_for(7, NOW),
            1,
            "only the header is read here"
        );
        assert!(wallet.take_for(7, NOW).is_err());
        assert!(wallet.take_for(7, NOW).expect("all set aside").is_none());
        assert_eq!(wallet.unspent_count().expect("count"), 0);
    }

    #[test]
    fn a_wrong_wallet_key_is_refused() {
        let (_dir, path) = setup();
        let v = voucher(7, NOW + 600, &mut StreamRng::new(8));
        open(&path).add(v.clone()).expect("added");
        let store = Store::open(&path).expect("opens");
        let err = store
            .wallet(Zeroizing::new([0x43; 32]))
            .expect_err("wrong key");
        assert!(matches!(err, StoreError::WalletKeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("state.redb"), "{err}");
        // Nothing was set aside by the attempt.
        let mut wallet = store.wallet(Zeroizing::new(KEY)).expect("right key");
        assert_eq!(
            wallet.take_for(7, NOW).expect("ok").map(|c| c.ticket_id()),
            Some(v.ticket_id())
        );
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let (_dir, path) = setup();
        let shown = format!("{:?}", open(&path));
        assert!(
            shown.contains("redacted") && !shown.contains("42, 42"),
            "{shown}"
        );
    }
}
