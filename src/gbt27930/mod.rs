//! GB/T 27930-2015: the conductive-charging communication protocol between an
//! off-board charger and the BMS, on J1939 at 250 kbit/s.
//!
//! - [`messages`]: every message as a typed value, with its PGN, priority and period.
//! - [`codec`]: bytes to messages and back, including the field variants seen in practice;
//!   `display` gives every [`Message`] a one-line `Display` for captures.
//! - [`charger`] and [`bms`]: sans-IO state machines for the two roles.

pub mod bms;
pub mod charger;
pub mod codec;
mod display;
pub mod field;
pub mod messages;
pub mod node;
pub mod session;
pub mod timeline;
pub mod units;

pub use messages::*;

#[cfg(test)]
mod pump_tests;
