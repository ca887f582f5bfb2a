//! The ticket (`docs/protocol.md` §4.2): what the cloud seals for one pile
//! and the pile opens to learn the session key.
//!
//! Sealing draws the nonce (`ticket_id`) from the injected RNG itself; no
//! caller can supply one, so no caller can repeat one.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use zeroize::Zeroizing;

use super::keys::{PileKeys, RootKey, SessionKey, ticket_key};
use super::messages::ResultCode;
use super::rng::Rng;

pub const TICKET_LEN: usize = 101;
pub const TICKET_VERSION: u8 = 1;
/// Version, reserved, key_offset, charger_number, ticket_id: the AEAD's
/// associated data.
pub const HEADER_LEN: usize = 20;
pub const BODY_LEN: usize = 65;
pub const TAG_LEN: usize = 16;

const FLAG_VOUCHER: u8 = 0x01;

/// The sealed part of a ticket.
#[derive(Clone, Debug)]
pub struct TicketBody {
    /// The cloud's per-vehicle pseudonym; never the VIN.
    pub pseudonym: [u8; 16],
    /// Must equal the header's: binds the body to the pile.
    pub charger_number: u32,
    /// Unix seconds. The issuer keeps `not_after > not_before`.
    pub not_before: u32,
    pub not_after: u32,
    /// The handshake PSK.
    pub session_key: SessionKey,
    /// Most energy this credential allows, in Wh; 0 = no cap.
    pub energy_cap_wh: u32,
    /// Issued ahead of time for offline use (flags bit 0).
    pub voucher: bool,
}

impl TicketBody {
    fn encode(&self) -> Zeroizing<[u8; BODY_LEN]> {
        let mut b = Zeroizing::new([0u8; BODY_LEN]);
        b[0..16].copy_from_slice(&self.pseudonym);
        b[16..20].copy_from_slice(&self.charger_number.to_le_bytes());
        b[20..24].copy_from_slice(&self.not_before.to_le_bytes());
        b[24..28].copy_from_slice(&self.not_after.to_le_bytes());
        b[28..60].copy_from_slice(self.session_key.expose());
        b[60..64].copy_from_slice(&self.energy_cap_wh.to_le_bytes());
        b[64] = if self.voucher { FLAG_VOUCHER } else { 0 };
        b
    }

    /// `None` when reserved flag bits are set.
    fn decode(b: &[u8; BODY_LEN]) -> Option<TicketBody> {
        let (pseudonym, rest) = b.split_first_chunk::<16>()?;
        let (charger_number, rest) = rest.split_first_chunk::<4>()?;
        let (not_before, rest) = rest.split_first_chunk::<4>()?;
        let (not_after, rest) = rest.split_first_chunk::<4>()?;
        let (session_key, rest) = rest.split_first_chunk::<32>()?;
        let (energy_cap_wh, rest) = rest.split_first_chunk::<4>()?;
        let &[flags] = rest else { return None };
        if flags & !FLAG_VOUCHER != 0 {
            return None;
        }
        Some(TicketBody {
            pseudonym: *pseudonym,
            charger_number: u32::from_le_bytes(*charger_number),
            not_before: u32::from_le_bytes(*not_before),
            not_after: u32::from_le_bytes(*not_after),
            session_key: SessionKey::from_bytes(*session_key),
            energy_cap_wh: u32::from_le_bytes(*energy_cap_wh),
            voucher: flags & FLAG_VOUCHER != 0,
        })
    }
}

/// The clear header of a ticket, readable without any key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TicketHeader {
    pub key_offset: u16,
    pub charger_number: u32,
    pub ticket_id: [u8; 12],
}

impl TicketHeader {
    /// Step 1 of §4.2: length 101 and version 1.
    pub fn parse(ticket: &[u8]) -> Result<TicketHeader, ResultCode> {
        let ticket: &[u8; TICKET_LEN] = ticket.try_into().map_err(|_| ResultCode::Malformed)?;
        let (header, _) = ticket
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(ResultCode::Malformed)?;
        let [version, _reserved, o0, o1, c0, c1, c2, c3, id @ ..] = *header;
        if version != TICKET_VERSION {
            return Err(ResultCode::UnsupportedVersion);
        }
        Ok(TicketHeader {
            key_offset: u16::from_le_bytes([o0, o1]),
            charger_number: u32::from_le_bytes([c0, c1, c2, c3]),
            ticket_id: id,
        })
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = TICKET_VERSION;
        h[2..4].copy_from_slice(&self.key_offset.to_le_bytes());
        h[4..8].copy_from_slice(&self.charger_number.to_le_bytes());
        h[8..20].copy_from_slice(&self.ticket_id);
        h
    }
}

/// Seal `body` for pile `body.charger_number` under epoch `key_offset`.
///
/// The nonce is a fresh 96-bit `ticket_id` from `rng` (the nonce rule of
/// §4.2). The caller keeps `body.not_after > body.not_before`; a pile refuses
/// a ticket that breaks it.
pub fn seal(
    root: &RootKey,
    key_offset: u16,
    body: &TicketBody,
    rng: &mut dyn Rng,
) -> [u8; TICKET_LEN] {
    let mut ticket_id = [0u8; 12];
    rng.fill(&mut ticket_id);
    let header = TicketHeader {
        key_offset,
        charger_number: body.charger_number,
        ticket_id,
    }
    .encode();
    let key = ticket_key(root, key_offset, body.charger_number);
    let mut sealed = body.encode();
    let tag = ChaCha20Poly1305::new(Key::from_slice(key.expose()))
        .encrypt_in_place_detached(Nonce::from_slice(&ticket_id), &header, &mut sealed[..])
        // Invariant: ChaCha20-Poly1305 refuses only plaintexts over 256 GiB.
        .expect("a 65-byte body is within ChaCha20-Poly1305's length limit");
    let mut ticket = [0u8; TICKET_LEN];
    ticket[..HEADER_LEN].copy_from_slice(&header);
    ticket[HEADER_LEN..HEADER_LEN + BODY_LEN].copy_from_slice(&sealed[..]);
    ticket[HEADER_LEN + BODY_LEN..].copy_from_slice(&tag);
    ticket
}

/// A ticket the pile has opened and checked (§4.2 steps 1–6).
#[derive(Clone, Debug)]
pub struct OpenedTicket {
    /// The nonce, and the key of the replay cache (step 7).
    pub ticket_id: [u8; 12],
    pub key_offset: u16,
    pub body: TicketBody,
}

/// Steps 1–6 of §4.2, in the spec's order, each failure with its own code.
/// The replay check (step 7) belongs to the pile's state machine.
pub fn open(
    keys: &PileKeys,
    ticket: &[u8],
    unix_now: u32,
    skew: u32,
) -> Result<OpenedTicket, ResultCode> {
    let header = TicketHeader::parse(ticket)?;
    if !keys.accepts_offset(header.key_offset) {
        return Err(ResultCode::UnknownKeyOffset);
    }
    if header.charger_number != keys.charger_number {
        return Err(ResultCode::WrongCharger);
    }
    let (aad, rest) = ticket
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(ResultCode::Malformed)?;
    let (ciphertext, rest) = rest
        .split_first_chunk::<BODY_LEN>()
        .ok_or(ResultCode::Malformed)?;
    let tag: &[u8; TAG_LEN] = rest.try_into().map_err(|_| ResultCode::Malformed)?;

    let key = ticket_key(&keys.root, header.key_offset, header.charger_number);
    let mut plain = Zeroizing::new(*ciphertext);
    ChaCha20Poly1305::new(Key::from_slice(key.expose()))
        .decrypt_in_place_detached(
            Nonce::from_slice(&header.ticket_id),
            aad,
            &mut plain[..],
            Tag::from_slice(tag),
        )
        .map_err(|_| ResultCode::BadTicket)?;

    let body = TicketBody::decode(&plain).ok_or(ResultCode::BadTicket)?;
    // Only the cloud can seal, so these reject an issuer bug rather than an
    // attacker; `not_after > not_before` is the body's own rule (§4.2 table).
    if body.charger_number != header.charger_number || body.not_after <= body.not_before {
        return Err(ResultCode::BadTicket);
    }

    let (now, skew) = (u64::from(unix_now), u64::from(skew));
    if now + skew < u64::from(body.not_before) {
        return Err(ResultCode::NotYetValid);
    }
    if now > u64::from(body.not_after) + skew {
        return Err(ResultCode::Expired);
    }
    Ok(OpenedTicket {
        ticket_id: header.ticket_id,
        key_offset: header.key_offset,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rng::StreamRng;
    use proptest::prelude::*;

    const CHARGER: u32 = 0x0001_E240;
    const NOW: u32 = 1_760_000_000;

    fn keys() -> PileKeys {
        PileKeys {
            root: RootKey::from_bytes([0x42; 32]),
            charger_number: CHARGER,
            current_offset: 3,
            previous_offset: Some(2),
        }
    }

    fn body() -> TicketBody {
        TicketBody {
            pseudonym: [0x77; 16],
            charger_number: CHARGER,
            not_before: NOW - 60,
            not_after: NOW + 600,
            session_key: SessionKey::from_bytes([0x5a; 32]),
            energy_cap_wh: 30_000,
            voucher: true,
        }
    }

    fn sealed(body: &TicketBody, offset: u16) -> [u8; TICKET_LEN] {
        seal(&keys().root, offset, body, &mut StreamRng::new(1))
    }

    #[test]
    fn seal_then_open_returns_the_body() {
        let t = sealed(&body(), 3);
        let opened = open(&keys(), &t, NOW, 300).expect("opens");
        assert_eq!(opened.key_offset, 3);
        assert_eq!(&opened.ticket_id[..], &t[8..20]);
        assert_eq!(opened.body.pseudonym, [0x77; 16]);
        assert_eq!(opened.body.session_key.expose(), &[0x5a; 32]);
        assert_eq!(
            (opened.body.energy_cap_wh, opened.body.voucher),
            (30_000, true)
        );
        assert_eq!(
            (opened.body.not_before, opened.body.not_after),
            (NOW - 60, NOW + 600)
        );
    }

    #[test]
    fn ticket_ids_come_from_the_rng_and_differ() {
        let mut rng = StreamRng::new(9);
        let a = seal(&keys().root, 3, &body(), &mut rng);
        let b = seal(&keys().root, 3, &body(), &mut rng);
        assert_ne!(a[8..20], b[8..20]);
        assert_ne!(a[20..], b[20..]);
    }

    #[test]
    fn each_step_has_its_code() {
        let t = sealed(&body(), 3);
        assert_eq!(
            open(&keys(), &t[..100], NOW, 300).err(),
            Some(ResultCode::Malformed)
        );
        let mut v2 = t;
        v2[0] = 2;
        assert_eq!(
            open(&keys(), &v2, NOW, 300).err(),
            Some(ResultCode::UnsupportedVersion)
        );
        assert_eq!(
            open(&keys(), &sealed(&body(), 1), NOW, 300).err(),
            Some(ResultCode::UnknownKeyOffset)
        );
        let mut other = keys();
        other.charger_number += 1;
        assert_eq!(
            open(&other, &t, NOW, 300).err(),
            Some(ResultCode::WrongCharger)
        );
        let mut wrong_root = keys();
        wrong_root.root = RootKey::from_bytes([0x43; 32]);
        assert_eq!(
            open(&wrong_root, &t, NOW, 300).err(),
            Some(ResultCode::BadTicket)
        );
    }

    #[test]
    fn previous_epoch_opens_only_when_configured() {
        let t = sealed(&body(), 2);
        assert!(open(&keys(), &t, NOW, 300).is_ok());
        let mut k = keys();
        k.previous_offset = None;
        assert_eq!(
            open(&k, &t, NOW, 300).err(),
            Some(ResultCode::UnknownKeyOffset)
        );
    }

    #[test]
    fn body_must_agree_with_header_and_its_own_rules() {
        // The cloud could seal these; the pile still refuses them.
        let mut mismatched = body();
        mismatched.charger_number = CHARGER + 1;
        let mut t = sealed(&mismatched, 3);
        // Reseal with the header naming this pile but the body another.
        let key = ticket_key(&keys().root, 3, CHARGER);
        t[4..8].copy_from_slice(&CHARGER.to_le_bytes());
        let mut plain = mismatched.encode();
        let tag = ChaCha20Poly1305::new(Key::from_slice(key.expose()))
            .encrypt_in_place_detached(Nonce::from_slice(&t[8..20]), &t[..20], &mut plain[..])
            .expect("seals");
        t[20..85].copy_from_slice(&plain[..]);
        t[85..].copy_from_slice(&tag);
        assert_eq!(
            open(&keys(), &t, NOW, 300).err(),
            Some(ResultCode::BadTicket)
        );

        let mut inverted = body();
        inverted.not_after = inverted.not_before;
        assert_eq!(
            open(&keys(), &sealed(&inverted, 3), NOW, 300).err(),
            Some(ResultCode::BadTicket)
        );
    }

    #[test]
    fn validity_window_with_skew() {
        let t = sealed(&body(), 3);
        let (nb, na) = (NOW - 60, NOW + 600);
        // Within the skew on both sides.
        assert!(open(&keys(), &t, nb - 300, 300).is_ok());
        assert!(open(&keys(), &t, na + 300, 300).is_ok());
        // Beyond it.
        assert_eq!(
            open(&keys(), &t, nb - 301, 300).err(),
            Some(ResultCode::NotYetValid)
        );
        assert_eq!(
            open(&keys(), &t, na + 301, 300).err(),
            Some(ResultCode::Expired)
        );
        // No overflow at the ends of time.
        assert_eq!(open(&keys(), &t, u32::MAX, u32::MAX).map(|_| ()), Ok(()));
        assert_eq!(
            open(&keys(), &t, u32::MAX, 0).err(),
            Some(ResultCode::Expired)
        );
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let t = sealed(&body(), 3);
        for bit in 0..TICKET_LEN * 8 {
            let mut flipped = t;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let code = open(&keys(), &flipped, NOW, 300)
                .err()
                .unwrap_or_else(|| panic!("bit {bit} flipped still opens"));
            let expected: &[ResultCode] = match bit / 8 {
                0 => &[ResultCode::UnsupportedVersion],
                2..=3 => &[ResultCode::UnknownKeyOffset, ResultCode::BadTicket],
                4..=7 => &[ResultCode::WrongCharger],
                _ => &[ResultCode::BadTicket],
            };
            assert!(expected.contains(&code), "bit {bit}: {code}");
        }
    }

    proptest! {
        #[test]
        fn open_never_panics(data in proptest::collection::vec(any::<u8>(), 0..120), now: u32, skew: u32) {
            let _ = open(&keys(), &data, now, skew);
        }

        #[test]
        fn open_never_panics_on_plausible_headers(tail in proptest::collection::vec(any::<u8>(), 93), now: u32) {
            let mut t = vec![1, 0, 3, 0];
            t.extend_from_slice(&CHARGER.to_le_bytes());
            t.extend_from_slice(&tail);
            prop_assert_eq!(open(&keys(), &t, now, 300).err(), Some(ResultCode::BadTicket));
        }
    }
}
