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
use crate::time::Clock;

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

/// Authenticate to the pile on `bus` with `credential`.
pub async fn authenticate<B: CanBus>(
    bus: &mut B,
    credential: Credential,
    opts: VehicleAuthOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Authenticated, VehicleAuthError> {
    let clock = Clock::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tp = Transport::new(TpConfig::gbt27930(), opts.address);
    let expected = credential.charger_number;
    let mut auth = VehicleAuth::new(credential, opts.config, Box::new(SystemRng));
    let mut pile: Option<Address> = None;
    let give_up = clock.now() + opts.wait_for_pile;
    loop {
        // Move output along until nothing moves: the state machine's
        // messages into the transport, frames onto the bus, received
        // messages back into the state machine.
        loop {
            let mut moved = false;
            if let Some(dst) = pile {
                while let Some(data) = auth.poll_transmit() {
                    moved = true;
                    let msg = J1939Message {
                        priority: auth_priority(),
                        pgn: auth_pgn(),
                        source: opts.address,
                        destination: dst,
                        data,
                    };
                    tp.send(msg, clock.now())
                        .map_err(|e| VehicleAuthError::Transport(e.to_string()))?;
                }
            }
            while let Some(frame) = tp.poll_transmit() {
                moved = true;
                if let Err(e) = bus.send(&frame).await {
                    warn!(error = %e, "send failed");
                }
            }
            while let Some(ev) = tp.poll_event() {
                moved = true;
                match ev {
                    TpEvent::Received(m) if m.pgn == auth_pgn() && Some(m.source) == pile => {
                        auth.handle_message(&m.data, clock.now());
                    }
                    TpEvent::SendAborted { reason, .. }
                    | TpEvent::ReceiveAborted { reason, .. } => {
                        debug!(%reason, "transport aborted; the handshake deadlines decide");
                    }
                    _ => {}
                }
            }
            if let Some(ev) = auth.poll_event() {
                return match ev {
                    VehicleAuthEvent::Accepted => {
                        let pile_address = pile.unwrap_or(Address::NULL);
                        info!(charger = expected, pile = %pile_address, "pile accepted the credential");
                        // Let the last frames (our EndOfMsgAck) go out.
                        while let Some(frame) = tp.poll_transmit() {
                            let _ = bus.send(&frame).await;
                        }
                        Ok(Authenticated {
                            charger_number: expected,
                            pile_address,
                        })
                    }
                    VehicleAuthEvent::Rejected(code) => Err(VehicleAuthError::Rejected(code)),
                    VehicleAuthEvent::FakePile => Err(VehicleAuthError::FakePile),
                    VehicleAuthEvent::Timeout { waiting_for } => {
                        Err(VehicleAuthError::Timeout(waiting_for))
                    }
                };
            }
            if !moved {
                break;
            }
        }
        let deadline = [
            auth.poll_timeout(),
            tp.poll_timeout(),
            pile.is_none().then_some(give_up),
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            biased;
            () = &mut shutdown => return Err(VehicleAuthError::Shutdown),
            ev = bus.recv() => {
                if let BusEvent::Frame(frame) = ev? {
                    let now = clock.now();
                    if pile.is_none()
                        && let Some((charger, address)) = crm00(&frame) {
                            if charger != expected {
                                return Err(VehicleAuthError::WrongPile { expected, found: charger });
                            }
                            info!(charger, pile = %address, "pile found; sending AuthRequest");
                            pile = Some(address);
                            auth.start(now);
                        }
                    tp.handle_frame(&frame, now);
                }
            }
            () = clock.sleep_until(deadline) => {
                let now = clock.now();
                if pile.is_none() && now >= give_up {
                    return Err(VehicleAuthError::NoPile(opts.wait_for_pile));
                }
                tp.handle_timeout(now);
                auth.handle_timeout(now);
            }
        }
    }
}

/// The pile's charger number and address, if `frame` is a CRM(0x00).
fn crm00(frame: &CanFrame) -> Option<(u32, Address)> {
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
