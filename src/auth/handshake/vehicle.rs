//! The vehicle's side: sends the ticket and Noise message 1, checks that the
//! pile can answer (which needs the pile's root key), confirms, and checks
//! that the result really came from that pile.

use std::collections::VecDeque;
use std::time::Duration;

use snow::HandshakeState;
use zeroize::Zeroizing;

use super::{CHALLENGE_LEN, CONFIRM_LABEL, CONFIRM_PAYLOAD_LEN, SecureChannel, build, scrub_psk};
use crate::auth::credential::Credential;
use crate::auth::messages::{
    AuthMessage, CONFIRM_TRANSPORT_LEN, MessageType, NOISE_MSG1_LEN, ParseError,
    RESULT_TRANSPORT_LEN, ResultCode,
};
use crate::auth::rng::Rng;
use crate::time::Timestamp;

/// The vehicle's deadlines (§4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VehicleAuthConfig {
    /// From sending AuthRequest to receiving AuthChallenge.
    pub challenge_timeout: Duration,
    /// From sending AuthConfirm to receiving AuthResult.
    pub result_timeout: Duration,
    /// With no answer this long after AuthRequest or AuthConfirm, send the
    /// same bytes again, until the deadline (§4.6). Zero: never.
    pub retransmit_after: Duration,
}

impl Default for VehicleAuthConfig {
    fn default() -> Self {
        VehicleAuthConfig {
            challenge_timeout: Duration::from_secs(1),
            result_timeout: Duration::from_secs(1),
            retransmit_after: Duration::from_millis(300),
        }
    }
}

/// The message last sent and when to send it again if nothing answers.
struct Resend {
    message: Vec<u8>,
    at: Option<Timestamp>,
}

impl Resend {
    fn new(message: Vec<u8>, now: Timestamp, config: &VehicleAuthConfig) -> Resend {
        let at = (!config.retransmit_after.is_zero()).then(|| now + config.retransmit_after);
        Resend { message, at }
    }
}

/// How the vehicle's attempt ended. Exactly one per attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VehicleAuthEvent {
    /// The pile proved it holds the root key and accepted the vehicle.
    Accepted,
    /// The pile refused, with its code.
    Rejected(ResultCode),
    /// The challenge or the result does not verify: whoever answered does
    /// not hold the pile's root key, or tampered with the answer.
    FakePile,
    Timeout {
        waiting_for: &'static str,
    },
}

/// A message the vehicle ignored or that made it report [`VehicleAuthEvent::FakePile`].
#[derive(Debug, thiserror::Error)]
pub enum VehicleAuthError {
    #[error("start() called again in state {state}")]
    AlreadyStarted { state: &'static str },
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
    #[error("AuthChallenge does not verify: the pile does not hold the session key")]
    ChallengeDoesNotVerify,
    #[error("AuthResult ({code:?}) does not verify on the session's keys")]
    ResultDoesNotVerify { code: ResultCode },
    #[error("unauthenticated AuthResult Accepted")]
    UnauthenticatedAccept,
}

/// Waiting for AuthChallenge.
struct AwaitChallenge {
    handshake: Box<HandshakeState>,
    deadline: Timestamp,
    resend: Resend,
}

/// AuthConfirm sent; waiting for AuthResult.
struct AwaitResult {
    channel: SecureChannel,
    deadline: Timestamp,
    resend: Resend,
}

enum State {
    Idle,
    AwaitChallenge(AwaitChallenge),
    AwaitResult(AwaitResult),
    Accepted(SecureChannel),
    /// Rejected, fake pile or timed out: the credential is spent.
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::AwaitChallenge(_) => "AwaitChallenge",
            State::AwaitResult(_) => "AwaitResult",
            State::Accepted(_) => "Accepted",
            State::Failed => "Failed",
        }
    }
}

/// What a state hands back besides the next state.
#[derive(Default)]
struct Output {
    transmit: Option<Vec<u8>>,
    event: Option<VehicleAuthEvent>,
    error: Option<VehicleAuthError>,
}

impl AwaitChallenge {
    fn on_message(
        mut self,
        msg: AuthMessage,
        now: Timestamp,
        config: &VehicleAuthConfig,
        out: &mut Output,
    ) -> State {
        match msg {
            AuthMessage::Challenge { noise } => {
                let mut challenge = Zeroizing::new([0u8; CHALLENGE_LEN]);
                match self.handshake.read_message(&noise, &mut challenge[..]) {
                    Ok(CHALLENGE_LEN) => {}
                    _ => {
                        out.error = Some(VehicleAuthError::ChallengeDoesNotVerify);
                        out.event = Some(VehicleAuthEvent::FakePile);
                        return State::Failed;
                    }
                }
                // Invariant: NNpsk0 has two messages and both are done.
                let transport = self
                    .handshake
                    .into_transport_mode()
                    .expect("the handshake is complete after message 2");
                let mut channel = SecureChannel(transport);
                let mut payload = Zeroizing::new([0u8; CONFIRM_PAYLOAD_LEN]);
                payload[..CONFIRM_LABEL.len()].copy_from_slice(CONFIRM_LABEL);
                payload[CONFIRM_LABEL.len()..].copy_from_slice(&challenge[..]);
                let mut transport = [0u8; CONFIRM_TRANSPORT_LEN];
                // Invariant: the buffer fits payload and tag; nonce 0 is fresh.
                channel
                    .0
                    .write_message(&payload[..], &mut transport)
                    .expect("the first transport message fits its buffer");
                let confirm = AuthMessage::Confirm { transport }.encode();
                out.transmit = Some(confirm.clone());
                State::AwaitResult(AwaitResult {
                    channel,
                    deadline: now + config.result_timeout,
                    resend: Resend::new(confirm, now, config),
                })
            }
            AuthMessage::Result { code, .. } => {
                // No keys exist yet, so no result can be authenticated here.
                plain_result(code, out)
            }
            other => {
                out.error = Some(VehicleAuthError::Unexpected {
                    state: "AwaitChallenge",
                    message: other.message_type(),
                });
                State::AwaitChallenge(self)
            }
        }
    }
}

impl AwaitResult {
    fn on_message(mut self, msg: AuthMessage, out: &mut Output) -> State {
        match msg {
            AuthMessage::Result {
                code,
                transport: Some(transport),
            } => {
                let mut payload = [0u8; RESULT_TRANSPORT_LEN];
                let verified = matches!(
                    self.channel.0.read_message(&transport, &mut payload),
                    Ok(1) if payload[0] == code.as_u8()
                );
                match (verified, code) {
                    (false, _) => {
                        out.error = Some(VehicleAuthError::ResultDoesNotVerify { code });
                        out.event = Some(VehicleAuthEvent::FakePile);
                        State::Failed
                    }
                    (true, ResultCode::Accepted) => {
                        out.event = Some(VehicleAuthEvent::Accepted);
                        State::Accepted(self.channel)
                    }
                    (true, code) => {
                        out.event = Some(VehicleAuthEvent::Rejected(code));
                        State::Failed
                    }
                }
            }
            AuthMessage::Result {
                code,
                transport: None,
            } => {
                // A pile in transport mode authenticates its result; a plain
                // one was injected or comes from a non-conforming pile.
                plain_result(code, out)
            }
            other => {
                out.error = Some(VehicleAuthError::Unexpected {
                    state: "AwaitResult",
                    message: other.message_type(),
                });
                State::AwaitResult(self)
            }
        }
    }
}

/// An AuthResult without its transport part. An "accepted" without proof is
/// an attack and is reported as one. A rejection is believed, since its
/// worst case (ending the attempt) is what anyone on the bus could cause
/// anyway.
fn plain_result(code: ResultCode, out: &mut Output) -> State {
    if code == ResultCode::Accepted {
        out.error = Some(VehicleAuthError::UnauthenticatedAccept);
        out.event = Some(VehicleAuthEvent::FakePile);
    } else {
        out.event = Some(VehicleAuthEvent::Rejected(code));
    }
    State::Failed
}

/// The vehicle's authentication state machine (Noise initiator).
pub struct VehicleAuth {
    credential: Credential,
    config: VehicleAuthConfig,
    rng: Box<dyn Rng>,
    state: State,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<VehicleAuthEvent>,
    last_error: Option<VehicleAuthError>,
    retransmissions: u32,
}

impl std::fmt::Debug for VehicleAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VehicleAuth")
            .field("charger_number", &self.credential.charger_number)
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

impl VehicleAuth {
    pub fn new(credential: Credential, config: VehicleAuthConfig, rng: Box<dyn Rng>) -> Self {
        VehicleAuth {
            credential,
            config,
            rng,
            state: State::Idle,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            last_error: None,
            retransmissions: 0,
        }
    }

    /// Queue AuthRequest and start the challenge deadline. Once only: a
    /// ticket is spent by its first use.
    pub fn start(&mut self, now: Timestamp) {
        if !matches!(self.state, State::Idle) {
            self.record(VehicleAuthError::AlreadyStarted {
                state: self.state.name(),
            });
            return;
        }
        let mut handshake = build(
            true,
            &self.credential.session_key,
            &self.credential.ticket,
            &mut *self.rng,
        );
        let mut noise = [0u8; NOISE_MSG1_LEN];
        // Invariant: a fresh initiator writes message 1 into a buffer of
        // exactly its size; its RNG pool is unused.
        handshake
            .write_message(&[], &mut noise)
            .expect("a fresh initiator writes Noise message 1");
        scrub_psk(&mut handshake);
        let request = AuthMessage::Request {
            ticket: self.credential.ticket,
            noise,
        }
        .encode();
        self.transmit.push_back(request.clone());
        self.state = State::AwaitChallenge(AwaitChallenge {
            handshake,
            deadline: now + self.config.challenge_timeout,
            resend: Resend::new(request, now, &self.config),
        });
    }

    /// Feed one reassembled message from the pile. Messages that do not
    /// parse or do not fit the state are ignored; see [`Self::last_error`].
    pub fn handle_message(&mut self, data: &[u8], now: Timestamp) {
        let msg = match AuthMessage::parse(data) {
            Ok(msg) => msg,
            Err(source) => {
                self.record(VehicleAuthError::Malformed {
                    state: self.state.name(),
                    source,
                });
                return;
            }
        };
        let mut out = Output::default();
        self.state = match std::mem::replace(&mut self.state, State::Failed) {
            State::AwaitChallenge(s) => s.on_message(msg, now, &self.config, &mut out),
            State::AwaitResult(s) => s.on_message(msg, &mut out),
            other => {
                out.error = Some(VehicleAuthError::Unexpected {
                    state: other.name(),
                    message: msg.message_type(),
                });
                other
            }
        };
        self.apply(out);
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        let (deadline, resend, waiting_for) = match &mut self.state {
            State::AwaitChallenge(s) => (s.deadline, &mut s.resend, "AuthChallenge"),
            State::AwaitResult(s) => (s.deadline, &mut s.resend, "AuthResult"),
            _ => return,
        };
        if now < deadline {
            if resend.at.is_some_and(|at| now >= at) {
                // Same bytes: the pile answers a byte-identical message
                // again without deciding anything anew.
                self.transmit.push_back(resend.message.clone());
                resend.at = Some(now + self.config.retransmit_after);
                self.retransmissions = self.retransmissions.saturating_add(1);
            }
            return;
        }
        self.state = State::Failed;
        self.events
            .push_back(VehicleAuthEvent::Timeout { waiting_for });
    }

    /// The next encoded message for the pile.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<VehicleAuthEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let (deadline, resend) = match &self.state {
            State::AwaitChallenge(s) => (s.deadline, &s.resend),
            State::AwaitResult(s) => (s.deadline, &s.resend),
            _ => return None,
        };
        Some(resend.at.map_or(deadline, |at| at.min(deadline)))
    }

    /// Messages sent again because nothing answered in time.
    pub fn retransmissions(&self) -> u32 {
        self.retransmissions
    }

    /// The session's secure channel, once accepted.
    pub fn channel(&mut self) -> Option<&mut SecureChannel> {
        match &mut self.state {
            State::Accepted(channel) => Some(channel),
            _ => None,
        }
    }

    /// Whether the attempt has ended (accepted or not).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Accepted(_) | State::Failed)
    }

    /// The most recent message ignored, or the reason for `FakePile`.
    pub fn last_error(&self) -> Option<&VehicleAuthError> {
        self.last_error.as_ref()
    }

    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    fn apply(&mut self, out: Output) {
        self.transmit.extend(out.transmit);
        self.events.extend(out.event);
        if let Some(e) = out.error {
            self.record(e);
        }
    }

    fn record(&mut self, e: VehicleAuthError) {
        tracing::debug!(error = %e, "vehicle auth");
        self.last_error = Some(e);
    }
}
