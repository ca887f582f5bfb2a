//! Running as a service: logging and key files now; config, systemd notify and the control
//! socket arrive with the daemon.

pub mod keyfile;
pub mod logging;
