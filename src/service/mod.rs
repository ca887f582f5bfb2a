//! Running as a service: logging now; config, systemd notify and the control
//! socket arrive with the daemon.

pub mod logging;
