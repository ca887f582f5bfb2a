//! The production CAN backend: a Linux SocketCAN raw socket (`can0`, or
//! `vcan0` in the VM lane), behind the [`CanBus`] trait.
//!
//! It owns what the rest of the gateway must not have to think about:
//! kernel filters, error frames decoded into [`ErrorEvent`]s, and surviving
//! the interface going down and coming back (a cable unplugged, `ip link
//! set can0 down` during maintenance, a driver reload). An outage is
//! reported once as [`LinkState::Down`], the socket is reopened with
//! backoff, and [`LinkState::Up`] follows when it works again.
//!
//! All socket I/O goes through `socketcan::tokio::CanSocket`: this module
//! hands no file descriptor to tokio itself and needs no `unsafe`. (That
//! type still registers its socket with tokio's deprecated `AsyncFd::new`;
//! a fix for that belongs in socketcan.)
//!
//! The decoding of error frames ([`error_events_from`]) is pure and shared
//! with the `candump` log reader, since a log holds the same kernel layout.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use socketcan::{EmbeddedFrame, SocketOptions};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{
    BusError, BusEvent, CanBus, CanFrame, CanId, ErrorEvent, ExtendedId, LinkState, StandardId,
};
use crate::backoff::Backoff;

/// Error classes of a SocketCAN error frame (`linux/can/error.h`), found
/// in the identifier bits of a frame flagged with [`CAN_ERR_FLAG`].
pub mod err_class {
    pub const TX_TIMEOUT: u32 = 0x0001;
    /// Lost arbitration; data\[0\] is the bit position.
    pub const LOST_ARBITRATION: u32 = 0x0002;
    /// Controller problem; data\[1\] holds `CAN_ERR_CRTL_*`.
    pub const CONTROLLER: u32 = 0x0004;
    /// Protocol violation; data\[2\] is the type, data\[3\] the location.
    pub const PROTOCOL: u32 = 0x0008;
    /// Transceiver status; data\[4\] holds `CAN_ERR_TRX_*`.
    pub const TRANSCEIVER: u32 = 0x0010;
    pub const NO_ACK: u32 = 0x0020;
    pub const BUS_OFF: u32 = 0x0040;
    pub const BUS_ERROR: u32 = 0x0080;
    pub const RESTARTED: u32 = 0x0100;
    /// Error counters in data\[6\] (TX) and data\[7\] (RX); there is no
    /// [`ErrorEvent`](crate::can::ErrorEvent) variant for it, so it is
    /// reported as `Other`.
    pub const COUNTERS: u32 = 0x0200;
}

/// Marks an error frame in a SocketCAN identifier word (and in `candump`).
pub const CAN_ERR_FLAG: u32 = 0x2000_0000;

/// Decodes one SocketCAN error frame into the events it reports.
///
/// `class` is the identifier without flags, `data` the frame's payload
/// (normally 8 bytes; missing bytes read as 0). One frame often reports
/// several classes at once, e.g. a protocol violation together with the
/// controller turning error-passive, so this returns one event per class
/// bit, in bit order. Bits with no [`ErrorEvent`] variant (including
/// [`err_class::COUNTERS`]) are kept together in one trailing
/// [`ErrorEvent::Other`]. Never empty: a frame with no class bit gives
/// `Other { class: 0 }`.
pub fn error_events_from(class: u32, data: &[u8]) -> Vec<ErrorEvent> {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let known: [(u32, ErrorEvent); 9] = [
        (err_class::TX_TIMEOUT, ErrorEvent::TransmitTimeout),
        (
            err_class::LOST_ARBITRATION,
            ErrorEvent::LostArbitration { bit: byte(0) },
        ),
        (
            err_class::CONTROLLER,
            ErrorEvent::Controller { detail: byte(1) },
        ),
        (
            err_class::PROTOCOL,
            ErrorEvent::Protocol {
                kind: byte(2),
                location: byte(3),
            },
        ),
        (
            err_class::TRANSCEIVER,
            ErrorEvent::Transceiver { detail: byte(4) },
        ),
        (err_class::NO_ACK, ErrorEvent::NoAck),
        (err_class::BUS_OFF, ErrorEvent::BusOff),
        (err_class::BUS_ERROR, ErrorEvent::BusError),
        (err_class::RESTARTED, ErrorEvent::Restarted),
    ];
    let mut events: Vec<ErrorEvent> = known
        .iter()
        .filter(|(bit, _)| class & bit != 0)
        .map(|(_, ev)| ev.clone())
        .collect();
    let known_bits = known.iter().fold(0, |acc, (bit, _)| acc | bit);
    let rest = class & !known_bits;
    if rest != 0 || events.is_empty() {
        events.push(ErrorEvent::Other { class: rest });
    }
    events
}

const CAN_EFF_FLAG: u32 = 0x8000_0000;
const CAN_RTR_FLAG: u32 = 0x4000_0000;

/// A kernel receive filter: a frame passes when `frame_id & mask == id &
/// mask` and its format (standard or extended) matches.
///
/// With several filters a frame passes if any one matches. Remote frames
/// never pass. GB/T 27930 traffic is J1939 (extended, priority | PF | DA
/// | SA), so e.g. everything the BMS (SA 0xF4) sends to the charger (DA
/// 0x56) is `Filter::extended(0x0000_56F4, 0x0000_FFFF)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub id: u32,
    pub mask: u32,
    pub extended: bool,
}

impl Filter {
    /// Matches extended (29-bit) identifiers; bits above 29 are ignored.
    pub fn extended(id: u32, mask: u32) -> Self {
        Filter {
            id: id & ExtendedId::MAX,
            mask: mask & ExtendedId::MAX,
            extended: true,
        }
    }

    /// Matches standard (11-bit) identifiers; bits above 11 are ignored.
    pub fn standard(id: u16, mask: u16) -> Self {
        Filter {
            id: u32::from(id & StandardId::MAX),
            mask: u32::from(mask & StandardId::MAX),
            extended: false,
        }
    }

    fn to_kernel(self) -> socketcan::CanFilter {
        // The EFF flag in the mask makes the format part of the match, the
        // RTR flag (clear in the id) keeps remote frames out.
        let format = if self.extended { CAN_EFF_FLAG } else { 0 };
        socketcan::CanFilter::new(self.id | format, self.mask | CAN_EFF_FLAG | CAN_RTR_FLAG)
    }
}

/// How [`SocketCanBus::open`] sets up the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketCanOptions {
    /// Kernel filters; empty accepts every data frame.
    pub filters: Vec<Filter>,
    /// Receive the frames this socket sends (`CAN_RAW_RECV_OWN_MSGS`).
    pub receive_own: bool,
    /// Ask the kernel for error frames and report them as
    /// [`BusEvent::Error`].
    pub error_frames: bool,
    /// First wait before reopening a lost interface; doubles up to
    /// `reopen_max`.
    pub reopen_min: Duration,
    pub reopen_max: Duration,
}

impl Default for SocketCanOptions {
    fn default() -> Self {
        SocketCanOptions {
            filters: Vec::new(),
            receive_own: false,
            error_frames: true,
            reopen_min: Duration::from_millis(100),
            reopen_max: Duration::from_secs(2),
        }
    }
}

/// ENOBUFS (the interface's TX queue is full) is retried this many times,
/// after 1, 2, 4, 8 and 16 ms: at 250 kbit/s the default queue of 10
/// frames drains in about 5 ms, so a longer stall means a bus problem
/// (bus-off, no ACK) that the caller should see.
const ENOBUFS_RETRIES: u32 = 5;
const ENOBUFS_FIRST_DELAY: Duration = Duration::from_millis(1);

/// Linux's limit on interface names (IFNAMSIZ without the NUL).
const IFNAME_MAX: usize = 15;

/// How often an idle `recv` looks at the interface in sysfs, the only way
/// it learns of an outage (see `recv`): an outage is noticed within this.
const LINK_CHECK_PERIOD: Duration = Duration::from_millis(250);

/// A SocketCAN raw socket on one interface. See the module docs.
#[derive(Debug)]
pub struct SocketCanBus {
    iface: String,
    opts: SocketCanOptions,
    link: Link,
    /// Events decoded but not yet returned: one error frame can carry
    /// several, and a failed send reports the link going down here.
    pending: VecDeque<BusEvent>,
    /// When `recv` next checks the interface in sysfs. Kept here rather than
    /// as a timer inside `recv`, so that a caller cancelling `recv` more
    /// often than [`LINK_CHECK_PERIOD`] (a `select!` next to a fast tick)
    /// still gets its checks.
    next_check: Instant,
}

#[derive(Debug)]
enum Link {
    Up {
        socket: socketcan::tokio::CanSocket,
        /// The interface index the socket is bound to. A raw socket stays
        /// bound to the index, so an interface deleted and recreated under
        /// the same name (driver reload, USB adapter replugged) leaves it
        /// deaf; a changed index in sysfs reveals that.
        ifindex: u32,
    },
    Down {
        retry_at: Instant,
        /// Reopen attempts: `reopen_min`, doubling up to `reopen_max`.
        pace: Backoff,
    },
}

impl SocketCanBus {
    /// Opens a raw CAN socket on `iface` and applies `opts`.
    ///
    /// Fails if the interface does not exist or the socket cannot be set
    /// up. An interface that exists but is down opens fine and reports
    /// [`LinkState::Down`] on the first `recv`.
    ///
    /// # Panics
    /// Outside a tokio runtime with I/O enabled.
    pub fn open(iface: &str, opts: SocketCanOptions) -> Result<Self, BusError> {
        check_iface_name(iface)?;
        let (socket, ifindex) = open_socket(iface, &opts)?;
        Ok(SocketCanBus {
            iface: iface.to_owned(),
            opts,
            link: Link::Up { socket, ifindex },
            pending: VecDeque::new(),
            // Check at once, so an interface that was down when opened is
            // reported on the first `recv`.
            next_check: Instant::now(),
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Whether the socket is currently usable (not waiting to reopen).
    pub fn is_up(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    /// Turns a received kernel frame into events; remote frames are dropped
    /// (GB/T 27930 does not use them).
    fn on_frame(&mut self, frame: socketcan::CanFrame) {
        match frame {
            socketcan::CanFrame::Data(f) => match from_socketcan(&f) {
                Some(f) => self.pending.push_back(BusEvent::Frame(f)),
                None => debug!(iface = %self.iface, ?f, "dropping a malformed data frame"),
            },
            socketcan::CanFrame::Remote(f) => {
                debug!(iface = %self.iface, id = ?f.id(), "dropping a remote frame");
            }
            socketcan::CanFrame::Error(f) => {
                let events = error_events_from(f.error_bits(), f.data());
                debug!(iface = %self.iface, class = f.error_bits(), ?events, "error frame");
                self.pending.extend(events.into_iter().map(BusEvent::Error));
            }
        }
    }

    /// Drops the socket, reports the outage once and schedules a reopen.
    fn link_down(&mut self, op: &'static str, err: &io::Error) {
        if let Link::Up { .. } = self.link {
            warn!(
                iface = %self.iface, op, error = %err,
                "CAN interface lost; reopening with backoff"
            );
            self.pending.push_back(BusEvent::Link(LinkState::Down));
        }
        let mut pace = Backoff::steady(self.opts.reopen_min, self.opts.reopen_max);
        let (_, first) = pace.next_delay();
        self.link = Link::Down {
            retry_at: Instant::now() + first,
            pace,
        };
    }

    /// One reopen attempt; on failure the next one is scheduled with twice
    /// the delay.
    fn try_reopen(&mut self) {
        let Link::Down { pace, .. } = &self.link else {
            return;
        };
        let mut pace = pace.clone();
        let attempt = match iface_state(&self.iface) {
            // A socket bound to a down interface opens fine but is useless,
            // so wait for the interface itself.
            Ok(IfaceState::Down) => Err(io::Error::new(
                io::ErrorKind::NetworkDown,
                "interface is down or absent",
            )),
            Ok(IfaceState::Up { .. }) => {
                open_socket(&self.iface, &self.opts).map_err(io::Error::other)
            }
            Err(e) => {
                debug!(iface = %self.iface, error = %e, "cannot read the interface state; trying to open anyway");
                open_socket(&self.iface, &self.opts).map_err(io::Error::other)
            }
        };
        match attempt {
            Ok((socket, ifindex)) => {
                info!(iface = %self.iface, ifindex, "CAN interface is back");
                self.link = Link::Up { socket, ifindex };
                self.pending.push_back(BusEvent::Link(LinkState::Up));
                self.next_check = Instant::now() + LINK_CHECK_PERIOD;
            }
            Err(e) => {
                let (_, next) = pace.next_delay();
                debug!(iface = %self.iface, error = %e, retry_in = ?next, "CAN interface still unavailable");
                self.link = Link::Down {
                    retry_at: Instant::now() + next,
                    pace,
                };
            }
        }
    }

    /// The periodic check of an up link: reports an outage that the socket
    /// itself does not wake `recv` for (see `recv`).
    fn check_link(&mut self) {
        self.next_check = Instant::now() + LINK_CHECK_PERIOD;
        let Link::Up { ifindex, .. } = self.link else {
            return;
        };
        let cause = match iface_state(&self.iface) {
            Ok(IfaceState::Up { ifindex: now }) if now == ifindex => return,
            Ok(IfaceState::Up { .. }) => "the interface was replaced (its index changed)",
            Ok(IfaceState::Down) => "the interface is down or absent",
            Err(e) => {
                // Not proof of an outage; reads and sends still report one.
                debug!(iface = %self.iface, error = %e, "cannot read the interface state");
                return;
            }
        };
        self.link_down(
            "link check",
            &io::Error::new(io::ErrorKind::NetworkDown, cause),
        );
    }

    fn encode(&self, frame: &CanFrame) -> Result<socketcan::CanFrame, BusError> {
        to_socketcan(frame).ok_or_else(|| {
            self.io_error(
                "send",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot encode {frame}"),
                ),
            )
        })
    }

    fn io_error(&self, op: &'static str, source: io::Error) -> BusError {
        BusError::Io {
            iface: self.iface.clone(),
            op,
            source,
        }
    }
}

impl CanBus for SocketCanBus {
    /// Sends one frame. While the interface is down this fails at once with
    /// [`BusError::Io`] (the frame is not queued); the caller decides
    /// whether to retry after [`LinkState::Up`].
    async fn send(&mut self, frame: &CanFrame) -> Result<(), BusError> {
        if let Link::Down { retry_at, .. } = self.link
            && Instant::now() >= retry_at
        {
            self.try_reopen();
        }
        let out = self.encode(frame)?;
        let mut pace = Backoff::steady(ENOBUFS_FIRST_DELAY, ENOBUFS_FIRST_DELAY * 16);
        loop {
            let Link::Up { socket, .. } = &self.link else {
                return Err(self.io_error(
                    "send",
                    io::Error::new(io::ErrorKind::NetworkDown, "interface is down"),
                ));
            };
            match socket.write_frame(out).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS)
                        && pace.attempts() < ENOBUFS_RETRIES =>
                {
                    tokio::time::sleep(pace.next_delay().1).await;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if is_link_error(&e) {
                        self.link_down("send", &e);
                    }
                    return Err(self.io_error("send", e));
                }
            }
        }
    }

    /// As `send` without the wait: a full transmit queue (ENOBUFS, or
    /// EAGAIN) is `Ok(false)`, for the caller to try again shortly.
    fn try_send(&mut self, frame: &CanFrame) -> Result<bool, BusError> {
        if let Link::Down { retry_at, .. } = self.link
            && Instant::now() >= retry_at
        {
            self.try_reopen();
        }
        let out = self.encode(frame)?;
        loop {
            let Link::Up { socket, .. } = &self.link else {
                return Err(self.io_error(
                    "send",
                    io::Error::new(io::ErrorKind::NetworkDown, "interface is down"),
                ));
            };
            match socket.try_write_frame(out) {
                Ok(()) => return Ok(true),
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS)
                        || e.kind() == io::ErrorKind::WouldBlock =>
                {
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if is_link_error(&e) {
                        self.link_down("send", &e);
                    }
                    return Err(self.io_error("send", e));
                }
            }
        }
    }

    /// What is queued, or what the socket already holds.
    fn try_recv(&mut self) -> Option<BusEvent> {
        if let Some(ev) = self.pending.pop_front() {
            return Some(ev);
        }
        let Link::Up { socket, .. } = &self.link else {
            return None;
        };
        match socket.try_read_frame() {
            Ok(frame) => self.on_frame(frame),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return None;
            }
            // As in `recv`: the socket is unusable.
            Err(e) => self.link_down("receive", &e),
        }
        self.pending.pop_front()
    }

    /// Waits for the next frame, error frame or link change.
    ///
    /// When the interface goes down the kernel only sets an error on the
    /// socket, which epoll reports as EPOLLERR alone, and
    /// `socketcan::tokio::CanSocket::read_frame` waits for READABLE: an idle
    /// reader would never wake. So the read races a check of the interface
    /// in sysfs every [`LINK_CHECK_PERIOD`]: `IFF_UP` (what the kernel tests
    /// before answering ENETDOWN) and the interface index. Not `operstate`:
    /// a CAN controller going bus-off drops the carrier, but the socket stays
    /// valid and the bus-off arrives as an error frame. A read error (e.g.
    /// the pending ENETDOWN, seen by the first read once frames flow again)
    /// also counts as an outage.
    ///
    /// Cancel-safe: `read_frame` reads only once the socket is ready and
    /// returns the frame in the same poll, so a cancelled call consumes
    /// nothing; state changes happen between awaits, and the check and
    /// reopen deadlines live in `self`, so a cancelled wait resumes where
    /// it was.
    async fn recv(&mut self) -> Result<BusEvent, BusError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            match &self.link {
                Link::Up { socket, .. } => {
                    let read = tokio::select! {
                        // Frames already received go out before an outage
                        // found by the check.
                        biased;
                        r = socket.read_frame() => Some(r),
                        () = tokio::time::sleep_until(self.next_check) => None,
                    };
                    match read {
                        Some(Ok(frame)) => self.on_frame(frame),
                        Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        // Any other read error leaves the socket unusable.
                        Some(Err(e)) => self.link_down("receive", &e),
                        None => self.check_link(),
                    }
                }
                Link::Down { retry_at, .. } => {
                    tokio::time::sleep_until(*retry_at).await;
                    self.try_reopen();
                }
            }
        }
    }
}

/// Errors meaning the interface (not this one frame) is unusable.
fn is_link_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETDOWN | libc::ENODEV | libc::ENXIO | libc::EBADF)
    )
}

fn check_iface_name(iface: &str) -> Result<(), BusError> {
    let ok = !iface.is_empty()
        && iface.len() <= IFNAME_MAX
        && iface != "."
        && iface != ".."
        && !iface.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control());
    if ok {
        return Ok(());
    }
    Err(BusError::Config {
        iface: iface.to_owned(),
        what: "interface name",
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("expected 1 to {IFNAME_MAX} characters without '/' or spaces, e.g. can0"),
        ),
    })
}

/// Opens and sets up a socket on `iface`, returning it with the interface
/// index it is bound to.
fn open_socket(
    iface: &str,
    opts: &SocketCanOptions,
) -> Result<(socketcan::tokio::CanSocket, u32), BusError> {
    let config = |what: &'static str| {
        move |source: io::Error| BusError::Config {
            iface: iface.to_owned(),
            what,
            source,
        }
    };
    let open_error = |source: io::Error| BusError::Io {
        iface: iface.to_owned(),
        op: "open",
        source,
    };
    // Resolve the name once and bind to that index, so the index recorded
    // for the link check is the one the socket is bound to.
    let addr = socketcan::CanAddr::from_iface(iface).map_err(open_error)?;
    let socket = socketcan::tokio::CanSocket::open_addr(&addr).map_err(open_error)?;
    if opts.filters.is_empty() {
        socket.set_filter_accept_all().map_err(config("filters"))?;
    } else {
        let filters: Vec<socketcan::CanFilter> =
            opts.filters.iter().map(|f| f.to_kernel()).collect();
        socket.set_filters(&filters).map_err(config("filters"))?;
    }
    if opts.error_frames {
        socket
            .set_error_filter_accept_all()
            .map_err(config("error frames"))?;
    } else {
        socket
            .set_error_filter_drop_all()
            .map_err(config("error frames"))?;
    }
    socket
        .set_recv_own_msgs(opts.receive_own)
        .map_err(config("receiving own frames"))?;
    Ok((socket, addr.ifindex()))
}

/// An interface as sysfs shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IfaceState {
    /// Absent, or administratively down (`IFF_UP` clear), which is what the
    /// kernel checks before it answers ENETDOWN.
    Down,
    Up {
        ifindex: u32,
    },
}

/// Reads `iface`'s state from `/sys/class/net`. Plain blocking reads: sysfs
/// attributes are generated in memory and never wait on a disk.
fn iface_state(iface: &str) -> io::Result<IfaceState> {
    let dir = format!("/sys/class/net/{iface}");
    let Some(flags) = read_sysfs_number(&dir, "flags", 16)? else {
        return Ok(IfaceState::Down);
    };
    const IFF_UP: u32 = 0x1;
    if flags & IFF_UP == 0 {
        return Ok(IfaceState::Down);
    }
    // Absent here means the interface vanished between the two reads.
    Ok(match read_sysfs_number(&dir, "ifindex", 10)? {
        Some(ifindex) => IfaceState::Up { ifindex },
        None => IfaceState::Down,
    })
}

/// One numeric sysfs attribute (`0x`-prefixed when `radix` is 16); `None`
/// when the file does not exist.
fn read_sysfs_number(dir: &str, attr: &str, radix: u32) -> io::Result<Option<u32>> {
    let path = format!("{dir}/{attr}");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    parse_sysfs_number(&text, radix).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: {text:?} is not a base-{radix} number: {e}"),
        )
    })
}

fn parse_sysfs_number(text: &str, radix: u32) -> Result<u32, std::num::ParseIntError> {
    let digits = text.trim();
    let digits = match radix {
        16 => digits.strip_prefix("0x").unwrap_or(digits),
        _ => digits,
    };
    u32::from_str_radix(digits, radix)
}

fn from_socketcan(f: &socketcan::CanDataFrame) -> Option<CanFrame> {
    let id: CanId = match f.id() {
        socketcan::Id::Standard(id) => StandardId::new(id.as_raw()).ok()?.into(),
        socketcan::Id::Extended(id) => ExtendedId::new(id.as_raw()).ok()?.into(),
    };
    CanFrame::new(id, f.data()).ok()
}

fn to_socketcan(f: &CanFrame) -> Option<socketcan::CanFrame> {
    let id: socketcan::Id = match f.id() {
        CanId::Standard(id) => socketcan::StandardId::new(id.raw())?.into(),
        CanId::Extended(id) => socketcan::ExtendedId::new(id.raw())?.into(),
    };
    socketcan::CanFrame::new(id, f.data())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_class_maps_to_its_event_with_its_data_byte() {
        let data = [7, 0x04, 0x02, 0x08, 0x40, 0, 0, 0];
        let cases = [
            (err_class::TX_TIMEOUT, ErrorEvent::TransmitTimeout),
            (
                err_class::LOST_ARBITRATION,
                ErrorEvent::LostArbitration { bit: 7 },
            ),
            (
                err_class::CONTROLLER,
                ErrorEvent::Controller { detail: 0x04 },
            ),
            (
                err_class::PROTOCOL,
                ErrorEvent::Protocol {
                    kind: 0x02,
                    location: 0x08,
                },
            ),
            (
                err_class::TRANSCEIVER,
                ErrorEvent::Transceiver { detail: 0x40 },
            ),
            (err_class::NO_ACK, ErrorEvent::NoAck),
            (err_class::BUS_OFF, ErrorEvent::BusOff),
            (err_class::BUS_ERROR, ErrorEvent::BusError),
            (err_class::RESTARTED, ErrorEvent::Restarted),
        ];
        for (class, event) in cases {
            assert_eq!(error_events_from(class, &data), [event], "class {class:#x}");
        }
    }

    #[test]
    fn one_frame_with_several_classes_gives_several_events_in_bit_order() {
        // What a controller sends when a stuff error pushes it error-passive:
        // controller (RX passive) + protocol (stuff error) + bus error.
        let class = err_class::CONTROLLER | err_class::PROTOCOL | err_class::BUS_ERROR;
        let data = [0, 0x10, 0x04, 0x0A, 0, 0, 0, 0];
        assert_eq!(
            error_events_from(class, &data),
            [
                ErrorEvent::Controller { detail: 0x10 },
                ErrorEvent::Protocol {
                    kind: 0x04,
                    location: 0x0A
                },
                ErrorEvent::BusError,
            ]
        );
    }

    #[test]
    fn unknown_bits_and_empty_classes_are_kept_as_other() {
        let class = err_class::BUS_OFF | err_class::COUNTERS | 0x1000_0000;
        assert_eq!(
            error_events_from(class, &[0; 8]),
            [
                ErrorEvent::BusOff,
                ErrorEvent::Other {
                    class: err_class::COUNTERS | 0x1000_0000
                }
            ]
        );
        assert_eq!(error_events_from(0, &[]), [ErrorEvent::Other { class: 0 }]);
    }

    #[test]
    fn short_error_payload_reads_missing_bytes_as_zero() {
        assert_eq!(
            error_events_from(err_class::PROTOCOL, &[0, 0, 0x08]),
            [ErrorEvent::Protocol {
                kind: 0x08,
                location: 0
            }]
        );
    }

    #[test]
    fn filters_pin_the_frame_format_and_exclude_remote_frames() {
        let f = Filter::extended(0x0000_56F4, 0x0000_FFFF).to_kernel();
        let raw: &libc::can_filter = f.as_ref();
        assert_eq!(raw.can_id, 0x8000_56F4);
        assert_eq!(raw.can_mask, 0xC000_FFFF);
        let f = Filter::standard(0x123, 0x7FF).to_kernel();
        let raw: &libc::can_filter = f.as_ref();
        assert_eq!(raw.can_id, 0x123);
        assert_eq!(raw.can_mask, 0xC000_07FF);
        // Out-of-range bits are cut, not turned into flags.
        assert_eq!(Filter::extended(0xFFFF_FFFF, 0xFFFF_FFFF).id, 0x1FFF_FFFF);
    }

    #[test]
    fn frames_convert_both_ways() {
        for f in [
            CanFrame::new(ExtendedId::new(0x18EC_56F4).unwrap(), &[1, 2, 3]).unwrap(),
            CanFrame::new(StandardId::new(0x7FF).unwrap(), &[]).unwrap(),
            CanFrame::new(ExtendedId::new(0).unwrap(), &[0xFF; 8]).unwrap(),
        ] {
            let Some(socketcan::CanFrame::Data(out)) = to_socketcan(&f) else {
                panic!("{f} must become a data frame");
            };
            assert_eq!(from_socketcan(&out), Some(f));
        }
    }

    #[test]
    fn interface_names_are_checked_before_use() {
        for bad in ["", "a/b", "..", "can 0", "sixteen_chars_xx"] {
            assert!(
                matches!(check_iface_name(bad), Err(BusError::Config { .. })),
                "{bad:?}"
            );
        }
        assert!(check_iface_name("vcan0").is_ok());
    }

    #[test]
    fn missing_interface_reads_as_down() {
        assert_eq!(iface_state("bmsgw-none0").unwrap(), IfaceState::Down);
    }

    #[test]
    fn sysfs_numbers_parse_as_the_kernel_writes_them() {
        // `flags` of an up vcan (IFF_UP | IFF_RUNNING | IFF_NOARP), `ifindex`.
        assert_eq!(parse_sysfs_number("0xc1\n", 16), Ok(0xC1));
        assert_eq!(parse_sysfs_number("42\n", 10), Ok(42));
        assert!(parse_sysfs_number("", 10).is_err());
        assert!(parse_sysfs_number("0x", 16).is_err());
        assert!(parse_sysfs_number("up\n", 16).is_err());
    }
}
