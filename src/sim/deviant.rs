//! Test peers that deviate from GB/T 27930 and J1939-21 the way field
//! equipment does (docs/interop.md): a BMS or a charger that is otherwise
//! the standard role, with chosen [`Quirk`]s on top.
//!
//! They exist to show that bmsgw's simulators and its gateway meet each
//! deviation as their profile says. Nothing in bmsgw sends a deviation
//! itself: these peers are reachable only from tests, never from the CLI.
//! (The VM lane's independent peers, written in Python on raw SocketCAN,
//! are in `tests/vcan/peers/`.)
//!
//! A [`DeviantPeer`] wraps a role with its own J1939 transport, sans-IO like
//! [`Node`](crate::gbt27930::node::Node), and bends what goes in and out:
//! messages before they are segmented, TP.CM frames after, and the pacing
//! of data packets. [`run`] drives one on a bus.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use tracing::debug;

use crate::can::{BusEvent, CanBus, CanFrame};
use crate::gbt27930::bms::{Bms, BmsConfig};
use crate::gbt27930::charger::{Charger, ChargerConfig};
use crate::gbt27930::messages::{Bcp, Bem, Bits2, Message, MessageKind, Readiness};
use crate::gbt27930::session::{Outcome, Role, SessionEvent};
use crate::gbt27930::units::Current;
use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS};
use crate::interop::{Deviation, Profile};
use crate::j1939::tp::{J1939Message, TP_CM, TP_DT, TpConfig, TpEvent, Transport};
use crate::j1939::{Address, J1939Id};
use crate::time::{Clock, Timestamp};

/// One way a field peer deviates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quirk {
    /// BMS: reads TP.CM_CTS bytes 4–5 as the milliseconds to wait before
    /// each data packet (0xFFFF included: 65 s).
    CtsIntervalReader,
    /// BMS: BHM carries version bytes `01 01` (25.7 V).
    BhmVersionBytes,
    /// BMS: BCP once, right after the first BRM, before CRM(0xAA), and never again.
    BcpOnceEarly,
    /// BMS: no BCL until the first CCS has come.
    BclWaitsForCcs,
    /// BMS: one BEM with only the CCS timeout on CRO(0xAA), then on as normal.
    EarlyBemCcs,
    /// Either side: charging current counted positive (raw 4000 + 10·A).
    PositiveCurrent,
    /// BMS: BCS in one 8-byte frame.
    BcsSingleFrame,
    /// Charger: CTS bytes 4–5 carry this packet interval in ms.
    CtsPacketInterval(u16),
    /// Charger: CTS without the PGN (all 0xFF and all 0x00 in turn).
    CtsWithoutPgn,
}

impl Quirk {
    /// Every quirk a BMS can show.
    pub const BMS: [Quirk; 7] = [
        Quirk::CtsIntervalReader,
        Quirk::BhmVersionBytes,
        Quirk::BcpOnceEarly,
        Quirk::BclWaitsForCcs,
        Quirk::EarlyBemCcs,
        Quirk::PositiveCurrent,
        Quirk::BcsSingleFrame,
    ];
    /// Every quirk a charger can show.
    pub const CHARGER: [Quirk; 3] = [
        Quirk::CtsPacketInterval(10),
        Quirk::CtsWithoutPgn,
        Quirk::PositiveCurrent,
    ];

    /// The deviation the quirk shows on the wire. A CTS-interval reader
    /// shows none: it only reads what it is sent.
    pub fn deviation(self) -> Option<Deviation> {
        Some(match self {
            Quirk::CtsIntervalReader => return None,
            Quirk::BhmVersionBytes => Deviation::BhmImplausible,
            Quirk::BcpOnceEarly => Deviation::BcpBeforeRecognition,
            Quirk::BclWaitsForCcs => Deviation::BclWaitsForCcs,
            Quirk::EarlyBemCcs => Deviation::EarlyCcsTimeout,
            Quirk::PositiveCurrent => Deviation::PositiveCurrent,
            Quirk::BcsSingleFrame => Deviation::BcsSingleFrame,
            Quirk::CtsPacketInterval(_) => Deviation::CtsPacketInterval,
            Quirk::CtsWithoutPgn => Deviation::CtsWithoutPgn,
        })
    }
}

/// A BMS with `quirks`, otherwise the standard role with its default
/// battery; it charges until the charger stops.
pub fn bms(quirks: &[Quirk]) -> DeviantPeer<Bms> {
    let mut bms = Bms::new(BmsConfig::default());
    bms.start(Timestamp::ZERO);
    let bcp = bms.charging_parameters();
    DeviantPeer::new(
        bms,
        Address(BMS_ADDRESS),
        Address(CHARGER_ADDRESS),
        quirks,
        bcp,
    )
}

/// A charger with `quirks`, otherwise the standard role as most field
/// chargers play it (it waits for the first BCL before CCS); it stops after
/// `charging` in the charging phase.
pub fn charger(quirks: &[Quirk], charging: Duration) -> DeviantPeer<Charger> {
    let mut charger = Charger::new(ChargerConfig {
        max_charging_time: Some(charging),
        profile: Profile::Strict,
        ..ChargerConfig::default()
    });
    charger.start(Timestamp::ZERO);
    DeviantPeer::new(
        charger,
        Address(CHARGER_ADDRESS),
        Address(BMS_ADDRESS),
        quirks,
        None,
    )
}

/// A role with quirks, on its own transport.
#[derive(Debug)]
pub struct DeviantPeer<R> {
    role: R,
    tp: Transport,
    peer: Address,
    quirks: Vec<Quirk>,
    /// What the BMS would say in BCP (for [`Quirk::BcpOnceEarly`]).
    bcp: Option<Bcp>,
    bcp_sent: bool,
    ccs_seen: bool,
    bem_sent: bool,
    /// CTS interval read by [`Quirk::CtsIntervalReader`], and when the next
    /// data packet may go.
    dt_gap: Duration,
    next_dt_at: Timestamp,
    /// Frames ready, and data packets held back until their time.
    ready: VecDeque<CanFrame>,
    held: VecDeque<(Timestamp, CanFrame)>,
    cts_count: u32,
    outcome: Option<Outcome>,
}

impl<R: Role> DeviantPeer<R> {
    /// `bcp` is what a BMS with [`Quirk::BcpOnceEarly`] sends early.
    pub fn new(role: R, local: Address, peer: Address, quirks: &[Quirk], bcp: Option<Bcp>) -> Self {
        DeviantPeer {
            role,
            tp: Transport::new(TpConfig::gbt27930(), local),
            peer,
            quirks: quirks.to_vec(),
            bcp,
            bcp_sent: false,
            ccs_seen: false,
            bem_sent: false,
            dt_gap: Duration::ZERO,
            next_dt_at: Timestamp::ZERO,
            ready: VecDeque::new(),
            held: VecDeque::new(),
            cts_count: 0,
            outcome: None,
        }
    }

    pub fn role_mut(&mut self) -> &mut R {
        &mut self.role
    }

    fn has(&self, q: Quirk) -> bool {
        self.quirks.contains(&q)
    }

    pub fn handle_frame(&mut self, frame: &CanFrame, now: Timestamp) {
        if self.has(Quirk::CtsIntervalReader)
            && let Ok(id) = J1939Id::from_can_id(frame.id())
            && id.pgn == TP_CM
            && id.destination == self.tp.local()
            && let [17, _, _, lo, hi, ..] = frame.data()
        {
            self.dt_gap = Duration::from_millis(u64::from(u16::from_le_bytes([*lo, *hi])));
            self.next_dt_at = now + self.dt_gap;
        }
        self.tp.handle_frame(frame, now);
        self.process(now);
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.tp.handle_timeout(now);
        self.role.handle_timeout(now);
        self.process(now);
    }

    /// The next frame due at `now`.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<CanFrame> {
        while let Some(frame) = self.tp.poll_transmit() {
            self.outgoing(frame);
        }
        if let Some(f) = self.ready.pop_front() {
            return Some(f);
        }
        match self.held.front() {
            Some((at, _)) if *at <= now => self.held.pop_front().map(|(_, f)| f),
            _ => None,
        }
    }

    pub fn poll_timeout(&self) -> Option<Timestamp> {
        [
            self.tp.poll_timeout(),
            self.role.poll_timeout(),
            self.held.front().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// How the role's session ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    fn process(&mut self, now: Timestamp) {
        loop {
            let mut progressed = false;
            while let Some(ev) = self.tp.poll_event() {
                progressed = true;
                match ev {
                    TpEvent::Received(m) if m.source == self.peer => self.incoming(m, now),
                    // Right after BRM's last packet, as the field BMS does.
                    TpEvent::Sent { pgn, .. }
                        if pgn == MessageKind::Brm.pgn()
                            && self.has(Quirk::BcpOnceEarly)
                            && !self.bcp_sent =>
                    {
                        self.bcp_sent = true;
                        if let Some(bcp) = self.bcp.clone() {
                            self.send(Message::Bcp(bcp), false, now);
                        }
                    }
                    _ => {}
                }
            }
            while let Some(msg) = self.role.poll_message() {
                progressed = true;
                self.send(msg, true, now);
            }
            while let Some(ev) = self.role.poll_event() {
                progressed = true;
                if let SessionEvent::Finished(outcome) = ev {
                    self.outcome = Some(outcome);
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn incoming(&mut self, m: J1939Message, now: Timestamp) {
        let Ok(msg) = Message::decode(m.pgn, &m.data) else {
            return;
        };
        match &msg {
            Message::Ccs(_) => self.ccs_seen = true,
            Message::Cro(cro)
                if cro.ready == Readiness::Ready
                    && self.has(Quirk::EarlyBemCcs)
                    && !self.bem_sent =>
            {
                // The CCS timer ran from CHM and nobody reset it.
                self.bem_sent = true;
                let bem = Bem {
                    ccs_timeout: Bits2::SET,
                    ..Bem::default()
                };
                self.send(Message::Bem(bem), false, now);
            }
            _ => {}
        }
        self.role.handle_message(msg, now);
    }

    /// A message (the role's own, or one the quirks add), bent by the
    /// quirks, to the transport.
    fn send(&mut self, mut msg: Message, from_role: bool, now: Timestamp) {
        let positive = self.has(Quirk::PositiveCurrent);
        let flip = |c: &mut Current| c.0 = 8000u16.saturating_sub(c.0);
        match &msg {
            // Only the early copy goes out, never the role's own BCPs.
            Message::Bcp(_) if from_role && self.has(Quirk::BcpOnceEarly) => return,
            Message::Bcl(_) if self.has(Quirk::BclWaitsForCcs) && !self.ccs_seen => return,
            _ => {}
        }
        if positive {
            match &mut msg {
                Message::Bcp(b) => flip(&mut b.max_charging_current),
                Message::Bcl(b) => flip(&mut b.current_demand),
                Message::Bcs(b) => flip(&mut b.measured_current),
                Message::Cml(c) => {
                    flip(&mut c.max_output_current);
                    if let Some(min) = c.min_output_current.as_mut() {
                        flip(min);
                    }
                }
                Message::Ccs(c) => flip(&mut c.output_current),
                _ => {}
            }
        }
        let kind = msg.kind();
        let mut data = msg.encode();
        match kind {
            MessageKind::Bhm if self.has(Quirk::BhmVersionBytes) => data = vec![0x01, 0x01],
            MessageKind::Bcs if self.has(Quirk::BcsSingleFrame) => data.truncate(8),
            _ => {}
        }
        let out = J1939Message {
            priority: kind.priority(),
            pgn: kind.pgn(),
            source: self.tp.local(),
            destination: self.peer,
            data,
        };
        if let Err(e) = self.tp.send(out, now) {
            debug!(message = %kind, error = %e, "deviant peer: not sent");
        }
    }

    /// A frame from the transport, bent by the TP quirks.
    fn outgoing(&mut self, mut frame: CanFrame) {
        let Ok(id) = J1939Id::from_can_id(frame.id()) else {
            self.ready.push_back(frame);
            return;
        };
        if id.pgn == TP_CM && frame.data().first() == Some(&17) {
            let mut data = [0u8; 8];
            data.copy_from_slice(frame.data());
            for q in &self.quirks {
                match *q {
                    Quirk::CtsPacketInterval(ms) => {
                        let [lo, hi] = ms.to_le_bytes();
                        data[3] = lo;
                        data[4] = hi;
                    }
                    Quirk::CtsWithoutPgn => {
                        let fill = if self.cts_count.is_multiple_of(2) {
                            0xFF
                        } else {
                            0x00
                        };
                        data[5..8].fill(fill);
                    }
                    _ => {}
                }
            }
            self.cts_count += 1;
            if let Ok(f) = CanFrame::new(frame.id(), &data) {
                frame = f;
            }
        }
        if id.pgn == TP_DT && self.has(Quirk::CtsIntervalReader) && !self.dt_gap.is_zero() {
            let at = self.next_dt_at;
            self.next_dt_at = at + self.dt_gap;
            self.held.push_back((at, frame));
            return;
        }
        self.ready.push_back(frame);
    }
}

/// Runs `peer` on `bus` until its role's session ends or `shutdown`: the
/// outcome, or `None` when shut down first.
pub async fn run<B: CanBus, R: Role>(
    bus: &mut B,
    peer: &mut DeviantPeer<R>,
    shutdown: impl Future<Output = ()>,
) -> Option<Outcome> {
    let clock = Clock::new();
    let mut shutdown = std::pin::pin!(shutdown);
    peer.handle_timeout(clock.now());
    loop {
        while let Some(frame) = peer.poll_transmit(clock.now()) {
            let _ = bus.send(&frame).await;
        }
        if let Some(outcome) = peer.outcome() {
            return Some(outcome.clone());
        }
        tokio::select! {
            biased;
            () = &mut shutdown => return None,
            ev = bus.recv() => match ev {
                Ok(BusEvent::Frame(frame)) => peer.handle_frame(&frame, clock.now()),
                Ok(_) => {}
                Err(_) => return None,
            },
            () = clock.sleep_until(peer.poll_timeout()) => peer.handle_timeout(clock.now()),
        }
    }
}
