//! SHA-256, HMAC-SHA256 and HKDF-SHA256 whose state is zeroized.
//!
//! Why this exists: RustCrypto's `sha2`/`hmac`/`hkdf` 0.10–0.12 never clear
//! their internal state, and that state is secret here (HMAC keyed with the
//! root key or with Noise's chaining key holds the key's pads). This module
//! keeps the state in its own zeroize-on-drop struct and uses `sha2` only for
//! the raw, audited compression function (`compress256`); what remains is
//! padding and the HMAC/HKDF composition, tested against `sha2` and `hkdf`.
//!
//! Not cleared: the compression function's own stack temporaries (message
//! schedule, working variables) inside `sha2`.

use sha2::compress256;
use sha2::digest::generic_array::GenericArray;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub(crate) const HASH_LEN: usize = 32;
pub(crate) const BLOCK_LEN: usize = 64;

const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// Streaming SHA-256 (FIPS 180-4) over `sha2`'s compression function.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) struct Sha256 {
    state: [u32; 8],
    block: [u8; BLOCK_LEN],
    /// Bytes of `block` in use; always < 64 between calls.
    filled: usize,
    /// Message length so far, in bytes.
    total: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 {
            state: IV,
            block: [0; BLOCK_LEN],
            filled: 0,
            total: 0,
        }
    }
}

impl Sha256 {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn reset(&mut self) {
        self.zeroize();
        self.state = IV;
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        self.total = self.total.wrapping_add(data.len() as u64);
        while !data.is_empty() {
            let free = &mut self.block[self.filled..];
            let take = free.len().min(data.len());
            let (now, rest) = data.split_at(take);
            free[..take].copy_from_slice(now);
            self.filled += take;
            data = rest;
            if self.filled == BLOCK_LEN {
                self.compress();
            }
        }
    }

    /// The digest; the hasher is reset afterwards.
    pub(crate) fn finalize(&mut self) -> Zeroizing<[u8; HASH_LEN]> {
        let bit_len = self.total.wrapping_mul(8);
        self.block[self.filled] = 0x80;
        self.filled += 1;
        if self.filled > BLOCK_LEN - 8 {
            self.block[self.filled..].fill(0);
            self.compress();
        }
        self.block[self.filled..BLOCK_LEN - 8].fill(0);
        self.block[BLOCK_LEN - 8..].copy_from_slice(&bit_len.to_be_bytes());
        self.compress();
        let mut out = Zeroizing::new([0u8; HASH_LEN]);
        for (o, word) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&word.to_be_bytes());
        }
        self.reset();
        out
    }

    fn compress(&mut self) {
        let block = GenericArray::from_slice(&self.block);
        compress256(&mut self.state, core::slice::from_ref(block));
        self.filled = 0;
    }
}

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts`.
pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; HASH_LEN]> {
    let mut k = Zeroizing::new([0u8; BLOCK_LEN]);
    if key.len() > BLOCK_LEN {
        let mut h = Sha256::new();
        h.update(key);
        k[..HASH_LEN].copy_from_slice(&*h.finalize());
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut pad = Zeroizing::new([0u8; BLOCK_LEN]);
    for (p, k) in pad.iter_mut().zip(k.iter()) {
        *p = k ^ 0x36;
    }
    let mut h = Sha256::new();
    h.update(&*pad);
    for part in parts {
        h.update(part);
    }
    let inner = h.finalize();
    for (p, k) in pad.iter_mut().zip(k.iter()) {
        *p = k ^ 0x5c;
    }
    h.update(&*pad);
    h.update(&*inner);
    h.finalize()
}

/// HKDF-Extract (RFC 5869 §2.2).
pub(crate) fn hkdf_extract(salt: &[u8], ikm: &[u8]) -> Zeroizing<[u8; HASH_LEN]> {
    hmac(salt, &[ikm])
}

/// HKDF-Expand (RFC 5869 §2.3) for up to three blocks, which is all that the
/// ticket key (one) and Noise (two or three) ask for. Each `outs[i]` gets
/// T(i+1); any length is allowed and a block is copied as far as it fits.
pub(crate) fn hkdf_expand(prk: &[u8], info: &[u8], outs: &mut [&mut [u8]]) {
    let mut t = Zeroizing::new([0u8; HASH_LEN]);
    let mut prev_len = 0;
    for (i, out) in outs.iter_mut().enumerate().take(3) {
        let counter = [i as u8 + 1];
        let next = hmac(prk, &[&t[..prev_len], info, &counter]);
        t.copy_from_slice(&*next);
        prev_len = HASH_LEN;
        let n = out.len().min(HASH_LEN);
        out[..n].copy_from_slice(&t[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::Digest;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha256_known_answers() {
        let mut h = Sha256::new();
        assert_eq!(
            hex(&*h.finalize()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        h.update(b"abc");
        assert_eq!(
            hex(&*h.finalize()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hmac_rfc4231_case_2() {
        let mac = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex(&*mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_with_long_key_rfc4231_case_6() {
        let key = [0xaau8; 131];
        let mac = hmac(
            &key,
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(
            hex(&*mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn reset_forgets_input() {
        let mut h = Sha256::new();
        h.update(b"secret");
        h.reset();
        h.update(b"abc");
        assert_eq!(&*h.finalize(), sha2::Sha256::digest(b"abc").as_slice());
    }

    proptest! {
        #[test]
        fn sha256_matches_sha2_for_any_split(data in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..300) {
            let cut = cut.min(data.len());
            let mut h = Sha256::new();
            h.update(&data[..cut]);
            h.update(&data[cut..]);
            let expected = sha2::Sha256::digest(&data);
            prop_assert_eq!(&*h.finalize(), expected.as_slice());
        }

        #[test]
        fn hkdf_matches_the_hkdf_crate(
            salt in proptest::collection::vec(any::<u8>(), 0..100),
            ikm in proptest::collection::vec(any::<u8>(), 0..80),
            info in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let prk = hkdf_extract(&salt, &ikm);
            let (mut a, mut b, mut c) = ([0u8; 32], [0u8; 32], [0u8; 32]);
            hkdf_expand(&*prk, &info, &mut [&mut a[..], &mut b[..], &mut c[..]]);
            let mut expected = [0u8; 96];
            hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), &ikm)
                .expand(&info, &mut expected)
                .expect("96 bytes is a valid HKDF-SHA256 length");
            prop_assert_eq!(&a[..], &expected[..32]);
            prop_assert_eq!(&b[..], &expected[32..64]);
            prop_assert_eq!(&c[..], &expected[64..]);
        }
    }
}
