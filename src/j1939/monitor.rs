//! Passive J1939 reassembly for captures and bridging.
//!
//! The [`Transport`](super::tp::Transport) takes part in transfers for one
//! address. `bmsgw decode` and the bridge need the opposite: to watch every
//! frame on a bus, whoever sent it and whoever it is for, and recover the
//! whole messages without ever answering. [`Monitor`] does that.
//!
//! It keys sessions by (source, destination), as J1939-21 allows one
//! connection per ordered pair plus one BAM per source, so both directions of
//! a link and concurrent transfers between different nodes interleave
//! freely. A connection-mode message is complete when every packet has been
//! seen; CTS and EndOfMsgAck are only used to keep timers alive and to spot
//! gaps. Packets are stored by sequence number, so retransmitted and
//! duplicated DTs are harmless.
//!
//! Memory is bounded: at most `max_sessions` reassemblies of at most 1785
//! bytes each.

use std::collections::VecDeque;

use tracing::debug;

use super::tp::{
    AbortReason, Cm, Insert, J1939Message, Reassembly, T1, T2, T4, TP_CM, TP_DT, parse_dt,
    validate_announce,
};
use super::{Address, J1939Id, Pgn, Priority};
use crate::can::CanFrame;
use crate::interop::Deviation;
use crate::time::Timestamp;

/// Why a transfer seen on the bus produced no message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncompleteReason {
    /// A Connection Abort for it was seen, sent by `by`.
    Aborted { by: Address, reason: AbortReason },
    /// A new RTS or BAM for the same (source, destination) arrived first.
    Replaced,
    /// No frame of the transfer within the J1939-21 timeout (T1 after a
    /// packet, T2 after RTS or CTS, T4 after a hold).
    Timeout,
    /// The receiver acknowledged the message but packets are missing here:
    /// frames were lost between the bus and this monitor.
    AcknowledgedWithGaps,
    /// The session table was full, so the transfer was not followed.
    NoResources,
    /// [`Monitor::finish`] was called with the transfer still open.
    EndOfInput,
    /// The RTS or BAM announced what J1939-21 cannot carry (over 1785
    /// bytes, or a packet count that does not fit the size): its receiver
    /// refuses it, so it is not followed.
    BadAnnouncement { size: u16, packets: u8 },
}

impl std::fmt::Display for IncompleteReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IncompleteReason::Aborted { by, reason } => write!(f, "aborted by {by}: {reason}"),
            IncompleteReason::Replaced => f.write_str("replaced by a new announcement"),
            IncompleteReason::Timeout => f.write_str("timed out"),
            IncompleteReason::AcknowledgedWithGaps => {
                f.write_str("acknowledged, but packets were missing from this capture")
            }
            IncompleteReason::NoResources => f.write_str("too many transfers at once to follow"),
            IncompleteReason::EndOfInput => f.write_str("still open at the end of the input"),
            IncompleteReason::BadAnnouncement { size, packets } => write!(
                f,
                "refused: announces {size} bytes in {packets} packets (J1939-21 carries at most {} bytes, 7 a packet)",
                super::tp::MAX_TP_LEN
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEvent {
    /// A single frame, or a reassembled TP/BAM message.
    Message(J1939Message),
    Incomplete {
        source: Address,
        destination: Address,
        pgn: Pgn,
        reason: IncompleteReason,
        /// Distinct packets seen, out of `total`.
        received: u8,
        total: u8,
    },
    /// `by` showed a known transport deviation (see [`crate::interop`]) in
    /// the transfer of `pgn` it receives from `sender`; reported once per
    /// transfer. A monitor judges nothing: it follows the transfer as the
    /// sender would under the field profile.
    Deviation {
        by: Address,
        sender: Address,
        pgn: Pgn,
        deviation: Deviation,
        detail: String,
    },
}

#[derive(Debug)]
struct Session {
    source: Address,
    /// A node for RTS/CTS, global for BAM.
    destination: Address,
    pgn: Pgn,
    priority: Priority,
    buf: Reassembly,
    deadline: Timestamp,
    /// Deviations already reported for this transfer.
    reported: Vec<Deviation>,
}

/// Watches a bus and reassembles every J1939 message on it.
#[derive(Debug)]
pub struct Monitor {
    max_sessions: usize,
    sessions: Vec<Session>,
    events: VecDeque<MonitorEvent>,
}

impl Monitor {
    pub fn new(max_sessions: usize) -> Self {
        Monitor {
            max_sessions,
            sessions: Vec::new(),
            events: VecDeque::new(),
        }
    }

    /// Transfers being followed.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Feeds one frame seen on the bus at `now`. Transfers whose timer ran
    /// out before `now` are reported first.
    pub fn handle_frame(&mut self, frame: &CanFrame, now: Timestamp) {
        self.handle_timeout(now);
        let Ok(id) = J1939Id::from_can_id(frame.id()) else {
            return;
        };
        let data = frame.data();
        if id.pgn == TP_CM {
            match Cm::parse(data) {
                Ok(cm) => self.on_cm(id, cm, now),
                Err(e) => debug!(%frame, error = %e, "TP.CM not understood"),
            }
        } else if id.pgn == TP_DT {
            if let Some((seq, bytes)) = parse_dt(data) {
                self.on_dt(id, seq, bytes, now);
            }
        } else {
            self.events.push_back(MonitorEvent::Message(J1939Message {
                priority: id.priority,
                pgn: id.pgn,
                source: id.source,
                destination: id.destination,
                data: data.to_vec(),
            }));
        }
    }

    /// Reports every transfer with no frame for longer than its timeout.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let mut i = 0;
        while let Some(s) = self.sessions.get(i) {
            if s.deadline <= now {
                self.close(i, IncompleteReason::Timeout);
            } else {
                i += 1;
            }
        }
    }

    /// When the next open transfer times out, for a live monitor.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.sessions.iter().map(|s| s.deadline).min()
    }

    /// Reports every open transfer as incomplete: the end of a capture.
    pub fn finish(&mut self) {
        while !self.sessions.is_empty() {
            self.close(0, IncompleteReason::EndOfInput);
        }
    }

    pub fn poll_event(&mut self) -> Option<MonitorEvent> {
        self.events.pop_front()
    }

    fn on_cm(&mut self, id: J1939Id, cm: Cm, now: Timestamp) {
        match cm {
            Cm::Rts {
                size, packets, pgn, ..
            } if !id.destination.is_global() => self.announce(id, size, packets, pgn, now + T2),
            Cm::Bam { size, packets, pgn } if id.destination.is_global() => {
                self.announce(id, size, packets, pgn, now + T1)
            }
            // CTS and EndOfMsgAck go from the receiver back to the sender.
            Cm::Cts { count, pgn, .. } => {
                let interval = cm.cts_interval_ms();
                // Without a PGN the CTS can only be for the one transfer
                // the sender has open to this receiver.
                let i = match pgn {
                    Some(pgn) => self.position(id.destination, id.source, pgn),
                    None => self.position_any(id.destination, id.source),
                };
                let Some(i) = i else { return };
                let mut found = Vec::new();
                if pgn.is_none() {
                    found.push((Deviation::CtsWithoutPgn, "CTS without a PGN".to_string()));
                }
                if let Some(ms) = interval {
                    found.push((
                        Deviation::CtsPacketInterval,
                        format!("CTS asks for {ms} ms between packets"),
                    ));
                }
                let Some(s) = self.sessions.get_mut(i) else {
                    return;
                };
                s.deadline = now + if count == 0 { T4 } else { T2 };
                for (deviation, detail) in found {
                    if !s.reported.contains(&deviation) {
                        s.reported.push(deviation);
                        self.events.push_back(MonitorEvent::Deviation {
                            by: id.source,
                            sender: id.destination,
                            pgn: s.pgn,
                            deviation,
                            detail,
                        });
                    }
                }
            }
            Cm::EndOfMsgAck { pgn, .. } => {
                if let Some(i) = self.position(id.destination, id.source, pgn) {
                    self.close(i, IncompleteReason::AcknowledgedWithGaps);
                }
            }
            // Either side may abort.
            Cm::Abort { reason, pgn } => {
                let i = self
                    .position(id.source, id.destination, pgn)
                    .or_else(|| self.position(id.destination, id.source, pgn));
                if let Some(i) = i {
                    self.close(
                        i,
                        IncompleteReason::Aborted {
                            by: id.source,
                            reason,
                        },
                    );
                }
            }
            _ => {
                debug!(source = %id.source, destination = %id.destination, ?cm, "TP.CM with unfitting destination")
            }
        }
    }

    fn announce(&mut self, id: J1939Id, size: u16, packets: u8, pgn: Pgn, deadline: Timestamp) {
        let (source, destination) = (id.source, id.destination);
        if let Some(i) = self
            .sessions
            .iter()
            .position(|s| s.source == source && s.destination == destination)
        {
            // The sender restarted or moved on (receivers act on the newest
            // RTS too); whatever the old transfer had is lost.
            self.close(i, IncompleteReason::Replaced);
        }
        if let Err(e) = validate_announce(size, packets) {
            // Receivers refuse it too (or, for a BAM, ignore it); said, not
            // dropped without a word, so a capture shows it.
            debug!(%source, %destination, %pgn, error = %e, "announcement not followed");
            self.events.push_back(MonitorEvent::Incomplete {
                source,
                destination,
                pgn,
                reason: IncompleteReason::BadAnnouncement { size, packets },
                received: 0,
                total: packets,
            });
            return;
        }
        if self.sessions.len() >= self.max_sessions {
            self.events.push_back(MonitorEvent::Incomplete {
                source,
                destination,
                pgn,
                reason: IncompleteReason::NoResources,
                received: 0,
                total: packets,
            });
            return;
        }
        let Ok(buf) = Reassembly::new(size, packets) else {
            return;
        };
        self.sessions.push(Session {
            source,
            destination,
            pgn,
            priority: id.priority,
            buf,
            deadline,
            reported: Vec::new(),
        });
    }

    fn on_dt(&mut self, id: J1939Id, seq: u8, bytes: &[u8], now: Timestamp) {
        let Some(i) = self
            .sessions
            .iter()
            .position(|s| s.source == id.source && s.destination == id.destination)
        else {
            return;
        };
        let Some(s) = self.sessions.get_mut(i) else {
            return;
        };
        match s.buf.insert(seq, bytes) {
            Insert::New => {}
            // Retransmissions and duplicates change nothing; the owners of
            // the transfer deal with bad sequence numbers.
            Insert::Duplicate | Insert::Short | Insert::OutOfRange => return,
        }
        if !s.buf.is_complete() {
            s.deadline = now + T1;
            return;
        }
        let s = self.sessions.swap_remove(i);
        self.events.push_back(MonitorEvent::Message(J1939Message {
            priority: s.priority,
            pgn: s.pgn,
            source: s.source,
            destination: s.destination,
            data: s.buf.into_data(),
        }));
    }

    fn position(&self, source: Address, destination: Address, pgn: Pgn) -> Option<usize> {
        self.sessions
            .iter()
            .position(|s| s.source == source && s.destination == destination && s.pgn == pgn)
    }

    /// The connection-mode transfer from `source` to `destination`, if one
    /// is open (there is at most one per ordered pair).
    fn position_any(&self, source: Address, destination: Address) -> Option<usize> {
        self.sessions
            .iter()
            .position(|s| s.source == source && s.destination == destination)
    }

    /// Drops session `i` (just looked up) and reports it.
    fn close(&mut self, i: usize, reason: IncompleteReason) {
        if i >= self.sessions.len() {
            return;
        }
        // `remove`, not `swap_remove`: `finish` reports in announcement order.
        let s = self.sessions.remove(i);
        self.events.push_back(MonitorEvent::Incomplete {
            source: s.source,
            destination: s.destination,
            pgn: s.pgn,
            reason,
            received: s.buf.received(),
            total: s.buf.total(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::can::{CanId, ExtendedId};
    use crate::j1939::tp::{TpConfig, TpEvent, Transport};

    const BMS: Address = Address(0xF4);
    const PILE: Address = Address(0x56);

    fn ms(v: u64) -> Timestamp {
        Timestamp::from_millis(v)
    }

    fn pgn(raw: u32) -> Pgn {
        Pgn::new(raw).unwrap()
    }

    fn payload(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(salt))
            .collect()
    }

    fn frame(pgn_raw: u32, source: Address, destination: Address, data: &[u8]) -> CanFrame {
        let id = J1939Id::new(Priority::new(7).unwrap(), pgn(pgn_raw), source, destination);
        CanFrame::new(id.to_can_id(), data).unwrap()
    }

    fn cm(source: Address, destination: Address, cm: Cm) -> CanFrame {
        frame(0xEC00, source, destination, &cm.encode())
    }

    fn dt(source: Address, destination: Address, data: &[u8], seq: u8) -> CanFrame {
        let start = usize::from(seq - 1) * 7;
        let mut bytes = vec![seq];
        bytes.extend((0..7).map(|k| data.get(start + k).copied().unwrap_or(0xFF)));
        frame(0xEB00, source, destination, &bytes)
    }

    fn rts(data: &[u8], p: u32) -> Cm {
        Cm::Rts {
            size: data.len() as u16,
            packets: data.len().div_ceil(7) as u8,
            max_per_cts: 0xFF,
            pgn: pgn(p),
        }
    }

    fn events(m: &mut Monitor) -> Vec<MonitorEvent> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    fn message(p: u32, source: Address, destination: Address, data: Vec<u8>) -> MonitorEvent {
        MonitorEvent::Message(J1939Message {
            priority: Priority::new(7).unwrap(),
            pgn: pgn(p),
            source,
            destination,
            data,
        })
    }

    #[test]
    fn single_frames_pass_for_any_destination() {
        let mut m = Monitor::new(4);
        m.handle_frame(&frame(0x2600, PILE, BMS, &[1, 1, 0]), ms(0));
        m.handle_frame(&frame(0x2600, PILE, Address(0x33), &[2]), ms(0));
        assert_eq!(
            events(&mut m),
            vec![
                message(0x2600, PILE, BMS, vec![1, 1, 0]),
                message(0x2600, PILE, Address(0x33), vec![2]),
            ]
        );
    }

    #[test]
    fn rts_transfer_with_retransmitted_packets_is_reassembled_once() {
        let data = payload(20, 1);
        let mut m = Monitor::new(4);
        let mut t = 0;
        let mut feed = |m: &mut Monitor, f: CanFrame| {
            t += 1;
            m.handle_frame(&f, ms(t));
        };
        feed(&mut m, cm(BMS, PILE, rts(&data, 0x0200)));
        let cts = |count, next| Cm::cts(count, next, pgn(0x0200));
        feed(&mut m, cm(PILE, BMS, cts(3, 1)));
        feed(&mut m, dt(BMS, PILE, &data, 1));
        feed(&mut m, dt(BMS, PILE, &data, 3));
        feed(&mut m, cm(PILE, BMS, cts(1, 2)));
        feed(&mut m, dt(BMS, PILE, &data, 3));
        assert!(events(&mut m).is_empty());
        feed(&mut m, dt(BMS, PILE, &data, 2));
        feed(&mut m, dt(BMS, PILE, &data, 2));
        assert_eq!(events(&mut m), vec![message(0x0200, BMS, PILE, data)]);
        assert_eq!(m.session_count(), 0);
    }

    #[test]
    fn abort_seen_from_either_side_reports_incomplete() {
        let data = payload(20, 2);
        let mut m = Monitor::new(4);
        m.handle_frame(&cm(BMS, PILE, rts(&data, 0x0200)), ms(0));
        m.handle_frame(&dt(BMS, PILE, &data, 1), ms(1));
        let abort = Cm::Abort {
            reason: AbortReason::NoResources,
            pgn: pgn(0x0200),
        };
        m.handle_frame(&cm(PILE, BMS, abort), ms(2));
        assert_eq!(
            events(&mut m),
            vec![MonitorEvent::Incomplete {
                source: BMS,
                destination: PILE,
                pgn: pgn(0x0200),
                reason: IncompleteReason::Aborted {
                    by: PILE,
                    reason: AbortReason::NoResources
                },
                received: 1,
                total: 3,
            }]
        );
    }

    #[test]
    fn new_rts_replaces_an_incomplete_transfer() {
        let (old, new) = (payload(20, 3), payload(13, 4));
        let mut m = Monitor::new(4);
        m.handle_frame(&cm(BMS, PILE, rts(&old, 0x0200)), ms(0));
        m.handle_frame(&dt(BMS, PILE, &old, 1), ms(1));
        m.handle_frame(&cm(BMS, PILE, rts(&new, 0x0600)), ms(2));
        m.handle_frame(&dt(BMS, PILE, &new, 1), ms(3));
        m.handle_frame(&dt(BMS, PILE, &new, 2), ms(4));
        let ev = events(&mut m);
        assert!(matches!(
            ev[0],
            MonitorEvent::Incomplete {
                reason: IncompleteReason::Replaced,
                received: 1,
                ..
            }
        ));
        assert_eq!(ev[1], message(0x0600, BMS, PILE, new));
    }

    #[test]
    fn silence_longer_than_t1_after_a_packet_times_out() {
        let data = payload(30, 5);
        let mut m = Monitor::new(4);
        let bam = Cm::Bam {
            size: 30,
            packets: 5,
            pgn: pgn(0xFE00),
        };
        m.handle_frame(&cm(BMS, Address::GLOBAL, bam), ms(0));
        m.handle_frame(&dt(BMS, Address::GLOBAL, &data, 1), ms(50));
        assert_eq!(m.poll_timeout(), Some(ms(800)));
        m.handle_frame(&dt(BMS, Address::GLOBAL, &data, 2), ms(799));
        assert!(events(&mut m).is_empty());
        // The next frame comes too late: the transfer is reported first, and
        // its packet has nowhere to go.
        m.handle_frame(&dt(BMS, Address::GLOBAL, &data, 3), ms(1549));
        assert!(matches!(
            events(&mut m)[..],
            [MonitorEvent::Incomplete {
                reason: IncompleteReason::Timeout,
                received: 2,
                total: 5,
                ..
            }]
        ));
        assert_eq!(m.session_count(), 0);
    }

    #[test]
    fn acknowledgement_with_missing_packets_is_reported() {
        let data = payload(20, 6);
        let mut m = Monitor::new(4);
        m.handle_frame(&cm(BMS, PILE, rts(&data, 0x0200)), ms(0));
        m.handle_frame(&dt(BMS, PILE, &data, 1), ms(1));
        let eoma = Cm::EndOfMsgAck {
            size: 20,
            packets: 3,
            pgn: pgn(0x0200),
        };
        m.handle_frame(&cm(PILE, BMS, eoma), ms(3));
        assert!(matches!(
            events(&mut m)[..],
            [MonitorEvent::Incomplete {
                reason: IncompleteReason::AcknowledgedWithGaps,
                ..
            }]
        ));
    }

    #[test]
    fn full_table_reports_and_finish_flushes() {
        let mut m = Monitor::new(1);
        m.handle_frame(&cm(BMS, PILE, rts(&payload(20, 0), 0x0200)), ms(0));
        m.handle_frame(&cm(PILE, BMS, rts(&payload(20, 0), 0x0600)), ms(0));
        m.finish();
        let reasons: Vec<_> = events(&mut m)
            .into_iter()
            .map(|e| match e {
                MonitorEvent::Incomplete { reason, source, .. } => (source, reason),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            reasons,
            vec![
                (PILE, IncompleteReason::NoResources),
                (BMS, IncompleteReason::EndOfInput)
            ]
        );
    }

    /// Frames and times of a `candump -L` capture (test-only reader; the
    /// real one lives in `can::candump`).
    fn capture(text: &str) -> Vec<(Timestamp, CanFrame)> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|line| {
                let mut parts = line.split_whitespace();
                let time = parts.next().unwrap().trim_matches(|c| c == '(' || c == ')');
                let (secs, micros) = time.split_once('.').unwrap();
                let t = secs.parse::<u64>().unwrap() * 1_000_000 + micros.parse::<u64>().unwrap();
                let (id, hex) = parts.nth(1).unwrap().split_once('#').unwrap();
                let id = ExtendedId::new(u32::from_str_radix(id, 16).unwrap()).unwrap();
                let data: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                (Timestamp::from_micros(t), CanFrame::new(id, &data).unwrap())
            })
            .collect()
    }

    #[test]
    fn gbt_capture_with_both_directions_interleaved() {
        // CRM(0x00); the BMS's BRM (PGN 0x0200, 49 bytes) over RTS/CTS, with a
        // concurrent 10-byte transfer the other way (PGN 0x3400) and packet 7
        // seen twice; then CRM(0xAA).
        let log = "
            (1700000000.000000) can0 1801F456#0001000000FFFFFF
            (1700000000.010000) can0 1CEC56F4#10310007FF000200
            (1700000000.012000) can0 1CECF456#110701FFFF000200
            (1700000000.013000) can0 1CEB56F4#0101020304050607
            (1700000000.014000) can0 1CEB56F4#0208090A0B0C0D0E
            (1700000000.015000) can0 1CEB56F4#030F101112131415
            (1700000000.015500) can0 1CECF456#100A0002FF003400
            (1700000000.016000) can0 1CEB56F4#04161718191A1B1C
            (1700000000.016500) can0 1CEC56F4#110201FFFF003400
            (1700000000.017000) can0 1CEB56F4#051D1E1F20212223
            (1700000000.017200) can0 1CEBF456#01A0A1A2A3A4A5A6
            (1700000000.018000) can0 1CEB56F4#062425262728292A
            (1700000000.018200) can0 1CEBF456#02A7A8A9FFFFFFFF
            (1700000000.018300) can0 1CEC56F4#130A0002FF003400
            (1700000000.019000) can0 1CEB56F4#072B2C2D2E2F3031
            (1700000000.019100) can0 1CEB56F4#072B2C2D2E2F3031
            (1700000000.020000) can0 1CECF456#13310007FF000200
            (1700000000.250000) can0 1801F456#AA01000000FFFFFF
        ";
        let mut m = Monitor::new(4);
        for (t, f) in capture(log) {
            m.handle_frame(&f, t);
        }
        m.finish();
        let p6 = Priority::new(6).unwrap();
        let single = |data: Vec<u8>| {
            MonitorEvent::Message(J1939Message {
                priority: p6,
                pgn: pgn(0x0100),
                source: PILE,
                destination: BMS,
                data,
            })
        };
        assert_eq!(
            events(&mut m),
            vec![
                single(vec![0x00, 0x01, 0, 0, 0, 0xFF, 0xFF, 0xFF]),
                message(0x3400, PILE, BMS, (0xA0..=0xA9).collect()),
                message(0x0200, BMS, PILE, (1..=49).collect()),
                single(vec![0xAA, 0x01, 0, 0, 0, 0xFF, 0xFF, 0xFF]),
            ]
        );
    }

    /// The frames of one transfer between two real transports on a clean link.
    fn trace(
        source: Address,
        destination: Address,
        p: u32,
        data: &[u8],
        per_cts: u8,
    ) -> Vec<CanFrame> {
        let mut cfg = TpConfig::j1939();
        cfg.packets_per_cts = per_cts;
        let receiver_addr = if destination.is_global() {
            Address(0x99)
        } else {
            destination
        };
        let mut tx = Transport::new(cfg.clone(), source);
        let mut rx = Transport::new(cfg, receiver_addr);
        let msg = J1939Message {
            priority: Priority::new(6).unwrap(),
            pgn: pgn(p),
            source,
            destination,
            data: data.to_vec(),
        };
        let mut now = ms(0);
        tx.send(msg, now).unwrap();
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(f) = tx.poll_transmit() {
                rx.handle_frame(&f, now);
                out.push(f);
                moved = true;
            }
            while let Some(f) = rx.poll_transmit() {
                tx.handle_frame(&f, now);
                out.push(f);
                moved = true;
            }
            if !moved {
                match [tx.poll_timeout(), rx.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min()
                {
                    Some(t) => {
                        now = now.max(t);
                        tx.handle_timeout(now);
                        rx.handle_timeout(now);
                    }
                    None => break,
                }
            }
        }
        assert!(matches!(tx.poll_event(), Some(TpEvent::Sent { .. })));
        out
    }

    #[derive(Debug, Clone)]
    struct Transfer {
        source: Address,
        destination: Address,
        pgn: u32,
        data: Vec<u8>,
        per_cts: u8,
    }

    fn arb_transfers() -> impl Strategy<Value = Vec<Transfer>> {
        let nodes = [0x10u8, 0x56, 0xF4];
        // Distinct (source, destination) pairs, including broadcasts.
        let pairs: Vec<(u8, u8)> = nodes
            .iter()
            .flat_map(|&s| nodes.iter().chain(&[0xFF]).map(move |&d| (s, d)))
            .filter(|(s, d)| s != d)
            .collect();
        proptest::sample::subsequence(pairs, 1..=5).prop_flat_map(|pairs| {
            pairs
                .into_iter()
                .map(|(s, d)| {
                    (
                        9usize..200,
                        any::<u8>(),
                        prop_oneof![Just(1u8), 2u8..6, Just(255)],
                    )
                        .prop_map(move |(len, salt, per_cts)| Transfer {
                            source: Address(s),
                            destination: Address(d),
                            pgn: if d == 0xFF {
                                0xFE00
                            } else {
                                0x0200 + u32::from(s) * 0x100 % 0x3000
                            },
                            data: payload(len, salt),
                            per_cts,
                        })
                })
                .collect::<Vec<_>>()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Interleaved concurrent transfers, with duplicated frames, come out
        /// as exactly the messages that were sent.
        #[test]
        fn interleaved_sessions_reassemble(
            transfers in arb_transfers(),
            picks in proptest::collection::vec(any::<u8>(), 2000),
            dups in proptest::collection::vec(any::<bool>(), 2000),
        ) {
            let mut traces: Vec<VecDeque<CanFrame>> = transfers
                .iter()
                .map(|t| trace(t.source, t.destination, t.pgn, &t.data, t.per_cts).into())
                .collect();
            // Merge the traces in random order, keeping each one's own order.
            let mut merged = Vec::new();
            let mut k = 0;
            while traces.iter().any(|t| !t.is_empty()) {
                let live: Vec<usize> = (0..traces.len()).filter(|&i| !traces[i].is_empty()).collect();
                let pick = live[usize::from(picks[k % picks.len()]) % live.len()];
                let f = traces[pick].pop_front().unwrap();
                merged.push(f);
                if dups[k % dups.len()] && J1939Id::from_can_id(f.id()).unwrap().pgn == TP_DT {
                    merged.push(f);
                }
                k += 1;
            }
            let mut m = Monitor::new(8);
            for (i, f) in merged.iter().enumerate() {
                m.handle_frame(f, Timestamp::from_micros(i as u64 * 500));
                prop_assert!(m.session_count() <= 8);
            }
            m.finish();
            let mut got: Vec<(u8, u8, u32, Vec<u8>)> = events(&mut m)
                .into_iter()
                .map(|e| match e {
                    MonitorEvent::Message(msg) => Ok((msg.source.0, msg.destination.0, msg.pgn.raw(), msg.data)),
                    other => Err(other),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(format!("unexpected {e:?}")))?;
            let mut want: Vec<(u8, u8, u32, Vec<u8>)> = transfers
                .into_iter()
                .map(|t| (t.source.0, t.destination.0, t.pgn, t.data))
                .collect();
            got.sort();
            want.sort();
            prop_assert_eq!(got, want);
        }

        /// Arbitrary frames never panic the monitor, and it stays bounded.
        #[test]
        fn arbitrary_frames_never_panic(
            frames in proptest::collection::vec(
                (0u32..=ExtendedId::MAX, proptest::collection::vec(any::<u8>(), 0..=8), 0u16..1000, any::<bool>()),
                0..200,
            )
        ) {
            let mut m = Monitor::new(4);
            let mut now = ms(0);
            for (raw, mut data, gap, tp) in frames {
                // Bias towards TP between a few nodes so sessions form.
                let id = if tp {
                    let pgn = if raw & 1 == 0 { 0xEC00 } else { 0xEB00 };
                    let da = [0x56, 0xF4, 0xFF][(raw as usize >> 1) % 3];
                    let sa = [0x56, 0xF4, 0x10][(raw as usize >> 3) % 3];
                    if pgn == 0xEC00 && data.len() == 8 && raw & 0x20 != 0 {
                        data[0] = [16, 17, 19, 32, 255][(raw as usize >> 6) % 5];
                        data[2] %= 2;
                        data[3] = (u16::from_le_bytes([data[1], data[2]]) as usize).div_ceil(7) as u8;
                    }
                    (7 << 26) | (pgn << 8) | (da << 8) | sa
                } else {
                    raw
                };
                let f = CanFrame::new(CanId::Extended(ExtendedId::new(id).unwrap()), &data).unwrap();
                now = now + Duration::from_millis(gap.into());
                m.handle_frame(&f, now);
                prop_assert!(m.session_count() <= 4);
                events(&mut m);
            }
            m.finish();
            prop_assert_eq!(m.session_count(), 0);
        }
    }
}
