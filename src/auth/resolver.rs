//! The crypto behind snow, with keys that are zeroized.
//!
//! snow 0.10's default resolver keeps DH private keys and cipher keys in
//! plain arrays and never clears them, and its HMAC/HKDF leave key-derived
//! pads on the stack. [`ZeroizingResolver`] supplies the three primitives of
//! `Noise_NNpsk0_25519_ChaChaPoly_SHA256` instead:
//!
//! - `Dh`: X25519 on curve25519-dalek 4, private key in zeroize-on-drop
//!   storage; an all-zero shared secret (a low-order peer key) is refused.
//! - `Cipher`: ChaCha20-Poly1305, key zeroized on drop and on every rekey; the
//!   AEAD object built per message zeroizes its own copy (chacha20poly1305
//!   does, and the `poly1305/zeroize` feature covers the MAC state).
//! - `Hash`: SHA-256 from [`super::hash`], state zeroized on reset and drop;
//!   HMAC and HKDF are overridden so their pads and PRKs are zeroized too.
//! - `Random`: a one-shot pool filled from the state machine's injected
//!   [`Rng`](super::rng::Rng), so the ephemeral key is as reproducible as
//!   every other random input, and zeroized once used.
//!
//! **Still not zeroized** (snow owns the memory and offers no hook):
//! `SymmetricState`'s chaining key `ck` and hash `h` (dropped when the
//! handshake turns into transport mode) and the checkpoint copies snow takes
//! of them around every handshake message; snow's stack temporaries in
//! `mix_key`/`split` (HKDF outputs, cipher keys copied on the way to
//! `Cipher::set`), its DH output array and the PSK array `Builder::build`
//! copies; and the PSK slot inside `HandshakeState`, which `handshake/mod.rs`
//! overwrites with zeros as soon as message 1 has used it. Stack temporaries
//! inside curve25519-dalek and the SHA-256 compression function are not
//! cleared either, nor (anywhere in Rust) the copies the compiler may leave
//! when a key is moved.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use curve25519_dalek::montgomery::MontgomeryPoint;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::CryptoResolver;
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::hash::{self, BLOCK_LEN, HASH_LEN, Sha256};

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Resolves the `25519`, `ChaChaPoly` and `SHA256` primitives; nothing else.
pub(crate) struct ZeroizingResolver {
    /// Bytes for the one ephemeral key this handshake generates.
    entropy: Zeroizing<[u8; KEY_LEN]>,
}

impl ZeroizingResolver {
    pub(crate) fn new(entropy: Zeroizing<[u8; KEY_LEN]>) -> Self {
        ZeroizingResolver { entropy }
    }
}

impl CryptoResolver for ZeroizingResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(OneShotRandom {
            pool: Some(self.entropy.clone()),
        }))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::<X25519>::default()),
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        match choice {
            HashChoice::SHA256 => Some(Box::<NoiseSha256>::default()),
            _ => None,
        }
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::ChaChaPoly => Some(Box::<ChaChaPoly>::default()),
            _ => None,
        }
    }
}

/// Gives out its pool once; a second request fails the handshake rather
/// than reuse key material.
struct OneShotRandom {
    pool: Option<Zeroizing<[u8; KEY_LEN]>>,
}

impl Random for OneShotRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        match self.pool.take() {
            Some(pool) if dest.len() == KEY_LEN => {
                dest.copy_from_slice(&pool[..]);
                Ok(())
            }
            _ => Err(snow::Error::Rng),
        }
    }
}

#[derive(Default, Zeroize, ZeroizeOnDrop)]
struct X25519 {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
}

impl X25519 {
    fn derive_public(&mut self) {
        self.public = MontgomeryPoint::mul_base_clamped(self.private).to_bytes();
    }
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        KEY_LEN
    }

    fn priv_len(&self) -> usize {
        KEY_LEN
    }

    fn set(&mut self, privkey: &[u8]) {
        // snow passes `priv_len()` bytes; anything else leaves a zero key,
        // whose use then fails as an all-zero DH output.
        self.zeroize();
        if let Ok(key) = <&[u8; KEY_LEN]>::try_from(privkey) {
            self.private = *key;
            self.derive_public();
        }
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        self.zeroize();
        rng.try_fill_bytes(&mut self.private)?;
        self.derive_public();
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let peer: [u8; KEY_LEN] = pubkey
            .get(..KEY_LEN)
            .and_then(|p| p.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let shared = Zeroizing::new(MontgomeryPoint(peer).mul_clamped(self.private).to_bytes());
        // RFC 7748 §6.1: an all-zero result means a low-order point.
        if shared.iter().fold(0u8, |acc, b| acc | b) == 0 {
            return Err(snow::Error::Dh);
        }
        out.get_mut(..KEY_LEN)
            .ok_or(snow::Error::Dh)?
            .copy_from_slice(&shared[..]);
        Ok(())
    }
}

#[derive(Default, Zeroize, ZeroizeOnDrop)]
struct ChaChaPoly {
    key: [u8; KEY_LEN],
}

impl ChaChaPoly {
    fn aead(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&self.key))
    }
}

/// Noise's ChaChaPoly nonce: 32 zero bits, then the counter little-endian.
fn noise_nonce(n: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&n.to_le_bytes());
    nonce
}

impl Cipher for ChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }

    fn set(&mut self, key: &[u8; KEY_LEN]) {
        self.key = *key;
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        // Invariant: snow sizes `out` for plaintext + tag before calling
        // (`write_message` checks it and returns `Error::Input` otherwise).
        let (body, rest) = out
            .split_at_mut_checked(len)
            .expect("snow sizes the output for plaintext and tag");
        let tag_out = rest
            .get_mut(..TAG_LEN)
            .expect("snow sizes the output for plaintext and tag");
        body.copy_from_slice(plaintext);
        let tag = self
            .aead()
            .encrypt_in_place_detached(Nonce::from_slice(&noise_nonce(nonce)), authtext, body)
            // Invariant: Noise messages are at most 65535 bytes, far below
            // ChaCha20-Poly1305's 256 GiB limit.
            .expect("a Noise message is within ChaCha20-Poly1305's length limit");
        tag_out.copy_from_slice(&tag);
        len + TAG_LEN
    }

    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let len = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(snow::Error::Decrypt)?;
        let (body, tag) = ciphertext.split_at(len);
        let out = out.get_mut(..len).ok_or(snow::Error::Decrypt)?;
        out.copy_from_slice(body);
        self.aead()
            .decrypt_in_place_detached(
                Nonce::from_slice(&noise_nonce(nonce)),
                authtext,
                out,
                Tag::from_slice(tag),
            )
            .map_err(|_| {
                out.zeroize();
                snow::Error::Decrypt
            })?;
        Ok(len)
    }

    fn rekey(&mut self) {
        // Noise §4.2: k = first 32 bytes of ENCRYPT(k, 2^64-1, "", zeros).
        let mut block = Zeroizing::new([0u8; KEY_LEN + TAG_LEN]);
        self.encrypt(u64::MAX, &[], &[0u8; KEY_LEN], &mut block[..]);
        self.key.copy_from_slice(&block[..KEY_LEN]);
    }
}

#[derive(Default)]
struct NoiseSha256 {
    hasher: Sha256,
}

impl Hash for NoiseSha256 {
    fn name(&self) -> &'static str {
        "SHA256"
    }

    fn block_len(&self) -> usize {
        BLOCK_LEN
    }

    fn hash_len(&self) -> usize {
        HASH_LEN
    }

    fn reset(&mut self) {
        self.hasher.reset();
    }

    fn input(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    fn result(&mut self, out: &mut [u8]) {
        let digest = self.hasher.finalize();
        let n = out.len().min(HASH_LEN);
        out[..n].copy_from_slice(&digest[..n]);
    }

    fn hmac(&mut self, key: &[u8], data: &[u8], out: &mut [u8]) {
        let mac = hash::hmac(key, &[data]);
        let n = out.len().min(HASH_LEN);
        out[..n].copy_from_slice(&mac[..n]);
    }

    fn hkdf(
        &mut self,
        chaining_key: &[u8],
        input_key_material: &[u8],
        outputs: usize,
        out1: &mut [u8],
        out2: &mut [u8],
        out3: &mut [u8],
    ) {
        // Noise's HKDF is RFC 5869 with salt = ck and empty info.
        let prk = hash::hkdf_extract(chaining_key, input_key_material);
        let outs: &mut [&mut [u8]] = &mut [out1, out2, out3];
        let n = outputs.min(outs.len());
        hash::hkdf_expand(&prk[..], &[], &mut outs[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snow::Builder;
    use snow::resolvers::DefaultResolver;

    const PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_SHA256";

    fn builder<'a>(ours: bool, psk: &'a [u8; 32], e: &'a [u8; 32]) -> Builder<'a> {
        let params = PARAMS.parse().expect("valid Noise parameters");
        let b = if ours {
            Builder::with_resolver(
                params,
                Box::new(ZeroizingResolver::new(Zeroizing::new([0; 32]))),
            )
        } else {
            Builder::with_resolver(params, Box::new(DefaultResolver))
        };
        b.psk(0, psk)
            .expect("psk slot 0")
            .prologue(b"prologue")
            .expect("one prologue")
            .fixed_ephemeral_key_for_testing_only(e)
    }

    /// Our primitives and snow's default resolver produce the same bytes:
    /// both directions, handshake and transport, rekey included.
    #[test]
    fn interoperates_with_snows_default_resolver() {
        let psk = [7u8; 32];
        let (ei, er) = ([1u8; 32], [2u8; 32]);
        for (init_ours, resp_ours) in [(true, false), (false, true), (true, true)] {
            let mut i = builder(init_ours, &psk, &ei)
                .build_initiator()
                .expect("initiator");
            let mut r = builder(resp_ours, &psk, &er)
                .build_responder()
                .expect("responder");
            let mut reference_i = builder(false, &psk, &ei)
                .build_initiator()
                .expect("initiator");
            let mut reference_r = builder(false, &psk, &er)
                .build_responder()
                .expect("responder");
            let (mut m1, mut m1_ref, mut m2, mut m2_ref, mut p) =
                ([0u8; 100], [0u8; 100], [0u8; 100], [0u8; 100], [0u8; 100]);
            let n1 = i.write_message(b"", &mut m1).expect("msg1");
            reference_i.write_message(b"", &mut m1_ref).expect("msg1");
            assert_eq!(m1[..n1], m1_ref[..n1]);
            r.read_message(&m1[..n1], &mut p).expect("read msg1");
            reference_r
                .read_message(&m1[..n1], &mut p)
                .expect("read msg1");
            let n2 = r.write_message(b"challenge", &mut m2).expect("msg2");
            reference_r
                .write_message(b"challenge", &mut m2_ref)
                .expect("msg2");
            assert_eq!(m2[..n2], m2_ref[..n2]);
            let np = i.read_message(&m2[..n2], &mut p).expect("read msg2");
            assert_eq!(&p[..np], b"challenge");
            let mut ti = i.into_transport_mode().expect("transport");
            let mut tr = r.into_transport_mode().expect("transport");
            for round in 0..3u8 {
                let n = ti.write_message(&[round; 20], &mut m1).expect("write");
                assert_eq!(tr.read_message(&m1[..n], &mut p).expect("read"), 20);
                assert_eq!(p[..20], [round; 20]);
                let n = tr.write_message(&[round], &mut m2).expect("write");
                assert_eq!(ti.read_message(&m2[..n], &mut p).expect("read"), 1);
                ti.rekey_outgoing();
                tr.rekey_incoming();
            }
        }
    }

    #[test]
    fn key_holders_zeroize_on_drop() {
        fn zeroizes_on_drop<T: ZeroizeOnDrop>() {}
        zeroizes_on_drop::<X25519>();
        zeroizes_on_drop::<ChaChaPoly>();
        zeroizes_on_drop::<Sha256>();
        let mut c = ChaChaPoly::default();
        c.set(&[1; 32]);
        c.rekey();
        assert_ne!(c.key, [1; 32]);
    }

    #[test]
    fn low_order_peer_key_is_refused() {
        let mut x = X25519::default();
        x.set(&[9u8; 32]);
        let mut out = [0u8; 56];
        // u = 0 and u = 1 are low-order points.
        assert!(x.dh(&[0u8; 32], &mut out).is_err());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(x.dh(&one, &mut out).is_err());
        assert!(x.dh(&[0u8; 31], &mut out).is_err());
        let mut base = [0u8; 32];
        base[0] = 9;
        assert!(x.dh(&base, &mut out).is_ok());
        assert_eq!(out[..32], x.public);
    }

    #[test]
    fn one_shot_random_gives_its_pool_once() {
        let mut r = OneShotRandom {
            pool: Some(Zeroizing::new([5u8; 32])),
        };
        let mut buf = [0u8; 32];
        assert!(r.try_fill_bytes(&mut buf[..16]).is_err());
        // The pool is gone after any request, even a refused one.
        assert!(r.try_fill_bytes(&mut buf).is_err());
        let mut r = OneShotRandom {
            pool: Some(Zeroizing::new([5u8; 32])),
        };
        r.try_fill_bytes(&mut buf).expect("first fill");
        assert_eq!(buf, [5u8; 32]);
        assert!(r.try_fill_bytes(&mut buf).is_err());
    }

    #[test]
    fn failed_decrypt_leaves_no_ciphertext_in_out() {
        let mut c = ChaChaPoly::default();
        c.set(&[3u8; 32]);
        let mut msg = [0u8; 20];
        let n = c.encrypt(0, b"ad", b"abcd", &mut msg);
        msg[0] ^= 1;
        let mut out = [0xffu8; 4];
        assert!(c.decrypt(0, b"ad", &msg[..n], &mut out).is_err());
        assert_eq!(out, [0u8; 4]);
        assert!(c.decrypt(0, b"ad", &msg[..15], &mut out).is_err());
    }
}
