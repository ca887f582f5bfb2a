//! The vehicle's side of a ticket, its file format, and the voucher wallet.
//!
//! A [`Credential`] is what the vehicle holds: the sealed ticket it forwards
//! and the session key it proves. Vouchers are credentials issued ahead of
//! time for offline use; a [`VoucherWallet`] hands each out at most once.

use std::collections::HashSet;
use std::fmt::Write as _;

use zeroize::Zeroizing;

use super::keys::{RootKey, SessionKey};
use super::messages::ResultCode;
use super::rng::Rng;
use super::ticket::{self, TICKET_LEN, TicketBody, TicketHeader};

/// First line of the credential file format.
pub const CREDENTIAL_HEADER: &str = "# bmsgw credential v1";

/// A ticket together with what the vehicle needs to use it.
#[derive(Clone, Debug)]
pub struct Credential {
    /// The sealed ticket, forwarded to the pile unchanged.
    pub ticket: [u8; TICKET_LEN],
    /// The handshake PSK; the ticket carries it sealed for the pile.
    pub session_key: SessionKey,
    pub charger_number: u32,
    pub not_before: u32,
    pub not_after: u32,
    pub energy_cap_wh: u32,
    pub voucher: bool,
}

impl Credential {
    /// Issue a credential for one vehicle at one pile: a fresh session key,
    /// sealed into a fresh ticket. What the cloud does (and tests, and
    /// `bmsgw sim ticket`).
    #[expect(clippy::too_many_arguments, reason = "one argument per ticket field")]
    pub fn issue(
        root: &RootKey,
        key_offset: u16,
        charger_number: u32,
        pseudonym: [u8; 16],
        not_before: u32,
        not_after: u32,
        energy_cap_wh: u32,
        voucher: bool,
        rng: &mut dyn Rng,
    ) -> Credential {
        let body = TicketBody {
            pseudonym,
            charger_number,
            not_before,
            not_after,
            session_key: SessionKey::generate(rng),
            energy_cap_wh,
            voucher,
        };
        let ticket = ticket::seal(root, key_offset, &body, rng);
        Credential {
            ticket,
            session_key: body.session_key.clone(),
            charger_number,
            not_before,
            not_after,
            energy_cap_wh,
            voucher,
        }
    }

    /// The ticket's id: its nonce and its replay-cache key.
    pub fn ticket_id(&self) -> [u8; 12] {
        self.header().ticket_id
    }

    /// The key epoch that sealed the ticket.
    pub fn key_offset(&self) -> u16 {
        self.header().key_offset
    }

    fn header(&self) -> TicketHeader {
        let [_, _, o0, o1, _, _, _, _, id @ ..] =
            *self.ticket.first_chunk::<20>().unwrap_or(&[0; 20]);
        TicketHeader {
            key_offset: u16::from_le_bytes([o0, o1]),
            charger_number: self.charger_number,
            ticket_id: id,
        }
    }

    /// Whether the vehicle's own clock puts `unix_now` in the validity window.
    pub fn is_valid_at(&self, unix_now: u32) -> bool {
        self.not_before <= unix_now && unix_now <= self.not_after
    }

    /// The credential file: a header line, then `key=value` lines.
    ///
    /// The text holds the session key: write it to a file of mode 0600, and
    /// wrap it in `zeroize::Zeroizing` while it lives in memory.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(400);
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "{CREDENTIAL_HEADER}\nticket={}\nsession_key={}\ncharger_number={}\nnot_before={}\n\
             not_after={}\nenergy_cap_wh={}\nvoucher={}\n",
            to_hex(&self.ticket),
            Zeroizing::new(to_hex(self.session_key.expose())).as_str(),
            self.charger_number,
            self.not_before,
            self.not_after,
            self.energy_cap_wh,
            self.voucher,
        );
        s
    }

    /// Parse [`Credential::to_text`]'s format. Blank lines and `#` comments
    /// after the header are allowed; every key must appear exactly once.
    pub fn from_text(text: &str) -> Result<Credential, CredentialError> {
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
        match lines.next() {
            Some((_, CREDENTIAL_HEADER)) => {}
            _ => return Err(CredentialError::MissingHeader),
        }
        let mut fields = Fields::default();
        for (line, content) in lines {
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let (key, value) = content
                .split_once('=')
                .ok_or(CredentialError::NotKeyValue { line })?;
            fields.set(line, key.trim(), value.trim())?;
        }
        fields.finish()
    }
}

/// One slot per key of the file format, filled while parsing.
#[derive(Default)]
struct Fields {
    ticket: Option<[u8; TICKET_LEN]>,
    session_key: Option<SessionKey>,
    charger_number: Option<u32>,
    not_before: Option<u32>,
    not_after: Option<u32>,
    energy_cap_wh: Option<u32>,
    voucher: Option<bool>,
}

const EXPECT_TICKET: &str = "202 hex digits (the 101-byte ticket)";
const EXPECT_SESSION_KEY: &str = "64 hex digits (the 32-byte session key)";
const EXPECT_U32: &str = "a decimal integer from 0 to 4294967295";
const EXPECT_BOOL: &str = "true or false";

impl Fields {
    fn set(&mut self, line: usize, key: &str, value: &str) -> Result<(), CredentialError> {
        fn put<T>(
            slot: &mut Option<T>,
            v: T,
            line: usize,
            key: &'static str,
        ) -> Result<(), CredentialError> {
            if slot.replace(v).is_some() {
                return Err(CredentialError::Duplicate { line, key });
            }
            Ok(())
        }
        let bad = |key, expected| CredentialError::BadValue {
            line,
            key,
            expected,
        };
        let int = |key| value.parse::<u32>().map_err(|_| bad(key, EXPECT_U32));
        match key {
            "ticket" => {
                let t = from_hex::<TICKET_LEN>(value).ok_or(bad("ticket", EXPECT_TICKET))?;
                TicketHeader::parse(&t).map_err(|code| CredentialError::Ticket { line, code })?;
                put(&mut self.ticket, t, line, "ticket")
            }
            "session_key" => {
                let mut k = Zeroizing::new([0u8; 32]);
                from_hex_into(value, &mut k[..]).ok_or(bad("session_key", EXPECT_SESSION_KEY))?;
                put(
                    &mut self.session_key,
                    SessionKey::from_bytes(*k),
                    line,
                    "session_key",
                )
            }
            "charger_number" => put(
                &mut self.charger_number,
                int("charger_number")?,
                line,
                "charger_number",
            ),
            "not_before" => put(&mut self.not_before, int("not_before")?, line, "not_before"),
            "not_after" => put(&mut self.not_after, int("not_after")?, line, "not_after"),
            "energy_cap_wh" => put(
                &mut self.energy_cap_wh,
                int("energy_cap_wh")?,
                line,
                "energy_cap_wh",
            ),
            "voucher" => {
                let v = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("voucher", EXPECT_BOOL)),
                };
                put(&mut self.voucher, v, line, "voucher")
            }
            _ => Err(CredentialError::UnknownKey {
                line,
                key: key.chars().take(40).collect(),
            }),
        }
    }

    fn finish(self) -> Result<Credential, CredentialError> {
        let missing = |key, expected| CredentialError::Missing { key, expected };
        let ticket = self.ticket.ok_or(missing("ticket", EXPECT_TICKET))?;
        let charger_number = self
            .charger_number
            .ok_or(missing("charger_number", EXPECT_U32))?;
        let not_before = self.not_before.ok_or(missing("not_before", EXPECT_U32))?;
        let not_after = self.not_after.ok_or(missing("not_after", EXPECT_U32))?;
        let credential = Credential {
            ticket,
            session_key: self
                .session_key
                .ok_or(missing("session_key", EXPECT_SESSION_KEY))?,
            charger_number,
            not_before,
            not_after,
            energy_cap_wh: self
                .energy_cap_wh
                .ok_or(missing("energy_cap_wh", EXPECT_U32))?,
            voucher: self.voucher.ok_or(missing("voucher", EXPECT_BOOL))?,
        };
        let in_ticket = TicketHeader::parse(&ticket)
            .map_err(|code| CredentialError::Ticket { line: 0, code })?
            .charger_number;
        if in_ticket != charger_number {
            return Err(CredentialError::ChargerMismatch {
                ticket: in_ticket,
                field: charger_number,
            });
        }
        if not_after <= not_before {
            return Err(CredentialError::EmptyWindow {
                not_before,
                not_after,
            });
        }
        Ok(credential)
    }
}

/// Why a credential file does not parse. Values are never echoed: one of
/// them is the session key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("line 1: expected the header \"{CREDENTIAL_HEADER}\"")]
    MissingHeader,
    #[error("line {line}: expected `key=value`")]
    NotKeyValue { line: usize },
    #[error(
        "line {line}: unknown key `{key}`; the keys are ticket, session_key, charger_number, \
         not_before, not_after, energy_cap_wh, voucher"
    )]
    UnknownKey { line: usize, key: String },
    #[error("line {line}: `{key}` is given twice")]
    Duplicate { line: usize, key: &'static str },
    #[error("line {line}: `{key}` must be {expected}")]
    BadValue {
        line: usize,
        key: &'static str,
        expected: &'static str,
    },
    #[error("line {line}: `ticket` is not a version 1 ticket: {code}")]
    Ticket { line: usize, code: ResultCode },
    #[error("missing `{key}`: {expected}")]
    Missing {
        key: &'static str,
        expected: &'static str,
    },
    #[error(
        "the ticket is for charger {ticket} but `charger_number` says {field}; they must match"
    )]
    ChargerMismatch { ticket: u32, field: u32 },
    #[error("`not_after` ({not_after}) must be later than `not_before` ({not_before})")]
    EmptyWindow { not_before: u32, not_after: u32 },
}

/// Lower-case hex.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Exactly `N` bytes of hex, either case.
pub(crate) fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    from_hex_into(s, &mut out)?;
    Some(out)
}

/// Fill all of `out` from hex, either case; `None` unless `s` has exactly
/// that length. Decodes in place, so a secret needs no intermediate copy.
pub(crate) fn from_hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    hex::decode_to_slice(s, out).ok()
}

/// Why a wallet refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("credential {} is an online ticket, not a voucher", to_hex(.ticket_id))]
    NotAVoucher { ticket_id: [u8; 12] },
    #[error("voucher {} is already in the wallet (spent or not)", to_hex(.ticket_id))]
    Duplicate { ticket_id: [u8; 12] },
    #[error("voucher store: {operation} failed")]
    Store {
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Vouchers for offline charging, each spent at most once.
pub trait VoucherWallet {
    /// An unspent voucher for `charger_number` that is valid at `unix_now`
    /// (the one that expires soonest), marked spent — durably, for a durable
    /// wallet — before it is returned. A spent voucher is never returned
    /// again, even if the session using it fails.
    fn take_for(
        &mut self,
        charger_number: u32,
        unix_now: u32,
    ) -> Result<Option<Credential>, WalletError>;
    /// How many unspent vouchers `take_for` could return for that pile now.
    fn remaining_for(&self, charger_number: u32, unix_now: u32) -> usize;
    /// Store a voucher. Refuses online tickets and any voucher already seen.
    fn add(&mut self, voucher: Credential) -> Result<(), WalletError>;
}

/// A wallet in memory.
#[derive(Debug, Default)]
pub struct MemoryWallet {
    unspent: Vec<Credential>,
    /// Ids of every voucher ever added; spent ones keep only their id.
    seen: HashSet<[u8; 12]>,
}

impl MemoryWallet {
    pub fn new() -> Self {
        Self::default()
    }

    fn usable(charger_number: u32, unix_now: u32) -> impl Fn(&&Credential) -> bool {
        move |c| c.charger_number == charger_number && c.is_valid_at(unix_now)
    }
}

impl VoucherWallet for MemoryWallet {
    fn take_for(
        &mut self,
        charger_number: u32,
        unix_now: u32,
    ) -> Result<Option<Credential>, WalletError> {
        let usable = Self::usable(charger_number, unix_now);
        let pick = self
            .unspent
            .iter()
            .enumerate()
            .filter(|(_, c)| usable(c))
            .min_by_key(|(_, c)| c.not_after)
            .map(|(i, _)| i);
        // Removing it from `unspent` is the spend; its id stays in `seen`.
        Ok(pick.map(|i| self.unspent.swap_remove(i)))
    }

    fn remaining_for(&self, charger_number: u32, unix_now: u32) -> usize {
        self.unspent
            .iter()
            .filter(Self::usable(charger_number, unix_now))
            .count()
    }

    fn add(&mut self, voucher: Credential) -> Result<(), WalletError> {
        let ticket_id = voucher.ticket_id();
        if !voucher.voucher {
            return Err(WalletError::NotAVoucher { ticket_id });
        }
        if !self.seen.insert(ticket_id) {
            return Err(WalletError::Duplicate { ticket_id });
        }
        self.unspent.push(voucher);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rng::StreamRng;
    use proptest::prelude::*;

    const NOW: u32 = 1_760_000_000;

    fn issue(charger: u32, not_after: u32, voucher: bool, rng: &mut StreamRng) -> Credential {
        Credential::issue(
            &RootKey::from_bytes([1; 32]),
            1,
            charger,
            [9; 16],
            NOW - 100,
            not_after,
            5_000,
            voucher,
            rng,
        )
    }

    #[test]
    fn text_round_trip() {
        let c = issue(0xDEAD_BEEF, NOW + 3600, true, &mut StreamRng::new(1));
        let text = c.to_text();
        assert!(text.starts_with("# bmsgw credential v1\nticket="), "{text}");
        assert!(text.contains("\ncharger_number=3735928559\n"), "{text}");
        assert!(text.contains("\nvoucher=true\n"), "{text}");
        let back = Credential::from_text(&text).expect("parses");
        assert_eq!(back.ticket, c.ticket);
        assert_eq!(back.session_key.expose(), c.session_key.expose());
        assert_eq!(
            (
                back.charger_number,
                back.not_before,
                back.not_after,
                back.energy_cap_wh,
                back.voucher
            ),
            (
                c.charger_number,
                c.not_before,
                c.not_after,
                c.energy_cap_wh,
                c.voucher
            )
        );
        assert_eq!(back.ticket_id(), c.ticket_id());
        assert_eq!(back.key_offset(), 1);
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let good = issue(7, NOW + 60, false, &mut StreamRng::new(2)).to_text();
        let cases: Vec<(String, CredentialError)> = vec![
            ("ticket=00".into(), CredentialError::MissingHeader),
            (
                good.replace("voucher=false", "voucher=yes"),
                CredentialError::BadValue {
                    line: 8,
                    key: "voucher",
                    expected: EXPECT_BOOL,
                },
            ),
            (
                good.replace("not_before=", "not_before=-"),
                CredentialError::BadValue {
                    line: 5,
                    key: "not_before",
                    expected: EXPECT_U32,
                },
            ),
            (
                format!("{good}colour=blue\n"),
                CredentialError::UnknownKey {
                    line: 9,
                    key: "colour".into(),
                },
            ),
            (
                format!("{good}\n# note\nvoucher=true\n"),
                CredentialError::Duplicate {
                    line: 11,
                    key: "voucher",
                },
            ),
            (
                format!("{good}oops\n"),
                CredentialError::NotKeyValue { line: 9 },
            ),
            (
                good.replace("energy_cap_wh", "# energy_cap_wh"),
                CredentialError::Missing {
                    key: "energy_cap_wh",
                    expected: EXPECT_U32,
                },
            ),
            (
                good.replace("charger_number=7", "charger_number=8"),
                CredentialError::ChargerMismatch {
                    ticket: 7,
                    field: 8,
                },
            ),
            (
                good.replace("ticket=01", "ticket=02"),
                CredentialError::Ticket {
                    line: 2,
                    code: ResultCode::UnsupportedVersion,
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                Credential::from_text(&text).err(),
                Some(expected.clone()),
                "{text}"
            );
            assert!(expected.to_string().len() > 10);
        }
        let short_key = good
            .lines()
            .map(|l| {
                if l.starts_with("session_key=") {
                    "session_key=abcd"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let err = Credential::from_text(&short_key).expect_err("short key");
        assert_eq!(
            err.to_string(),
            "line 3: `session_key` must be 64 hex digits (the 32-byte session key)"
        );
    }

    #[test]
    fn errors_never_echo_the_session_key() {
        let good = issue(7, NOW + 60, false, &mut StreamRng::new(3));
        let key_hex = to_hex(good.session_key.expose());
        let text = good.to_text().replace("session_key=", "session_key=zz");
        let err = Credential::from_text(&text).expect_err("bad hex");
        assert!(!format!("{err} {err:?}").contains(&key_hex[..16]));
        assert!(!format!("{good:?}").contains(&key_hex[..16]));
    }

    #[test]
    fn wallet_spends_each_voucher_once_soonest_expiry_first() {
        let mut rng = StreamRng::new(4);
        let mut wallet = MemoryWallet::new();
        let late = issue(7, NOW + 7200, true, &mut rng);
        let soon = issue(7, NOW + 600, true, &mut rng);
        let other_pile = issue(8, NOW + 600, true, &mut rng);
        let expired = issue(7, NOW - 1, true, &mut rng);
        for v in [&late, &soon, &other_pile, &expired] {
            wallet.add(v.clone()).expect("added");
        }
        assert_eq!(wallet.remaining_for(7, NOW), 2);
        let first = wallet.take_for(7, NOW).expect("ok").expect("a voucher");
        assert_eq!(first.ticket_id(), soon.ticket_id());
        assert_eq!(wallet.remaining_for(7, NOW), 1);
        let second = wallet.take_for(7, NOW).expect("ok").expect("a voucher");
        assert_eq!(second.ticket_id(), late.ticket_id());
        assert!(
            wallet.take_for(7, NOW).expect("ok").is_none(),
            "never the expired or another pile's"
        );
        assert_eq!(wallet.remaining_for(7, NOW), 0);
        // A spent voucher cannot come back in.
        assert!(matches!(
            wallet.add(soon.clone()),
            Err(WalletError::Duplicate { .. })
        ));
        assert!(wallet.take_for(7, NOW).expect("ok").is_none());
        // The other pile still has its own.
        assert_eq!(wallet.remaining_for(8, NOW), 1);
    }

    #[test]
    fn wallet_refuses_online_tickets() {
        let online = issue(7, NOW + 60, false, &mut StreamRng::new(5));
        let err = MemoryWallet::new().add(online).expect_err("not a voucher");
        assert!(matches!(err, WalletError::NotAVoucher { .. }));
    }

    proptest! {
        #[test]
        fn from_text_never_panics(text in "\\PC*") {
            let _ = Credential::from_text(&text);
        }

        #[test]
        fn from_text_never_panics_on_near_misses(lines in proptest::collection::vec(
            prop_oneof![
                Just("# bmsgw credential v1".to_string()),
                "(ticket|session_key|charger_number|not_before|not_after|energy_cap_wh|voucher)=[0-9a-fA-Fx ]{0,210}",
                "[a-z_=#]{0,20}",
            ], 0..12)) {
            let _ = Credential::from_text(&lines.join("\n"));
        }

        #[test]
        fn text_round_trips_any_fields(
            seed: u64, charger: u32, nb in 0u32..u32::MAX, len in 1u32..1_000_000, cap: u32, voucher: bool,
        ) {
            let na = nb.saturating_add(len).max(nb + 1);
            let c = Credential::issue(
                &RootKey::from_bytes([2; 32]), 9, charger, [0; 16], nb, na, cap, voucher,
                &mut StreamRng::new(seed),
            );
            let back = Credential::from_text(&c.to_text()).expect("round trip");
            prop_assert_eq!(back.ticket, c.ticket);
            prop_assert_eq!(back.session_key.expose(), c.session_key.expose());
            prop_assert_eq!((back.charger_number, back.not_before, back.not_after, back.energy_cap_wh, back.voucher),
                            (charger, nb, na, cap, voucher));
        }

        #[test]
        fn hex_round_trip(bytes in any::<[u8; 12]>()) {
            prop_assert_eq!(from_hex::<12>(&to_hex(&bytes)), Some(bytes));
            prop_assert_eq!(from_hex::<12>(&to_hex(&bytes).to_uppercase()), Some(bytes));
        }
    }
}
