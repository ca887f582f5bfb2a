//! An in-process CAN bus, so the simulators, the demo and the tests can run
//! whole charging sessions without SocketCAN.
//!
//! It behaves like a shared wire: every frame reaches every other node, the
//! sender sees its own frame only if it asked for it, and each node has a
//! bounded receive queue that drops (and counts) on overflow instead of
//! stalling the bus, as a socket's receive buffer does.
//!
//! With [`VirtualBus::with_timing`] the bus also models time: a frame
//! occupies the wire for its real length at the bit rate, stuff bits
//! included ([`frame_bits`]), frames waiting in different nodes go out in
//! CAN arbitration order, and `send` completes only once the frame has been
//! transmitted, which gives senders the back-pressure of a real 250 kbit/s
//! bus. Time is `tokio::time`, so under `tokio::time::pause()` a test runs
//! the model deterministically and instantly.
//!
//! On a real clock tokio's timer fires on millisecond ticks, so each frame
//! would end up to a millisecond late and a chain of reactions (TP's
//! RTS → CTS → DT) would run at a fraction of the bit rate.
//! [`VirtualBus::with_precise_timing`] is for measuring latency in real
//! time (`bmsgw bench latency`): it sleeps to within a tick of each
//! instant and yields until the clock reaches it, at the cost of a busy
//! thread while the bus is busy. It must not run under a paused clock,
//! which never moves while a task is ready.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{BusError, BusEvent, CanBus, CanFrame, CanId};

/// Receive queue length of a node made with [`VirtualBus::node`].
pub const DEFAULT_RX_QUEUE: usize = 1024;

/// Bits after the CRC sequence, never stuffed: CRC delimiter, ACK slot, ACK
/// delimiter, 7 bits of end of frame and the 3-bit intermission that must
/// pass before the next start of frame.
const FIXED_TAIL_BITS: u32 = 1 + 1 + 1 + 7 + 3;

/// CRC-15/CAN generator x^15 + x^14 + x^10 + x^8 + x^7 + x^4 + x^3 + 1,
/// without its x^15 term.
const CRC15_POLY: u16 = 0x4599;

/// Number of bits a classical data frame occupies on the wire, from start of
/// frame to the end of the intermission, stuff bits included.
///
/// The stuff bits are counted on the actual bit stream (SOF through the
/// CRC-15 sequence), so the result depends on the identifier and payload,
/// not only on the length: an 8-byte extended frame takes between 131 and
/// 160 bits.
pub fn frame_bits(frame: &CanFrame) -> u32 {
    let mut w = WireBits::default();
    w.push(false); // start of frame (dominant)
    match frame.id() {
        CanId::Standard(id) => {
            w.push_field(u32::from(id.raw()), 11);
            w.push(false); // RTR: data frame
            w.push(false); // IDE: standard format
            w.push(false); // r0
        }
        CanId::Extended(id) => {
            let raw = id.raw();
            w.push_field(raw >> 18, 11); // base identifier
            w.push(true); // SRR (recessive)
            w.push(true); // IDE: extended format
            w.push_field(raw & 0x3_FFFF, 18); // identifier extension
            w.push(false); // RTR: data frame
            w.push(false); // r1
            w.push(false); // r0
        }
    }
    // A classical frame's DLC is its length (0..=8), which fits in 4 bits.
    w.push_field(frame.len() as u32, 4);
    for &b in frame.data() {
        w.push_field(u32::from(b), 8);
    }
    let crc = w.crc;
    w.in_crc = false; // the CRC sequence is stuffed but not part of its own CRC
    w.push_field(u32::from(crc), 15);
    w.bits + w.stuff_bits + FIXED_TAIL_BITS
}

/// How long `frame` occupies a bus running at `bitrate_bps`
/// ([`frame_bits`] bit times, rounded up to the nanosecond).
///
/// A bit rate of 0 gives [`Duration::MAX`]: nothing is ever transmitted.
pub fn frame_duration(frame: &CanFrame, bitrate_bps: u32) -> Duration {
    bits_duration(frame_bits(frame), bitrate_bps)
}

fn bits_duration(bits: u32, bitrate_bps: u32) -> Duration {
    if bitrate_bps == 0 {
        return Duration::MAX;
    }
    Duration::from_nanos((u64::from(bits) * 1_000_000_000).div_ceil(u64::from(bitrate_bps)))
}

/// Serialises a frame bit by bit, keeping the CRC-15 and the stuff-bit count.
#[derive(Default)]
struct WireBits {
    bits: u32,
    stuff_bits: u32,
    crc: u16,
    /// Whether pushed bits still feed the CRC (SOF through the data field).
    in_crc: bool,
    last: bool,
    /// Length of the current run of equal bits on the wire, stuff bits
    /// included (0 before the first bit).
    run: u32,
}

impl WireBits {
    fn push(&mut self, bit: bool) {
        if self.bits == 0 {
            self.in_crc = true;
        }
        if self.in_crc {
            self.crc = crc15_step(self.crc, bit);
        }
        self.bits += 1;
        if self.run > 0 && bit == self.last {
            self.run += 1;
        } else {
            self.last = bit;
            self.run = 1;
        }
        if self.run == 5 {
            // Five equal bits: the transmitter inserts the complement, which
            // starts the next run.
            self.stuff_bits += 1;
            self.last = !bit;
            self.run = 1;
        }
    }

    /// Pushes the low `width` bits of `value`, most significant first.
    fn push_field(&mut self, value: u32, width: u32) {
        for i in (0..width).rev() {
            self.push((value >> i) & 1 == 1);
        }
    }
}

fn crc15_step(crc: u16, bit: bool) -> u16 {
    let feedback = bit ^ ((crc >> 14) & 1 == 1);
    let shifted = (crc << 1) & 0x7FFF;
    if feedback {
        shifted ^ CRC15_POLY
    } else {
        shifted
    }
}

/// The order in which identifiers win arbitration: lower wins.
///
/// Mirrors the bits as they go out: the 11-bit base identifier, then RTR
/// (standard, dominant) or SRR (extended, recessive), then IDE, then the
/// 18-bit extension. So a standard data frame beats an extended one with
/// the same base identifier.
fn arbitration_key(id: CanId) -> u32 {
    match id {
        CanId::Standard(id) => u32::from(id.raw()) << 19,
        CanId::Extended(id) => {
            let raw = id.raw();
            ((raw >> 18) << 19) | (1 << 18) | (raw & 0x3_FFFF)
        }
    }
}

/// Counters of a [`VirtualBus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Frames that went out on the bus.
    pub frames_transmitted: u64,
    /// Frames placed in a receiver's queue (a frame reaching three nodes
    /// counts three times).
    pub frames_delivered: u64,
    /// Frames lost because a receiver's queue was full.
    pub frames_dropped: u64,
    /// Total time the wire was occupied (timing model only; zero otherwise).
    pub busy_time: Duration,
}

/// How a node attaches to the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeOptions {
    /// Also receive the frames this node sends (SocketCAN's
    /// `CAN_RAW_RECV_OWN_MSGS`); they arrive once transmitted.
    pub receive_own: bool,
    /// Receive queue length in events; when full, further frames for this
    /// node are dropped and counted. 0 is treated as 1.
    pub rx_queue: usize,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            receive_own: false,
            rx_queue: DEFAULT_RX_QUEUE,
        }
    }
}

type NodeId = u64;

/// A handle on one in-process bus. Cloning it is cheap and gives another
/// handle on the same bus.
#[derive(Clone)]
pub struct VirtualBus {
    shared: Arc<Shared>,
}

struct Shared {
    /// `Some` when the timing model is on.
    bitrate_bps: Option<u32>,
    /// Timed mode: wait out frame times exactly on a real clock (see the
    /// module docs).
    precise: bool,
    state: Mutex<State>,
    /// Timed mode only: the queue into the arbiter task.
    arbiter: Option<ArbiterLink>,
}

struct ArbiterLink {
    tx: mpsc::UnboundedSender<TxRequest>,
    /// Taken by the first `send`, which spawns the arbiter: the bus may be
    /// built outside a runtime, but sends always run inside one.
    rx: Mutex<Option<mpsc::UnboundedReceiver<TxRequest>>>,
}

#[derive(Default)]
struct State {
    next_node: NodeId,
    next_seq: u64,
    nodes: Vec<NodeSlot>,
    stats: BusStats,
    /// Timed mode: (tokio instant, exact bus time) of the last completed
    /// transmission. See [`State::ready_time`].
    anchor: Option<(Instant, Instant)>,
}

struct NodeSlot {
    id: NodeId,
    receive_own: bool,
    tx: mpsc::Sender<BusEvent>,
    dropped: Arc<AtomicU64>,
}

struct TxRequest {
    node: NodeId,
    frame: CanFrame,
    /// Exact bus time from which the frame is ready to compete.
    ready_at: Instant,
    /// Tie-break between identical identifiers: first queued goes first.
    seq: u64,
    done: oneshot::Sender<()>,
}

impl State {
    fn deliver(&mut self, from: Option<NodeId>, event: &BusEvent) {
        for slot in &self.nodes {
            if Some(slot.id) == from && !slot.receive_own {
                continue;
            }
            match slot.tx.try_send(event.clone()) {
                Ok(()) => self.stats.frames_delivered += 1,
                Err(TrySendError::Full(_)) => {
                    slot.dropped.fetch_add(1, Ordering::Relaxed);
                    self.stats.frames_dropped += 1;
                }
                // The node is being dropped; it unregisters itself.
                Err(TrySendError::Closed(_)) => {}
            }
        }
    }

    /// The exact bus time at which a frame queued now becomes ready.
    ///
    /// tokio's timer fires on millisecond ticks, so the arbiter usually
    /// completes a transmission a little after the exact instant it ended
    /// on the wire. A node that reacts without any tokio time passing (the
    /// sender queuing its next frame, a receiver answering) reacted, in the
    /// model, at that exact end. Without this, every reaction would start
    /// on the next millisecond and back-to-back traffic would run at a
    /// fraction of the bit rate.
    fn ready_time(&self, now: Instant) -> Instant {
        match self.anchor {
            Some((tokio_at, bus_at)) if tokio_at == now => bus_at,
            _ => now,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a panic in
        // another thread holding the lock cannot have broken it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl VirtualBus {
    /// A bus without timing: `send` delivers at once, in send order.
    pub fn new() -> Self {
        VirtualBus {
            shared: Arc::new(Shared {
                bitrate_bps: None,
                precise: false,
                state: Mutex::new(State::default()),
                arbiter: None,
            }),
        }
    }

    /// A bus that models transmission time and arbitration at
    /// `bitrate_bps` (GB/T 27930 uses 250 000).
    ///
    /// # Panics
    /// If `bitrate_bps` is 0.
    pub fn with_timing(bitrate_bps: u32) -> Self {
        Self::timed(bitrate_bps, false)
    }

    /// Like [`VirtualBus::with_timing`], but frame times are waited out to
    /// the microsecond on a real clock instead of on tokio's millisecond
    /// ticks. For latency measurements in real time only: under a paused
    /// clock it never finishes a frame (see the module docs).
    ///
    /// # Panics
    /// If `bitrate_bps` is 0.
    pub fn with_precise_timing(bitrate_bps: u32) -> Self {
        Self::timed(bitrate_bps, true)
    }

    fn timed(bitrate_bps: u32, precise: bool) -> Self {
        assert!(bitrate_bps > 0, "a CAN bit rate must be positive");
        let (tx, rx) = mpsc::unbounded_channel();
        VirtualBus {
            shared: Arc::new(Shared {
                bitrate_bps: Some(bitrate_bps),
                precise,
                state: Mutex::new(State::default()),
                arbiter: Some(ArbiterLink {
                    tx,
                    rx: Mutex::new(Some(rx)),
                }),
            }),
        }
    }

    /// The bit rate of the timing model, if any.
    pub fn bitrate(&self) -> Option<u32> {
        self.shared.bitrate_bps
    }

    /// Attaches a node with default options: it does not receive its own
    /// frames.
    pub fn node(&self) -> VirtualNode {
        self.node_with(NodeOptions::default())
    }

    pub fn node_with(&self, opts: NodeOptions) -> VirtualNode {
        let (tx, rx) = mpsc::channel(opts.rx_queue.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut st = self.shared.lock();
        let id = st.next_node;
        st.next_node += 1;
        st.nodes.push(NodeSlot {
            id,
            receive_own: opts.receive_own,
            tx,
            dropped: Arc::clone(&dropped),
        });
        VirtualNode {
            id,
            shared: Arc::clone(&self.shared),
            rx,
            dropped,
            tx_queue: VecDeque::new(),
        }
    }

    pub fn stats(&self) -> BusStats {
        self.shared.lock().stats
    }

    /// Puts `event` in every node's receive queue, as if the controller had
    /// reported it: lets tests drive how consumers handle error frames and
    /// link changes. Queue overflow applies as for frames.
    pub fn inject(&self, event: BusEvent) {
        self.shared.lock().deliver(None, &event);
    }
}

impl Default for VirtualBus {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for VirtualBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualBus")
            .field("bitrate_bps", &self.shared.bitrate_bps)
            .field("stats", &self.stats())
            .finish()
    }
}

/// One node on a [`VirtualBus`].
///
/// In the timing model, `send` returns once the frame is on the wire and
/// received. A cancelled `send` does not withdraw its frame: like a write
/// the kernel accepted, it stays queued and goes out in turn. Frames of one
/// node leave in the order they were queued; only the oldest one of each
/// node competes in arbitration.
pub struct VirtualNode {
    id: NodeId,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<BusEvent>,
    dropped: Arc<AtomicU64>,
    /// Frames handed over by `try_send` and not yet on the wire (timed
    /// bus): the node's transmit queue, at most [`TX_QUEUE_LEN`].
    tx_queue: VecDeque<oneshot::Receiver<()>>,
}

/// A timed node's transmit queue, as Linux's default `txqueuelen` for a
/// CAN interface.
pub const TX_QUEUE_LEN: usize = 10;

impl VirtualNode {
    /// Puts `frame` on the bus: at once on an untimed bus (`None`), or in
    /// the arbiter's queue, with the receiver released once the frame has
    /// been on the wire.
    fn transmit(&mut self, frame: &CanFrame) -> Result<Option<oneshot::Receiver<()>>, BusError> {
        let (Some(link), Some(bitrate)) = (&self.shared.arbiter, self.shared.bitrate_bps) else {
            let mut st = self.shared.lock();
            st.stats.frames_transmitted += 1;
            st.deliver(Some(self.id), &BusEvent::Frame(*frame));
            return Ok(None);
        };
        self.ensure_arbiter(link, bitrate);
        let (done, finished) = oneshot::channel();
        let request = {
            let mut st = self.shared.lock();
            let seq = st.next_seq;
            st.next_seq += 1;
            TxRequest {
                node: self.id,
                frame: *frame,
                ready_at: st.ready_time(Instant::now()),
                seq,
                done,
            }
        };
        link.tx.send(request).map_err(|_| BusError::Closed)?;
        Ok(Some(finished))
    }

    /// The next queued event, without waiting.
    pub fn try_recv(&mut self) -> Option<BusEvent> {
        self.rx.try_recv().ok()
    }

    /// Frames this node lost to a full receive queue.
    pub fn rx_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn ensure_arbiter(&self, link: &ArbiterLink, bitrate_bps: u32) {
        let rx = link
            .rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(rx) = rx {
            tokio::spawn(run_arbiter(
                rx,
                Arc::downgrade(&self.shared),
                bitrate_bps,
                self.shared.precise,
            ));
        }
    }
}

impl std::fmt::Debug for VirtualNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualNode")
            .field("id", &self.id)
            .field("rx_dropped", &self.rx_dropped())
            .finish()
    }
}

impl Drop for VirtualNode {
    fn drop(&mut self) {
        self.shared.lock().nodes.retain(|n| n.id != self.id);
    }
}

impl CanBus for VirtualNode {
    async fn send(&mut self, frame: &CanFrame) -> Result<(), BusError> {
        match self.transmit(frame)? {
            // Released once the frame has been on the wire.
            Some(finished) => finished.await.map_err(|_| BusError::Closed),
            None => Ok(()),
        }
    }

    fn try_send(&mut self, frame: &CanFrame) -> Result<bool, BusError> {
        // Frames already on the wire leave the queue.
        while let Some(front) = self.tx_queue.front_mut() {
            match front.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => break,
                _ => {
                    self.tx_queue.pop_front();
                }
            }
        }
        if self.tx_queue.len() >= TX_QUEUE_LEN {
            return Ok(false);
        }
        if let Some(finished) = self.transmit(frame)? {
            self.tx_queue.push_back(finished);
        }
        Ok(true)
    }

    fn try_recv(&mut self) -> Option<BusEvent> {
        self.rx.try_recv().ok()
    }

    async fn recv(&mut self) -> Result<BusEvent, BusError> {
        // `mpsc::Receiver::recv` is cancel-safe: a dropped call takes nothing.
        self.rx.recv().await.ok_or(BusError::Closed)
    }
}

/// The wire of a timed bus: picks the next frame by arbitration, holds the
/// bus for its duration, then delivers it and releases the sender.
///
/// Bus time is tracked exactly (`bus_free_at`, `ready_at`) and tokio time
/// only has to catch up with it, which it does on millisecond ticks. The
/// task ends when the last handle on the bus is gone.
async fn run_arbiter(
    mut rx: mpsc::UnboundedReceiver<TxRequest>,
    shared: Weak<Shared>,
    bitrate_bps: u32,
    precise: bool,
) {
    let bit = bits_duration(1, bitrate_bps);
    // One FIFO per node with something to send.
    let mut queues: Vec<(NodeId, VecDeque<TxRequest>)> = Vec::new();
    let mut bus_free_at: Option<Instant> = None;
    loop {
        if queues.is_empty() {
            match rx.recv().await {
                Some(req) => enqueue(&mut queues, req),
                None => return,
            }
        }
        drain(&mut rx, &mut queues);
        let Some(earliest) = queues
            .iter()
            .filter_map(|(_, q)| q.front().map(|r| r.ready_at))
            .min()
        else {
            continue;
        };
        let sof = bus_free_at.map_or(earliest, |free| free.max(earliest));
        // Arbitrate at the end of the start-of-frame bit. Every node whose
        // frame was ready at `sof` joins; with a paused clock tokio only
        // moves past `sof` once all tasks ready at that instant have run,
        // so frames queued "at once" have all arrived.
        wait_until(sof + bit, precise).await;
        drain(&mut rx, &mut queues);
        let Some(winner) = queues
            .iter()
            .enumerate()
            .filter_map(|(i, (_, q))| q.front().map(|r| (i, r)))
            .filter(|(_, r)| r.ready_at <= sof)
            .min_by_key(|(_, r)| (arbitration_key(r.frame.id()), r.seq))
            .map(|(i, _)| i)
        else {
            continue;
        };
        let Some(req) = queues.get_mut(winner).and_then(|(_, q)| q.pop_front()) else {
            continue;
        };
        queues.retain(|(_, q)| !q.is_empty());

        let duration = frame_duration(&req.frame, bitrate_bps);
        let end = sof + duration;
        wait_until(end, precise).await;
        bus_free_at = Some(end);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        {
            let mut st = shared.lock();
            st.stats.frames_transmitted += 1;
            st.stats.busy_time += duration;
            st.deliver(Some(req.node), &BusEvent::Frame(req.frame));
            st.anchor = Some((Instant::now(), end));
        }
        // The sender may have stopped waiting; the frame went out anyway.
        let _ = req.done.send(());
    }
}

/// Sleeps until `t`: on tokio's millisecond ticks, or with `precise` to
/// within one tick and then yielding until the clock has reached `t`.
async fn wait_until(t: Instant, precise: bool) {
    if !precise {
        tokio::time::sleep_until(t).await;
        return;
    }
    const TICK: Duration = Duration::from_millis(1);
    if let Some(coarse) = t.checked_sub(TICK)
        && coarse > Instant::now()
    {
        tokio::time::sleep_until(coarse).await;
    }
    while Instant::now() < t {
        tokio::task::yield_now().await;
    }
}

fn enqueue(queues: &mut Vec<(NodeId, VecDeque<TxRequest>)>, req: TxRequest) {
    match queues.iter_mut().find(|(id, _)| *id == req.node) {
        Some((_, q)) => q.push_back(req),
        None => queues.push((req.node, VecDeque::from([req]))),
    }
}

fn drain(
    rx: &mut mpsc::UnboundedReceiver<TxRequest>,
    queues: &mut Vec<(NodeId, VecDeque<TxRequest>)>,
) {
    while let Ok(req) = rx.try_recv() {
        enqueue(queues, req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::can::{ErrorEvent, ExtendedId, LinkState, StandardId};

    fn ext(id: u32, data: &[u8]) -> CanFrame {
        CanFrame::new(ExtendedId::new(id).unwrap(), data).unwrap()
    }

    fn std_frame(id: u16, data: &[u8]) -> CanFrame {
        CanFrame::new(StandardId::new(id).unwrap(), data).unwrap()
    }

    fn expect_frame(ev: Option<BusEvent>) -> CanFrame {
        match ev {
            Some(BusEvent::Frame(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// CRC-15/CAN over whole bytes, via the same bit step the wire model uses.
    fn crc15_bytes(bytes: &[u8]) -> u16 {
        bytes.iter().fold(0, |crc, &b| {
            (0..8)
                .rev()
                .fold(crc, |c, i| crc15_step(c, (b >> i) & 1 == 1))
        })
    }

    #[test]
    fn crc15_matches_the_catalogued_check_value() {
        // CRC-15/CAN: poly 0x4599, init 0, check("123456789") = 0x059E.
        assert_eq!(crc15_bytes(b"123456789"), 0x059E);
    }

    #[test]
    fn all_zero_standard_frame_has_six_stuff_bits() {
        // SOF, id 0x000, RTR, IDE, r0, DLC 0 and the CRC of 19 zero bits
        // (zero) are 34 dominant bits. A stuff bit follows every fifth:
        // after bits 5, 10, 15, 20, 25 and 30. 34 + 6 + 13 = 53.
        assert_eq!(frame_bits(&std_frame(0x000, &[])), 53);
    }

    #[test]
    fn frame_bits_match_independently_computed_streams() {
        // Reference values from a separate string-based model (bit string
        // built field by field, CRC-15 by polynomial long division, stuffing
        // applied to the string), not from this code.
        //
        // 0x7FF, no data: CRC 0x272F; stuffed stream
        // 0 11111 0 11111 0 1 0 0000 1 00010011100101111 -> 3 stuff bits.
        assert_eq!(frame_bits(&std_frame(0x7FF, &[])), 34 + 3 + 13);
        // A J1939 TP.CM RTS as GB/T sends it (CRC 0x6180): 10 stuff bits,
        // 141 bits, 564 us at 250 kbit/s.
        let rts = ext(
            0x18EC_56F4,
            &[0x10, 0x29, 0x00, 0x06, 0xFF, 0x00, 0x02, 0x00],
        );
        assert_eq!(frame_bits(&rts), 118 + 10 + 13);
        assert_eq!(frame_duration(&rts, 250_000), Duration::from_micros(564));
        // All-ones payload (CRC 0x3DB7): 13 stuff bits.
        assert_eq!(frame_bits(&ext(0x1CEB_56F4, &[0xFF; 8])), 118 + 13 + 13);
    }

    #[test]
    fn frame_bits_stay_within_the_known_bounds() {
        // Worst-case lengths from the CAN schedulability literature:
        // 47 + 8n + floor((34 + 8n - 1) / 4) standard, 67 + 8n +
        // floor((54 + 8n - 1) / 4) extended; 135 and 160 bits for 8 bytes.
        for n in 0..=8usize {
            let data = vec![0u8; n];
            let n = n as u32;
            let s = frame_bits(&std_frame(0, &data));
            let e = frame_bits(&ext(0, &data));
            assert!((47 + 8 * n..=47 + 8 * n + (33 + 8 * n) / 4).contains(&s));
            assert!((67 + 8 * n..=67 + 8 * n + (53 + 8 * n) / 4).contains(&e));
        }
    }

    #[test]
    fn duration_is_bits_times_bit_time() {
        let f = ext(0x1CEB_56F4, &[0xFF; 8]);
        let bits = frame_bits(&f);
        assert_eq!(
            frame_duration(&f, 250_000),
            Duration::from_micros(4 * u64::from(bits))
        );
        assert_eq!(frame_duration(&f, 0), Duration::MAX);
        // 1 bit at 3 bit/s is 333 333 333.3 ns: rounded up.
        assert_eq!(bits_duration(1, 3), Duration::from_nanos(333_333_334));
    }

    #[test]
    fn arbitration_order_follows_the_wire() {
        let std_100 = CanId::Standard(StandardId::new(0x100).unwrap());
        // Same base identifier 0x100 as an extended id: 0x100 << 18.
        let ext_same_base = CanId::Extended(ExtendedId::new(0x100 << 18).unwrap());
        let ext_lower_base = CanId::Extended(ExtendedId::new(0x0FF << 18 | 0x3_FFFF).unwrap());
        assert!(arbitration_key(std_100) < arbitration_key(ext_same_base));
        assert!(arbitration_key(ext_lower_base) < arbitration_key(std_100));
        let a = CanId::Extended(ExtendedId::new(0x18EC_56F4).unwrap());
        let b = CanId::Extended(ExtendedId::new(0x18EC_56F5).unwrap());
        assert!(arbitration_key(a) < arbitration_key(b));
    }

    #[tokio::test]
    async fn broadcast_reaches_every_other_node_and_own_frames_only_on_request() {
        let bus = VirtualBus::new();
        let mut a = bus.node();
        let mut b = bus.node_with(NodeOptions {
            receive_own: true,
            ..NodeOptions::default()
        });
        let mut c = bus.node();

        let f1 = ext(0x1826_F456, &[1, 2, 3]);
        a.send(&f1).await.unwrap();
        assert_eq!(a.try_recv(), None, "a must not hear itself");
        assert_eq!(expect_frame(b.try_recv()), f1);
        assert_eq!(expect_frame(c.try_recv()), f1);

        let f2 = std_frame(0x123, &[]);
        b.send(&f2).await.unwrap();
        assert_eq!(expect_frame(a.try_recv()), f2);
        assert_eq!(expect_frame(b.try_recv()), f2, "b asked for its own frames");
        assert_eq!(expect_frame(c.try_recv()), f2);

        let stats = bus.stats();
        assert_eq!(stats.frames_transmitted, 2);
        assert_eq!(stats.frames_delivered, 5);
        assert_eq!(stats.busy_time, Duration::ZERO);
    }

    #[tokio::test]
    async fn untimed_bus_keeps_send_order() {
        let bus = VirtualBus::new();
        let mut a = bus.node();
        let mut b = bus.node();
        let mut rx = bus.node();
        // Higher-priority ids sent later must not overtake without timing.
        a.send(&ext(0x1FFF_FFFF, &[1])).await.unwrap();
        b.send(&std_frame(0x000, &[2])).await.unwrap();
        a.send(&ext(0x0000_0001, &[3])).await.unwrap();
        let got: Vec<u8> = (0..3)
            .map(|_| expect_frame(rx.try_recv()).data()[0])
            .collect();
        assert_eq!(got, [1, 2, 3]);
    }

    #[tokio::test]
    async fn full_rx_queue_drops_and_counts_without_blocking_others() {
        let bus = VirtualBus::new();
        let mut tx = bus.node();
        let mut slow = bus.node_with(NodeOptions {
            receive_own: false,
            rx_queue: 2,
        });
        let mut fast = bus.node();
        for i in 0..5u8 {
            tx.send(&ext(0x100, &[i])).await.unwrap();
        }
        assert_eq!(expect_frame(slow.try_recv()).data(), [0]);
        assert_eq!(expect_frame(slow.try_recv()).data(), [1]);
        assert_eq!(slow.try_recv(), None);
        assert_eq!(slow.rx_dropped(), 3);
        for i in 0..5u8 {
            assert_eq!(expect_frame(fast.try_recv()).data(), [i]);
        }
        assert_eq!(bus.stats().frames_dropped, 3);
        assert_eq!(bus.stats().frames_delivered, 7);
    }

    #[tokio::test]
    async fn dropped_nodes_leave_the_bus() {
        let bus = VirtualBus::new();
        let mut a = bus.node();
        let b = bus.node();
        drop(b);
        a.send(&ext(1, &[])).await.unwrap();
        assert_eq!(bus.stats().frames_delivered, 0);
    }

    #[tokio::test]
    async fn injected_events_reach_every_node() {
        let bus = VirtualBus::new();
        let mut a = bus.node();
        let mut b = bus.node();
        bus.inject(BusEvent::Link(LinkState::Down));
        bus.inject(BusEvent::Error(ErrorEvent::BusOff));
        for n in [&mut a, &mut b] {
            assert_eq!(n.try_recv(), Some(BusEvent::Link(LinkState::Down)));
            assert_eq!(n.try_recv(), Some(BusEvent::Error(ErrorEvent::BusOff)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn recv_is_cancel_safe() {
        let bus = VirtualBus::new();
        let mut tx = bus.node();
        let mut rx = bus.node();
        let mut got = Vec::new();
        for i in 0..50u8 {
            // A recv that times out before anything arrives is dropped
            // mid-wait; it must not swallow the frame sent afterwards.
            let timed_out = tokio::time::timeout(Duration::from_millis(1), rx.recv()).await;
            assert!(timed_out.is_err());
            tx.send(&ext(0x200, &[i])).await.unwrap();
            // Poll recv once more with a zero budget on odd rounds: it either
            // completes or is cancelled, never loses the frame.
            if i % 2 == 1
                && let Ok(ev) = tokio::time::timeout(Duration::ZERO, rx.recv()).await
            {
                got.push(expect_frame(Some(ev.unwrap())).data()[0]);
                continue;
            }
            got.push(expect_frame(Some(rx.recv().await.unwrap())).data()[0]);
        }
        assert_eq!(got, (0..50).collect::<Vec<u8>>());
    }

    #[tokio::test(start_paused = true)]
    async fn timed_frames_take_the_sum_of_their_durations() {
        let bus = VirtualBus::with_timing(250_000);
        let mut tx = bus.node();
        let mut rx = bus.node();
        let frames: Vec<CanFrame> = (0..40u8)
            .map(|i| {
                ext(
                    0x1CEB_56F4,
                    &[i, i.wrapping_mul(37), 0xFF, 0, 0x55, 0xAA, i, 1],
                )
            })
            .collect();
        let expected: Duration = frames.iter().map(|f| frame_duration(f, 250_000)).sum();

        let start = Instant::now();
        for f in &frames {
            tx.send(f).await.unwrap();
        }
        let elapsed = start.elapsed();
        // The model's own clock is exact; tokio's timer fires on millisecond
        // ticks, so the last completion may land up to 1 ms later.
        assert_eq!(bus.stats().busy_time, expected);
        assert!(elapsed >= expected, "{elapsed:?} < {expected:?}");
        assert!(
            elapsed <= expected + Duration::from_millis(1),
            "{elapsed:?} vs {expected:?}"
        );
        for f in &frames {
            assert_eq!(expect_frame(rx.try_recv()), *f);
        }
        assert_eq!(rx.try_recv(), None);
    }

    /// On a real clock (a paused one would never move), the precise bus
    /// keeps the model: arbitration order, exact busy time, and no frame
    /// delivered before its time on the wire has passed.
    #[tokio::test]
    async fn precise_timing_keeps_the_model_on_a_real_clock() {
        // A slow bus (5 kbit/s: 26 ms per frame) so that queuing the other
        // 19 frames takes far less than the first frame's time on the wire
        // even on a slow CPU or under emulation. At 250 kbit/s (0.5 ms) an
        // emulated ARM queued them after the first had finished, and the
        // order rightly became first come, first served.
        const BITRATE: u32 = 5_000;
        let bus = VirtualBus::with_precise_timing(BITRATE);
        let mut listener = bus.node();
        let frames: Vec<CanFrame> = (0..20u8)
            .map(|i| {
                ext(
                    0x1800_0000 | u32::from(20 - i),
                    &[i, 0xA5, i, 0, 0xFF, 1, 2, 3],
                )
            })
            .collect();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for f in frames.clone() {
            let mut node = bus.node();
            tasks.push(tokio::spawn(async move { node.send(&f).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let elapsed = start.elapsed();
        let expected: Duration = frames.iter().map(|f| frame_duration(f, BITRATE)).sum();
        assert_eq!(bus.stats().busy_time, expected);
        assert!(elapsed >= expected, "{elapsed:?} < {expected:?}");
        // The first frame queued has the idle bus to itself; the others,
        // queued while it is on the wire, then go lowest identifier first
        // (they were built in reverse order).
        let order: Vec<u8> = (0..20)
            .map(|_| expect_frame(listener.try_recv()).data()[0])
            .collect();
        let mut rest: Vec<u8> = (0..20).rev().filter(|&i| i != order[0]).collect();
        rest.insert(0, order[0]);
        assert_eq!(order, rest);
    }

    #[tokio::test(start_paused = true)]
    async fn timed_send_blocks_until_transmitted() {
        let bus = VirtualBus::with_timing(125_000);
        let mut tx = bus.node();
        let mut rx = bus.node();
        let f = ext(0x1826_F456, &[0; 8]);
        let d = frame_duration(&f, 125_000);
        assert!(d > Duration::from_micros(1000), "{d:?}");
        let start = Instant::now();
        let send = tx.send(&f);
        tokio::pin!(send);
        // Not done before the frame's duration has passed.
        assert!(
            tokio::time::timeout(d - Duration::from_micros(1), &mut send)
                .await
                .is_err()
        );
        assert_eq!(rx.try_recv(), None, "nothing arrives mid-frame");
        send.await.unwrap();
        assert!(start.elapsed() >= d);
        assert_eq!(expect_frame(rx.try_recv()), f);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_queued_at_once_go_out_in_arbitration_order() {
        let bus = VirtualBus::with_timing(250_000);
        let mut listener = bus.node();
        let frames = [
            ext(0x18FF_5000, &[1]),
            std_frame(0x101, &[2]),
            ext(0x030 << 18 | 0x1234, &[3]), // base id 0x030: beats every other here
            ext(0x100 << 18, &[4]),          // base id 0x100, extended
            std_frame(0x100, &[5]),          // base id 0x100, standard: beats the above
        ];
        let mut tasks = Vec::new();
        for f in frames {
            let mut node = bus.node();
            tasks.push(tokio::spawn(async move { node.send(&f).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let order: Vec<u8> = (0..5)
            .map(|_| expect_frame(listener.try_recv()).data()[0])
            .collect();
        assert_eq!(order, [3, 5, 4, 2, 1]);
        let total: Duration = frames.iter().map(|f| frame_duration(f, 250_000)).sum();
        assert_eq!(bus.stats().busy_time, total);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_ready_at_the_same_instant_arbitrate_even_if_queued_one_after_another() {
        // `b` is only woken after `a` has queued, so the arbiter sees `a`'s
        // frame alone first. Both are ready at the same instant, though, so
        // `b`'s higher-priority frame must win.
        let bus = VirtualBus::with_timing(250_000);
        let mut listener = bus.node();
        let mut a = bus.node();
        let mut b = bus.node();
        let low = ext(0x1FFF_0000, &[1]);
        let high = ext(0x0000_0001, &[2]);
        let (go, wait) = oneshot::channel::<()>();
        let b_task = tokio::spawn(async move {
            wait.await.unwrap();
            b.send(&high).await
        });
        tokio::task::yield_now().await; // b now waits on the trigger
        let a_send = a.send(&low);
        tokio::pin!(a_send);
        assert!(
            futures_poll_once(&mut a_send).await.is_none(),
            "queued, not sent"
        );
        go.send(()).unwrap();
        a_send.await.unwrap();
        b_task.await.unwrap().unwrap();
        assert_eq!(expect_frame(listener.try_recv()), high);
        assert_eq!(expect_frame(listener.try_recv()), low);
    }

    /// Polls a future once; `None` if it is still pending.
    async fn futures_poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_bus_arbitrates_among_frames_queued_meanwhile() {
        let bus = VirtualBus::with_timing(250_000);
        let mut listener = bus.node();
        let mut first = bus.node();
        let busy = ext(0x1FFF_FFFF, &[0; 8]);
        let sending = tokio::spawn(async move { first.send(&busy).await });
        // Let the first frame take the bus, then queue three more.
        tokio::time::sleep(Duration::from_micros(1)).await;
        let mut tasks = Vec::new();
        for (id, tag) in [(0x300u32, 1u8), (0x200, 2), (0x100, 3)] {
            let mut node = bus.node();
            let f = ext(id, &[tag]);
            tasks.push(tokio::spawn(async move { node.send(&f).await }));
        }
        sending.await.unwrap().unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            expect_frame(listener.try_recv()),
            busy,
            "started first, finishes first"
        );
        let order: Vec<u8> = (0..3)
            .map(|_| expect_frame(listener.try_recv()).data()[0])
            .collect();
        assert_eq!(order, [3, 2, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_sends_its_frames_in_order_and_cancelled_sends_still_go_out() {
        let bus = VirtualBus::with_timing(250_000);
        let mut listener = bus.node();
        let mut node = bus.node();
        let low_priority = ext(0x1FFF_0000, &[1]);
        let high_priority = ext(0x0000_0001, &[2]);
        // Queue the first frame and stop waiting for it.
        tokio::select! {
            biased;
            r = node.send(&low_priority) => panic!("cannot be sent instantly: {r:?}"),
            () = std::future::ready(()) => {}
        }
        node.send(&high_priority).await.unwrap();
        // Within one node, queue order wins over identifier priority.
        assert_eq!(expect_frame(listener.try_recv()), low_priority);
        assert_eq!(expect_frame(listener.try_recv()), high_priority);
    }

    #[tokio::test(start_paused = true)]
    async fn receivers_answering_at_once_start_back_to_back() {
        // A request/response exchange: each answer is queued the moment the
        // request is received, so the bus never idles in between.
        let bus = VirtualBus::with_timing(250_000);
        let mut a = bus.node();
        let mut b = bus.node();
        let req = ext(0x1801_56F4, &[0; 8]);
        let resp = ext(0x1802_F456, &[0; 8]);
        let responder = tokio::spawn(async move {
            for _ in 0..10 {
                let f = expect_frame(Some(b.recv().await.unwrap()));
                assert_eq!(f, req);
                b.send(&resp).await.unwrap();
            }
        });
        let start = Instant::now();
        for _ in 0..10 {
            a.send(&req).await.unwrap();
            assert_eq!(expect_frame(Some(a.recv().await.unwrap())), resp);
        }
        responder.await.unwrap();
        let expected = (frame_duration(&req, 250_000) + frame_duration(&resp, 250_000)) * 10;
        assert_eq!(bus.stats().busy_time, expected);
        let elapsed = start.elapsed();
        assert!(elapsed >= expected && elapsed <= expected + Duration::from_millis(1));
    }
}
