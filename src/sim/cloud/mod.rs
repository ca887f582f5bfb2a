//! The reference cloud identity service, `bmsgw sim cloud --config F`: the
//! sans-IO core that the MQTT shell drives.
//!
//! - [`registry`] reads the vehicles and piles (`vehicles.toml`, `piles.toml`);
//! - [`config`] reads `cloud.toml`;
//! - [`service`] makes the decisions (grants, denials, owner approval, records);
//! - [`owner`] seals what the owner's app sends (for tests and simulators);
//! - [`issue`] seals vouchers into a ticket file for another carrier.
//!
//! It is meant as the starting point of an OEM backend: everything a real
//! service must decide is here, and nothing about how messages travel.

pub mod config;
pub mod issue;
pub mod owner;
pub mod registry;
pub mod run;
pub mod service;

pub use config::{CloudConfig, CloudSettings, ConfigError};
pub use registry::{ApprovalPolicy, PileEntry, Registry, RegistryError, VehicleEntry};
pub use service::{CloudService, Inbound, Output, RejectReason, ReplyKind, ServiceError};
