//! CAN: the frame type, the async bus trait every backend implements, and the
//! backends themselves.
//!
//! - [`socketcan`]: Linux SocketCAN (production, and `vcan` in the VM lane).
//! - [`virtual_bus`]: an in-process bus for tests and the demo, with an
//!   optional bit-rate timing model.
//! - [`candump`]: reader and writer for `candump -L` log lines.
//! - [`fault`]: a wrapper that loses and corrupts frames, for the fault suite.

pub mod candump;
pub mod fault;
mod frame;
pub mod socketcan;
pub mod virtual_bus;

pub use frame::{CAN_MAX_DLEN, CanFrame, CanId, ExtendedId, FrameError, StandardId};
pub use socketcan::{SocketCanBus, SocketCanOptions};
pub use virtual_bus::{VirtualBus, VirtualNode};

use std::future::Future;

/// What a bus delivers to its reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A data frame from another node (or our own, if the node asked for it).
    Frame(CanFrame),
    /// The controller reported an error frame.
    Error(ErrorEvent),
    /// The interface went down or came back. Frames sent while it is down are
    /// lost, as on a real bus.
    Link(LinkState),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Down,
    Up,
}

/// An error frame from the CAN controller, decoded into what happened.
///
/// Mirrors the Linux `CAN_ERR_*` classes, which is what real controllers
/// report through SocketCAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorEvent {
    TransmitTimeout,
    /// Lost arbitration at the given bit (0 if unknown).
    LostArbitration {
        bit: u8,
    },
    /// Controller state: warning / passive levels or an overflow. `detail` is
    /// the raw `CAN_ERR_CRTL_*` byte.
    Controller {
        detail: u8,
    },
    /// Bus protocol violation: raw `CAN_ERR_PROT_*` type and location bytes.
    Protocol {
        kind: u8,
        location: u8,
    },
    /// Transceiver status, raw `CAN_ERR_TRX_*` byte.
    Transceiver {
        detail: u8,
    },
    /// No acknowledgement: no other node is listening.
    NoAck,
    BusOff,
    BusError,
    Restarted,
    /// An error frame whose class we do not know; the raw class bits are kept.
    Other {
        class: u32,
    },
}

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("CAN interface {iface}: {op} failed: {source}{}", what_to_do(.source, .iface))]
    Io {
        iface: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("CAN interface {iface}: configuring {what} failed: {source}")]
    Config {
        iface: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the in-process bus was closed")]
    Closed,
}

/// What to do about a failed CAN socket operation, for the errors an
/// integrator meets on a new board: appended to the error's message.
fn what_to_do(e: &std::io::Error, iface: &str) -> String {
    match e.raw_os_error() {
        Some(libc::ENODEV) => format!(
            ". There is no interface {iface}: check the name (`ip link show`), or create it \
             (a vcan: `modprobe vcan && ip link add dev {iface} type vcan && ip link set up {iface}`)"
        ),
        Some(libc::ENETDOWN) => format!(
            ". {iface} is down: `ip link set up {iface}` (a real CAN interface first needs its \
             bit rate: `ip link set {iface} type can bitrate 250000`)"
        ),
        Some(libc::EAFNOSUPPORT) => ". This kernel has no SocketCAN: load it (`modprobe can-raw`, \
             and `modprobe vcan` for vcan), or use a kernel built with CONFIG_CAN"
            .to_string(),
        Some(libc::EPERM | libc::EACCES) => ". Not permitted: a unit's \
             RestrictAddressFamilies= must include AF_CAN"
            .to_string(),
        _ => String::new(),
    }
}

/// An asynchronous CAN bus node.
///
/// `recv` must be cancel-safe: the shell calls it inside `tokio::select!`
/// next to timers and a shutdown signal, and a cancelled `recv` loses no
/// frame.
pub trait CanBus: Send {
    /// Queue one frame for transmission, waiting while the bus cannot take
    /// it.
    fn send(&mut self, frame: &CanFrame) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Hand one frame to the bus without waiting: `Ok(true)` when the bus
    /// took it, `Ok(false)` when it cannot take one now (its transmit queue
    /// is full; try again shortly), an error when this frame failed. The
    /// daemon sends only this way, so that a full bus never holds up its
    /// loop, the other bus or the timers.
    fn try_send(&mut self, frame: &CanFrame) -> Result<bool, BusError>;

    /// Wait for the next event on the bus.
    fn recv(&mut self) -> impl Future<Output = Result<BusEvent, BusError>> + Send;

    /// The next event if one is already there, without waiting, so that a
    /// reader takes a burst in one go; `None` when nothing is ready (then
    /// `recv` waits). The default never has one.
    fn try_recv(&mut self) -> Option<BusEvent> {
        None
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    fn open_error(errno: i32) -> String {
        BusError::Io {
            iface: "can0".into(),
            op: "open",
            source: std::io::Error::from_raw_os_error(errno),
        }
        .to_string()
    }

    /// The errors a new board gives say what to do, not just the errno.
    #[test]
    fn can_errors_say_what_to_do() {
        let e = open_error(libc::ENODEV);
        assert!(
            e.contains("no interface can0") && e.contains("ip link add dev can0 type vcan"),
            "{e}"
        );
        let e = open_error(libc::ENETDOWN);
        assert!(
            e.contains("ip link set up can0") && e.contains("bitrate 250000"),
            "{e}"
        );
        let e = open_error(libc::EAFNOSUPPORT);
        assert!(
            e.contains("modprobe can-raw") && e.contains("CONFIG_CAN"),
            "{e}"
        );
        let e = open_error(libc::EACCES);
        assert!(e.contains("AF_CAN"), "{e}");
        // Others keep the plain error.
        let e = open_error(libc::EIO);
        assert!(e.ends_with("(os error 5)"), "{e}");
    }
}
