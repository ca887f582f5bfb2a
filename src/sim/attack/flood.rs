//! A node on the inlet bus that sends junk back to back: the attack suite's
//! flood (`bmsgw sim flood`, `tests/system/attack_flood.rs`).
//!
//! [`Junk`] makes every kind of frame a pile-side attacker could send at the
//! bridge, from a seed so a failing run can be repeated: random identifiers
//! and bodies, standard ids, PGNs outside the pile's allowlist, the BMS's or
//! the gateway's address as source, charger messages that do not decode,
//! valid charger messages faster than the rate limit, and transport abuse
//! (RTS and BAM for 1785 bytes from any address, CTS, EndOfMsgAck, Abort and
//! TP.DT out of any session).
//!
//! [`flood`] sends them as fast as the bus takes them. On the in-process bus
//! with the timing model, `send` returns once the frame is on the wire, so
//! back to back is exactly 100% bus load. On SocketCAN (vcan has no bit
//! rate) it paces itself to the wire time of each frame at a given bit rate,
//! which is 100% load of a real bus at that rate.

use std::time::Duration;

use crate::can::virtual_bus::frame_duration;
use crate::can::{BusError, CanBus, CanFrame, CanId, ExtendedId, StandardId};
use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS, MessageKind};
use crate::j1939::tp::{Cm, MAX_TP_LEN, TP_CM, TP_DT};
use crate::j1939::{Address, J1939Id, Pgn, Priority};

/// The gateway's default address (its authentication node).
const GATEWAY_ADDRESS: u8 = crate::gateway::vehicle_auth::DEFAULT_VEHICLE_ADDRESS;

/// A small, fast, seeded generator (xorshift64*): the flood must be
/// reproducible, not unpredictable.
#[derive(Clone, Debug)]
pub struct Junk {
    state: u64,
    /// PGNs the pile may send to the BMS, for the "allowed but abusive" kinds.
    allowed: Vec<Pgn>,
}

/// What [`flood`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodReport {
    pub frames: u64,
    /// Wire time of those frames at the flood's bit rate.
    pub wire_time: Duration,
    /// Frames the bus refused (SocketCAN: buffer full).
    pub send_errors: u64,
}

impl Junk {
    pub fn new(seed: u64) -> Self {
        let allowed = crate::gateway::firewall::default_pile_to_bms()
            .into_iter()
            .collect();
        Junk {
            // xorshift's state must not be zero.
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
            allowed,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    /// Any address a node might claim, weighted towards the ones that matter.
    fn address(&mut self) -> Address {
        Address(match self.below(4) {
            0 => CHARGER_ADDRESS,
            1 => [BMS_ADDRESS, GATEWAY_ADDRESS, 0xFF][usize::from(self.byte() % 3)],
            _ => self.byte(),
        })
    }

    fn frame(
        &mut self,
        priority: u8,
        pgn: Pgn,
        src: Address,
        dst: Address,
        data: &[u8],
    ) -> CanFrame {
        let priority = Priority::new(priority & 7).unwrap_or(Priority::LOWEST);
        let id = J1939Id::new(priority, pgn, src, dst).to_can_id();
        CanFrame::new(id, data).unwrap_or_else(|_| CanFrame::new(id, &[]).expect("empty body"))
    }

    fn tp_cm(&mut self, cm: Cm) -> CanFrame {
        let (src, dst) = (self.address(), self.address());
        let p = self.byte();
        self.frame(p, TP_CM, src, dst, &cm.encode())
    }

    fn any_pgn(&mut self) -> Pgn {
        // 18 bits: EDP, DP, PF, PS; `Pgn::new` refuses the few invalid ones.
        Pgn::new(u32::try_from(self.below(1 << 18)).unwrap_or(0)).unwrap_or(TP_DT)
    }

    /// The next junk frame.
    pub fn next_frame(&mut self) -> CanFrame {
        let big = u16::try_from(MAX_TP_LEN).unwrap_or(u16::MAX);
        match self.below(12) {
            // Anything at all with a 29-bit id.
            0 | 1 => {
                let raw = u32::try_from(self.below(1 << 29)).unwrap_or(0);
                let len = usize::try_from(self.below(9)).unwrap_or(8);
                let data = self.bytes(len);
                let id = ExtendedId::new(raw & ExtendedId::MAX).expect("masked to 29 bits");
                CanFrame::new(CanId::Extended(id), &data).expect("at most 8 bytes")
            }
            // Standard ids: never J1939.
            2 => {
                let raw = u16::try_from(self.below(0x800)).unwrap_or(0);
                let data = self.bytes(8);
                let id = StandardId::new(raw & StandardId::MAX).expect("masked to 11 bits");
                CanFrame::new(CanId::Standard(id), &data).expect("8 bytes")
            }
            // From the pile's own address, any PGN, to the BMS.
            3 => {
                let pgn = self.any_pgn();
                let data = self.bytes(8);
                let p = self.byte();
                self.frame(
                    p,
                    pgn,
                    Address(CHARGER_ADDRESS),
                    Address(BMS_ADDRESS),
                    &data,
                )
            }
            // An allowed charger PGN with a random body (mostly undecodable),
            // or a replayed valid-looking one, from the pile or spoofed.
            4 | 5 => {
                let i = usize::try_from(self.below(self.allowed.len() as u64)).unwrap_or(0);
                let pgn = self.allowed.get(i).copied().unwrap_or(TP_DT);
                let len = usize::try_from(self.below(9)).unwrap_or(8);
                let data = self.bytes(len);
                let (src, dst) = (self.address(), self.address());
                let p = self.byte();
                self.frame(p, pgn, src, dst, &data)
            }
            // RTS for 1785 bytes, any PGN (often allowed ones), any address.
            6 | 7 => {
                let pgn = if self.below(2) == 0 {
                    let i = usize::try_from(self.below(self.allowed.len() as u64)).unwrap_or(0);
                    self.allowed.get(i).copied().unwrap_or(TP_DT)
                } else {
                    self.any_pgn()
                };
                let cm = if self.below(3) == 0 {
                    Cm::Bam {
                        size: big,
                        packets: 255,
                        pgn,
                    }
                } else {
                    Cm::Rts {
                        size: big,
                        packets: 255,
                        max_per_cts: 0xFF,
                        pgn,
                    }
                };
                self.tp_cm(cm)
            }
            // CTS, EndOfMsgAck and Abort out of any session.
            8 => {
                let pgn = self.any_pgn();
                let cm = match self.below(3) {
                    0 => Cm::cts(self.byte(), self.byte(), pgn),
                    1 => Cm::EndOfMsgAck {
                        size: big,
                        packets: 255,
                        pgn,
                    },
                    _ => Cm::Abort {
                        reason: crate::j1939::tp::AbortReason::from_u8(self.byte()),
                        pgn,
                    },
                };
                self.tp_cm(cm)
            }
            // TP.DT storms: any sequence number, any address.
            9 | 10 => {
                let data = self.bytes(8);
                let (src, dst) = (self.address(), self.address());
                self.frame(7, TP_DT, src, dst, &data)
            }
            // Valid CML from the pile, far over the rate limit.
            _ => {
                let pgn = MessageKind::Cml.pgn();
                let cml = [0x4C, 0x1D, 0xD0, 0x07, 0x3C, 0x0F, 0xA0, 0x0F];
                self.frame(6, pgn, Address(CHARGER_ADDRESS), Address(BMS_ADDRESS), &cml)
            }
        }
    }
}

/// Send [`Junk`] on `bus` until `stop` resolves, back to back. With
/// `pace_bitrate`, wait out each frame's wire time at that rate (SocketCAN);
/// without, rely on the bus for back-pressure (the timed in-process bus).
pub async fn flood<B: CanBus>(
    bus: &mut B,
    junk: &mut Junk,
    pace_bitrate: Option<u32>,
    stop: impl std::future::Future<Output = ()>,
) -> FloodReport {
    let mut stop = std::pin::pin!(stop);
    let mut report = FloodReport::default();
    let start = tokio::time::Instant::now();
    // The wire time of everything sent so far is when the next frame may go.
    let mut due = start;
    loop {
        let frame = junk.next_frame();
        let wire = frame_duration(&frame, pace_bitrate.unwrap_or(250_000));
        let send = async {
            if pace_bitrate.is_some() && due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            bus.send(&frame).await
        };
        tokio::select! {
            biased;
            () = &mut stop => return report,
            r = send => match r {
                Ok(()) => {
                    report.frames += 1;
                    report.wire_time += wire;
                }
                Err(BusError::Closed) => return report,
                Err(_) => report.send_errors += 1,
            },
        }
        due += wire;
    }
}
