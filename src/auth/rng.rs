//! Randomness, injected.
//!
//! Every random byte the auth core uses (ticket ids, session keys, Noise
//! ephemeral keys, the pile's challenge) comes through [`Rng`], so production
//! draws from the operating system and tests replay fixed bytes to reproduce
//! the test vectors of `docs/protocol.md` §4.7 exactly.

/// A source of cryptographically secure random bytes.
pub trait Rng: Send {
    /// Fill `dest` entirely.
    fn fill(&mut self, dest: &mut [u8]);
}

/// The operating system's CSPRNG (`getrandom`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemRng;

impl Rng for SystemRng {
    fn fill(&mut self, dest: &mut [u8]) {
        // Invariant: the OS RNG is available on every target bmsgw supports
        // (Linux `getrandom(2)`, which blocks until seeded and then never
        // fails). Carrying on without randomness would reuse nonces and keys,
        // so an unavailable RNG must stop the process.
        getrandom::fill(dest).expect("the operating system's random number generator is available");
    }
}

impl<R: Rng + ?Sized> Rng for Box<R> {
    fn fill(&mut self, dest: &mut [u8]) {
        (**self).fill(dest);
    }
}

#[cfg(test)]
pub(crate) use test_rng::{ScriptedRng, StreamRng};

#[cfg(test)]
mod test_rng {
    use super::Rng;
    use sha2::{Digest, Sha256};
    use std::collections::VecDeque;

    /// Hands out exactly the byte strings it was given, in order: the
    /// test vectors list each random input explicitly.
    pub(crate) struct ScriptedRng(VecDeque<Vec<u8>>);

    impl ScriptedRng {
        pub(crate) fn new(chunks: &[&[u8]]) -> Self {
            ScriptedRng(chunks.iter().map(|c| c.to_vec()).collect())
        }
    }

    impl Rng for ScriptedRng {
        fn fill(&mut self, dest: &mut [u8]) {
            let chunk = self.0.pop_front().expect("test script has another chunk");
            assert_eq!(chunk.len(), dest.len(), "scripted chunk length");
            dest.copy_from_slice(&chunk);
        }
    }

    /// An endless deterministic stream: SHA-256(seed || counter) blocks.
    pub(crate) struct StreamRng {
        seed: u64,
        counter: u64,
    }

    impl StreamRng {
        pub(crate) fn new(seed: u64) -> Self {
            StreamRng { seed, counter: 0 }
        }
    }

    impl Rng for StreamRng {
        fn fill(&mut self, dest: &mut [u8]) {
            for chunk in dest.chunks_mut(32) {
                let block = Sha256::new()
                    .chain_update(self.seed.to_le_bytes())
                    .chain_update(self.counter.to_le_bytes())
                    .finalize();
                self.counter += 1;
                chunk.copy_from_slice(&block[..chunk.len()]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_rng_fills_every_byte() {
        // 64 zero bytes surviving a fill has probability 2^-512.
        let mut buf = [0u8; 64];
        SystemRng.fill(&mut buf);
        assert_ne!(buf, [0u8; 64]);
    }

    #[test]
    fn stream_rng_is_deterministic_and_seed_dependent() {
        let (mut a, mut b, mut c) = (StreamRng::new(1), StreamRng::new(1), StreamRng::new(2));
        let (mut x, mut y, mut z) = ([0u8; 40], [0u8; 40], [0u8; 40]);
        a.fill(&mut x);
        b.fill(&mut y);
        c.fill(&mut z);
        assert_eq!(x, y);
        assert_ne!(x, z);
    }
}
