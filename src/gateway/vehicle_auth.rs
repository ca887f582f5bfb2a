//! The vehicle side of pile authentication, as an async task on a CAN bus.
//!
//! It waits for the pile's CRM(0x00), which names the pile (charger number)
//! and its address, checks that the credential is for that pile, then runs
//! the sans-IO [`VehicleAuth`] handshake through its own J1939 transport at
//! its own source address. It takes no part in GB/T itself: the BMS carries
//! on beside it.

use std::future::Future;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::auth::messages::AUTH_PRIORITY;
use crate::auth::{
    AUTH_PGN, Credential, ResultCode, SystemRng, VehicleAuth, VehicleAuthConfig, VehicleAuthEvent,
};
use crate::can::{BusError, BusEvent, CanBus, CanFrame};
use crate::gbt27930::{Message, MessageKind, Recognition};
use crate::j1939::tp::{J1939Message, TpConfig, TpEvent, Transport};
use crate::j1939::{Address, J1939Id, Pgn, Priority};
use crate::time::{Clock, Timestamp};

/// The vehicle side's default J1939 address, next to the BMS's 0xF4.
pub const DEFAULT_VEHICLE_ADDRESS: u8 = 0xF5;

#[derive(Clone, Debug)]
pub struct VehicleAuthOptions {
    /// Our source address on the bus.
    pub address: Address,
    pub config: VehicleAuthConfig,
    /// How long to wait for a pile's CRM(0x00).
    pub wait_for_pile: Duration,
}

impl Default for VehicleAuthOptions {
    fn default() -> Self {
        VehicleAuthOptions {
            address: Address(DEFAULT_VEHICLE_ADDRESS),
            config: VehicleAuthConfig::default(),
            wait_for_pile: Duration::from_secs(60),
        }
    }
}

/// The pile that accepted us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub charger_number: u32,
    pub pile_address: Address,
}

#[derive(Debug, thiserror::Error)]
pub enum VehicleAuthError {
    #[error("no pile sent CRM(0x00) within {0:?}")]
    NoPile(Duration),
    #[error("the pile is charger {found}, but the credential is for charger {expected}")]
    WrongPile { expected: u32, found: u32 },
    #[error("the pile refused the credential: {0}")]
    Rejected(ResultCode),
    #[error("the pile failed to prove it holds the pile's root key (fake pile?)")]
    FakePile,
    #[error("the pile did not answer in time: waiting for {0}")]
    Timeout(&'static str),
    #[error("sending to the pile failed: {0}")]
    Transport(String),
    #[error("shut down before the pile answered")]
    Shutdown,
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// How one attempt with the pile ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted(Authenticated),
    Rejected(ResultCode),
    FakePile,
    Timeout(&'static str),
}

impl AuthOutcome {
    fn into_result(self) -> Result<Authenticated, VehicleAuthError> {
        match self {
            AuthOutcome::Accepted(a) => Ok(a),
            AuthOutcome::Rejected(code) => Err(VehicleAuthError::Rejected(code)),
            AuthOutcome::FakePile => Err(VehicleAuthError::FakePile),
            AuthOutcome::Timeout(what) => Err(VehicleAuthError::Timeout(what)),
        }
    }
}

/// The vehicle side of pile authentication as a sans-IO node: the
/// [`VehicleAuth`] handshake on its own J1939 transport at our address.
///
/// It sees every frame of the pile's bus ([`AuthNode::handle_frame`]) but
/// takes only the transport traffic addressed to it, so it can sit beside a
/// bridge or a passive monitor on the same bus. The shell calls
/// [`AuthNode::start`] once it knows the pile's address (from CRM(0x00)).
pub struct AuthNode {
    tp: Transport,
    auth: VehicleAuth,
    address: Address,
    charger_number: u32,
    pile: Option<Address>,
    outcome: Option<AuthOutcome>,
}

impl AuthNode {
    pub fn new(credential: Credential, address: Address, config: VehicleAuthConfig) -> Self {
        AuthNode {
            tp: Transport::new(TpConfig::gbt27930(), address),
            charger_number: credential.charger_number,
            auth: VehicleAuth::new(credential, config, Box::new(SystemRng)),
            address,
            pile: None,
            outcome: None,
        }
    }

    /// The charger number the credential is for.
    pub fn charger_number(&self) -> u32 {
        self.charger_number
    }

    /// Send AuthRequest to the pile at `pile`.
    pub fn start(&mut self, pile: Address, now: Timestamp) {
        if self.pile.is_some() {
            return;
        }
        info!(charger = self.charger_number, pile = %pile, "sending AuthRequest");
        self.pile = Some(pile);
        self.auth.start(now);
        self.process(now);
    }

    /// Only frames from the pile we talk to, addressed to us, reach our
    /// transport. Anyone else on the inlet bus could otherwise take its
    /// sessions and buffers (an RTS or a BAM from every address, renewed
    /// before T2/T1) and make it refuse the pile's AuthChallenge with
    /// `NoResources`: a legitimate session stopped by a node it never
    /// talked to.
    pub fn handle_frame(&mut self, frame: &CanFrame, now: Timestamp) {
        let Some(pile) = self.pile else { return };
        let Ok(id) = J1939Id::from_can_id(frame.id()) else {
            return;
        };
        if id.source != pile || id.destination != self.address {
            return;
        }
        self.tp.handle_frame(frame, now);
        self.process(now);
    }

    /// Open sessions of our transport (for tests and the attack suite).
    pub fn tp_sessions(&self) -> usize {
        self.tp.session_count()
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.tp.handle_timeout(now);
        self.auth.handle_timeout(now);
        self.process(now);
    }

    pub fn poll_transmit(&mut self) -> Option<CanFrame> {
        self.tp.poll_transmit()
    }

    /// The outcome, once; `None` while the handshake runs.
    pub fn poll_outcome(&mut self) -> Option<AuthOutcome> {
        self.outcome.take()
    }

    pub fn poll_timeout(&self) -> Option<Timestamp> {
        [self.auth.poll_timeout(), self.tp.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Move messages between the handshake and the transport until neither
    /// has more to say.
    fn process(&mut self, now: Timestamp) {
        loop {
            let mut moved = false;
            if let Some(dst) = self.pile {
                while let Some(data) = self.auth.poll_transmit() {
                    moved = true;
                    let msg = J1939Message {
                        priority: auth_priority(),
                        pgn: auth_pgn(),
                        source: self.address,
                        destination: dst,
                        data,
                    };
                    // A retransmission replaces a copy whose transfer
                    // stalled (waiting for a lost CTS).
                    if let Err(e) = self.tp.send_replacing(msg, now) {
                        // The handshake's own deadline ends the attempt.
                        warn!(error = %e, "cannot send an authentication message");
                    }
                }
            }
            while let Some(ev) = self.tp.poll_event() {
                moved = true;
                match ev {
                    TpEvent::Received(m) if m.pgn == auth_pgn() && Some(m.source) == self.pile => {
                        self.auth.handle_message(&m.data, now);
                    }
                    TpEvent::SendAborted { reason, .. }
                    | TpEvent::ReceiveAborted { reason, .. } => {
                        debug!(%reason, "transport aborted; the handshake deadlines decide");
                    }
                    _ => {}
                }
            }
            while let Some(ev) = self.auth.poll_event() {
                moved = true;
                let outcome = match ev {
                    VehicleAuthEvent::Accepted => {
                        let pile_address = self.pile.unwrap_or(Address::NULL);
                        info!(charger = self.charger_number, pile = %pile_address, "pile accepted the credential");
                        AuthOutcome::Accepted(Authenticated {
                            charger_number: self.charger_number,
                            pile_address,
                        })
                    }
                    VehicleAuthEvent::Rejected(code) => AuthOutcome::Rejected(code),
                    VehicleAuthEvent::FakePile => AuthOutcome::FakePile,
                    VehicleAuthEvent::Timeout { waiting_for } => AuthOutcome::Timeout(waiting_for),
                };
                self.outcome.get_or_insert(outcome);
            }
            if !moved {
                break;
            }
        }
    }
}

/// Authenticate to the pile on `bus` with `credential`: an [`AuthNode`]
/// that waits for the pile's CRM(0x00), on a bus of its own.
pub async fn authenticate<B: CanBus>(
    bus: &mut B,
    credential: Credential,
    opts: VehicleAuthOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Authenticated, VehicleAuthError> {
    let clock = Clock::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let expected = credential.charger_number;
    let mut node = AuthNode::new(credential, opts.address, opts.config);
    let mut pile_known = false;
    let give_up = clock.now() + opts.wait_for_pile;
    loop {
        while let Some(frame) = node.poll_transmit() {
            if let Err(e) = bus.send(&frame).await {
                warn!(error = %e, "send failed");
            }
        }
        if let Some(outcome) = node.poll_outcome() {
            // Let the last frames (our EndOfMsgAck) go out.
            while let Some(frame) = node.poll_transmit() {
                let _ = bus.send(&frame).await;
            }
            return outcome.into_result();
        }
        let deadline = [node.poll_timeout(), (!pile_known).then_some(give_up)]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            biased;
            () = &mut shutdown => return Err(VehicleAuthError::Shutdown),
            ev = bus.recv() => {
                if let BusEvent::Frame(frame) = ev? {
                    let now = clock.now();
                    if !pile_known
                        && let Some((charger, address)) = crm00(&frame) {
                            if charger != expected {
                                return Err(VehicleAuthError::WrongPile { expected, found: charger });
                            }
                            pile_known = true;
                            node.start(address, now);
                        }
                    node.handle_frame(&frame, now);
                }
            }
            () = clock.sleep_until(deadline) => {
                let now = clock.now();
                if !pile_known && now >= give_up {
                    return Err(VehicleAuthError::NoPile(opts.wait_for_pile));
                }
                node.handle_timeout(now);
            }
        }
    }
}

/// The pile's charger number and address, if `frame` is a CRM(0x00).
pub fn crm00(frame: &CanFrame) -> Option<(u32, Address)> {
    let id = J1939Id::from_can_id(frame.id()).ok()?;
    if id.pgn != MessageKind::Crm.pgn() {
        return None;
    }
    match Message::decode(id.pgn, frame.data()).ok()? {
        Message::Crm(crm) if crm.recognition == Recognition::NotRecognized => {
            Some((crm.charger_number.0, id.source))
        }
        _ => None,
    }
}

fn auth_pgn() -> Pgn {
    Pgn::from_const(AUTH_PGN)
}

/// The priority of authentication messages (§4.4); their TP frames use the
/// transport's own priority.
pub fn auth_priority() -> Priority {
    Priority::new(AUTH_PRIORITY).expect("AUTH_PRIORITY is a constant within 0..=7")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::RootKey;
    use crate::j1939::tp::{Cm, MAX_TP_LEN, TP_CM};

    const PILE: Address = Address(0x56);
    const US: Address = Address(DEFAULT_VEHICLE_ADDRESS);

    fn node() -> AuthNode {
        let credential = Credential::issue(
            &RootKey::from_bytes([9; 32]),
            0,
            1,
            [1; 16],
            0,
            u32::MAX,
            0,
            false,
            &mut SystemRng,
        );
        AuthNode::new(credential, US, VehicleAuthConfig::default())
    }

    fn cm(source: Address, destination: Address, cm: Cm) -> CanFrame {
        let id = J1939Id::new(Priority::LOWEST, TP_CM, source, destination);
        CanFrame::new(id.to_can_id(), &cm.encode()).expect("8 bytes")
    }

    fn rts(size: u16, packets: u8) -> Cm {
        Cm::Rts {
            size,
            packets,
            max_per_cts: 0xFF,
            pgn: auth_pgn(),
        }
    }

    /// Regression (attack suite): RTS and BAM for 1785 bytes from every other
    /// address used to fill the node's transport, which then refused the
    /// pile's AuthChallenge with `NoResources`.
    #[test]
    fn transport_abuse_from_other_nodes_cannot_starve_the_pile() {
        let mut n = node();
        let now = Timestamp::from_millis(10);
        n.start(PILE, now);
        while n.poll_transmit().is_some() {}
        let big = u16::try_from(MAX_TP_LEN).expect("1785 fits");
        for sa in (0..=0xFD_u8)
            .map(Address)
            .filter(|a| *a != PILE && *a != US)
        {
            n.handle_frame(&cm(sa, US, rts(big, 255)), now);
            let bam = Cm::Bam {
                size: big,
                packets: 255,
                pgn: auth_pgn(),
            };
            n.handle_frame(&cm(sa, Address::GLOBAL, bam), now);
        }
        assert_eq!(n.tp_sessions(), 1, "only our own AuthRequest is open");
        assert!(n.poll_transmit().is_none(), "nobody else gets an answer");
        // The pile's AuthChallenge (65 bytes, 10 packets) is granted at once.
        n.handle_frame(&cm(PILE, US, rts(65, 10)), now);
        let answer = n.poll_transmit().expect("an answer to the pile");
        let id = J1939Id::from_can_id(answer.id()).expect("J1939");
        assert_eq!(id.destination, PILE);
        assert!(
            matches!(Cm::parse(answer.data()), Ok(Cm::Cts { count: 10, .. })),
            "{answer}"
        );
    }

    #[test]
    fn nothing_reaches_the_transport_before_the_pile_is_known() {
        let mut n = node();
        let now = Timestamp::from_millis(10);
        n.handle_frame(&cm(PILE, US, rts(65, 10)), now);
        assert_eq!(n.tp_sessions(), 0);
        assert!(n.poll_transmit().is_none());
    }
}
