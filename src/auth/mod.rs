//! Vehicle authentication at the charging pile (`docs/protocol.md` §4).
//!
//! The VIN proves nothing. The cloud issues the vehicle a short-lived
//! [`Credential`]: a [`ticket`] sealed for one pile under a key derived from
//! that pile's root key ([`keys`]), and the session key inside it. Vehicle
//! and pile then run a Noise handshake keyed with the session key
//! ([`handshake`]), so the pile learns that the vehicle holds a fresh
//! credential for it, and the vehicle learns that the pile holds the root key.
//! The pile's [`replay`] cache spends each ticket once; [`credential`] also
//! holds the voucher wallet for offline charging.
//!
//! Everything here is sans-IO: time, randomness ([`rng`]) and storage come in
//! through arguments and traits. Secrets zeroize on drop, including inside
//! the Noise handshake, which runs on this module's own `resolver` (its
//! docs list what snow still leaves behind).

pub mod credential;
pub mod handshake;
mod hash;
pub mod keys;
pub mod messages;
pub mod replay;
mod resolver;
pub mod rng;
pub mod ticket;

pub use credential::{Credential, CredentialError, MemoryWallet, VoucherWallet, WalletError};
pub use handshake::{
    AcceptedTicket, ChannelError, PileAuth, PileAuthConfig, PileAuthError, PileAuthEvent,
    SecureChannel, VehicleAuth, VehicleAuthConfig, VehicleAuthError, VehicleAuthEvent,
};
pub use keys::{PileKeys, RootKey, SessionKey, TicketKey, ticket_key};
pub use messages::{AUTH_PGN, AuthMessage, MessageType, ParseError, ResultCode};
pub use replay::{MemoryReplayStore, ReplayCache, ReplayError, ReplayStore, ReplayStoreError};
pub use rng::{Rng, SystemRng};
pub use ticket::{OpenedTicket, TICKET_LEN, TicketBody, TicketHeader};
