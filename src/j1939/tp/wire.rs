//! Byte layouts of the transport protocol frames (SAE J1939-21 §5.10).
//!
//! Both the [`Transport`](super::Transport) and the passive
//! [`Monitor`](crate::j1939::monitor::Monitor) read and write TP.CM and TP.DT
//! through this one codec, so the two can never disagree about the wire.
//!
//! ```text
//! TP.CM (PGN 0xEC00), 8 bytes; multi-byte fields little-endian
//!   RTS   16 | size(2) | packets | max packets per CTS (0xFF: no limit) | PGN(3)
//!   CTS   17 | packets (0 = hold) | next packet | 00 00 (see below) | PGN(3)
//!   EOMA  19 | size(2) | packets | FF | PGN(3)
//!   BAM   32 | size(2) | packets | FF | PGN(3)
//!   Abort 255| reason | FF FF FF | PGN(3)
//! TP.DT (PGN 0xEB00), 8 bytes
//!   sequence (1..=255) | 7 data bytes, the last packet padded with 0xFF
//! ```
//!
//! **CTS bytes 4–5.** J1939-21 reserves them (fill 0xFF, receivers ignore
//! them). In the field, some chargers put a packet interval in milliseconds
//! there, and some BMSs read it as one: a BMS of that kind waits 65 s
//! between packets after a standard `FF FF`, and the transfer dies on T1.
//! We send `00 00`: a peer that follows J1939-21 ignores the bytes, and a
//! peer that reads an interval reads "no gap". It is the one value both
//! kinds of peer take; `docs/interop.md` has the reasoning and the tests
//! (including the Linux kernel's J1939 stack as sender). On receipt, both
//! `FF FF` and `00 00` mean "no interval"; anything else is the field's
//! packet interval ([`crate::interop::Deviation::CtsPacketInterval`]).
//!
//! **A CTS without its PGN** (bytes 6–8 all 0xFF or all 0x00) parses with
//! `pgn: None`; whether to act on it is the transport's decision
//! ([`crate::interop::Deviation::CtsWithoutPgn`]).

use std::fmt;

use crate::can::CanFrame;
use crate::j1939::{Address, J1939Id, Pgn, Priority};

/// Connection management: RTS, CTS, EndOfMsgAck, BAM, Abort.
pub(crate) const TP_CM: Pgn = Pgn::from_const(0xEC00);
/// Data transfer: one sequence-numbered 7-byte packet.
pub(crate) const TP_DT: Pgn = Pgn::from_const(0xEB00);

/// Bytes carried by one TP.DT packet.
pub(crate) const PACKET_BYTES: usize = 7;
/// Largest message the transport protocol carries: 255 packets of 7 bytes.
pub const MAX_TP_LEN: usize = 255 * PACKET_BYTES;
/// RTS byte 5 value meaning "the sender sets no limit per CTS".
pub(crate) const NO_LIMIT: u8 = 0xFF;
/// What we send in CTS bytes 4–5 (little-endian): see the module docs.
pub(crate) const CTS_BYTES_4_5_SENT: u16 = 0x0000;
/// CTS bytes 4–5 as J1939-21 fills them.
const CTS_BYTES_4_5_RESERVED: u16 = 0xFFFF;

const CTRL_RTS: u8 = 16;
const CTRL_CTS: u8 = 17;
const CTRL_EOMA: u8 = 19;
const CTRL_BAM: u8 = 32;
const CTRL_ABORT: u8 = 255;
const FILL: u8 = 0xFF;

/// Why a connection was aborted: the Connection Abort reason byte
/// (J1939-21 table "Connection Abort Reason").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// 1: already in one or more connection-managed sessions and cannot support another.
    AlreadyInSession,
    /// 2: system resources were needed for another task, so this session was terminated.
    NoResources,
    /// 3: a timeout occurred; this abort closes the session.
    Timeout,
    /// 4: CTS received while a data transfer was in progress.
    CtsWhileDt,
    /// 5: maximum retransmit request limit reached.
    MaxRetransmit,
    /// 6: unexpected data transfer packet.
    UnexpectedDt,
    /// 7: bad sequence number (and software cannot recover).
    BadSequence,
    /// 8: duplicate sequence number (and software cannot recover).
    DuplicateSequence,
    /// 9: total message size is greater than 1785 bytes.
    TooLarge,
    /// Any other code: reserved values, and 250 "any other reason".
    Other(u8),
}

impl AbortReason {
    /// Code 250, which J1939-21 reserves for a reason not in its table. We use
    /// it for an RTS whose size and packet count disagree.
    pub const ANY_OTHER: AbortReason = AbortReason::Other(250);

    pub fn from_u8(code: u8) -> Self {
        match code {
            1 => Self::AlreadyInSession,
            2 => Self::NoResources,
            3 => Self::Timeout,
            4 => Self::CtsWhileDt,
            5 => Self::MaxRetransmit,
            6 => Self::UnexpectedDt,
            7 => Self::BadSequence,
            8 => Self::DuplicateSequence,
            9 => Self::TooLarge,
            other => Self::Other(other),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Self::AlreadyInSession => 1,
            Self::NoResources => 2,
            Self::Timeout => 3,
            Self::CtsWhileDt => 4,
            Self::MaxRetransmit => 5,
            Self::UnexpectedDt => 6,
            Self::BadSequence => 7,
            Self::DuplicateSequence => 8,
            Self::TooLarge => 9,
            Self::Other(code) => code,
        }
    }
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::AlreadyInSession => "already in a connection-managed session",
            Self::NoResources => "resources needed for another task",
            Self::Timeout => "timeout",
            Self::CtsWhileDt => "CTS received during data transfer",
            Self::MaxRetransmit => "retransmit request limit reached",
            Self::UnexpectedDt => "unexpected data transfer packet",
            Self::BadSequence => "bad sequence number",
            Self::DuplicateSequence => "duplicate sequence number",
            Self::TooLarge => "message larger than 1785 bytes",
            Self::Other(_) => "other reason",
        };
        write!(f, "{text} ({})", self.to_u8())
    }
}

/// A decoded TP.CM frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cm {
    Rts {
        size: u16,
        packets: u8,
        /// Byte 5: most packets the sender wants per CTS (0xFF: no limit).
        max_per_cts: u8,
        pgn: Pgn,
    },
    Cts {
        /// Packets granted; 0 asks the sender to hold.
        count: u8,
        next: u8,
        /// Bytes 4–5, little-endian: reserved in J1939-21, a packet interval
        /// in ms in some field implementations (see the module docs).
        bytes_4_5: u16,
        /// `None` when bytes 6–8 are all 0xFF or hold PGN 0 (see the module docs).
        pgn: Option<Pgn>,
    },
    EndOfMsgAck {
        size: u16,
        packets: u8,
        pgn: Pgn,
    },
    Bam {
        size: u16,
        packets: u8,
        pgn: Pgn,
    },
    Abort {
        reason: AbortReason,
        pgn: Pgn,
    },
}

/// Why a TP.CM frame could not be decoded. The cores drop such frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CmError {
    #[error("TP.CM frame has {len} bytes; the PGN field needs all 8")]
    Short { len: usize },
    #[error("TP.CM control byte {0:#04x} is not RTS, CTS, EndOfMsgAck, BAM or Abort")]
    UnknownControl(u8),
    #[error("TP.CM carries PGN {0:#x}, which does not fit in 18 bits")]
    BadPgn(u32),
}

impl Cm {
    /// The CTS we send: `count` packets from `next` of `pgn`'s transfer.
    pub(crate) fn cts(count: u8, next: u8, pgn: Pgn) -> Cm {
        Cm::Cts {
            count,
            next,
            bytes_4_5: CTS_BYTES_4_5_SENT,
            pgn: Some(pgn),
        }
    }

    /// The packet interval a CTS asks for in the field's reading of bytes
    /// 4–5, in ms: `None` for a standard CTS, for ours, and for anything
    /// else.
    pub(crate) fn cts_interval_ms(&self) -> Option<u16> {
        match *self {
            Cm::Cts { bytes_4_5, .. }
                if bytes_4_5 != CTS_BYTES_4_5_RESERVED && bytes_4_5 != CTS_BYTES_4_5_SENT =>
            {
                Some(bytes_4_5)
            }
            _ => None,
        }
    }

    /// Decodes a TP.CM payload. Reserved bytes are not checked (peers fill
    /// them with 0xFF, but nothing depends on it), except that CTS bytes 4–5
    /// are kept for the transport to judge.
    pub(crate) fn parse(data: &[u8]) -> Result<Cm, CmError> {
        let &[ctrl, b1, b2, b3, b4, p0, p1, p2, ..] = data else {
            return Err(CmError::Short { len: data.len() });
        };
        if ctrl == CTRL_CTS {
            // All zeros is PGN 0 once the PDU1 low byte is masked, so a zero
            // PGN with junk in that byte counts as missing too.
            let pgn = match [p0, p1, p2] {
                [0xFF, 0xFF, 0xFF] => None,
                _ => Some(pgn_from_bytes(p0, p1, p2)?).filter(|p| p.raw() != 0),
            };
            return Ok(Cm::Cts {
                count: b1,
                next: b2,
                bytes_4_5: u16::from_le_bytes([b3, b4]),
                pgn,
            });
        }
        let pgn = pgn_from_bytes(p0, p1, p2)?;
        let size = u16::from_le_bytes([b1, b2]);
        Ok(match ctrl {
            CTRL_RTS => Cm::Rts {
                size,
                packets: b3,
                max_per_cts: b4,
                pgn,
            },
            CTRL_EOMA => Cm::EndOfMsgAck {
                size,
                packets: b3,
                pgn,
            },
            CTRL_BAM => Cm::Bam {
                size,
                packets: b3,
                pgn,
            },
            CTRL_ABORT => Cm::Abort {
                reason: AbortReason::from_u8(b1),
                pgn,
            },
            other => return Err(CmError::UnknownControl(other)),
        })
    }

    pub(crate) fn encode(self) -> [u8; 8] {
        let (head, pgn) = match self {
            Cm::Cts {
                count,
                next,
                bytes_4_5,
                pgn,
            } => {
                let [r0, r1] = bytes_4_5.to_le_bytes();
                let [p0, p1, p2] = pgn.map_or([0xFF; 3], pgn_to_bytes);
                return [CTRL_CTS, count, next, r0, r1, p0, p1, p2];
            }
            Cm::Rts {
                size,
                packets,
                max_per_cts,
                pgn,
            } => {
                let [s0, s1] = size.to_le_bytes();
                ([CTRL_RTS, s0, s1, packets, max_per_cts], pgn)
            }
            Cm::EndOfMsgAck { size, packets, pgn } => {
                let [s0, s1] = size.to_le_bytes();
                ([CTRL_EOMA, s0, s1, packets, FILL], pgn)
            }
            Cm::Bam { size, packets, pgn } => {
                let [s0, s1] = size.to_le_bytes();
                ([CTRL_BAM, s0, s1, packets, FILL], pgn)
            }
            Cm::Abort { reason, pgn } => ([CTRL_ABORT, reason.to_u8(), FILL, FILL, FILL], pgn),
        };
        let [p0, p1, p2] = pgn_to_bytes(pgn);
        let [h0, h1, h2, h3, h4] = head;
        [h0, h1, h2, h3, h4, p0, p1, p2]
    }
}

fn pgn_to_bytes(pgn: Pgn) -> [u8; 3] {
    let [p0, p1, p2, _] = pgn.raw().to_le_bytes();
    [p0, p1, p2]
}

/// The PGN field of a TP.CM frame. For a PDU1 PGN the low byte is the
/// destination's place and carries no meaning here; some stacks leave junk in
/// it, so it is masked rather than refused.
fn pgn_from_bytes(p0: u8, p1: u8, p2: u8) -> Result<Pgn, CmError> {
    let raw = u32::from_le_bytes([p0, p1, p2, 0]);
    let masked = if p1 < 240 { raw & !0xFF } else { raw };
    Pgn::new(masked).map_err(|_| CmError::BadPgn(raw))
}

/// Splits a TP.DT payload into its sequence number and data bytes.
pub(crate) fn parse_dt(data: &[u8]) -> Option<(u8, &[u8])> {
    match data {
        [seq, rest @ ..] => Some((*seq, rest)),
        [] => None,
    }
}

/// Number of TP.DT packets that carry `len` bytes.
pub(crate) fn packets_for(len: usize) -> usize {
    len.div_ceil(PACKET_BYTES)
}

/// The TP.DT payload for packet `seq` (1-based) of `message`: 7 data bytes,
/// padded with 0xFF after the end of the message.
pub(crate) fn dt_payload(message: &[u8], seq: u8) -> [u8; 8] {
    let mut out = [FILL; 8];
    out[0] = seq;
    let start = usize::from(seq.saturating_sub(1)) * PACKET_BYTES;
    let end = (start + PACKET_BYTES).min(message.len());
    let chunk = message.get(start..end).unwrap_or(&[]);
    for (dst, src) in out.iter_mut().skip(1).zip(chunk) {
        *dst = *src;
    }
    out
}

/// An 8-byte frame from `source` to `destination`.
pub(crate) fn frame8(
    priority: Priority,
    pgn: Pgn,
    source: Address,
    destination: Address,
    payload: [u8; 8],
) -> CanFrame {
    let id = J1939Id::new(priority, pgn, source, destination).to_can_id();
    CanFrame::new(id, &payload).expect("8 bytes is exactly the classical CAN payload limit")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn abort_reasons_round_trip_through_their_codes() {
        for code in 0..=u8::MAX {
            assert_eq!(AbortReason::from_u8(code).to_u8(), code);
        }
        assert_eq!(AbortReason::from_u8(3), AbortReason::Timeout);
        assert_eq!(AbortReason::from_u8(9), AbortReason::TooLarge);
        assert_eq!(AbortReason::ANY_OTHER.to_u8(), 250);
    }

    #[test]
    fn rts_layout_matches_j1939_21() {
        // BRM (PGN 0x000200), 49 bytes in 7 packets, no per-CTS limit.
        let rts = Cm::Rts {
            size: 49,
            packets: 7,
            max_per_cts: NO_LIMIT,
            pgn: Pgn::from_const(0x0200),
        };
        assert_eq!(
            rts.encode(),
            [0x10, 0x31, 0x00, 0x07, 0xFF, 0x00, 0x02, 0x00]
        );
        assert_eq!(Cm::parse(&rts.encode()), Ok(rts));
        // Bytes 4-5 are 00 00, not J1939-21's FF FF: see the module docs.
        let cts = Cm::cts(7, 1, Pgn::from_const(0x0200));
        assert_eq!(
            cts.encode(),
            [0x11, 0x07, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00]
        );
        assert_eq!(Cm::parse(&cts.encode()), Ok(cts));
        assert_eq!(cts.cts_interval_ms(), None);
        let abort = Cm::Abort {
            reason: AbortReason::Timeout,
            pgn: Pgn::from_const(0xFEF1),
        };
        assert_eq!(
            abort.encode(),
            [0xFF, 0x03, 0xFF, 0xFF, 0xFF, 0xF1, 0xFE, 0x00]
        );
    }

    #[test]
    fn parse_is_liberal_about_reserved_bytes_and_pdu1_low_byte() {
        // EOMA with zeros where 0xFF is expected, and junk in the PDU1 PGN's low byte.
        let eoma = [0x13, 0x0D, 0x00, 0x02, 0x00, 0x42, 0x06, 0x00];
        assert_eq!(
            Cm::parse(&eoma),
            Ok(Cm::EndOfMsgAck {
                size: 13,
                packets: 2,
                pgn: Pgn::from_const(0x0600)
            })
        );
        assert_eq!(Cm::parse(&[0x10, 1, 2]), Err(CmError::Short { len: 3 }));
        assert_eq!(
            Cm::parse(&[0x42, 0, 0, 0, 0, 0, 0, 0]),
            Err(CmError::UnknownControl(0x42))
        );
        assert_eq!(
            Cm::parse(&[0x10, 0, 0, 0, 0, 0, 0, 0x04]),
            Err(CmError::BadPgn(0x04_0000))
        );
    }

    #[test]
    fn cts_keeps_bytes_4_5_and_may_lack_its_pgn() {
        let standard = [0x11, 0x02, 0x01, 0xFF, 0xFF, 0x00, 0x06, 0x00];
        let cm = Cm::parse(&standard).unwrap();
        assert_eq!(cm.cts_interval_ms(), None);
        assert!(matches!(cm, Cm::Cts { pgn: Some(p), .. } if p == Pgn::from_const(0x0600)));
        // A charger's 10 ms packet interval.
        let interval = [0x11, 0x02, 0x01, 0x0A, 0x00, 0x00, 0x06, 0x00];
        assert_eq!(Cm::parse(&interval).unwrap().cts_interval_ms(), Some(10));
        for pgn_bytes in [[0xFF; 3], [0x00; 3]] {
            let [p0, p1, p2] = pgn_bytes;
            let cm = Cm::parse(&[0x11, 0x02, 0x01, 0xFF, 0xFF, p0, p1, p2]).unwrap();
            assert!(matches!(cm, Cm::Cts { pgn: None, .. }), "{cm:?}");
        }
        // Only CTS may lack its PGN: an RTS without one is still refused.
        assert_eq!(
            Cm::parse(&[0x10, 9, 0, 2, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(CmError::BadPgn(0xFF_FFFF))
        );
    }

    #[test]
    fn last_packet_is_padded_with_ff() {
        let msg: Vec<u8> = (1..=9).collect();
        assert_eq!(dt_payload(&msg, 1), [1, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(dt_payload(&msg, 2), [2, 8, 9, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(packets_for(9), 2);
        assert_eq!(packets_for(MAX_TP_LEN), 255);
    }

    proptest! {
        #[test]
        fn cm_parse_never_panics_and_round_trips(data in proptest::collection::vec(any::<u8>(), 0..=8)) {
            if let Ok(cm) = Cm::parse(&data) {
                prop_assert_eq!(Cm::parse(&cm.encode()), Ok(cm));
            }
        }
    }
}
