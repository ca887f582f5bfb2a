//! bmsgw: the vehicle gateway for GB/T 27930 charging.
//!
//! Layers, one folder per concept (see `ARCHITECTURE.md`):
//! - [`can`]: frames, the async bus trait and its backends;
//! - [`j1939`]: identifier codec and transport protocol (sans-IO);
//! - [`gbt27930`]: message codecs and the charger and BMS state machines (sans-IO);
//! - [`cloud`]: cloud messages, the end-to-end envelope and the MQTT link;
//! - [`store`]: durable state in redb (outbox, voucher wallet, replay cache);
//! - [`gateway`]: the session observer and orchestrator, the bridge and firewall, vehicle authentication;
//! - [`service`]: the daemon, its config, systemd, the control socket, logging;
//! - `sim`: simulators and the demo (feature `sim`).
#![forbid(unsafe_code)]

pub mod auth;
pub mod backoff;
pub mod can;
pub mod cloud;
pub mod gateway;
pub mod gbt27930;
pub mod interop;
pub mod j1939;
mod prng;
pub mod service;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;
pub mod text;
pub mod time;
