//! The bus-time lower bound of one authorization, from the frames the
//! session actually exchanged (sans-IO: captured frames in, durations out).
//!
//! The latency is measured on the pile's bus from the end of the pile's
//! first CRM(0x00) to the end of its CRM(0xAA). Two chains of frames must
//! fit in between, and the pile's bus carries one frame at a time:
//!
//! - **authentication** (pile bus): the AuthRequest, AuthChallenge and
//!   AuthConfirm transfers, each with its TP flow control (RTS, CTS, every
//!   DT; the EndOfMsgAck of the first two, which the receiver sends before
//!   it answers), then CRM(0xAA);
//! - **identification** (both buses): CRM(0x00) forwarded to the BMS, the
//!   BMS's BRM transfer on its bus, the bridge's BRM transfer to the pile
//!   (RTS, CTS, every DT), then CRM(0xAA): the pile only recognises a BMS
//!   that has identified itself.
//!
//! The bound is the larger of: the pile-bus frames of both chains back to
//! back, and the identification chain end to end. Each frame counts its
//! real wire time at the bit rate, stuff bits included
//! ([`frame_duration`]). What the bound leaves out is the gateway's and the
//! simulators' processing, the cloud round trip (online), and frames that
//! contend for the bus without being needed (periodic CHM/CRM copies).

use std::time::Duration;

use crate::can::CanFrame;
use crate::can::virtual_bus::frame_duration;
use crate::gbt27930::MessageKind;
use crate::j1939::tp::{Cm, TP_CM, TP_DT, parse_dt};
use crate::j1939::{Address, J1939Id, Pgn};

/// A frame as a monitor on one bus saw it: when its transmission ended,
/// relative to any fixed origin shared by both buses.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Duration,
    pub frame: CanFrame,
}

/// Who is who on the buses.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub bms: Address,
    pub pile: Address,
    /// The gateway's own address (authentication traffic).
    pub gateway: Address,
    /// The J1939 PGN the authentication messages use.
    pub auth_pgn: Pgn,
}

/// One authorization, measured and bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authorization {
    /// First CRM(0x00) to CRM(0xAA) on the pile's bus.
    pub latency: Duration,
    /// The bus-time lower bound (see the module docs).
    pub bound: Duration,
    /// Frames counted in the bound.
    pub frames: usize,
    /// The authentication chain alone (pile bus, with CRM(0xAA)).
    pub auth_chain: Duration,
    /// The identification chain alone (both buses, with CRM(0xAA)).
    pub identification_chain: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the pile never sent CRM(0x00)")]
    NoCrm00,
    #[error("the pile never sent CRM(0xAA) after its first CRM(0x00)")]
    NoCrmAa,
    #[error("no complete {0} transfer before CRM(0xAA)")]
    MissingTransfer(&'static str),
    #[error("no CRM reached the BMS before its BRM")]
    NoForwardedCrm,
}

/// One message between two nodes as it went over the wire: a single frame,
/// or a TP transfer's frames from RTS to its last DT.
#[derive(Clone, Debug)]
struct Transfer {
    /// Indices into the capture, in order.
    frames: Vec<usize>,
    /// The EndOfMsgAck the receiver sent, if seen.
    ack: Option<usize>,
}

impl Transfer {
    fn first(&self) -> usize {
        self.frames[0]
    }

    fn last(&self) -> usize {
        *self
            .frames
            .last()
            .expect("a transfer has at least one frame")
    }
}

fn id(frame: &CanFrame) -> Option<J1939Id> {
    J1939Id::from_can_id(frame.id()).ok()
}

fn is_crm(frame: &CanFrame, pile: Address, recognised: bool) -> bool {
    id(frame).is_some_and(|id| id.pgn == MessageKind::Crm.pgn() && id.source == pile)
        && frame.data().first() == Some(&if recognised { 0xAA } else { 0x00 })
}

/// Every complete message from `src` to `dst` for `pgn` in `frames[..end]`:
/// single frames and TP (RTS/CTS) transfers, which are complete once the
/// DT the RTS announced last has gone by.
fn transfers(frames: &[Seen], end: usize, src: Address, dst: Address, pgn: Pgn) -> Vec<Transfer> {
    let mut done: Vec<Transfer> = Vec::new();
    // The open transfer and the packet count its RTS announced.
    let mut open: Option<(Transfer, u8)> = None;
    for (i, seen) in frames[..end].iter().enumerate() {
        let Some(fid) = id(&seen.frame) else { continue };
        let data = seen.frame.data();
        let forward = fid.source == src && fid.destination == dst;
        let backward = fid.source == dst && fid.destination == src;
        if fid.pgn == pgn && forward {
            done.push(Transfer {
                frames: vec![i],
                ack: None,
            });
        } else if fid.pgn == TP_CM && (forward || backward) {
            match Cm::parse(data) {
                Ok(Cm::Rts {
                    packets, pgn: p, ..
                }) if forward && p == pgn => {
                    // A new RTS abandons whatever was open.
                    open = Some((
                        Transfer {
                            frames: vec![i],
                            ack: None,
                        },
                        packets,
                    ));
                }
                Ok(Cm::Cts { pgn: p, .. }) if backward && p == Some(pgn) => {
                    if let Some((t, _)) = open.as_mut() {
                        t.frames.push(i);
                    }
                }
                Ok(Cm::EndOfMsgAck { pgn: p, .. }) if backward && p == pgn => {
                    if let Some(t) = done.last_mut().filter(|t| t.frames.len() > 1) {
                        t.ack.get_or_insert(i);
                    }
                }
                Ok(Cm::Abort { pgn: p, .. }) if p == pgn => open = None,
                _ => {}
            }
        } else if fid.pgn == TP_DT && forward {
            let Some((t, packets)) = open.as_mut() else {
                continue;
            };
            t.frames.push(i);
            if parse_dt(data).is_some_and(|(seq, _)| seq == *packets)
                && let Some((t, _)) = open.take()
            {
                done.push(t);
            }
        }
    }
    done
}

fn wire_time(frames: &[Seen], indices: impl IntoIterator<Item = usize>, bitrate: u32) -> Duration {
    indices
        .into_iter()
        .map(|i| frame_duration(&frames[i].frame, bitrate))
        .sum()
}

/// Measures one authorization and its bound from what monitors on the
/// pile's bus and the BMS's bus captured (each in time order, on a shared
/// time origin).
pub fn analyse(
    pile_bus: &[Seen],
    bms_bus: &[Seen],
    addrs: Addresses,
    bitrate: u32,
) -> Result<Authorization, PathError> {
    let start = pile_bus
        .iter()
        .position(|s| is_crm(&s.frame, addrs.pile, false))
        .ok_or(PathError::NoCrm00)?;
    let end = start
        + pile_bus[start..]
            .iter()
            .position(|s| is_crm(&s.frame, addrs.pile, true))
            .ok_or(PathError::NoCrmAa)?;
    let t0 = pile_bus[start].at;
    let crm_aa = wire_time(pile_bus, [end], bitrate);

    // Authentication: the last AuthConfirm before CRM(0xAA), the challenge
    // that came before it, and the request before that.
    let to_pile = transfers(pile_bus, end, addrs.gateway, addrs.pile, addrs.auth_pgn);
    let to_gateway = transfers(pile_bus, end, addrs.pile, addrs.gateway, addrs.auth_pgn);
    let confirm = to_pile
        .last()
        .ok_or(PathError::MissingTransfer("AuthConfirm"))?;
    let challenge = to_gateway
        .iter()
        .rev()
        .find(|t| t.last() < confirm.first())
        .ok_or(PathError::MissingTransfer("AuthChallenge"))?;
    let request = to_pile
        .iter()
        .rev()
        .find(|t| t.last() < challenge.first() && t.first() > start)
        .ok_or(PathError::MissingTransfer("AuthRequest"))?;
    let auth_frames: Vec<usize> = request
        .frames
        .iter()
        .chain(request.ack.iter())
        .chain(&challenge.frames)
        .chain(challenge.ack.iter())
        .chain(&confirm.frames)
        .copied()
        .collect();
    let auth_chain = wire_time(pile_bus, auth_frames.iter().copied(), bitrate) + crm_aa;

    // Identification: the bridge's BRM to the pile, the BMS's BRM it
    // re-sent, and the CRM that made the BMS send it.
    let brm = MessageKind::Brm.pgn();
    let brm_pile = transfers(pile_bus, end, addrs.bms, addrs.pile, brm)
        .into_iter()
        .rfind(|t| t.first() > start)
        .ok_or(PathError::MissingTransfer("BRM on the pile's bus"))?;
    let brm_pile_time = wire_time(pile_bus, brm_pile.frames.iter().copied(), bitrate);
    let before_bridge = bms_bus
        .iter()
        .position(|s| s.at >= pile_bus[brm_pile.first()].at)
        .unwrap_or(bms_bus.len());
    let brm_bms = transfers(bms_bus, before_bridge, addrs.bms, addrs.pile, brm)
        .into_iter()
        .rfind(|t| bms_bus[t.first()].at > t0)
        .ok_or(PathError::MissingTransfer("BRM on the BMS's bus"))?;
    let forwarded_crm = bms_bus[..brm_bms.first()]
        .iter()
        .rposition(|s| {
            id(&s.frame).is_some_and(|i| i.pgn == MessageKind::Crm.pgn() && i.source == addrs.pile)
        })
        .ok_or(PathError::NoForwardedCrm)?;
    let identification_chain = wire_time(bms_bus, [forwarded_crm], bitrate)
        + wire_time(bms_bus, brm_bms.frames.iter().copied(), bitrate)
        + brm_pile_time
        + crm_aa;

    let pile_bus_total = auth_chain + brm_pile_time;
    Ok(Authorization {
        latency: pile_bus[end].at.saturating_sub(t0),
        bound: pile_bus_total.max(identification_chain),
        frames: auth_frames.len() + brm_pile.frames.len() + 1,
        auth_chain,
        identification_chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AUTH_PGN;
    use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS};
    use crate::j1939::Priority;
    use crate::j1939::tp::AbortReason;

    const RATE: u32 = 250_000;
    const GW: Address = Address(0xF5);
    const PILE: Address = Address(CHARGER_ADDRESS);
    const BMS: Address = Address(BMS_ADDRESS);

    fn addrs() -> Addresses {
        Addresses {
            bms: BMS,
            pile: PILE,
            gateway: GW,
            auth_pgn: Pgn::from_const(AUTH_PGN),
        }
    }

    /// Builds a capture frame by frame, 1 ms apart.
    #[derive(Default)]
    struct Trace {
        frames: Vec<Seen>,
    }

    impl Trace {
        fn push(&mut self, pgn: Pgn, src: Address, dst: Address, data: &[u8]) -> usize {
            let id = J1939Id::new(Priority::new(6).expect("0..=7"), pgn, src, dst);
            let frame = CanFrame::new(id.to_can_id(), data).expect("at most 8 bytes");
            let at = Duration::from_millis(self.frames.len() as u64);
            self.frames.push(Seen { at, frame });
            self.frames.len() - 1
        }

        fn cm(&mut self, cm: Cm, src: Address, dst: Address) -> usize {
            self.push(TP_CM, src, dst, &cm.encode())
        }

        fn crm(&mut self, recognised: bool) -> usize {
            let b = if recognised { 0xAA } else { 0x00 };
            self.push(
                MessageKind::Crm.pgn(),
                PILE,
                BMS,
                &[b, 1, 0, 0, 0, b'3', b'1', b'0'],
            )
        }

        /// A whole RTS/CTS transfer of `packets` DTs; returns the indices
        /// of its frames (RTS, CTS, DTs) and of its EndOfMsgAck.
        fn tp(&mut self, pgn: Pgn, src: Address, dst: Address, packets: u8) -> (Vec<usize>, usize) {
            let size = u16::from(packets) * 7;
            let mut idx = vec![self.cm(
                Cm::Rts {
                    size,
                    packets,
                    max_per_cts: 0xFF,
                    pgn,
                },
                src,
                dst,
            )];
            idx.push(self.cm(Cm::cts(packets, 1, pgn), dst, src));
            for seq in 1..=packets {
                idx.push(self.push(TP_DT, src, dst, &[seq, 0xA5, 0x5A, 0, 0xFF, 1, 2, 3]));
            }
            let ack = self.cm(Cm::EndOfMsgAck { size, packets, pgn }, dst, src);
            (idx, ack)
        }

        fn time(&self, idx: impl IntoIterator<Item = usize>) -> Duration {
            wire_time(&self.frames, idx, RATE)
        }
    }

    fn chm(t: &mut Trace) {
        t.push(MessageKind::Chm.pgn(), PILE, BMS, &[1, 1, 0]);
    }

    /// A session as the bridge sees it, with distractors: periodic CHM, an
    /// AuthRequest aborted and sent again, a late AuthResult.
    fn session() -> (Trace, Trace, Duration, Duration) {
        let auth = Pgn::from_const(AUTH_PGN);
        let brm = MessageKind::Brm.pgn();
        let (mut pile, mut bms) = (Trace::default(), Trace::default());
        chm(&mut pile);
        let first_crm = pile.crm(false);
        // An abandoned AuthRequest: RTS, CTS, one DT, abort.
        pile.tp(auth, GW, PILE, 2);
        pile.frames.truncate(pile.frames.len() - 2);
        pile.cm(
            Cm::Abort {
                reason: AbortReason::Timeout,
                pgn: auth,
            },
            GW,
            PILE,
        );
        let (req, req_ack) = pile.tp(auth, GW, PILE, 20);
        chm(&mut pile);
        pile.crm(false);
        let (chal, chal_ack) = pile.tp(auth, PILE, GW, 8);
        let (brm_pile, _) = pile.tp(brm, BMS, PILE, 7);
        let (conf, _) = pile.tp(auth, GW, PILE, 6);
        // AuthResult's RTS goes before CRM(0xAA) and is not on the path.
        pile.cm(
            Cm::Rts {
                size: 9,
                packets: 2,
                max_per_cts: 0xFF,
                pgn: auth,
            },
            PILE,
            GW,
        );
        let aa = pile.crm(true);
        // The BMS's bus, on the same clock: CRM forwarded, then BRM.
        bms.frames.push(Seen {
            at: pile.frames[first_crm].at + Duration::from_micros(10),
            frame: pile.frames[first_crm].frame,
        });
        let fwd = 0;
        let (brm_bms, _) = bms.tp(brm, BMS, PILE, 7);
        for s in &mut bms.frames[1..] {
            s.at += pile.frames[first_crm].at;
        }
        let pile_path: Vec<usize> = req
            .iter()
            .chain([&req_ack])
            .chain(&chal)
            .chain([&chal_ack])
            .chain(&conf)
            .chain(&brm_pile)
            .chain([&aa])
            .copied()
            .collect();
        let pile_time = pile.time(pile_path);
        let ident = bms.time([fwd]) + bms.time(brm_bms) + pile.time(brm_pile) + pile.time([aa]);
        (pile, bms, pile_time, ident)
    }

    #[test]
    fn the_bound_counts_exactly_the_frames_on_the_critical_path() {
        let (pile, bms, pile_time, ident) = session();
        let a = analyse(&pile.frames, &bms.frames, addrs(), RATE).expect("a full session");
        assert_eq!(a.bound, pile_time.max(ident));
        assert_eq!(a.bound, pile_time, "the pile's bus is the bottleneck here");
        // 22+1 + 10+1 + 8 (auth) + 9 (BRM) + CRM(0xAA)
        assert_eq!(a.frames, 23 + 11 + 8 + 9 + 1);
        // From the end of the first CRM(0x00) to the end of CRM(0xAA).
        let first = pile
            .frames
            .iter()
            .position(|s| is_crm(&s.frame, PILE, false));
        let last = pile.frames.len() - 1;
        assert_eq!(
            a.latency,
            pile.frames[last].at - pile.frames[first.expect("CRM(0x00)")].at
        );
        assert!(a.latency > a.bound);
        // At 250 kbit/s an 8-byte extended frame takes 0.5–0.65 ms.
        let per_frame = a.bound / a.frames as u32;
        assert!(
            per_frame > Duration::from_micros(400) && per_frame < Duration::from_micros(650),
            "{per_frame:?}"
        );
    }

    #[test]
    fn a_session_without_recognition_or_authentication_has_no_bound() {
        let (mut pile, bms, _, _) = session();
        pile.frames.pop();
        assert_eq!(
            analyse(&pile.frames, &bms.frames, addrs(), RATE),
            Err(PathError::NoCrmAa)
        );
        let mut t = Trace::default();
        t.crm(false);
        t.crm(true);
        assert_eq!(
            analyse(&t.frames, &bms.frames, addrs(), RATE),
            Err(PathError::MissingTransfer("AuthConfirm"))
        );
        assert_eq!(analyse(&[], &[], addrs(), RATE), Err(PathError::NoCrm00));
    }
}
