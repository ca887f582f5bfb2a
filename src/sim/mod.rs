//! Simulators and the demo (feature `sim`).
//!
//! The BMS and pile simulators play full GB/T 27930 sessions on any
//! [`CanBus`](crate::can::CanBus): SocketCAN (`vcan0`, a real bench) or the
//! in-process bus. They are test peers for the gateway and the two halves of
//! `bmsgw demo`.

pub mod attack;
pub mod bench;
pub mod bms;
pub mod broker;
pub mod cloud;
pub mod demo;
pub mod deviant;
pub mod driver;
pub mod mosquitto;
pub mod pile;
pub mod pki;
mod wallclock;

pub use driver::SimError;
