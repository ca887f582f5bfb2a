//! Running as a service: logging, key files, systemd notification, the
//! control socket and the status it answers; config arrives with the daemon.

pub mod control;
pub mod keyfile;
pub mod logging;
pub mod status;
pub mod systemd;
