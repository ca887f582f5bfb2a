//! The pile's side: opens the ticket, spends it, answers with a challenge
//! only a holder of the root key can produce, and accepts the vehicle once it
//! has confirmed the session keys.

use std::collections::VecDeque;
use std::time::Duration;

use zeroize::Zeroizing;

use super::{CHALLENGE_LEN, CONFIRM_LABEL, CONFIRM_PAYLOAD_LEN, SecureChannel, build, scrub_psk};
use crate::auth::keys::PileKeys;
use crate::auth::messages::{
    AuthMessage, CONFIRM_TRANSPORT_LEN, MessageType, NOISE_MSG1_LEN, NOISE_MSG2_LEN, ParseError,
    RESULT_TRANSPORT_LEN, ResultCode,
};
use crate::auth::replay::{ReplayCache, ReplayError, ReplayStore, ReplayStoreError};
use crate::auth::rng::Rng;
use crate::auth::ticket::{self, TICKET_LEN};
use crate::time::Timestamp;

/// The pile's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PileAuthConfig {
    /// Clock skew tolerated on the ticket's validity window, in seconds.
    pub skew: u32,
    /// From sending AuthChallenge to receiving AuthConfirm.
    pub confirm_timeout: Duration,
    /// AuthRequests answered per GB/T session; later ones get `TooManyAttempts`.
    pub max_attempts: u8,
    /// Capacity of the replay cache ([`PileAuth::open`] builds it with this).
    pub replay_capacity: usize,
}

impl Default for PileAuthConfig {
    fn default() -> Self {
        PileAuthConfig {
            skew: 300,
            confirm_timeout: Duration::from_secs(1),
            max_attempts: 3,
            replay_capacity: 4096,
        }
    }
}

/// What the pile learned from an accepted ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedTicket {
    /// The cloud's pseudonym of the vehicle, for the session record.
    pub pseudonym: [u8; 16],
    /// The most energy to deliver, in Wh; 0 = no cap.
    pub energy_cap_wh: u32,
    pub voucher: bool,
    pub not_after: u32,
    /// Identifies the ticket in session records.
    pub ticket_id: [u8; 12],
    pub key_offset: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PileAuthEvent {
    /// AuthResult Accepted has been queued: send CRM(0xAA) after it.
    Accepted(AcceptedTicket),
    /// AuthResult with this code has been queued.
    Rejected(ResultCode),
}

/// A message the pile ignored, or detail behind a rejection.
#[derive(Debug, thiserror::Error)]
pub enum PileAuthError {
    #[error("ignored a message that does not parse, in state {state}")]
    Malformed {
        state: &'static str,
        #[source]
        source: ParseError,
    },
    #[error("ignored {message} in state {state}")]
    Unexpected {
        state: &'static str,
        message: MessageType,
    },
    #[error("a new AuthRequest abandoned the attempt waiting for AuthConfirm")]
    Abandoned,
    #[error("ticket refused by the replay cache")]
    Replay(#[source] ReplayError),
}

/// AuthChallenge sent; waiting for AuthConfirm.
struct AwaitConfirm {
    channel: SecureChannel,
    challenge: Zeroizing<[u8; CHALLENGE_LEN]>,
    ticket: AcceptedTicket,
    deadline: Timestamp,
    /// The request as received and the challenge as sent: the same request
    /// again is the vehicle retransmitting (§4.6), and gets the same answer.
    answered: Answered,
}

/// A message received and the reply it got, kept so that a byte-identical
/// retransmission gets the byte-identical reply: nothing is decided, spent
/// or counted again, and an eavesdropper learns nothing it has not seen.
struct Answered {
    received: Vec<u8>,
    reply: Vec<u8>,
}

enum State {
    /// Waiting for AuthRequest.
    Idle,
    AwaitConfirm(AwaitConfirm),
    /// The vehicle is authenticated; later requests are ignored, except a
    /// retransmitted AuthConfirm, which gets the AuthResult again.
    Accepted {
        channel: SecureChannel,
        ticket: AcceptedTicket,
        answered: Answered,
    },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::AwaitConfirm(_) => "AwaitConfirm",
            State::Accepted { .. } => "Accepted",
        }
    }
}

impl AwaitConfirm {
    /// Verify AuthConfirm: it decrypts under the session's keys and echoes
    /// this run's challenge.
    fn confirms(&mut self, transport: &[u8; CONFIRM_TRANSPORT_LEN]) -> bool {
        let mut payload = Zeroizing::new([0u8; CONFIRM_TRANSPORT_LEN]);
        let Ok(CONFIRM_PAYLOAD_LEN) = self.channel.0.read_message(transport, &mut payload[..])
        else {
            return false;
        };
        let mut expected = Zeroizing::new([0u8; CONFIRM_PAYLOAD_LEN]);
        expected[..CONFIRM_LABEL.len()].copy_from_slice(CONFIRM_LABEL);
        expected[CONFIRM_LABEL.len()..].copy_from_slice(&self.challenge[..]);
        // Constant time, although the message is already authenticated.
        payload
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// AuthResult carrying `code`, authenticated on the session's keys.
    fn result(&mut self, code: ResultCode) -> Vec<u8> {
        sealed_result(&mut self.channel, code)
    }
}

fn sealed_result(channel: &mut SecureChannel, code: ResultCode) -> Vec<u8> {
    let mut transport = [0u8; RESULT_TRANSPORT_LEN];
    // Invariant: the pile sends exactly one transport message per session
    // (nonce 0) into a buffer that fits it.
    channel
        .0
        .write_message(&[code.as_u8()], &mut transport)
        .expect("the pile's first transport message fits its buffer");
    AuthMessage::Result {
        code,
        transport: Some(transport),
    }
    .encode()
}

fn plain_result(code: ResultCode) -> Vec<u8> {
    AuthMessage::Result {
        code,
        transport: None,
    }
    .encode()
}

/// The pile's authentication state machine (Noise responder).
pub struct PileAuth {
    keys: PileKeys,
    config: PileAuthConfig,
    replay: ReplayCache,
    rng: Box<dyn Rng>,
    state: State,
    /// AuthRequests counted this GB/T session.
    attempts: u8,
    /// Retransmitted requests and confirms answered again this session.
    retransmissions: u32,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<PileAuthEvent>,
    last_error: Option<PileAuthError>,
}

impl std::fmt::Debug for PileAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PileAuth")
            .field("charger_number", &self.keys.charger_number)
            .field("state", &self.state.name())
            .field("attempts", &self.attempts)
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

impl PileAuth {
    pub fn new(
        keys: PileKeys,
        config: PileAuthConfig,
        replay: ReplayCache,
        rng: Box<dyn Rng>,
    ) -> Self {
        PileAuth {
            keys,
            config,
            replay,
            rng,
            state: State::Idle,
            attempts: 0,
            retransmissions: 0,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            last_error: None,
        }
    }

    /// [`PileAuth::new`] with a replay cache of `config.replay_capacity` on `store`.
    pub fn open(
        keys: PileKeys,
        config: PileAuthConfig,
        store: Box<dyn ReplayStore>,
        rng: Box<dyn Rng>,
    ) -> Result<Self, ReplayStoreError> {
        let replay = ReplayCache::open(store, config.replay_capacity)?;
        Ok(Self::new(keys, config, replay, rng))
    }

    /// Feed one reassembled message from the vehicle. `unix_now` is the
    /// pile's wall clock for the ticket's validity window.
    pub fn handle_message(&mut self, data: &[u8], now: Timestamp, unix_now: u32) {
        let answered = match &self.state {
            State::AwaitConfirm(w) => Some(&w.answered),
            State::Accepted { answered, .. } => Some(answered),
            State::Idle => None,
        };
        if let Some(a) = answered.filter(|a| a.received == data) {
            // The vehicle did not get our answer (a frame lost on the way):
            // the same bytes again, no new decision.
            self.transmit.push_back(a.reply.clone());
            self.retransmissions = self.retransmissions.saturating_add(1);
            return;
        }
        let parsed = AuthMessage::parse(data);
        match (std::mem::replace(&mut self.state, State::Idle), parsed) {
            (
                State::Accepted {
                    channel,
                    ticket,
                    answered,
                },
                parsed,
            ) => {
                // Nothing may disturb an authenticated session.
                self.record(match parsed {
                    Ok(msg) => PileAuthError::Unexpected {
                        state: "Accepted",
                        message: msg.message_type(),
                    },
                    Err(source) => PileAuthError::Malformed {
                        state: "Accepted",
                        source,
                    },
                });
                self.state = State::Accepted {
                    channel,
                    ticket,
                    answered,
                };
            }
            (State::AwaitConfirm(mut waiting), Ok(AuthMessage::Confirm { transport })) => {
                if waiting.confirms(&transport) {
                    let reply = waiting.result(ResultCode::Accepted);
                    self.transmit.push_back(reply.clone());
                    self.events
                        .push_back(PileAuthEvent::Accepted(waiting.ticket.clone()));
                    self.state = State::Accepted {
                        channel: waiting.channel,
                        ticket: waiting.ticket,
                        answered: Answered {
                            received: data.to_vec(),
                            reply,
                        },
                    };
                } else {
                    self.reject_sealed(waiting, ResultCode::ConfirmFailed);
                }
            }
            (State::AwaitConfirm(_), Ok(AuthMessage::Request { ticket, noise })) => {
                // A different request: not a retransmission (those were
                // answered above).
                // The vehicle gave up on the last attempt and started anew.
                self.record(PileAuthError::Abandoned);
                self.on_request(data, &ticket, &noise, now, unix_now);
            }
            (State::AwaitConfirm(waiting), Err(source)) => {
                // Garbage where AuthConfirm belongs ends the attempt, so the
                // vehicle learns at once rather than at its deadline.
                self.reject_sealed(waiting, source.code());
            }
            (State::Idle, Ok(AuthMessage::Request { ticket, noise })) => {
                self.on_request(data, &ticket, &noise, now, unix_now);
            }
            (State::Idle, Err(source)) => {
                // Refused with a code (§4.4); it counts as an attempt.
                self.record(PileAuthError::Malformed {
                    state: "Idle",
                    source: source.clone(),
                });
                if self.take_attempt() {
                    self.reject_plain(source.code());
                }
            }
            (state, Ok(msg)) => {
                // Confirm in Idle (e.g. after a timeout), or a pile-to-vehicle
                // message: not ours to answer.
                self.record(PileAuthError::Unexpected {
                    state: state.name(),
                    message: msg.message_type(),
                });
                self.state = state;
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::AwaitConfirm(waiting) if now >= waiting.deadline => {
                self.reject_sealed(waiting, ResultCode::Timeout);
            }
            other => self.state = other,
        }
    }

    /// The next encoded message for the vehicle.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PileAuthEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match &self.state {
            State::AwaitConfirm(waiting) => Some(waiting.deadline),
            _ => None,
        }
    }

    /// A new GB/T session: back to waiting for AuthRequest with no attempts
    /// used. The replay cache is kept; unsent messages are dropped.
    pub fn reset(&mut self) {
        self.state = State::Idle;
        self.attempts = 0;
        self.retransmissions = 0;
        self.transmit.clear();
        self.last_error = None;
    }

    /// The accepted ticket, once the vehicle is authenticated.
    pub fn accepted(&self) -> Option<&AcceptedTicket> {
        match &self.state {
            State::Accepted { ticket, .. } => Some(ticket),
            _ => None,
        }
    }

    /// The session's secure channel, once the vehicle is authenticated.
    pub fn channel(&mut self) -> Option<&mut SecureChannel> {
        match &mut self.state {
            State::Accepted { channel, .. } => Some(channel),
            _ => None,
        }
    }

    /// AuthRequests counted this session.
    /// Retransmissions from the vehicle answered again (not attempts).
    pub fn retransmissions(&self) -> u32 {
        self.retransmissions
    }

    pub fn attempts(&self) -> u8 {
        self.attempts
    }

    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    /// The most recent message ignored, or detail behind a rejection.
    pub fn last_error(&self) -> Option<&PileAuthError> {
        self.last_error.as_ref()
    }

    /// Count an attempt; `false` (and `TooManyAttempts` sent) when none is left.
    fn take_attempt(&mut self) -> bool {
        if self.attempts >= self.config.max_attempts {
            self.reject_plain(ResultCode::TooManyAttempts);
            return false;
        }
        self.attempts += 1;
        true
    }

    /// §4.2 steps 1–7, then Noise message 1 and the challenge.
    fn on_request(
        &mut self,
        received: &[u8],
        ticket_bytes: &[u8; TICKET_LEN],
        noise: &[u8; NOISE_MSG1_LEN],
        now: Timestamp,
        unix_now: u32,
    ) {
        if !self.take_attempt() {
            return;
        }
        let opened = match ticket::open(&self.keys, ticket_bytes, unix_now, self.config.skew) {
            Ok(opened) => opened,
            Err(code) => return self.reject_plain(code),
        };
        // Spent from here on, whatever happens next (§4.2 step 7).
        if let Err(e) = self.replay.check_and_insert(
            opened.ticket_id,
            opened.body.not_after,
            unix_now,
            self.config.skew,
        ) {
            let code = e.code();
            self.record(PileAuthError::Replay(e));
            return self.reject_plain(code);
        }

        let mut handshake = build(
            false,
            &opened.body.session_key,
            ticket_bytes,
            &mut *self.rng,
        );
        let read = handshake.read_message(noise, &mut [0u8; NOISE_MSG1_LEN]);
        // Message 1 has used the PSK, whether or not it verified.
        scrub_psk(&mut handshake);
        if read.is_err() {
            return self.reject_plain(ResultCode::HandshakeFailed);
        }
        let mut challenge = Zeroizing::new([0u8; CHALLENGE_LEN]);
        self.rng.fill(&mut challenge[..]);
        let mut msg2 = [0u8; NOISE_MSG2_LEN];
        // Fails only on a low-order ephemeral key from the vehicle.
        if handshake.write_message(&challenge[..], &mut msg2).is_err() {
            return self.reject_plain(ResultCode::HandshakeFailed);
        }
        // Invariant: NNpsk0 has two messages and both are done.
        let transport = handshake
            .into_transport_mode()
            .expect("the handshake is complete after message 2");
        let reply = AuthMessage::Challenge { noise: msg2 }.encode();
        self.transmit.push_back(reply.clone());
        let body = opened.body;
        self.state = State::AwaitConfirm(AwaitConfirm {
            channel: SecureChannel(transport),
            challenge,
            ticket: AcceptedTicket {
                pseudonym: body.pseudonym,
                energy_cap_wh: body.energy_cap_wh,
                voucher: body.voucher,
                not_after: body.not_after,
                ticket_id: opened.ticket_id,
                key_offset: opened.key_offset,
            },
            deadline: now + self.config.confirm_timeout,
            answered: Answered {
                received: received.to_vec(),
                reply,
            },
        });
    }

    /// Before transport mode nothing can be authenticated: `[0x04, code]`.
    fn reject_plain(&mut self, code: ResultCode) {
        self.transmit.push_back(plain_result(code));
        self.events.push_back(PileAuthEvent::Rejected(code));
        self.state = State::Idle;
    }

    /// In transport mode the result is authenticated; the attempt ends.
    fn reject_sealed(&mut self, mut waiting: AwaitConfirm, code: ResultCode) {
        self.transmit.push_back(waiting.result(code));
        self.events.push_back(PileAuthEvent::Rejected(code));
        self.state = State::Idle;
    }

    fn record(&mut self, e: PileAuthError) {
        tracing::debug!(error = %e, "pile auth");
        self.last_error = Some(e);
    }
}
