//! The end-to-end envelope around every cloud-link payload (`docs/protocol.md`
//! §6.4), and the X25519 keys it uses.
//!
//! HPKE (RFC 9180) in mode Auth with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256
//! and ChaCha20-Poly1305. The recipient's key keeps the broker from reading
//! a payload; the sender's static key, which Auth mode mixes into the key
//! schedule, keeps anyone without it (the broker included) from forging one.
//! The associated data binds the topic and the MQTT correlation data, so a
//! sealed payload cannot be moved to another vehicle's topic or answer
//! another request.
//!
//! ```text
//! wire = 0x01 || enc (32 bytes) || ciphertext (payload length + 16-byte tag)
//! info = "bmsgw/v1 envelope"
//! aad  = u16be(len topic) || topic || u16be(len corr) || corr
//! ```

use std::fmt;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use curve25519_dalek::montgomery::MontgomeryPoint;
use hpke::{Deserializable, HpkeError, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

use super::messages::MAX_PAYLOAD_LEN;
use crate::auth::Rng;
use crate::service::keyfile::{self, KeyFileError};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// The first byte of every envelope.
pub const VERSION: u8 = 1;
/// HPKE `info`: separates this use of the keys from any other.
pub const INFO: &[u8] = b"bmsgw/v1 envelope";
/// The encapsulated ephemeral public key.
pub const ENC_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
/// What the envelope adds to a payload.
pub const OVERHEAD: usize = 1 + ENC_LEN + TAG_LEN;
/// The largest envelope `open` reads.
pub const MAX_WIRE_LEN: usize = MAX_PAYLOAD_LEN + OVERHEAD;

/// Why an envelope was not sealed or not opened. Opening says only which
/// check failed: nothing about the keys or the plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope of {len} bytes is too short; it takes at least {OVERHEAD}")]
    TooShort { len: usize },
    #[error("envelope of {len} bytes is over the limit of {MAX_WIRE_LEN}")]
    TooLong { len: usize },
    #[error("envelope version {version} is unknown; this build reads version {VERSION}")]
    UnknownVersion { version: u8 },
    #[error("envelope's encapsulated key is not usable (a low-order X25519 point)")]
    BadEnc,
    #[error(
        "envelope authentication failed: wrong sender or recipient key, wrong topic or correlation data, or altered bytes"
    )]
    AuthenticationFailed,
    #[error("{field} of {len} bytes does not fit the envelope's 16-bit length prefix")]
    AadTooLong { field: &'static str, len: usize },
    #[error("payload of {len} bytes is over the limit of {MAX_PAYLOAD_LEN}")]
    PayloadTooLong { len: usize },
}

/// Why a key could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    SecretFile(#[from] KeyFileError),
    #[error("public key file {path}: {source}")]
    PublicIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("public key file {path} already exists; refusing to overwrite a key")]
    PublicExists { path: PathBuf },
    #[error("{origin}: expected an X25519 public key as 64 hex digits, found {found}")]
    PublicFormat { origin: String, found: String },
    #[error("{origin}: not a usable X25519 public key (a low-order point)")]
    LowOrder { origin: String },
}

/// An X25519 static secret (32 raw bytes, RFC 7748), zeroized on drop.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    pub fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> SecretKey {
        SecretKey(bytes)
    }

    pub fn generate(rng: &mut dyn Rng) -> SecretKey {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill(&mut key[..]);
        SecretKey(key)
    }

    /// Read a key file (64 hex digits or 32 raw bytes), refusing one that
    /// group or others may read.
    pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
        Ok(SecretKey(keyfile::load_key(path)?))
    }

    /// Write a new key file with mode 0600; never overwrites.
    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        Ok(keyfile::write_key(path, &self.0)?)
    }

    pub fn public_key(&self) -> PublicKey {
        // A clamped scalar times the base point is never a low-order point.
        PublicKey(MontgomeryPoint::mul_base_clamped(*self.0).to_bytes())
    }

    /// The raw key, for the code that must use it.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    fn hpke(&self) -> <Kem as hpke::Kem>::PrivateKey {
        // Invariant: X25519 private keys are any 32 bytes (clamped on use).
        <Kem as hpke::Kem>::PrivateKey::from_bytes(&self.0[..])
            .expect("every 32-byte string is an X25519 private key")
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// An X25519 public key that is not a low-order point (so a Diffie-Hellman
/// with it never yields the all-zero secret HPKE refuses).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Result<PublicKey, KeyError> {
        Self::checked(bytes).ok_or_else(|| KeyError::LowOrder {
            origin: "public key".into(),
        })
    }

    fn checked(bytes: [u8; 32]) -> Option<PublicKey> {
        // Clamping makes the scalar a multiple of the cofactor, so the
        // product is the identity (encoded as zero) exactly for points of
        // small order.
        let probe = MontgomeryPoint(bytes).mul_clamped([0x5a; 32]);
        (probe.to_bytes() != [0; 32]).then_some(PublicKey(bytes))
    }

    /// 64 hex digits, either case, surrounding whitespace ignored.
    pub fn from_hex(s: &str) -> Result<PublicKey, KeyError> {
        Self::parse_hex(s, "public key")
    }

    fn parse_hex(s: &str, origin: &str) -> Result<PublicKey, KeyError> {
        let t = s.trim();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(t, &mut bytes).map_err(|_| KeyError::PublicFormat {
            origin: origin.to_owned(),
            found: if t.chars().all(|c| c.is_ascii_hexdigit()) {
                format!("{} hex digits", t.len())
            } else {
                format!(
                    "{} characters that are not all hex digits",
                    t.chars().count()
                )
            },
        })?;
        Self::checked(bytes).ok_or_else(|| KeyError::LowOrder {
            origin: origin.to_owned(),
        })
    }

    /// Read a `.pub` file: 64 hex digits and a newline.
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        let io = |source| KeyError::PublicIo {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(1024).read_to_string(&mut text))
            .map_err(io)?;
        Self::parse_hex(&text, &format!("public key file {}", path.display()))
    }

    /// Write a new `.pub` file (64 hex digits and a newline); never
    /// overwrites.
    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::PublicExists {
                        path: path.to_owned(),
                    }
                } else {
                    KeyError::PublicIo {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
        file.write_all(format!("{}\n", self.to_hex()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::PublicIo {
                path: path.to_owned(),
                source,
            })
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn hpke(&self) -> <Kem as hpke::Kem>::PublicKey {
        // Invariant: X25519 public keys are any 32 bytes.
        <Kem as hpke::Kem>::PublicKey::from_bytes(&self.0)
            .expect("every 32-byte string is an X25519 public key")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

/// A static secret and its public key.
#[derive(Clone, Debug)]
pub struct KeyPair {
    secret: SecretKey,
    public: PublicKey,
}

impl KeyPair {
    pub fn generate(rng: &mut dyn Rng) -> KeyPair {
        Self::from_secret(SecretKey::generate(rng))
    }

    pub fn from_secret(secret: SecretKey) -> KeyPair {
        let public = secret.public_key();
        KeyPair { secret, public }
    }

    /// Load the secret key file; the public key is derived from it.
    pub fn load(secret_path: &Path) -> Result<KeyPair, KeyError> {
        Ok(Self::from_secret(SecretKey::load(secret_path)?))
    }

    pub fn secret(&self) -> &SecretKey {
        &self.secret
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }
}

/// Adapts our injected [`Rng`] to the `rand_core` 0.9 traits hpke takes, so
/// tests can reproduce envelopes byte for byte.
struct HpkeRng<'a>(&'a mut dyn Rng);

impl hpke::rand_core::RngCore for HpkeRng<'_> {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.0.fill(dst);
    }
}

// Every `Rng` is a CSPRNG by its contract.
impl hpke::rand_core::CryptoRng for HpkeRng<'_> {}

/// The associated data: both fields length-prefixed, so no two (topic,
/// correlation) pairs share an encoding.
fn aad(topic: &str, corr: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let prefix = |field, len: usize| {
        u16::try_from(len)
            .map(u16::to_be_bytes)
            .map_err(|_| EnvelopeError::AadTooLong { field, len })
    };
    let mut out = Vec::with_capacity(4 + topic.len() + corr.len());
    out.extend_from_slice(&prefix("topic", topic.len())?);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&prefix("correlation data", corr.len())?);
    out.extend_from_slice(corr);
    Ok(out)
}

/// Seal `plaintext` from `sender` to `recipient` for `topic` and the
/// correlation data `corr` (empty for pushes). Draws the 32-byte ephemeral
/// key seed from `rng`.
///
/// Fails only for inputs MQTT cannot carry: a topic or correlation data over
/// 65535 bytes, or a payload over [`MAX_PAYLOAD_LEN`].
pub fn seal(
    recipient: &PublicKey,
    sender: &KeyPair,
    topic: &str,
    corr: &[u8],
    plaintext: &[u8],
    rng: &mut dyn Rng,
) -> Result<Vec<u8>, EnvelopeError> {
    if plaintext.len() > MAX_PAYLOAD_LEN {
        return Err(EnvelopeError::PayloadTooLong {
            len: plaintext.len(),
        });
    }
    let aad = aad(topic, corr)?;
    let mut wire = Vec::with_capacity(plaintext.len() + OVERHEAD);
    wire.push(VERSION);
    wire.extend_from_slice(&[0; ENC_LEN]);
    wire.extend_from_slice(plaintext);
    let mode = OpModeS::<Kem>::Auth((sender.secret.hpke(), sender.public.hpke()));
    let body = &mut wire[1 + ENC_LEN..];
    let (enc, tag) = hpke::single_shot_seal_in_place_detached::<Aead, Kdf, Kem, _>(
        &mode,
        &recipient.hpke(),
        INFO,
        body,
        &aad,
        &mut HpkeRng(rng),
    )
    // Invariant: encapsulation fails only on an all-zero DH result, which a
    // checked `PublicKey` and a fresh ephemeral key cannot give, and the
    // AEAD only past 2^38 bytes.
    .expect("HPKE seal succeeds for a checked public key and a bounded payload");
    enc.write_exact(&mut wire[1..1 + ENC_LEN]);
    wire.extend_from_slice(&tag.to_bytes());
    Ok(wire)
}

/// Open an envelope from `sender` to `recipient` for `topic` and `corr`.
pub fn open(
    recipient: &SecretKey,
    sender: &PublicKey,
    topic: &str,
    corr: &[u8],
    wire: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    if wire.len() > MAX_WIRE_LEN {
        return Err(EnvelopeError::TooLong { len: wire.len() });
    }
    let short = EnvelopeError::TooShort { len: wire.len() };
    let (&version, rest) = wire.split_first().ok_or(short)?;
    if version != VERSION {
        return Err(EnvelopeError::UnknownVersion { version });
    }
    let (enc, rest) = rest.split_first_chunk::<ENC_LEN>().ok_or(short)?;
    let (ciphertext, tag) = rest.split_last_chunk::<TAG_LEN>().ok_or(short)?;
    let aad = aad(topic, corr)?;
    let enc =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| EnvelopeError::BadEnc)?;
    let tag = hpke::aead::AeadTag::<Aead>::from_bytes(tag)
        .map_err(|_| EnvelopeError::AuthenticationFailed)?;
    let mut plain = Zeroizing::new(ciphertext.to_vec());
    hpke::single_shot_open_in_place_detached::<Aead, Kdf, Kem>(
        &OpModeR::Auth(sender.hpke()),
        &recipient.hpke(),
        &enc,
        INFO,
        &mut plain,
        &aad,
        &tag,
    )
    .map_err(|e| match e {
        HpkeError::DecapError => EnvelopeError::BadEnc,
        _ => EnvelopeError::AuthenticationFailed,
    })?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rng::StreamRng;
    use std::os::unix::fs::PermissionsExt;

    const TOPIC: &str = "bmsgw/v1/veh-a/identity/resp";
    const CORR: &[u8] = &[7; 16];

    struct Keys {
        cloud: KeyPair,
        vehicle: KeyPair,
        other: KeyPair,
    }

    fn keys() -> Keys {
        let mut rng = StreamRng::new(100);
        Keys {
            cloud: KeyPair::generate(&mut rng),
            vehicle: KeyPair::generate(&mut rng),
            other: KeyPair::generate(&mut rng),
        }
    }

    fn sealed(k: &Keys, plaintext: &[u8]) -> Vec<u8> {
        seal(
            k.vehicle.public(),
            &k.cloud,
            TOPIC,
            CORR,
            plaintext,
            &mut StreamRng::new(1),
        )
        .expect("sealed")
    }

    #[test]
    fn round_trip_and_layout() {
        let k = keys();
        let wire = sealed(&k, b"hello grant");
        assert_eq!(wire.len(), b"hello grant".len() + OVERHEAD);
        assert_eq!(wire[0], VERSION);
        let plain = open(k.vehicle.secret(), k.cloud.public(), TOPIC, CORR, &wire).expect("opens");
        assert_eq!(&plain[..], b"hello grant");
        // Empty payload and empty correlation data (a push) work too.
        let push = seal(
            k.vehicle.public(),
            &k.cloud,
            TOPIC,
            &[],
            &[],
            &mut StreamRng::new(2),
        )
        .expect("sealed");
        assert_eq!(push.len(), OVERHEAD);
        assert!(
            open(k.vehicle.secret(), k.cloud.public(), TOPIC, &[], &push)
                .expect("opens")
                .is_empty()
        );
    }

    #[test]
    fn deterministic_with_an_injected_rng_and_fresh_otherwise() {
        let k = keys();
        assert_eq!(sealed(&k, b"x"), sealed(&k, b"x"));
        let other = seal(
            k.vehicle.public(),
            &k.cloud,
            TOPIC,
            CORR,
            b"x",
            &mut StreamRng::new(9),
        )
        .expect("sealed");
        assert_ne!(sealed(&k, b"x")[1..33], other[1..33], "fresh ephemeral key");
    }

    #[test]
    fn wrong_context_or_keys_are_refused() {
        let k = keys();
        let wire = sealed(&k, b"grant");
        let refused = |r: Result<Zeroizing<Vec<u8>>, EnvelopeError>| {
            assert_eq!(r.err(), Some(EnvelopeError::AuthenticationFailed));
        };
        refused(open(
            k.vehicle.secret(),
            k.cloud.public(),
            "bmsgw/v1/veh-b/identity/resp",
            CORR,
            &wire,
        ));
        refused(open(
            k.vehicle.secret(),
            k.cloud.public(),
            TOPIC,
            &[8; 16],
            &wire,
        ));
        refused(open(
            k.vehicle.secret(),
            k.cloud.public(),
            TOPIC,
            &[],
            &wire,
        ));
        // Forged: sealed by a key pair that is not the cloud's.
        let forged = seal(
            k.vehicle.public(),
            &k.other,
            TOPIC,
            CORR,
            b"grant",
            &mut StreamRng::new(3),
        )
        .expect("sealed");
        refused(open(
            k.vehicle.secret(),
            k.cloud.public(),
            TOPIC,
            CORR,
            &forged,
        ));
        // Expecting another sender.
        refused(open(
            k.vehicle.secret(),
            k.other.public(),
            TOPIC,
            CORR,
            &wire,
        ));
        // Another recipient (the broker, another vehicle).
        refused(open(k.other.secret(), k.cloud.public(), TOPIC, CORR, &wire));
    }

    #[test]
    fn aad_cannot_be_shifted_between_topic_and_correlation() {
        assert_ne!(
            aad("ab", b"c").expect("fits"),
            aad("a", b"bc").expect("fits")
        );
        assert_eq!(aad("ab", b"c").expect("fits"), b"\x00\x02ab\x00\x01c");
        assert_eq!(
            aad(&"x".repeat(65536), b""),
            Err(EnvelopeError::AadTooLong {
                field: "topic",
                len: 65536
            })
        );
    }

    #[test]
    fn every_tampered_byte_is_refused() {
        let k = keys();
        let wire = sealed(&k, b"a grant with a session key");
        for i in 0..wire.len() {
            for flip in [0x01, 0x80] {
                let mut bad = wire.clone();
                bad[i] ^= flip;
                let r = open(k.vehicle.secret(), k.cloud.public(), TOPIC, CORR, &bad);
                assert!(r.is_err(), "byte {i} flip {flip:#x} accepted");
            }
        }
        for len in 0..wire.len() {
            assert!(
                open(
                    k.vehicle.secret(),
                    k.cloud.public(),
                    TOPIC,
                    CORR,
                    &wire[..len]
                )
                .is_err()
            );
        }
    }

    #[test]
    fn malformed_envelopes_have_their_own_errors() {
        let k = keys();
        let open = |w: &[u8]| open(k.vehicle.secret(), k.cloud.public(), TOPIC, CORR, w).err();
        assert_eq!(open(&[]), Some(EnvelopeError::TooShort { len: 0 }));
        assert_eq!(
            open(&[1; OVERHEAD - 1]),
            Some(EnvelopeError::TooShort { len: OVERHEAD - 1 })
        );
        let mut wire = sealed(&k, b"x");
        wire[0] = 2;
        assert_eq!(
            open(&wire),
            Some(EnvelopeError::UnknownVersion { version: 2 })
        );
        // enc = 0 is a low-order point: the DH result would be all zeros.
        let mut wire = sealed(&k, b"x");
        wire[1..33].fill(0);
        assert_eq!(open(&wire), Some(EnvelopeError::BadEnc));
        assert_eq!(
            open(&vec![1; MAX_WIRE_LEN + 1]),
            Some(EnvelopeError::TooLong {
                len: MAX_WIRE_LEN + 1
            })
        );
        assert_eq!(
            seal(
                k.vehicle.public(),
                &k.cloud,
                TOPIC,
                CORR,
                &vec![0; MAX_PAYLOAD_LEN + 1],
                &mut StreamRng::new(1)
            ),
            Err(EnvelopeError::PayloadTooLong {
                len: MAX_PAYLOAD_LEN + 1
            })
        );
        // The largest payload still fits.
        let big = seal(
            k.vehicle.public(),
            &k.cloud,
            TOPIC,
            CORR,
            &vec![0; MAX_PAYLOAD_LEN],
            &mut StreamRng::new(1),
        )
        .expect("sealed");
        assert_eq!(open(&big), None);
    }

    #[test]
    fn low_order_public_keys_are_refused() {
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [[0u8; 32], one] {
            assert!(matches!(
                PublicKey::from_bytes(bad),
                Err(KeyError::LowOrder { .. })
            ));
        }
        let err = PublicKey::from_hex(&"00".repeat(32)).expect_err("low order");
        assert_eq!(
            err.to_string(),
            "public key: not a usable X25519 public key (a low-order point)"
        );
        assert!(PublicKey::from_bytes(*keys().cloud.public().as_bytes()).is_ok());
    }

    #[test]
    fn public_key_matches_rfc7748() {
        // RFC 7748 §6.1, Alice's key pair.
        let sk: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .expect("hex")
                .try_into()
                .expect("32 bytes");
        let pk = SecretKey::from_bytes(Zeroizing::new(sk)).public_key();
        assert_eq!(
            pk.to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    fn temp() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn key_files_round_trip_and_are_never_overwritten() {
        let dir = temp();
        let pair = KeyPair::generate(&mut StreamRng::new(5));
        let (sk, pk) = (dir.path().join("v.key"), dir.path().join("v.pub"));
        pair.secret().write(&sk).expect("written");
        pair.public().write(&pk).expect("written");
        let mode = std::fs::metadata(&sk).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&pk).expect("readable");
        assert_eq!(text, format!("{}\n", pair.public().to_hex()));
        let loaded = KeyPair::load(&sk).expect("loads");
        assert_eq!(loaded.secret().expose(), pair.secret().expose());
        assert_eq!(loaded.public(), pair.public());
        assert_eq!(PublicKey::load(&pk).expect("loads"), *pair.public());
        assert!(matches!(
            pair.secret().write(&sk),
            Err(KeyError::SecretFile(KeyFileError::Exists { .. }))
        ));
        assert!(matches!(
            pair.public().write(&pk),
            Err(KeyError::PublicExists { .. })
        ));
    }

    #[test]
    fn key_file_errors_name_the_file() {
        let dir = temp();
        let sk = dir.path().join("loose.key");
        KeyPair::generate(&mut StreamRng::new(6))
            .secret()
            .write(&sk)
            .expect("written");
        std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = KeyPair::load(&sk).expect_err("loose");
        assert!(err.to_string().contains("chmod 600"), "{err}");

        let pk = dir.path().join("bad.pub");
        std::fs::write(&pk, "abcd\n").expect("written");
        let err = PublicKey::load(&pk).expect_err("short");
        assert_eq!(
            err.to_string(),
            format!(
                "public key file {}: expected an X25519 public key as 64 hex digits, found 4 hex digits",
                pk.display()
            )
        );
        let missing = PublicKey::load(&dir.path().join("missing.pub")).expect_err("missing");
        assert!(missing.to_string().contains("missing.pub"), "{missing}");
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let pair = KeyPair::generate(&mut StreamRng::new(7));
        let shown = format!("{pair:?}");
        assert!(shown.contains("SecretKey(<redacted>)"), "{shown}");
        assert!(
            !shown.contains(&hex::encode(pair.secret().expose())[..8]),
            "{shown}"
        );
    }
}
