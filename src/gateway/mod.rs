//! The gateway: what the vehicle side runs on the CAN bus.
//!
//! For now this holds the vehicle-side authentication driver, which proves
//! the vehicle to a pile with a credential over any [`CanBus`](crate::can::CanBus).
//! The session orchestrator and the bridge/firewall join it with the daemon.

pub mod bridge;
pub mod firewall;
pub mod vehicle_auth;
