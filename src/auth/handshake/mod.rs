//! The challenge–response between vehicle and pile (`docs/protocol.md`
//! §4.3): Noise `NNpsk0_25519_ChaChaPoly_SHA256` with the session key as PSK,
//! the ticket in the prologue, and a key-confirmation message.
//!
//! [`VehicleAuth`] (initiator) and [`PileAuth`] (responder) are sans-IO state
//! machines: bytes and time go in, bytes to send, events and the next
//! deadline come out.

mod pile;
mod vehicle;

#[cfg(test)]
mod tests;

pub use pile::{AcceptedTicket, PileAuth, PileAuthConfig, PileAuthError, PileAuthEvent};
pub use vehicle::{VehicleAuth, VehicleAuthConfig, VehicleAuthError, VehicleAuthEvent};

use std::fmt;

use snow::{Builder, HandshakeState, TransportState};
use zeroize::Zeroizing;

use super::keys::SessionKey;
use super::resolver::ZeroizingResolver;
use super::rng::Rng;
use super::ticket::TICKET_LEN;

pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_SHA256";
/// Prologue = this label || the ticket: binds the handshake to the ticket.
pub const PROLOGUE_LABEL: &[u8; 13] = b"bmsgw auth v1";
/// AuthConfirm's payload = this label || the challenge.
pub const CONFIRM_LABEL: &[u8; 13] = b"bmsgw confirm";
/// The pile's random challenge, AuthChallenge's payload.
pub const CHALLENGE_LEN: usize = 16;
const CONFIRM_PAYLOAD_LEN: usize = CONFIRM_LABEL.len() + CHALLENGE_LEN;

/// Build one side of the handshake. The ephemeral key is drawn from `rng`
/// through the resolver, so the whole run is reproducible under a fixed RNG.
fn build(
    initiator: bool,
    psk: &SessionKey,
    ticket: &[u8; TICKET_LEN],
    rng: &mut dyn Rng,
) -> Box<HandshakeState> {
    let mut prologue = [0u8; PROLOGUE_LABEL.len() + TICKET_LEN];
    prologue[..PROLOGUE_LABEL.len()].copy_from_slice(PROLOGUE_LABEL);
    prologue[PROLOGUE_LABEL.len()..].copy_from_slice(ticket);
    let mut entropy = Zeroizing::new([0u8; 32]);
    rng.fill(&mut entropy[..]);
    // Invariant for every `expect` below: the parameters are a constant
    // snow supports, PSK slot 0 and the prologue are set once, and the
    // resolver provides all three primitives and an RNG.
    let params = NOISE_PARAMS
        .parse()
        .expect("NOISE_PARAMS is a valid Noise protocol name");
    let builder = Builder::with_resolver(params, Box::new(ZeroizingResolver::new(entropy)))
        .psk(0, psk.expose())
        .expect("PSK slot 0 exists and is set once")
        .prologue(&prologue)
        .expect("the prologue is set once");
    let state = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    };
    Box::new(state.expect("the resolver supplies every primitive of NOISE_PARAMS"))
}

/// Overwrite snow's copy of the PSK once message 1 has mixed it in: snow
/// never clears it, and NNpsk0 needs it no further.
fn scrub_psk(state: &mut HandshakeState) {
    // Cannot fail: slot 0 exists and the key has PSK length.
    let _ = state.set_psk(0, &[0u8; 32]);
}

/// Why a message on the secure channel was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("secure channel message does not verify")]
    Verify,
    #[error("secure channel message of {len} bytes is too long (at most 65535)")]
    TooLong { len: usize },
}

/// The session's Noise transport keys, kept after acceptance for later
/// messages. Exposes no key material.
pub struct SecureChannel(TransportState);

impl fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecureChannel { .. }")
    }
}

impl SecureChannel {
    /// Encrypt and authenticate `plaintext` (tag: 16 bytes more).
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, ChannelError> {
        let mut out = vec![0u8; plaintext.len() + 16];
        let n = self
            .0
            .write_message(plaintext, &mut out)
            .map_err(|_| ChannelError::TooLong {
                len: plaintext.len(),
            })?;
        out.truncate(n);
        Ok(out)
    }

    /// Verify and decrypt the peer's next message.
    pub fn open(&mut self, message: &[u8]) -> Result<Zeroizing<Vec<u8>>, ChannelError> {
        let mut out = Zeroizing::new(vec![0u8; message.len()]);
        let n = self
            .0
            .read_message(message, &mut out)
            .map_err(|_| ChannelError::Verify)?;
        out.truncate(n);
        Ok(out)
    }
}
