//! Key material and the key schedule (`docs/protocol.md` §4.1).
//!
//! Every secret is a newtype that zeroizes itself on drop and whose `Debug`
//! never shows its bytes, so a stray `{:?}` in a log cannot leak a key.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::hash;
use super::rng::Rng;

/// HKDF salt of the ticket key schedule.
pub const TICKET_KEY_SALT: &[u8; 19] = b"bmsgw ticket key v1";

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; 32]);

        impl $name {
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                $name(bytes)
            }

            /// A fresh key from `rng`.
            pub fn generate(rng: &mut dyn Rng) -> Self {
                let mut key = $name([0; 32]);
                rng.fill(&mut key.0);
                key
            }

            /// The raw key, for the code that must use it (AEAD, PSK, files).
            pub fn expose(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_key!(
    /// A pile's 32-byte root key, shared only with the cloud.
    RootKey
);
secret_key!(
    /// The handshake PSK of one ticket, known to the vehicle, the cloud and
    /// the pile that opened the ticket.
    SessionKey
);
secret_key!(
    /// The AEAD key that seals tickets for one pile in one epoch.
    TicketKey
);

/// HKDF-SHA256(salt = "bmsgw ticket key v1", ikm = root key,
/// info = key_offset (u16 LE) || charger_number (u32 LE), L = 32).
pub fn ticket_key(root: &RootKey, key_offset: u16, charger_number: u32) -> TicketKey {
    let mut info = [0u8; 6];
    info[..2].copy_from_slice(&key_offset.to_le_bytes());
    info[2..].copy_from_slice(&charger_number.to_le_bytes());
    let prk = hash::hkdf_extract(TICKET_KEY_SALT, root.expose());
    let mut okm = Zeroizing::new([0u8; 32]);
    hash::hkdf_expand(&*prk, &info, &mut [&mut okm[..]]);
    TicketKey::from_bytes(*okm)
}

/// What a pile needs to open tickets: its root key, its number and the key
/// epochs it accepts.
#[derive(Clone, Debug)]
pub struct PileKeys {
    pub root: RootKey,
    /// The pile's number as sent in CRM bytes 2–5; tickets name it.
    pub charger_number: u32,
    /// The epoch the cloud issues tickets under now.
    pub current_offset: u16,
    /// The epoch before, still accepted while the cloud rotates.
    pub previous_offset: Option<u16>,
}

impl PileKeys {
    /// Whether a ticket sealed under `key_offset` may be opened (§4.2 step 2).
    pub fn accepts_offset(&self, key_offset: u16) -> bool {
        key_offset == self.current_offset || self.previous_offset == Some(key_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_zeroize_on_drop() {
        fn zeroizes_on_drop<T: ZeroizeOnDrop>() {}
        zeroizes_on_drop::<RootKey>();
        zeroizes_on_drop::<SessionKey>();
        zeroizes_on_drop::<TicketKey>();
        let mut k = SessionKey::from_bytes([7; 32]);
        k.zeroize();
        assert_eq!(k.expose(), &[0; 32]);
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let keys = PileKeys {
            root: RootKey::from_bytes([0xab; 32]),
            charger_number: 7,
            current_offset: 1,
            previous_offset: None,
        };
        let shown = format!("{keys:?} {:?}", SessionKey::from_bytes([0xcd; 32]));
        assert!(shown.contains("RootKey(<redacted>)"), "{shown}");
        // 0xab = 171 and 0xcd = 205 as `[u8]` Debug would print them.
        assert!(!shown.contains("171") && !shown.contains("205"), "{shown}");
    }

    #[test]
    fn ticket_key_is_rfc5869_hkdf_over_offset_and_charger() {
        let root = RootKey::from_bytes([0x11; 32]);
        let mut expected = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(TICKET_KEY_SALT), root.expose())
            .expand(&[0x02, 0x01, 0x78, 0x56, 0x34, 0x12], &mut expected)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        assert_eq!(ticket_key(&root, 0x0102, 0x1234_5678).expose(), &expected);
        // Epoch and pile both select the key.
        assert_ne!(ticket_key(&root, 0x0103, 0x1234_5678).expose(), &expected);
        assert_ne!(ticket_key(&root, 0x0102, 0x1234_5679).expose(), &expected);
    }

    #[test]
    fn accepts_only_configured_epochs() {
        let mut keys = PileKeys {
            root: RootKey::from_bytes([0; 32]),
            charger_number: 1,
            current_offset: 5,
            previous_offset: None,
        };
        assert!(keys.accepts_offset(5));
        assert!(!keys.accepts_offset(4));
        keys.previous_offset = Some(4);
        assert!(keys.accepts_offset(4));
        assert!(!keys.accepts_offset(3));
    }
}
