//! Running as a service: the daemon itself ([`daemon`]), its config, systemd
//! readiness and watchdog, the control socket and `status`, logging and key
//! files.

pub mod daemon;
pub mod keyfile;
pub mod logging;
