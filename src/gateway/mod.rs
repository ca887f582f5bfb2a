//! The gateway: what the vehicle side runs on the CAN bus.
//!
//! - [`observer`]: follows a GB/T session between the BMS and the pile
//!   without taking part (sans-IO);
//! - [`orchestrator`]: what to do at each step of a session: fetch a
//!   credential, authenticate to the pile, record the session (sans-IO);
//! - [`vehicle_auth`]: proves the vehicle to the pile with a credential;
//! - [`firewall`] and [`bridge`]: bridge mode's CAN firewall between the
//!   BMS's bus and the pile's (sans-IO);
//! - [`throttle`]: how often a credential may be requested (sans-IO).
//!
//! `service::daemon` drives them on real buses.

pub mod bridge;
pub mod firewall;
pub mod observer;
pub mod orchestrator;
pub mod throttle;
pub mod vehicle_auth;
