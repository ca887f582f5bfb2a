//! The payloads of the cloud link (`docs/protocol.md` §6.3), in CBOR.
//!
//! Every payload is one CBOR map with text keys (the field names below) and a
//! `"type"` key that says which message it is, so a cloud team can read them
//! in any language with any CBOR library. Each topic has one top-level enum of
//! the messages it may carry: [`Request`], [`Response`], [`Push`], [`Event`]
//! and [`Approval`], all implementing [`Payload`].
//!
//! Decoding is for bytes that came off the network (after the envelope has
//! authenticated them): it bounds the input ([`MAX_PAYLOAD_LEN`]) and every
//! list and text, checks the length of every fixed-size byte string, refuses
//! trailing bytes, and never panics. Unknown map keys are ignored, so fields
//! can be added without breaking older readers.
//!
//! Session keys live in [`SessionKey`] (zeroized on drop), and encoding and
//! decoding keep their bytes in zeroizing buffers. Decoding does not go
//! through serde's buffered "internally tagged" path, which would leave a
//! copy of the key in a freed heap buffer: it reads the `"type"` key first,
//! then decodes the right struct directly.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::topics::VehicleId;
use crate::auth::ticket::TICKET_LEN;
use crate::auth::{Credential, ResultCode, SessionKey, TicketHeader};
use crate::interop::LinkDeviations;

/// The largest payload accepted (before the envelope adds its 49 bytes).
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// The most vouchers in one batch.
pub const MAX_VOUCHERS: usize = 64;
/// The most ticket ids in one revocation.
pub const MAX_REVOKED: usize = 1024;
/// The longest free text (a denial's detail, a failure's reason), in bytes.
pub const MAX_TEXT_LEN: usize = 512;

/// A 16-byte random id (request ids, nonces, batch and record ids).
pub type Id16 = [u8; 16];
/// A ticket's id: its 12-byte nonce, the pile's replay-cache key.
pub type TicketId = [u8; 12];

/// vehicle → cloud on `identity/req`: "give me a credential for this pile".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRequest {
    pub vehicle_id: VehicleId,
    /// The pile's number, from CRM bytes 2–5.
    pub charger_number: u32,
    /// The pile's region code, from CRM bytes 6–8.
    #[serde(with = "fixed")]
    pub region_code: [u8; 3],
    /// Equal to the MQTT Correlation Data of the request.
    #[serde(with = "fixed")]
    pub request_id: Id16,
    /// Fresh per request and echoed inside the answer: what makes an old
    /// answer useless (the replay rule of §6.5).
    #[serde(with = "fixed")]
    pub nonce: Id16,
    /// The vehicle's clock, Unix seconds; the cloud refuses stale requests.
    pub time: u32,
    /// How many vouchers the vehicle would like with the grant.
    pub want_vouchers: u16,
}

/// cloud → vehicle on `identity/resp`: the credential for one pile.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityGrant {
    pub vehicle_id: VehicleId,
    /// The request's `nonce`.
    #[serde(with = "fixed")]
    pub request_nonce: Id16,
    #[serde(with = "fixed")]
    pub ticket: [u8; TICKET_LEN],
    #[serde(with = "secret")]
    pub session_key: SessionKey,
    pub charger_number: u32,
    pub not_before: u32,
    pub not_after: u32,
    /// 0 = no cap.
    pub energy_cap_wh: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vouchers: Option<VoucherBatch>,
}

/// Why the cloud refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    UnknownVehicle,
    Revoked,
    UnknownPile,
    ApprovalDenied,
    ApprovalTimeout,
    BadRequest,
    StaleRequest,
    /// A reason this build does not know (a newer cloud).
    #[serde(other)]
    Other,
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DenyReason::UnknownVehicle => "unknown vehicle",
            DenyReason::Revoked => "vehicle revoked",
            DenyReason::UnknownPile => "unknown pile",
            DenyReason::ApprovalDenied => "the owner denied approval",
            DenyReason::ApprovalTimeout => "the owner did not approve in time",
            DenyReason::BadRequest => "bad request",
            DenyReason::StaleRequest => "stale request (check the vehicle's clock)",
            DenyReason::Other => "other reason",
        })
    }
}

/// cloud → vehicle on `identity/resp`: a final refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denied {
    pub vehicle_id: VehicleId,
    #[serde(with = "fixed")]
    pub request_nonce: Id16,
    pub reason: DenyReason,
    /// For people, not for programs.
    pub detail: String,
}

/// cloud → vehicle on `identity/resp`: held for the owner's approval; the
/// grant or a denial follows by `deadline`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingApproval {
    pub vehicle_id: VehicleId,
    #[serde(with = "fixed")]
    pub request_nonce: Id16,
    /// Unix seconds.
    pub deadline: u32,
}

/// One voucher: a ticket issued ahead of time for offline charging.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Voucher {
    #[serde(with = "fixed")]
    pub ticket: [u8; TICKET_LEN],
    #[serde(with = "secret")]
    pub session_key: SessionKey,
    pub charger_number: u32,
    pub not_before: u32,
    pub not_after: u32,
    pub energy_cap_wh: u32,
}

/// Vouchers, inside a grant or pushed on `vouchers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VoucherBatch {
    pub vehicle_id: VehicleId,
    #[serde(with = "fixed")]
    pub batch_id: Id16,
    pub issued_at: u32,
    pub vouchers: Vec<Voucher>,
}

/// Which kind of credential a session used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    Online,
    Voucher,
}

/// The credential a session used, by ticket id (never the session key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsedCredential {
    pub kind: CredentialKind,
    #[serde(with = "fixed")]
    pub ticket_id: TicketId,
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SessionResult {
    Completed,
    Failed { reason: String },
}

/// vehicle → cloud on `events`: one charging session, for reconciliation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Random; the cloud deduplicates on it (the outbox may publish twice).
    #[serde(with = "fixed")]
    pub record_id: Id16,
    pub vehicle_id: VehicleId,
    pub charger_number: u32,
    pub credential: UsedCredential,
    pub energy_wh: u32,
    pub started_at: u32,
    pub stopped_at: u32,
    pub result: SessionResult,
    /// What the BMS and the pile deviated in from the standards during the
    /// session (docs/interop.md), so that a fleet operator can see which
    /// piles deviate. Absent when neither did.
    #[serde(default, skip_serializing_if = "LinkDeviations::is_empty")]
    pub deviations: LinkDeviations,
}

/// cloud → vehicle on `vouchers`: tickets the vehicle must no longer use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub vehicle_id: VehicleId,
    /// Increases with every revocation for this vehicle.
    pub seq: u64,
    pub issued_at: u32,
    #[serde(with = "fixed_seq")]
    pub ticket_ids: Vec<TicketId>,
}

/// owner's app → cloud on `approval`: the answer to a held request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerApproval {
    pub vehicle_id: VehicleId,
    /// The held request's `request_id`.
    #[serde(with = "fixed")]
    pub request_id: Id16,
    pub approve: bool,
    pub time: u32,
}

/// What is wrong with a payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("{what}: {len} bytes is over the limit of {MAX_PAYLOAD_LEN}")]
    TooLong { what: &'static str, len: usize },
    #[error("{what}: the CBOR ends early")]
    Truncated { what: &'static str },
    #[error("{what}: not well-formed CBOR at byte {offset}")]
    Syntax { what: &'static str, offset: usize },
    #[error("{what}: {detail}{}", .offset.map(|o| format!(" (item at byte {o})")).unwrap_or_default())]
    Invalid {
        what: &'static str,
        offset: Option<usize>,
        detail: String,
    },
    #[error("{what}: nested too deeply")]
    TooDeep { what: &'static str },
    #[error("{what}: {extra} bytes after the end of the CBOR map")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what}: unknown \"type\" {found:?}; expected one of {expected}")]
    UnknownType {
        what: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{what}: `{field}` has {len} entries; at most {max} are allowed")]
    TooMany {
        what: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what}: `{field}` has {len} bytes; at most {max} are allowed")]
    TextTooLong {
        what: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// Why a grant's or voucher's fields do not make a usable [`Credential`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialMismatch {
    #[error("the ticket is not a version 1 ticket: {0}")]
    Ticket(ResultCode),
    #[error("the ticket is for charger {ticket} but the message says {field}")]
    Charger { ticket: u32, field: u32 },
    #[error("`not_after` ({not_after}) is not later than `not_before` ({not_before})")]
    EmptyWindow { not_before: u32, not_after: u32 },
}

fn credential(
    ticket: &[u8; TICKET_LEN],
    session_key: &SessionKey,
    charger_number: u32,
    not_before: u32,
    not_after: u32,
    energy_cap_wh: u32,
    voucher: bool,
) -> Result<Credential, CredentialMismatch> {
    let header = TicketHeader::parse(ticket).map_err(CredentialMismatch::Ticket)?;
    if header.charger_number != charger_number {
        return Err(CredentialMismatch::Charger {
            ticket: header.charger_number,
            field: charger_number,
        });
    }
    if not_after <= not_before {
        return Err(CredentialMismatch::EmptyWindow {
            not_before,
            not_after,
        });
    }
    Ok(Credential {
        ticket: *ticket,
        session_key: session_key.clone(),
        charger_number,
        not_before,
        not_after,
        energy_cap_wh,
        voucher,
    })
}

impl IdentityGrant {
    /// A grant carrying `credential` (an online ticket) in answer to the
    /// request whose nonce was `request_nonce`.
    pub fn new(
        vehicle_id: VehicleId,
        request_nonce: Id16,
        credential: &Credential,
        vouchers: Option<VoucherBatch>,
    ) -> IdentityGrant {
        IdentityGrant {
            vehicle_id,
            request_nonce,
            ticket: credential.ticket,
            session_key: credential.session_key.clone(),
            charger_number: credential.charger_number,
            not_before: credential.not_before,
            not_after: credential.not_after,
            energy_cap_wh: credential.energy_cap_wh,
            vouchers,
        }
    }

    /// The online credential, after checking that the ticket's clear header
    /// agrees with the grant's fields.
    pub fn credential(&self) -> Result<Credential, CredentialMismatch> {
        credential(
            &self.ticket,
            &self.session_key,
            self.charger_number,
            self.not_before,
            self.not_after,
            self.energy_cap_wh,
            false,
        )
    }
}

impl Voucher {
    pub fn from_credential(c: &Credential) -> Voucher {
        Voucher {
            ticket: c.ticket,
            session_key: c.session_key.clone(),
            charger_number: c.charger_number,
            not_before: c.not_before,
            not_after: c.not_after,
            energy_cap_wh: c.energy_cap_wh,
        }
    }

    /// The voucher as a wallet credential, checked like
    /// [`IdentityGrant::credential`].
    pub fn credential(&self) -> Result<Credential, CredentialMismatch> {
        credential(
            &self.ticket,
            &self.session_key,
            self.charger_number,
            self.not_before,
            self.not_after,
            self.energy_cap_wh,
            true,
        )
    }
}

impl VoucherBatch {
    /// Every voucher as a credential; the index of the first bad one.
    pub fn credentials(&self) -> Result<Vec<Credential>, (usize, CredentialMismatch)> {
        self.vouchers
            .iter()
            .enumerate()
            .map(|(i, v)| v.credential().map_err(|e| (i, e)))
            .collect()
    }
}

/// Bounds that serde's derive cannot express, checked after decoding.
trait Bounded {
    fn check(&self, what: &'static str) -> Result<(), MessageError>;
}

fn at_most<T>(
    what: &'static str,
    field: &'static str,
    v: &[T],
    max: usize,
) -> Result<(), MessageError> {
    if v.len() > max {
        return Err(MessageError::TooMany {
            what,
            field,
            len: v.len(),
            max,
        });
    }
    Ok(())
}

fn text_at_most(what: &'static str, field: &'static str, s: &str) -> Result<(), MessageError> {
    if s.len() > MAX_TEXT_LEN {
        return Err(MessageError::TextTooLong {
            what,
            field,
            len: s.len(),
            max: MAX_TEXT_LEN,
        });
    }
    Ok(())
}

impl Bounded for IdentityRequest {
    fn check(&self, _: &'static str) -> Result<(), MessageError> {
        Ok(())
    }
}

impl Bounded for IdentityGrant {
    fn check(&self, what: &'static str) -> Result<(), MessageError> {
        self.vouchers.as_ref().map_or(Ok(()), |b| b.check(what))
    }
}

impl Bounded for Denied {
    fn check(&self, what: &'static str) -> Result<(), MessageError> {
        text_at_most(what, "detail", &self.detail)
    }
}

impl Bounded for PendingApproval {
    fn check(&self, _: &'static str) -> Result<(), MessageError> {
        Ok(())
    }
}

impl Bounded for VoucherBatch {
    fn check(&self, what: &'static str) -> Result<(), MessageError> {
        at_most(what, "vouchers", &self.vouchers, MAX_VOUCHERS)
    }
}

impl Bounded for Revocation {
    fn check(&self, what: &'static str) -> Result<(), MessageError> {
        at_most(what, "ticket_ids", &self.ticket_ids, MAX_REVOKED)
    }
}

impl Bounded for SessionRecord {
    fn check(&self, what: &'static str) -> Result<(), MessageError> {
        match &self.result {
            SessionResult::Completed => Ok(()),
            SessionResult::Failed { reason } => text_at_most(what, "result.reason", reason),
        }
    }
}

impl Bounded for OwnerApproval {
    fn check(&self, _: &'static str) -> Result<(), MessageError> {
        Ok(())
    }
}

/// A topic's payload: CBOR out, bounded and checked CBOR in.
pub trait Payload: Sized {
    /// What the payload is called in errors.
    const WHAT: &'static str;
    /// The CBOR bytes. Zeroizing, because some payloads hold session keys.
    fn encode(&self) -> Zeroizing<Vec<u8>>;
    fn decode(bytes: &[u8]) -> Result<Self, MessageError>;
    /// The bounds `decode` enforces, for a sender to check before sending
    /// what the receiver would refuse.
    fn check(&self) -> Result<(), MessageError>;
}

/// Declares a topic's top-level enum: each variant wraps one message struct
/// and is told apart by the `"type"` key.
macro_rules! topic_payload {
    (
        $(#[$doc:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vdoc:meta])* $variant:ident($ty:ty) = $tag:literal, )+
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Serialize)]
        #[serde(tag = "type")]
        pub enum $name {
            $( $(#[$vdoc])* #[serde(rename = $tag)] $variant($ty), )+
        }

        impl Payload for $name {
            const WHAT: &'static str = $what;

            fn encode(&self) -> Zeroizing<Vec<u8>> {
                encode_cbor(self)
            }

            fn check(&self) -> Result<(), MessageError> {
                match self {
                    $( $name::$variant(m) => m.check($tag), )+
                }
            }

            fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
                let tag = decode_type(bytes, $what)?;
                match tag.as_str() {
                    $( $tag => Ok($name::$variant(decode_body::<$ty>(bytes, $tag)?)), )+
                    _ => Err(MessageError::UnknownType {
                        what: $what,
                        found: tag.chars().take(40).collect(),
                        expected: concat!($("\"", $tag, "\" "),+),
                    }),
                }
            }
        }
    };
}

topic_payload! {
    /// What `identity/req` carries.
    pub enum Request ("identity/req payload") {
        Identity(IdentityRequest) = "identity_request",
    }
}

topic_payload! {
    /// What `identity/resp` carries.
    pub enum Response ("identity/resp payload") {
        Grant(IdentityGrant) = "grant",
        Denied(Denied) = "denied",
        Pending(PendingApproval) = "pending_approval",
    }
}

topic_payload! {
    /// What `vouchers` carries.
    pub enum Push ("vouchers payload") {
        Vouchers(VoucherBatch) = "voucher_batch",
        Revocation(Revocation) = "revocation",
    }
}

topic_payload! {
    /// What `events` carries.
    pub enum Event ("events payload") {
        SessionRecord(SessionRecord) = "session_record",
    }
}

topic_payload! {
    /// What `approval` carries.
    pub enum Approval ("approval payload") {
        Owner(OwnerApproval) = "owner_approval",
    }
}

/// Counts what a serializer writes, to size the buffer exactly once: a
/// growing `Vec` would leave copies of session keys in freed memory.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn encode_cbor<T: Serialize>(value: &T) -> Zeroizing<Vec<u8>> {
    // Invariant: our message types serialize without error (no maps with
    // non-string keys, no unsupported types), and neither writer fails.
    const OK: &str = "message types always serialize to CBOR";
    let mut counter = Counter(0);
    ciborium::into_writer(value, &mut counter).expect(OK);
    let mut out = Zeroizing::new(Vec::with_capacity(counter.0));
    ciborium::into_writer(value, &mut *out).expect(OK);
    out
}

/// Only the `"type"` key; the others are skipped unread.
#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: String,
}

fn decode_type(bytes: &[u8], what: &'static str) -> Result<String, MessageError> {
    if bytes.len() > MAX_PAYLOAD_LEN {
        return Err(MessageError::TooLong {
            what,
            len: bytes.len(),
        });
    }
    Ok(decode_cbor::<TypeOnly>(bytes, what)?.kind)
}

fn decode_body<T: DeserializeOwned + Bounded>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, MessageError> {
    let value = decode_cbor::<T>(bytes, what)?;
    value.check(what)?;
    Ok(value)
}

fn decode_cbor<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, MessageError> {
    use ciborium::de::Error;
    // ciborium reads byte strings through this buffer: keep it zeroizing.
    let mut scratch = Zeroizing::new([0u8; 512]);
    let mut rest = bytes;
    let value = ciborium::de::from_reader_with_buffer(&mut rest, &mut scratch[..]).map_err(
        |e| match e {
            Error::Io(_) => MessageError::Truncated { what },
            Error::Syntax(offset) => MessageError::Syntax { what, offset },
            Error::Semantic(offset, detail) => MessageError::Invalid {
                what,
                offset,
                detail: detail.chars().take(200).collect(),
            },
            Error::RecursionLimitExceeded => MessageError::TooDeep { what },
        },
    )?;
    if !rest.is_empty() {
        return Err(MessageError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

/// A byte string of exactly `N` bytes, refused with its length otherwise.
struct FixedVisitor<const N: usize>;

impl<const N: usize> serde::de::Visitor<'_> for FixedVisitor<N> {
    type Value = [u8; N];

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a byte string of {N} bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<[u8; N], E> {
        v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<[u8; N], E> {
        self.visit_bytes(&Zeroizing::new(v))
    }
}

/// `#[serde(with = "fixed")]` for `[u8; N]`: a CBOR byte string (major type
/// 2), not an array of integers.
mod fixed {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        d.deserialize_bytes(super::FixedVisitor::<N>)
    }
}

/// `#[serde(with = "secret")]` for a [`SessionKey`]: a 32-byte byte string.
mod secret {
    use serde::{Deserializer, Serializer};
    use zeroize::Zeroizing;

    use crate::auth::SessionKey;

    pub fn serialize<S: Serializer>(k: &SessionKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(k.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SessionKey, D::Error> {
        let bytes = Zeroizing::new(d.deserialize_bytes(super::FixedVisitor::<32>)?);
        Ok(SessionKey::from_bytes(*bytes))
    }
}

/// `#[serde(with = "fixed_seq")]` for `Vec<[u8; N]>`: an array of byte strings.
mod fixed_seq {
    use serde::de::{SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    struct Item<const N: usize>([u8; N]);

    impl<'de, const N: usize> Deserialize<'de> for Item<N> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::fixed::deserialize(d).map(Item)
        }
    }

    pub fn serialize<S: Serializer, const N: usize>(
        v: &[[u8; N]],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(serde_bytes::Bytes::new(item))?;
        }
        seq.end()
    }

    struct SeqVisitor<const N: usize>;

    impl<'de, const N: usize> Visitor<'de> for SeqVisitor<N> {
        type Value = Vec<[u8; N]>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "an array of {N}-byte byte strings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // No preallocation from the claimed length: the input is bounded,
            // the claim is not.
            let mut out = Vec::new();
            while let Some(Item(v)) = seq.next_element::<Item<N>>()? {
                out.push(v);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Vec<[u8; N]>, D::Error> {
        d.deserialize_seq(SeqVisitor::<N>)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::RootKey;
    use crate::auth::rng::StreamRng;
    use crate::cloud::topics::tests::vehicle_id_strategy;
    use proptest::prelude::*;

    fn vid(s: &str) -> VehicleId {
        VehicleId::parse(s).expect("valid id")
    }

    pub(crate) fn issued(charger: u32, voucher: bool, seed: u64) -> Credential {
        Credential::issue(
            &RootKey::from_bytes([3; 32]),
            1,
            charger,
            [4; 16],
            1_760_000_000,
            1_760_000_300,
            0,
            voucher,
            &mut StreamRng::new(seed),
        )
    }

    fn ticket_strategy() -> impl Strategy<Value = [u8; TICKET_LEN]> {
        any::<[u8; TICKET_LEN]>()
    }

    fn key_strategy() -> impl Strategy<Value = SessionKey> {
        any::<[u8; 32]>().prop_map(SessionKey::from_bytes)
    }

    fn voucher_strategy() -> impl Strategy<Value = Voucher> {
        (
            ticket_strategy(),
            key_strategy(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(
                |(ticket, session_key, charger_number, not_before, not_after, energy_cap_wh)| {
                    Voucher {
                        ticket,
                        session_key,
                        charger_number,
                        not_before,
                        not_after,
                        energy_cap_wh,
                    }
                },
            )
    }

    fn batch_strategy() -> impl Strategy<Value = VoucherBatch> {
        (
            vehicle_id_strategy(),
            any::<Id16>(),
            any::<u32>(),
            prop::collection::vec(voucher_strategy(), 0..=4),
        )
            .prop_map(|(vehicle_id, batch_id, issued_at, vouchers)| VoucherBatch {
                vehicle_id,
                batch_id,
                issued_at,
                vouchers,
            })
    }

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,60}"
    }

    prop_compose! {
        fn request()(vehicle_id in vehicle_id_strategy(), charger_number: u32, region_code: [u8; 3],
                     request_id: Id16, nonce: Id16, time: u32, want_vouchers: u16) -> IdentityRequest {
            IdentityRequest { vehicle_id, charger_number, region_code, request_id, nonce, time, want_vouchers }
        }
    }

    prop_compose! {
        fn grant()(vehicle_id in vehicle_id_strategy(), request_nonce: Id16, ticket in ticket_strategy(),
                   session_key in key_strategy(), charger_number: u32, not_before: u32, not_after: u32,
                   energy_cap_wh: u32, vouchers in prop::option::of(batch_strategy())) -> IdentityGrant {
            IdentityGrant { vehicle_id, request_nonce, ticket, session_key, charger_number, not_before,
                            not_after, energy_cap_wh, vouchers }
        }
    }

    fn deny_reason() -> impl Strategy<Value = DenyReason> {
        prop::sample::select(vec![
            DenyReason::UnknownVehicle,
            DenyReason::Revoked,
            DenyReason::UnknownPile,
            DenyReason::ApprovalDenied,
            DenyReason::ApprovalTimeout,
            DenyReason::BadRequest,
            DenyReason::StaleRequest,
        ])
    }

    pub(crate) fn response_strategy() -> impl Strategy<Value = Response> {
        prop_oneof![
            grant().prop_map(Response::Grant),
            (vehicle_id_strategy(), any::<Id16>(), deny_reason(), text()).prop_map(
                |(vehicle_id, request_nonce, reason, detail)| Response::Denied(Denied {
                    vehicle_id,
                    request_nonce,
                    reason,
                    detail
                })
            ),
            (vehicle_id_strategy(), any::<Id16>(), any::<u32>()).prop_map(
                |(vehicle_id, request_nonce, deadline)| Response::Pending(PendingApproval {
                    vehicle_id,
                    request_nonce,
                    deadline
                })
            ),
        ]
    }

    fn push_strategy() -> impl Strategy<Value = Push> {
        prop_oneof![
            batch_strategy().prop_map(Push::Vouchers),
            (
                vehicle_id_strategy(),
                any::<u64>(),
                any::<u32>(),
                prop::collection::vec(any::<TicketId>(), 0..20)
            )
                .prop_map(|(vehicle_id, seq, issued_at, ticket_ids)| Push::Revocation(
                    Revocation {
                        vehicle_id,
                        seq,
                        issued_at,
                        ticket_ids
                    }
                )),
        ]
    }

    prop_compose! {
        pub(crate) fn record()(record_id: Id16, vehicle_id in vehicle_id_strategy(), charger_number: u32,
                    voucher: bool, ticket_id: TicketId, energy_wh: u32, started_at: u32, stopped_at: u32,
                    failed in prop::option::of(text()),
                    deviations in link_deviations()) -> SessionRecord {
            SessionRecord {
                record_id, vehicle_id, charger_number,
                credential: UsedCredential {
                    kind: if voucher { CredentialKind::Voucher } else { CredentialKind::Online },
                    ticket_id,
                },
                energy_wh, started_at, stopped_at,
                result: failed.map_or(SessionResult::Completed, |reason| SessionResult::Failed { reason }),
                deviations,
            }
        }
    }

    /// Deviations of either side, accepted or refused, some of them repeated.
    fn link_deviations() -> impl Strategy<Value = LinkDeviations> {
        use crate::interop::Deviation;
        prop::collection::vec(
            (any::<bool>(), any::<bool>(), 0..Deviation::ALL.len()),
            0..6,
        )
        .prop_map(|seen| {
            let mut out = LinkDeviations::default();
            for (bms, refused, i) in seen {
                let side = if bms { &mut out.bms } else { &mut out.pile };
                let counts = if refused {
                    &mut side.refused
                } else {
                    &mut side.accepted
                };
                counts.add(Deviation::ALL[i]);
            }
            out
        })
    }

    prop_compose! {
        fn approval()(vehicle_id in vehicle_id_strategy(), request_id: Id16, approve: bool, time: u32) -> OwnerApproval {
            OwnerApproval { vehicle_id, request_id, approve, time }
        }
    }

    /// Round trip by re-encoding: encoding is deterministic (fields in
    /// declaration order, definite lengths), so equal bytes mean equal
    /// messages, session keys included, without `PartialEq` on secrets.
    fn round_trips<P: Payload>(p: &P) -> Result<(), TestCaseError> {
        let bytes = p.encode();
        let back = P::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back.encode()[..], &bytes[..]);
        Ok(())
    }

    /// A CBOR map with the given text keys and values.
    fn map(entries: Vec<(&str, ciborium::Value)>) -> Vec<u8> {
        let v = ciborium::Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (ciborium::Value::Text(k.into()), v))
                .collect(),
        );
        let mut out = Vec::new();
        ciborium::into_writer(&v, &mut out).expect("writes to a Vec");
        out
    }

    fn value_of<T: Serialize>(t: &T) -> ciborium::Value {
        ciborium::Value::serialized(t).expect("serializes")
    }

    #[test]
    fn encoding_is_a_text_keyed_map_with_a_type() {
        let r = Request::Identity(IdentityRequest {
            vehicle_id: vid("veh-a"),
            charger_number: 7,
            region_code: *b"\x01\x02\x03",
            request_id: [0x11; 16],
            nonce: [0x22; 16],
            time: 1_760_000_000,
            want_vouchers: 2,
        });
        let v: ciborium::Value = ciborium::from_reader(&r.encode()[..]).expect("CBOR");
        let keys: Vec<String> = v
            .as_map()
            .expect("a map")
            .iter()
            .map(|(k, _)| k.as_text().expect("text key").to_owned())
            .collect();
        assert_eq!(
            keys,
            [
                "type",
                "vehicle_id",
                "charger_number",
                "region_code",
                "request_id",
                "nonce",
                "time",
                "want_vouchers"
            ]
        );
        let entries = v.as_map().expect("a map");
        assert_eq!(
            entries[0].1,
            ciborium::Value::Text("identity_request".into())
        );
        assert_eq!(entries[3].1, ciborium::Value::Bytes(vec![1, 2, 3]));
    }

    #[test]
    fn grant_and_voucher_convert_to_credentials() {
        let online = issued(7, false, 1);
        let v1 = issued(7, true, 2);
        let batch = VoucherBatch {
            vehicle_id: vid("veh-a"),
            batch_id: [9; 16],
            issued_at: 1,
            vouchers: vec![Voucher::from_credential(&v1)],
        };
        let grant = IdentityGrant::new(vid("veh-a"), [5; 16], &online, Some(batch));
        let Response::Grant(back) =
            Response::decode(&Response::Grant(grant).encode()).expect("decodes")
        else {
            panic!("not a grant");
        };
        let c = back.credential().expect("consistent");
        assert_eq!(c.ticket, online.ticket);
        assert_eq!(c.session_key.expose(), online.session_key.expose());
        assert!(!c.voucher);
        let vs = back
            .vouchers
            .expect("batch")
            .credentials()
            .expect("consistent");
        assert_eq!(vs.len(), 1);
        assert_eq!(vs[0].ticket_id(), v1.ticket_id());
        assert_eq!(vs[0].session_key.expose(), v1.session_key.expose());
        assert!(vs[0].voucher);
    }

    #[test]
    fn credential_conversion_checks_the_ticket_header() {
        let online = issued(7, false, 3);
        let mut g = IdentityGrant::new(vid("veh-a"), [5; 16], &online, None);
        g.charger_number = 8;
        assert_eq!(
            g.credential().err(),
            Some(CredentialMismatch::Charger {
                ticket: 7,
                field: 8
            })
        );
        g.charger_number = 7;
        g.not_after = g.not_before;
        assert!(matches!(
            g.credential(),
            Err(CredentialMismatch::EmptyWindow { .. })
        ));
        g.not_after = g.not_before + 1;
        g.ticket[0] = 2;
        assert_eq!(
            g.credential().err(),
            Some(CredentialMismatch::Ticket(ResultCode::UnsupportedVersion))
        );
    }

    #[test]
    fn fixed_size_fields_are_length_checked_with_a_clear_error() {
        let r = IdentityRequest {
            vehicle_id: vid("veh-a"),
            charger_number: 7,
            region_code: [0; 3],
            request_id: [0; 16],
            nonce: [0; 16],
            time: 0,
            want_vouchers: 0,
        };
        let mut entries: Vec<(&str, ciborium::Value)> =
            vec![("type", ciborium::Value::Text("identity_request".into()))];
        let v = value_of(&r);
        let fields: Vec<(String, ciborium::Value)> = v
            .as_map()
            .expect("map")
            .iter()
            .map(|(k, v)| (k.as_text().expect("text").to_owned(), v.clone()))
            .collect();
        for (k, v) in &fields {
            let v = if k == "nonce" {
                ciborium::Value::Bytes(vec![0; 15])
            } else {
                v.clone()
            };
            entries.push((k.as_str(), v));
        }
        let err = Request::decode(&map(entries)).expect_err("short nonce");
        let text = err.to_string();
        assert!(
            text.contains("invalid length 15, expected a byte string of 16 bytes"),
            "{text}"
        );
        assert!(text.starts_with("identity_request: "), "{text}");

        // An array of integers is not a byte string.
        let mut entries: Vec<(&str, ciborium::Value)> =
            vec![("type", ciborium::Value::Text("identity_request".into()))];
        for (k, v) in &fields {
            let v = if k == "region_code" {
                ciborium::Value::Array(vec![1.into(), 2.into(), 3.into()])
            } else {
                v.clone()
            };
            entries.push((k.as_str(), v));
        }
        let err = Request::decode(&map(entries)).expect_err("array");
        assert!(
            err.to_string().contains("a byte string of 3 bytes"),
            "{err}"
        );
    }

    #[test]
    fn decode_errors_name_what_was_wrong() {
        let grant = Response::Grant(IdentityGrant::new(
            vid("veh-a"),
            [5; 16],
            &issued(7, false, 4),
            None,
        ));
        let good = grant.encode();

        assert_eq!(
            Response::decode(&good[..good.len() - 1]).err(),
            Some(MessageError::Truncated {
                what: "identity/resp payload"
            })
        );
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(
            Response::decode(&long).err(),
            Some(MessageError::TrailingBytes {
                what: "identity/resp payload",
                extra: 1
            })
        );
        assert_eq!(
            Response::decode(&vec![0u8; MAX_PAYLOAD_LEN + 1]).err(),
            Some(MessageError::TooLong {
                what: "identity/resp payload",
                len: MAX_PAYLOAD_LEN + 1
            })
        );
        let err = Response::decode(&map(vec![("type", ciborium::Value::Text("gift".into()))]))
            .expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "identity/resp payload: unknown \"type\" \"gift\"; expected one of \"grant\" \"denied\" \"pending_approval\" "
        );
        let err = Response::decode(&map(vec![("kind", ciborium::Value::Text("grant".into()))]))
            .expect_err("no type");
        assert!(err.to_string().contains("missing field `type`"), "{err}");
        let err = Response::decode(&map(vec![("type", ciborium::Value::Text("denied".into()))]))
            .expect_err("fields");
        assert!(
            err.to_string()
                .starts_with("denied: missing field `vehicle_id`"),
            "{err}"
        );
        // A request is not a response.
        let req = Request::Identity(IdentityRequest {
            vehicle_id: vid("veh-a"),
            charger_number: 7,
            region_code: [0; 3],
            request_id: [0; 16],
            nonce: [0; 16],
            time: 0,
            want_vouchers: 0,
        });
        assert!(matches!(
            Response::decode(&req.encode()),
            Err(MessageError::UnknownType { .. })
        ));
    }

    #[test]
    fn lists_and_texts_are_bounded() {
        let v = Voucher::from_credential(&issued(7, true, 5));
        let batch = VoucherBatch {
            vehicle_id: vid("veh-a"),
            batch_id: [0; 16],
            issued_at: 0,
            vouchers: vec![v; MAX_VOUCHERS + 1],
        };
        assert_eq!(
            Push::decode(&Push::Vouchers(batch).encode()).err(),
            Some(MessageError::TooMany {
                what: "voucher_batch",
                field: "vouchers",
                len: MAX_VOUCHERS + 1,
                max: MAX_VOUCHERS
            })
        );
        let rev = Revocation {
            vehicle_id: vid("veh-a"),
            seq: 1,
            issued_at: 0,
            ticket_ids: vec![[0; 12]; MAX_REVOKED + 1],
        };
        assert!(matches!(
            Push::decode(&Push::Revocation(rev).encode()),
            Err(MessageError::TooMany {
                field: "ticket_ids",
                ..
            })
        ));
        let denied = Denied {
            vehicle_id: vid("veh-a"),
            request_nonce: [0; 16],
            reason: DenyReason::Revoked,
            detail: "x".repeat(MAX_TEXT_LEN + 1),
        };
        assert!(matches!(
            Response::decode(&Response::Denied(denied).encode()),
            Err(MessageError::TextTooLong {
                field: "detail",
                ..
            })
        ));
    }

    #[test]
    fn unknown_keys_are_ignored_and_unknown_reasons_kept() {
        let d = Denied {
            vehicle_id: vid("veh-a"),
            request_nonce: [1; 16],
            reason: DenyReason::Revoked,
            detail: "no".into(),
        };
        let mut entries = vec![
            ("type", ciborium::Value::Text("denied".into())),
            ("future", 1.into()),
        ];
        let v = value_of(&d);
        let fields: Vec<(String, ciborium::Value)> = v
            .as_map()
            .expect("map")
            .iter()
            .map(|(k, v)| (k.as_text().expect("text").to_owned(), v.clone()))
            .collect();
        for (k, v) in &fields {
            let v = if k == "reason" {
                ciborium::Value::Text("quota_exceeded".into())
            } else {
                v.clone()
            };
            entries.push((k.as_str(), v));
        }
        let Ok(Response::Denied(back)) = Response::decode(&map(entries)) else {
            panic!("decodes");
        };
        assert_eq!(back.reason, DenyReason::Other);
        assert_eq!(back.detail, "no");
    }

    #[test]
    fn session_result_and_kind_encodings() {
        let failed = value_of(&SessionResult::Failed {
            reason: "pile".into(),
        });
        assert_eq!(
            failed,
            ciborium::Value::Map(vec![
                ("status".into(), "failed".into()),
                ("reason".into(), "pile".into())
            ])
        );
        assert_eq!(
            value_of(&CredentialKind::Voucher),
            ciborium::Value::Text("voucher".into())
        );
        assert_eq!(
            value_of(&DenyReason::ApprovalTimeout),
            ciborium::Value::Text("approval_timeout".into())
        );
    }

    proptest! {
        #[test]
        fn request_round_trips(r in request()) {
            round_trips(&Request::Identity(r.clone()))?;
            let Request::Identity(back) = Request::decode(&Request::Identity(r.clone()).encode()).expect("decodes");
            prop_assert_eq!(back, r);
        }

        #[test]
        fn response_round_trips(r in response_strategy()) {
            round_trips(&r)?;
        }

        #[test]
        fn push_round_trips(p in push_strategy()) {
            round_trips(&p)?;
        }

        #[test]
        fn event_round_trips(r in record()) {
            round_trips(&Event::SessionRecord(r.clone()))?;
            let Event::SessionRecord(back) = Event::decode(&Event::SessionRecord(r.clone()).encode()).expect("decodes");
            prop_assert_eq!(back, r);
        }

        #[test]
        fn approval_round_trips(a in approval()) {
            round_trips(&Approval::Owner(a.clone()))?;
            let Approval::Owner(back) = Approval::decode(&Approval::Owner(a.clone()).encode()).expect("decodes");
            prop_assert_eq!(back, a);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
            let _ = Push::decode(&bytes);
            let _ = Event::decode(&bytes);
            let _ = Approval::decode(&bytes);
        }

        #[test]
        fn mutated_payloads_never_panic(r in response_strategy(), at: prop::sample::Index, byte: u8, cut: prop::sample::Index) {
            let mut bytes = r.encode().to_vec();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = Response::decode(&bytes);
            let _ = Response::decode(&bytes[..cut.index(bytes.len())]);
        }
    }
}
