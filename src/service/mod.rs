//! Running as a service: the daemon itself ([`daemon`]), its config, systemd
//! readiness and watchdog, the control socket and `status`, logging, key
//! files and the stop signals.

pub mod check;
pub mod config;
pub mod control;
pub mod daemon;
pub mod keyfile;
pub mod logging;
pub mod signals;
pub mod status;
pub mod systemd;
