//! Transport tests: two transports pumped in memory, every timer with explicit
//! timestamps, hand-made peers for the corner cases, and property tests under
//! arbitrary input and under loss, duplication and reordering.

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::can::{CanId, ExtendedId, StandardId};

const BMS: Address = Address(0xF4);
const PILE: Address = Address(0x56);
const OTHER: Address = Address(0x10);

fn ms(v: u64) -> Timestamp {
    Timestamp::from_millis(v)
}

fn pgn(raw: u32) -> Pgn {
    Pgn::new(raw).unwrap()
}

fn prio(p: u8) -> Priority {
    Priority::new(p).unwrap()
}

/// A payload whose bytes differ from packet to packet, so a misplaced packet
/// shows up.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 7 + 3) as u8).collect()
}

fn message(pgn_raw: u32, source: Address, destination: Address, data: Vec<u8>) -> J1939Message {
    J1939Message {
        priority: prio(6),
        pgn: pgn(pgn_raw),
        source,
        destination,
        data,
    }
}

fn raw(priority: u8, pgn_raw: u32, source: Address, destination: Address, data: &[u8]) -> CanFrame {
    let id = J1939Id::new(prio(priority), pgn(pgn_raw), source, destination);
    CanFrame::new(id.to_can_id(), data).unwrap()
}

fn cm_frame(source: Address, destination: Address, cm: Cm) -> CanFrame {
    raw(7, 0xEC00, source, destination, &cm.encode())
}

fn dt_frame(source: Address, destination: Address, data: &[u8], seq: u8) -> CanFrame {
    raw(7, 0xEB00, source, destination, &wire::dt_payload(data, seq))
}

fn drain(tp: &mut Transport) -> Vec<CanFrame> {
    std::iter::from_fn(|| tp.poll_transmit()).collect()
}

fn events(tp: &mut Transport) -> Vec<TpEvent> {
    std::iter::from_fn(|| tp.poll_event()).collect()
}

/// Decodes a frame we expect to be TP.CM.
fn as_cm(frame: &CanFrame) -> (J1939Id, Cm) {
    let id = J1939Id::from_can_id(frame.id()).unwrap();
    assert_eq!(id.pgn, TP_CM, "expected TP.CM, got {frame}");
    (id, Cm::parse(frame.data()).unwrap())
}

fn is_dt(frame: &CanFrame) -> bool {
    J1939Id::from_can_id(frame.id()).is_ok_and(|id| id.pgn == TP_DT)
}

fn cts(count: u8, next: u8, p: u32) -> Cm {
    Cm::cts(count, next, pgn(p))
}

fn rts_for(data: &[u8], p: u32) -> Cm {
    Cm::Rts {
        size: data.len() as u16,
        packets: packets_for(data.len()) as u8,
        max_per_cts: 0xFF,
        pgn: pgn(p),
    }
}

fn abort(reason: AbortReason, p: u32) -> Cm {
    Cm::Abort {
        reason,
        pgn: pgn(p),
    }
}

// ---------------------------------------------------------------------------
// An in-memory link between two transports, with an optional fault schedule.

#[derive(Debug, Clone, Copy)]
enum Fault {
    Pass,
    Drop,
    Duplicate,
    /// Extra transit time in milliseconds; later frames overtake this one.
    Delay(u16),
}

struct InFlight {
    at: Timestamp,
    order: u64,
    to_b: bool,
    frame: CanFrame,
}

const TRANSIT: Duration = Duration::from_millis(1);

struct Sim {
    a: Transport,
    b: Transport,
    now: Timestamp,
    wire: Vec<InFlight>,
    order: u64,
    faults: VecDeque<Fault>,
    events_a: Vec<TpEvent>,
    events_b: Vec<TpEvent>,
    /// Every frame put on the wire, with the time it was sent.
    log: Vec<(Timestamp, CanFrame)>,
    /// Every frame B was handed, after the faults.
    heard_by_b: Vec<CanFrame>,
}

impl Sim {
    fn new(a: Transport, b: Transport) -> Self {
        Sim {
            a,
            b,
            now: Timestamp::ZERO,
            wire: Vec::new(),
            order: 0,
            faults: VecDeque::new(),
            events_a: Vec::new(),
            events_b: Vec::new(),
            log: Vec::new(),
            heard_by_b: Vec::new(),
        }
    }

    fn pair(cfg_a: TpConfig, cfg_b: TpConfig) -> Self {
        Sim::new(Transport::new(cfg_a, BMS), Transport::new(cfg_b, PILE))
    }

    fn push(&mut self, at: Timestamp, to_b: bool, frame: CanFrame) {
        self.order += 1;
        self.wire.push(InFlight {
            at,
            order: self.order,
            to_b,
            frame,
        });
    }

    fn launch(&mut self, frame: CanFrame, to_b: bool) {
        self.log.push((self.now, frame));
        let at = self.now + TRANSIT;
        match self.faults.pop_front().unwrap_or(Fault::Pass) {
            Fault::Pass => self.push(at, to_b, frame),
            Fault::Drop => {}
            Fault::Duplicate => {
                self.push(at, to_b, frame);
                self.push(at, to_b, frame);
            }
            Fault::Delay(d) => self.push(at + Duration::from_millis(d.into()), to_b, frame),
        }
    }

    /// What a shell does after every input: send everything, take every event.
    fn flush(&mut self) {
        while let Some(f) = self.a.poll_transmit() {
            self.launch(f, true);
        }
        while let Some(f) = self.b.poll_transmit() {
            self.launch(f, false);
        }
        self.events_a
            .extend(std::iter::from_fn(|| self.a.poll_event()));
        self.events_b
            .extend(std::iter::from_fn(|| self.b.poll_event()));
    }

    /// Runs until nothing is in flight and no timer is set (returns true), or
    /// until `limit` (returns false).
    fn run_until(&mut self, limit: Timestamp, max_steps: usize) -> bool {
        for _ in 0..max_steps {
            self.flush();
            let next_wire = self.wire.iter().map(|w| w.at).min();
            let next_timer = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let Some(t) = next_wire.into_iter().chain(next_timer).min() else {
                return true;
            };
            if t > limit {
                return false;
            }
            self.now = self.now.max(t);
            while let Some(i) = self
                .wire
                .iter()
                .enumerate()
                .filter(|(_, w)| w.at <= self.now)
                .min_by_key(|(_, w)| (w.at, w.order))
                .map(|(i, _)| i)
            {
                let w = self.wire.remove(i);
                if w.to_b {
                    self.heard_by_b.push(w.frame);
                    self.b.handle_frame(&w.frame, self.now);
                } else {
                    self.a.handle_frame(&w.frame, self.now);
                }
                self.flush();
            }
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
        }
        false
    }

    fn run(&mut self) -> bool {
        self.run_until(Timestamp::from_micros(u64::MAX), 200_000)
    }

    fn frames_from(&self, source: Address) -> Vec<(Timestamp, CanFrame)> {
        self.log
            .iter()
            .filter(|(_, f)| J1939Id::from_can_id(f.id()).unwrap().source == source)
            .copied()
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Round trips.

#[test]
fn rts_cts_round_trip_for_sizes_and_window_sizes() {
    for &size in &[9usize, 13, 49, 100, 1785] {
        for &per_cts in &[1u8, 2, 5, 16, 255] {
            for &rts_limit in &[0xFFu8, 3] {
                let mut cfg_a = TpConfig::gbt27930();
                cfg_a.max_rts_packets = rts_limit;
                let mut cfg_b = TpConfig::gbt27930();
                cfg_b.packets_per_cts = per_cts;
                let mut sim = Sim::pair(cfg_a, cfg_b);
                let data = payload(size);
                sim.a
                    .send(message(0x0200, BMS, PILE, data.clone()), sim.now)
                    .unwrap();
                assert!(
                    sim.run(),
                    "size {size} per_cts {per_cts}: pump did not settle"
                );

                let case = format!("size {size}, packets_per_cts {per_cts}, RTS limit {rts_limit}");
                assert_eq!(
                    sim.events_b,
                    vec![TpEvent::Received(J1939Message {
                        priority: prio(7),
                        pgn: pgn(0x0200),
                        source: BMS,
                        destination: PILE,
                        data,
                    })],
                    "{case}"
                );
                assert_eq!(
                    sim.events_a,
                    vec![TpEvent::Sent {
                        pgn: pgn(0x0200),
                        destination: PILE
                    }],
                    "{case}"
                );
                assert_eq!(sim.a.session_count() + sim.b.session_count(), 0, "{case}");
                assert_eq!(sim.b.buffered_bytes(), 0, "{case}");

                // Every window respects both our grant and the sender's limit,
                // and exactly enough windows were granted.
                let window = usize::from(per_cts.min(rts_limit));
                let grants: Vec<u8> = sim
                    .frames_from(PILE)
                    .iter()
                    .filter_map(|(_, f)| match as_cm(f).1 {
                        Cm::Cts { count, .. } => Some(count),
                        _ => None,
                    })
                    .collect();
                assert!(
                    grants.iter().all(|&c| c >= 1 && usize::from(c) <= window),
                    "{case}: {grants:?}"
                );
                assert_eq!(grants.len(), packets_for(size).div_ceil(window), "{case}");
                let dts = sim
                    .frames_from(BMS)
                    .into_iter()
                    .filter(|(_, f)| is_dt(f))
                    .count();
                assert_eq!(
                    dts,
                    packets_for(size),
                    "{case}: no packet sent twice on a clean link"
                );
            }
        }
    }
}

#[test]
fn tp_frames_use_the_configured_priority_and_pad_the_last_packet() {
    let mut sim = Sim::pair(TpConfig::gbt27930(), TpConfig::gbt27930());
    sim.a
        .send(message(0x0200, BMS, PILE, payload(9)), sim.now)
        .unwrap();
    assert!(sim.run());
    let frames: Vec<String> = sim.log.iter().map(|(_, f)| f.to_string()).collect();
    assert_eq!(
        frames,
        vec![
            "1CEC56F4#10090002FF000200", // RTS: 9 bytes, 2 packets, no limit, PGN 0x0200
            "1CECF456#1102010000000200", // CTS: 2 packets from 1
            "1CEB56F4#01030A11181F262D", // DT 1
            "1CEB56F4#02353CFFFFFFFFFF", // DT 2, padded
            "1CECF456#13090002FF000200", // EndOfMsgAck
        ]
    );
}

#[test]
fn bam_round_trip_paces_packets_by_the_gap() {
    for &size in &[9usize, 100, 1785] {
        let mut sim = Sim::pair(TpConfig::gbt27930(), TpConfig::gbt27930());
        let data = payload(size);
        sim.a
            .send(
                message(0xFE00, BMS, Address::GLOBAL, data.clone()),
                ms(1000),
            )
            .unwrap();
        sim.now = ms(1000);
        assert_eq!(
            sim.a.poll_timeout(),
            Some(ms(1050)),
            "first packet one gap after the BAM"
        );
        assert!(sim.run());
        assert_eq!(
            sim.events_b,
            vec![TpEvent::Received(J1939Message {
                priority: prio(7),
                pgn: pgn(0xFE00),
                source: BMS,
                destination: Address::GLOBAL,
                data,
            })]
        );
        assert_eq!(
            sim.events_a,
            vec![TpEvent::Sent {
                pgn: pgn(0xFE00),
                destination: Address::GLOBAL
            }]
        );
        let sent = sim.frames_from(BMS);
        assert_eq!(as_cm(&sent[0].1).0.destination, Address::GLOBAL);
        assert_eq!(sent.len(), 1 + packets_for(size));
        for pair in sent.windows(2) {
            assert!(pair[1].0.saturating_since(pair[0].0) >= Duration::from_millis(50));
        }
        assert!(sim.frames_from(PILE).is_empty(), "nobody answers a BAM");
    }
}

#[test]
fn single_frames_pass_through_with_their_priority() {
    let mut sim = Sim::pair(TpConfig::gbt27930(), TpConfig::gbt27930());
    // CHM-like PDU1 to the BMS, a PDU2 broadcast, and an empty frame.
    sim.b
        .send(message(0x2600, PILE, BMS, vec![1, 1, 0]), sim.now)
        .unwrap();
    sim.b
        .send(message(0xFEF1, PILE, BMS, vec![9; 8]), sim.now)
        .unwrap();
    sim.b
        .send(message(0x1000, PILE, BMS, vec![]), sim.now)
        .unwrap();
    assert!(sim.run());
    assert_eq!(sim.log[0].1.to_string(), "1826F456#010100");
    assert_eq!(
        sim.events_a,
        vec![
            TpEvent::Received(message(0x2600, PILE, BMS, vec![1, 1, 0])),
            TpEvent::Received(message(0xFEF1, PILE, Address::GLOBAL, vec![9; 8])),
            TpEvent::Received(message(0x1000, PILE, BMS, vec![])),
        ]
    );
    assert!(
        sim.events_b.is_empty(),
        "single frames produce no Sent event"
    );
}

#[test]
fn frames_not_for_us_are_ignored() {
    let mut tp = Transport::new(TpConfig::gbt27930(), PILE);
    // To another node, from ourselves, and a standard id.
    tp.handle_frame(&raw(6, 0x2600, BMS, OTHER, &[1]), ms(0));
    tp.handle_frame(&raw(6, 0x2600, PILE, PILE, &[1]), ms(0));
    tp.handle_frame(&cm_frame(BMS, OTHER, rts_for(&payload(20), 0x0200)), ms(0));
    let std_frame = CanFrame::new(StandardId::new(0x123).unwrap(), &[1, 2]).unwrap();
    tp.handle_frame(&std_frame, ms(0));
    assert!(drain(&mut tp).is_empty());
    assert!(events(&mut tp).is_empty());
    assert_eq!(tp.session_count(), 0);
}

// ---------------------------------------------------------------------------
// Timers, each with explicit timestamps.

/// A receiver at PILE that has accepted an RTS from BMS at t=0 for `data`.
fn receiver_with_rts(cfg: TpConfig, data: &[u8]) -> Transport {
    let mut tp = Transport::new(cfg, PILE);
    tp.handle_frame(&cm_frame(BMS, PILE, rts_for(data, 0x0200)), ms(0));
    let out = drain(&mut tp);
    assert_eq!(out.len(), 1);
    tp
}

fn expect_abort(frames: &[CanFrame], to: Address, reason: AbortReason) {
    assert_eq!(frames.len(), 1, "{frames:?}");
    let (id, cm) = as_cm(&frames[0]);
    assert_eq!(id.destination, to);
    assert_eq!(id.priority, prio(7));
    assert_eq!(cm, abort(reason, 0x0200));
}

#[test]
fn t1_receiver_aborts_when_packets_stop() {
    let data = payload(20);
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 1), ms(10));
    assert_eq!(tp.poll_timeout(), Some(ms(760)));
    tp.handle_timeout(ms(759));
    assert!(drain(&mut tp).is_empty());
    tp.handle_timeout(ms(760));
    expect_abort(&drain(&mut tp), BMS, AbortReason::Timeout);
    assert_eq!(
        events(&mut tp),
        vec![TpEvent::ReceiveAborted {
            pgn: pgn(0x0200),
            source: BMS,
            reason: AbortReason::Timeout
        }]
    );
    assert_eq!(
        (tp.session_count(), tp.buffered_bytes(), tp.poll_timeout()),
        (0, 0, None)
    );
}

#[test]
fn t2_receiver_aborts_when_no_packet_follows_the_cts() {
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &payload(20));
    assert_eq!(tp.poll_timeout(), Some(ms(1250)));
    tp.handle_timeout(ms(1249));
    assert!(drain(&mut tp).is_empty());
    tp.handle_timeout(ms(1250));
    expect_abort(&drain(&mut tp), BMS, AbortReason::Timeout);
    assert!(matches!(
        events(&mut tp)[..],
        [TpEvent::ReceiveAborted {
            reason: AbortReason::Timeout,
            ..
        }]
    ));
}

/// A sender at BMS that sent an RTS for `data` to PILE at t=0.
fn sender_with_rts(cfg: TpConfig, data: &[u8]) -> Transport {
    let mut tp = Transport::new(cfg, BMS);
    tp.send(message(0x0200, BMS, PILE, data.to_vec()), ms(0))
        .unwrap();
    let out = drain(&mut tp);
    assert_eq!(as_cm(&out[0]).1, rts_for(data, 0x0200));
    tp
}

fn send_aborted(reason: AbortReason) -> TpEvent {
    TpEvent::SendAborted {
        pgn: pgn(0x0200),
        destination: PILE,
        reason,
    }
}

#[test]
fn t3_sender_aborts_without_cts_after_rts() {
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &payload(20));
    assert_eq!(tp.poll_timeout(), Some(ms(1250)));
    tp.handle_timeout(ms(1249));
    assert!(drain(&mut tp).is_empty());
    tp.handle_timeout(ms(1250));
    expect_abort(&drain(&mut tp), PILE, AbortReason::Timeout);
    assert_eq!(events(&mut tp), vec![send_aborted(AbortReason::Timeout)]);
    assert_eq!(tp.session_count(), 0);
}

#[test]
fn t3_sender_aborts_without_answer_after_a_window() {
    let data = payload(20);
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&cm_frame(PILE, BMS, cts(2, 1, 0x0200)), ms(100));
    let out = drain(&mut tp);
    assert_eq!(
        out,
        vec![dt_frame(BMS, PILE, &data, 1), dt_frame(BMS, PILE, &data, 2)]
    );
    assert_eq!(tp.poll_timeout(), Some(ms(1350)));
    tp.handle_timeout(ms(1349));
    assert!(drain(&mut tp).is_empty());
    tp.handle_timeout(ms(1350));
    expect_abort(&drain(&mut tp), PILE, AbortReason::Timeout);
    assert_eq!(events(&mut tp), vec![send_aborted(AbortReason::Timeout)]);
}

#[test]
fn t4_sender_waits_after_hold_and_repeated_holds_extend_it() {
    let data = payload(20);
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&cm_frame(PILE, BMS, cts(0, 1, 0x0200)), ms(100));
    assert!(drain(&mut tp).is_empty(), "a hold grants nothing");
    assert_eq!(tp.poll_timeout(), Some(ms(1150)));
    // The receiver repeats its hold within Th: the wait starts over.
    tp.handle_frame(&cm_frame(PILE, BMS, cts(0, 1, 0x0200)), ms(600));
    tp.handle_timeout(ms(1150));
    assert!(drain(&mut tp).is_empty());
    assert_eq!(tp.poll_timeout(), Some(ms(1650)));
    tp.handle_timeout(ms(1649));
    assert!(events(&mut tp).is_empty());
    tp.handle_timeout(ms(1650));
    expect_abort(&drain(&mut tp), PILE, AbortReason::Timeout);
    assert_eq!(events(&mut tp), vec![send_aborted(AbortReason::Timeout)]);
}

#[test]
fn th_holding_receiver_repeats_hold_and_resumes_when_released() {
    let data = payload(20);
    let mut tp = Transport::new(TpConfig::gbt27930(), PILE);
    tp.set_receive_hold(true, ms(0));
    tp.handle_frame(&cm_frame(BMS, PILE, rts_for(&data, 0x0200)), ms(0));
    assert_eq!(drain(&mut tp), vec![cm_frame(PILE, BMS, cts(0, 1, 0x0200))]);
    assert_eq!(tp.poll_timeout(), Some(ms(500)));
    tp.handle_timeout(ms(499));
    assert!(drain(&mut tp).is_empty());
    tp.handle_timeout(ms(500));
    assert_eq!(drain(&mut tp), vec![cm_frame(PILE, BMS, cts(0, 1, 0x0200))]);
    assert_eq!(tp.poll_timeout(), Some(ms(1000)));

    tp.set_receive_hold(false, ms(700));
    assert_eq!(drain(&mut tp), vec![cm_frame(PILE, BMS, cts(3, 1, 0x0200))]);
    assert_eq!(
        tp.poll_timeout(),
        Some(ms(700 + 1250)),
        "T2 after the granting CTS"
    );
    for seq in 1..=3 {
        tp.handle_frame(&dt_frame(BMS, PILE, &data, seq), ms(710));
    }
    assert_eq!(
        as_cm(&drain(&mut tp)[0]).1,
        Cm::EndOfMsgAck {
            size: 20,
            packets: 3,
            pgn: pgn(0x0200)
        }
    );
    assert!(matches!(&events(&mut tp)[..], [TpEvent::Received(m)] if m.data == data));
}

#[test]
fn hold_applies_at_the_next_window_boundary() {
    let data = payload(20);
    let mut cfg = TpConfig::gbt27930();
    cfg.packets_per_cts = 1;
    let mut tp = receiver_with_rts(cfg, &data);
    tp.set_receive_hold(true, ms(5));
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 1), ms(10));
    assert_eq!(drain(&mut tp), vec![cm_frame(PILE, BMS, cts(0, 2, 0x0200))]);
    assert_eq!(tp.poll_timeout(), Some(ms(510)));
}

#[test]
fn a_holding_receiver_keeps_a_real_sender_alive_for_longer_than_t4() {
    let mut sim = Sim::pair(TpConfig::gbt27930(), TpConfig::gbt27930());
    let data = payload(100);
    sim.b.set_receive_hold(true, sim.now);
    sim.a
        .send(message(0x0200, BMS, PILE, data.clone()), sim.now)
        .unwrap();
    assert!(!sim.run_until(ms(3000), 10_000), "still holding at 3 s");
    assert!(
        sim.events_a.is_empty() && sim.events_b.is_empty(),
        "{:?}",
        sim.events_a
    );
    sim.b.set_receive_hold(false, sim.now);
    assert!(sim.run());
    assert!(matches!(&sim.events_b[..], [TpEvent::Received(m)] if m.data == data));
    assert_eq!(
        sim.events_a,
        vec![TpEvent::Sent {
            pgn: pgn(0x0200),
            destination: PILE
        }]
    );
}

#[test]
fn bam_receiver_drops_the_message_after_t1() {
    let data = payload(30);
    let mut tp = Transport::new(TpConfig::gbt27930(), PILE);
    let bam = Cm::Bam {
        size: 30,
        packets: 5,
        pgn: pgn(0xFE00),
    };
    tp.handle_frame(&cm_frame(BMS, Address::GLOBAL, bam), ms(0));
    tp.handle_frame(&dt_frame(BMS, Address::GLOBAL, &data, 1), ms(50));
    assert_eq!(tp.poll_timeout(), Some(ms(800)));
    tp.handle_timeout(ms(800));
    assert!(drain(&mut tp).is_empty(), "no Abort for a broadcast");
    assert_eq!(
        events(&mut tp),
        vec![TpEvent::ReceiveAborted {
            pgn: pgn(0xFE00),
            source: BMS,
            reason: AbortReason::Timeout
        }]
    );
}

// ---------------------------------------------------------------------------
// Aborts, limits and refusals.

#[test]
fn abort_from_the_receiver_ends_our_send_without_an_answer() {
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &payload(20));
    // An abort for another PGN is not ours.
    tp.handle_frame(
        &cm_frame(PILE, BMS, abort(AbortReason::NoResources, 0x0600)),
        ms(5),
    );
    assert_eq!(tp.session_count(), 1);
    tp.handle_frame(
        &cm_frame(PILE, BMS, abort(AbortReason::NoResources, 0x0200)),
        ms(10),
    );
    assert!(drain(&mut tp).is_empty());
    assert_eq!(
        events(&mut tp),
        vec![send_aborted(AbortReason::NoResources)]
    );
    assert_eq!((tp.session_count(), tp.poll_timeout()), (0, None));
}

#[test]
fn abort_from_the_sender_ends_our_reassembly() {
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &payload(20));
    tp.handle_frame(
        &cm_frame(BMS, PILE, abort(AbortReason::Other(250), 0x0200)),
        ms(10),
    );
    assert!(drain(&mut tp).is_empty());
    assert_eq!(
        events(&mut tp),
        vec![TpEvent::ReceiveAborted {
            pgn: pgn(0x0200),
            source: BMS,
            reason: AbortReason::Other(250)
        }]
    );
    assert_eq!((tp.session_count(), tp.buffered_bytes()), (0, 0));
}

#[test]
fn full_session_table_refuses_rts_with_no_resources_and_ignores_bam() {
    let mut cfg = TpConfig::gbt27930();
    cfg.max_sessions = 2;
    let mut tp = Transport::new(cfg, PILE);
    let data = payload(20);
    for src in [Address(1), Address(2)] {
        tp.handle_frame(&cm_frame(src, PILE, rts_for(&data, 0x0200)), ms(0));
    }
    assert_eq!(drain(&mut tp).len(), 2);
    tp.handle_frame(&cm_frame(Address(3), PILE, rts_for(&data, 0x0200)), ms(0));
    let out = drain(&mut tp);
    assert_eq!(
        out,
        vec![cm_frame(
            PILE,
            Address(3),
            abort(AbortReason::NoResources, 0x0200)
        )]
    );
    assert_eq!(
        events(&mut tp),
        vec![TpEvent::ReceiveAborted {
            pgn: pgn(0x0200),
            source: Address(3),
            reason: AbortReason::NoResources
        }]
    );
    let bam = Cm::Bam {
        size: 20,
        packets: 3,
        pgn: pgn(0xFE00),
    };
    tp.handle_frame(&cm_frame(Address(4), Address::GLOBAL, bam), ms(0));
    assert!(drain(&mut tp).is_empty() && events(&mut tp).is_empty());
    assert_eq!(tp.session_count(), 2);
}

#[test]
fn memory_budget_refuses_rts_with_no_resources() {
    let mut cfg = TpConfig::gbt27930();
    cfg.max_buffered_bytes = 100;
    let mut tp = Transport::new(cfg, PILE);
    tp.handle_frame(
        &cm_frame(Address(1), PILE, rts_for(&payload(90), 0x0200)),
        ms(0),
    );
    assert_eq!(tp.buffered_bytes(), 90);
    tp.handle_frame(
        &cm_frame(Address(2), PILE, rts_for(&payload(20), 0x0200)),
        ms(0),
    );
    let out = drain(&mut tp);
    assert_eq!(as_cm(&out[1]).1, abort(AbortReason::NoResources, 0x0200));
    assert_eq!((tp.session_count(), tp.buffered_bytes()), (1, 90));
}

/// Regression (attack suite): BAMs for 1785 bytes from a few addresses,
/// renewed within T1, used to fill the whole pool, and every RTS to us was
/// refused with `NoResources` (the pile simulator lost the vehicle's
/// AuthConfirm this way). Broadcasts now get at most half of it.
#[test]
fn bam_floods_cannot_take_the_room_of_connection_mode_transfers() {
    let mut tp = Transport::new(TpConfig::gbt27930(), PILE);
    let big = MAX_TP_LEN as u16;
    for sa in 0..=0xFD_u8 {
        let bam = Cm::Bam {
            size: big,
            packets: 255,
            pgn: pgn(0xFE00),
        };
        tp.handle_frame(&cm_frame(Address(sa), Address::GLOBAL, bam), ms(0));
    }
    // Half of 4 x 1785 bytes: two broadcasts.
    assert_eq!(tp.session_count(), 2);
    assert_eq!(tp.buffered_bytes(), 2 * MAX_TP_LEN);
    // A 46-byte transfer to us (AuthConfirm) still gets its CTS.
    tp.handle_frame(&cm_frame(BMS, PILE, rts_for(&payload(46), 0xEF00)), ms(1));
    let out = drain(&mut tp);
    assert_eq!(out.len(), 1);
    assert_eq!(as_cm(&out[0]).1, cts(7, 1, 0xEF00));
}

#[test]
fn oversized_and_inconsistent_rts_are_aborted() {
    let mut tp = Transport::new(TpConfig::gbt27930(), PILE);
    let huge = Cm::Rts {
        size: 1786,
        packets: 255,
        max_per_cts: 0xFF,
        pgn: pgn(0x0200),
    };
    tp.handle_frame(&cm_frame(BMS, PILE, huge), ms(0));
    expect_abort(&drain(&mut tp), BMS, AbortReason::TooLarge);
    let liar = Cm::Rts {
        size: 20,
        packets: 4,
        max_per_cts: 0xFF,
        pgn: pgn(0x0200),
    };
    tp.handle_frame(&cm_frame(BMS, PILE, liar), ms(0));
    expect_abort(&drain(&mut tp), BMS, AbortReason::ANY_OTHER);
    assert_eq!(events(&mut tp).len(), 2);
    assert_eq!(tp.session_count(), 0);
}

#[test]
fn send_refuses_too_large_busy_and_full() {
    let mut cfg = TpConfig::gbt27930();
    cfg.max_sessions = 2;
    let mut tp = Transport::new(cfg, BMS);
    assert_eq!(
        tp.send(message(0x0200, BMS, PILE, payload(1786)), ms(0)),
        Err(TpError::TooLarge {
            pgn: pgn(0x0200),
            len: 1786
        })
    );
    tp.send(message(0x0200, BMS, PILE, payload(20)), ms(0))
        .unwrap();
    let busy = tp.send(message(0x0600, BMS, PILE, payload(20)), ms(0));
    assert_eq!(
        busy,
        Err(TpError::Busy {
            pgn: pgn(0x0600),
            destination: PILE,
            in_progress: pgn(0x0200)
        })
    );
    assert!(busy.unwrap_err().to_string().contains("retry"));
    // Single frames never need a session.
    tp.send(message(0x2600, BMS, PILE, vec![1]), ms(0)).unwrap();
    tp.send(message(0xFE00, BMS, Address::GLOBAL, payload(20)), ms(0))
        .unwrap();
    assert_eq!(
        tp.send(message(0x0200, BMS, OTHER, payload(20)), ms(0)),
        Err(TpError::NoSessionSlot {
            pgn: pgn(0x0200),
            destination: OTHER,
            max: 2
        })
    );
}

#[test]
fn repeated_rts_for_the_same_pgn_restarts_the_transfer_without_abort() {
    let data = payload(20);
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 1), ms(10));
    tp.handle_frame(&cm_frame(BMS, PILE, rts_for(&data, 0x0200)), ms(20));
    assert_eq!(drain(&mut tp), vec![cm_frame(PILE, BMS, cts(3, 1, 0x0200))]);
    assert!(events(&mut tp).is_empty());
    assert_eq!(tp.buffered_bytes(), 20);
    for seq in 1..=3 {
        tp.handle_frame(&dt_frame(BMS, PILE, &data, seq), ms(30));
    }
    assert!(matches!(&events(&mut tp)[..], [TpEvent::Received(m)] if m.data == data));
}

#[test]
fn rts_for_another_pgn_during_a_transfer_is_refused_and_the_first_completes() {
    let data = payload(20);
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&cm_frame(BMS, PILE, rts_for(&payload(30), 0x0600)), ms(5));
    assert_eq!(
        drain(&mut tp),
        vec![cm_frame(
            PILE,
            BMS,
            abort(AbortReason::AlreadyInSession, 0x0600)
        )]
    );
    assert_eq!(
        events(&mut tp),
        vec![TpEvent::ReceiveAborted {
            pgn: pgn(0x0600),
            source: BMS,
            reason: AbortReason::AlreadyInSession
        }]
    );
    for seq in 1..=3 {
        tp.handle_frame(&dt_frame(BMS, PILE, &data, seq), ms(10));
    }
    assert!(
        matches!(&events(&mut tp)[..], [TpEvent::Received(m)] if m.pgn == pgn(0x0200) && m.data == data)
    );
}

// ---------------------------------------------------------------------------
// Sequence handling and retransmission.

#[test]
fn duplicate_packets_are_ignored() {
    let data = payload(20);
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 1), ms(10));
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 1), ms(11));
    assert!(drain(&mut tp).is_empty() && events(&mut tp).is_empty());
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 2), ms(12));
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 3), ms(13));
    assert_eq!(drain(&mut tp).len(), 1, "one EndOfMsgAck");
    assert!(matches!(&events(&mut tp)[..], [TpEvent::Received(m)] if m.data == data));
}

#[test]
fn packet_beyond_the_announced_count_is_a_bad_sequence() {
    let data = payload(20);
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(
        &raw(7, 0xEB00, BMS, PILE, &[9, 0, 0, 0, 0, 0, 0, 0]),
        ms(10),
    );
    expect_abort(&drain(&mut tp), BMS, AbortReason::BadSequence);
    assert!(matches!(
        events(&mut tp)[..],
        [TpEvent::ReceiveAborted {
            reason: AbortReason::BadSequence,
            ..
        }]
    ));
}

#[test]
fn receiver_asks_again_for_a_missing_packet() {
    let data = payload(28); // 4 packets
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &data);
    for seq in [1, 3, 4] {
        tp.handle_frame(&dt_frame(BMS, PILE, &data, seq), ms(10));
    }
    assert_eq!(drain(&mut tp), vec![cm_frame(PILE, BMS, cts(1, 2, 0x0200))]);
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 2), ms(20));
    assert_eq!(
        as_cm(&drain(&mut tp)[0]).1,
        Cm::EndOfMsgAck {
            size: 28,
            packets: 4,
            pgn: pgn(0x0200)
        }
    );
    assert!(matches!(&events(&mut tp)[..], [TpEvent::Received(m)] if m.data == data));
}

#[test]
fn receiver_gives_up_after_too_many_retransmission_requests() {
    // Each time the last packet of a window arrives with gaps before it, the
    // receiver asks again; max_retransmits is 2.
    let data2 = payload(35); // 5 packets
    let mut tp2 = receiver_with_rts(TpConfig::gbt27930(), &data2);
    tp2.handle_frame(&dt_frame(BMS, PILE, &data2, 5), ms(10)); // window end, 1-4 missing: request 1
    assert_eq!(
        drain(&mut tp2),
        vec![cm_frame(PILE, BMS, cts(4, 1, 0x0200))]
    );
    tp2.handle_frame(&dt_frame(BMS, PILE, &data2, 4), ms(11)); // end again, 1-3 missing: request 2
    assert_eq!(
        drain(&mut tp2),
        vec![cm_frame(PILE, BMS, cts(3, 1, 0x0200))]
    );
    tp2.handle_frame(&dt_frame(BMS, PILE, &data2, 3), ms(12)); // third: over the limit of 2
    expect_abort(&drain(&mut tp2), BMS, AbortReason::MaxRetransmit);
}

#[test]
fn sender_honours_retransmission_requests() {
    let data = payload(28);
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&cm_frame(PILE, BMS, cts(4, 1, 0x0200)), ms(10));
    assert_eq!(drain(&mut tp).len(), 4);
    // The receiver asks for 2 and 3 again: exactly those go out again.
    tp.handle_frame(&cm_frame(PILE, BMS, cts(2, 2, 0x0200)), ms(20));
    assert_eq!(
        drain(&mut tp),
        vec![dt_frame(BMS, PILE, &data, 2), dt_frame(BMS, PILE, &data, 3)]
    );
    let eoma = Cm::EndOfMsgAck {
        size: 28,
        packets: 4,
        pgn: pgn(0x0200),
    };
    tp.handle_frame(&cm_frame(PILE, BMS, eoma), ms(30));
    assert_eq!(
        events(&mut tp),
        vec![TpEvent::Sent {
            pgn: pgn(0x0200),
            destination: PILE
        }]
    );
    assert_eq!(tp.session_count(), 0);
}

#[test]
fn sender_aborts_when_retransmissions_exceed_the_limit() {
    let data = payload(14);
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&cm_frame(PILE, BMS, cts(2, 1, 0x0200)), ms(10));
    assert_eq!(drain(&mut tp).len(), 2);
    for t in [20, 30] {
        tp.handle_frame(&cm_frame(PILE, BMS, cts(2, 1, 0x0200)), ms(t));
        assert_eq!(drain(&mut tp).len(), 2, "retransmission honoured");
    }
    tp.handle_frame(&cm_frame(PILE, BMS, cts(2, 1, 0x0200)), ms(40));
    expect_abort(&drain(&mut tp), PILE, AbortReason::MaxRetransmit);
    assert_eq!(
        events(&mut tp),
        vec![send_aborted(AbortReason::MaxRetransmit)]
    );
}

#[test]
fn progress_resets_the_retransmission_count() {
    // Sender side: a request for new packets between retransmissions.
    let data = payload(35); // 5 packets
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    let mut t = 10;
    let mut cts_in = |tp: &mut Transport, count, next| {
        t += 10;
        tp.handle_frame(&cm_frame(PILE, BMS, cts(count, next, 0x0200)), ms(t));
        drain(tp)
    };
    assert_eq!(cts_in(&mut tp, 2, 1).len(), 2);
    assert_eq!(cts_in(&mut tp, 1, 2).len(), 1); // retransmission 1
    assert_eq!(cts_in(&mut tp, 1, 2).len(), 1); // retransmission 2
    assert_eq!(cts_in(&mut tp, 2, 3).len(), 2); // progress
    assert_eq!(cts_in(&mut tp, 1, 4).len(), 1); // retransmission 1 again
    assert_eq!(cts_in(&mut tp, 1, 4).len(), 1); // retransmission 2
    assert_eq!(cts_in(&mut tp, 1, 5).len(), 1); // progress
    assert!(events(&mut tp).is_empty());

    // Receiver side: two gaps healed in separate windows of 2.
    let mut cfg = TpConfig::gbt27930();
    cfg.packets_per_cts = 2;
    cfg.max_retransmits = 1;
    let mut rx = receiver_with_rts(cfg, &data);
    let dt_in = |rx: &mut Transport, seq| {
        rx.handle_frame(&dt_frame(BMS, PILE, &data, seq), ms(20));
        drain(rx)
    };
    assert_eq!(
        dt_in(&mut rx, 2),
        vec![cm_frame(PILE, BMS, cts(1, 1, 0x0200))]
    );
    assert_eq!(
        dt_in(&mut rx, 1),
        vec![cm_frame(PILE, BMS, cts(2, 3, 0x0200))]
    );
    assert_eq!(
        dt_in(&mut rx, 4),
        vec![cm_frame(PILE, BMS, cts(1, 3, 0x0200))]
    );
    assert_eq!(
        dt_in(&mut rx, 3),
        vec![cm_frame(PILE, BMS, cts(1, 5, 0x0200))]
    );
    assert_eq!(
        as_cm(&dt_in(&mut rx, 5)[0]).1,
        Cm::EndOfMsgAck {
            size: 35,
            packets: 5,
            pgn: pgn(0x0200)
        }
    );
    assert!(matches!(&events(&mut rx)[..], [TpEvent::Received(m)] if m.data == data));
}

#[test]
fn a_new_bam_for_another_pgn_ends_the_open_one() {
    let mut tp = Transport::new(TpConfig::gbt27930(), PILE);
    let bam = |p| Cm::Bam {
        size: 20,
        packets: 3,
        pgn: pgn(p),
    };
    let data = payload(20);
    tp.handle_frame(&cm_frame(BMS, Address::GLOBAL, bam(0xFE00)), ms(0));
    tp.handle_frame(&dt_frame(BMS, Address::GLOBAL, &data, 1), ms(50));
    // The same PGN again: a silent restart.
    tp.handle_frame(&cm_frame(BMS, Address::GLOBAL, bam(0xFE00)), ms(100));
    assert!(events(&mut tp).is_empty());
    tp.handle_frame(&cm_frame(BMS, Address::GLOBAL, bam(0xFE01)), ms(150));
    assert_eq!(
        events(&mut tp),
        vec![TpEvent::ReceiveAborted {
            pgn: pgn(0xFE00),
            source: BMS,
            reason: AbortReason::NoResources
        }]
    );
    for seq in 1..=3 {
        tp.handle_frame(&dt_frame(BMS, Address::GLOBAL, &data, seq), ms(200));
    }
    assert!(
        matches!(&events(&mut tp)[..], [TpEvent::Received(m)] if m.pgn == pgn(0xFE01) && m.data == data)
    );
    assert!(drain(&mut tp).is_empty(), "a BAM receiver never transmits");
}

#[test]
fn cts_during_a_window_aborts_but_a_duplicate_does_not() {
    let data = payload(28);
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&cm_frame(PILE, BMS, cts(4, 1, 0x0200)), ms(10));
    assert_eq!(tp.poll_transmit(), Some(dt_frame(BMS, PILE, &data, 1)));
    tp.handle_frame(&cm_frame(PILE, BMS, cts(4, 1, 0x0200)), ms(11));
    assert_eq!(tp.poll_transmit(), Some(dt_frame(BMS, PILE, &data, 2)));
    tp.handle_frame(&cm_frame(PILE, BMS, cts(1, 4, 0x0200)), ms(12));
    expect_abort(&drain(&mut tp), PILE, AbortReason::CtsWhileDt);
    assert_eq!(events(&mut tp), vec![send_aborted(AbortReason::CtsWhileDt)]);
}

#[test]
fn cts_for_a_packet_that_does_not_exist_aborts() {
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &payload(14));
    tp.handle_frame(&cm_frame(PILE, BMS, cts(1, 3, 0x0200)), ms(10));
    expect_abort(&drain(&mut tp), PILE, AbortReason::BadSequence);
}

#[test]
fn early_or_foreign_end_of_message_ack_is_ignored() {
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &payload(14));
    let eoma = |p| Cm::EndOfMsgAck {
        size: 14,
        packets: 2,
        pgn: pgn(p),
    };
    tp.handle_frame(&cm_frame(PILE, BMS, eoma(0x0200)), ms(5));
    tp.handle_frame(&cm_frame(PILE, BMS, cts(2, 1, 0x0200)), ms(10));
    assert_eq!(drain(&mut tp).len(), 2);
    tp.handle_frame(&cm_frame(PILE, BMS, eoma(0x0600)), ms(15));
    assert!(events(&mut tp).is_empty());
    tp.handle_frame(&cm_frame(PILE, BMS, eoma(0x0200)), ms(20));
    assert_eq!(
        events(&mut tp),
        vec![TpEvent::Sent {
            pgn: pgn(0x0200),
            destination: PILE
        }]
    );
}

// ---------------------------------------------------------------------------
// Interop with other stacks (the Linux kernel's in particular).

#[test]
fn kernel_style_sender_is_accepted() {
    // The kernel uses its own priority (6 here), puts the packet count in
    // RTS byte 5 and its junk may reach reserved bytes.
    let data = payload(40); // 6 packets
    let mut tp = Transport::new(TpConfig::gbt27930(), PILE);
    let rts = [0x10, 40, 0, 6, 2, 0x00, 0x02, 0x00];
    tp.handle_frame(&raw(6, 0xEC00, BMS, PILE, &rts), ms(0));
    assert_eq!(drain(&mut tp), vec![cm_frame(PILE, BMS, cts(2, 1, 0x0200))]);
    let mut t = 1;
    for window in [[1u8, 2], [3, 4], [5, 6]] {
        for seq in window {
            tp.handle_frame(
                &raw(6, 0xEB00, BMS, PILE, &wire::dt_payload(&data, seq)),
                ms(t),
            );
            t += 1;
        }
        let out = drain(&mut tp);
        assert_eq!(out.len(), 1);
        if window[0] < 5 {
            assert_eq!(as_cm(&out[0]).1, cts(2, window[0] + 2, 0x0200));
        }
    }
    match &events(&mut tp)[..] {
        [TpEvent::Received(m)] => {
            assert_eq!(m.data, data);
            assert_eq!(m.priority, prio(6), "priority of the RTS");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rts_byte5_zero_means_no_limit_and_reserved_bytes_need_not_be_ff() {
    let mut tp = Transport::new(TpConfig::gbt27930(), PILE);
    // Byte 5 = 0 and a junk low byte in the PDU1 PGN (0x0233 reads as 0x0200).
    tp.handle_frame(
        &raw(7, 0xEC00, BMS, PILE, &[0x10, 20, 0, 3, 0, 0x33, 0x02, 0x00]),
        ms(0),
    );
    assert_eq!(drain(&mut tp), vec![cm_frame(PILE, BMS, cts(3, 1, 0x0200))]);
}

#[test]
fn unpadded_last_packet_completes_the_message() {
    let data = payload(9);
    let mut tp = receiver_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&dt_frame(BMS, PILE, &data, 1), ms(1));
    tp.handle_frame(&raw(7, 0xEB00, BMS, PILE, &[2, data[7], data[8]]), ms(2));
    assert!(matches!(&events(&mut tp)[..], [TpEvent::Received(m)] if m.data == data));
}

// ---------------------------------------------------------------------------
// Property tests.

/// A frame biased towards TP traffic between a few addresses.
fn arb_frame() -> impl Strategy<Value = CanFrame> {
    let addr = prop_oneof![
        Just(BMS),
        Just(PILE),
        Just(OTHER),
        Just(Address::GLOBAL),
        any::<u8>().prop_map(Address)
    ];
    let pgn_bytes = prop_oneof![
        Just([0x00u8, 0x02, 0x00]),
        Just([0x00, 0x06, 0x00]),
        Just([0x00, 0xFE, 0x00]),
        any::<[u8; 3]>()
    ];
    let size = prop_oneof![1u16..64, 0u16..2000];
    let cm = (
        prop_oneof![
            Just(16u8),
            Just(17),
            Just(19),
            Just(32),
            Just(255),
            any::<u8>()
        ],
        size,
        prop_oneof![0u8..12, any::<u8>()],
        any::<bool>(),
        pgn_bytes,
        prop_oneof![4 => Just(8usize), 1 => 0usize..8],
    )
        .prop_map(|(ctrl, size, small, consistent, p, len)| {
            let [s0, s1] = size.to_le_bytes();
            let packets = if consistent {
                packets_for(usize::from(size)) as u8
            } else {
                small
            };
            let (b1, b2, b3) = match ctrl {
                17 => (small, small / 2 + 1, 0xFF),
                255 => (small, 0xFF, 0xFF),
                _ => (s0, s1, packets),
            };
            let bytes = [ctrl, b1, b2, b3, small, p[0], p[1], p[2]];
            bytes[..len].to_vec()
        });
    let dt = (
        prop_oneof![0u8..12, any::<u8>()],
        proptest::collection::vec(any::<u8>(), 0..=7),
    )
        .prop_map(|(seq, mut rest)| {
            rest.insert(0, seq);
            rest
        });
    let tp_frame = (
        addr.clone(),
        addr,
        prop_oneof![Just(0xEC00u32), Just(0xEB00)],
        prop_oneof![cm, dt],
    )
        .prop_map(|(sa, da, p, data)| raw(7, p, sa, da, &data));
    let any_frame = (
        0u32..=ExtendedId::MAX,
        proptest::collection::vec(any::<u8>(), 0..=8),
    )
        .prop_map(|(id, data)| {
            CanFrame::new(CanId::Extended(ExtendedId::new(id).unwrap()), &data).unwrap()
        });
    prop_oneof![6 => tp_frame, 1 => any_frame]
}

#[derive(Debug, Clone)]
enum Input {
    Frame(CanFrame),
    Advance(u16),
    Send(u16, bool),
    Hold(bool),
}

fn arb_input() -> impl Strategy<Value = Input> {
    prop_oneof![
        8 => arb_frame().prop_map(Input::Frame),
        2 => (0u16..1500).prop_map(Input::Advance),
        1 => (0u16..300, any::<bool>()).prop_map(|(len, global)| Input::Send(len, global)),
        1 => any::<bool>().prop_map(Input::Hold),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever arrives, the transport never panics and stays within its
    /// session and memory bounds, and it always settles once input stops.
    #[test]
    fn arbitrary_input_never_panics_and_stays_bounded(inputs in proptest::collection::vec(arb_input(), 0..120)) {
        let mut cfg = TpConfig::gbt27930();
        cfg.max_sessions = 3;
        cfg.max_buffered_bytes = 200;
        let mut tp = Transport::new(cfg, PILE);
        let mut now = ms(0);
        for input in inputs {
            match input {
                Input::Frame(f) => tp.handle_frame(&f, now),
                Input::Advance(d) => {
                    now = now + Duration::from_millis(d.into());
                    tp.handle_timeout(now);
                }
                Input::Send(len, global) => {
                    let to = if global { Address::GLOBAL } else { BMS };
                    let _ = tp.send(message(0x0200, PILE, to, payload(len.into())), now);
                }
                Input::Hold(h) => tp.set_receive_hold(h, now),
            }
            drain(&mut tp);
            events(&mut tp);
            prop_assert!(tp.session_count() <= 3);
            prop_assert!(tp.buffered_bytes() <= 200);
        }
        // Without further input every session ends by a timer.
        tp.set_receive_hold(false, now);
        for _ in 0..600 {
            let Some(t) = tp.poll_timeout() else { break };
            now = now.max(t);
            tp.handle_timeout(now);
            drain(&mut tp);
        }
        prop_assert_eq!(tp.poll_timeout(), None);
        prop_assert_eq!(tp.session_count(), 0);
        prop_assert_eq!(tp.buffered_bytes(), 0);
    }
}

fn arb_fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        2 => Just(Fault::Drop),
        2 => Just(Fault::Duplicate),
        1 => (1u16..40).prop_map(Fault::Delay),
        1 => (40u16..2000).prop_map(Fault::Delay),
    ]
}

/// A fault schedule: a few faults at random frame positions, every other
/// frame passing. Sparse schedules reach the recovery paths (retransmission,
/// restarts) instead of failing every transfer early.
fn arb_schedule() -> impl Strategy<Value = VecDeque<Fault>> {
    proptest::collection::vec((0usize..120, arb_fault()), 0..10).prop_map(|faults| {
        let mut schedule = VecDeque::from(vec![Fault::Pass; 120]);
        for (at, fault) in faults {
            schedule[at] = fault;
        }
        schedule
    })
}

/// The reasons a transfer may legitimately die of on a lossy link.
fn lossy_reason(reason: AbortReason) -> bool {
    matches!(reason, AbortReason::Timeout | AbortReason::MaxRetransmit)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Under loss, duplication and reordering a transfer either delivers the
    /// exact payload or ends in an abort on both sides; it never delivers
    /// anything else and never hangs.
    #[test]
    fn lossy_link_delivers_exactly_or_aborts(
        len in 9usize..300,
        per_cts in prop_oneof![Just(1u8), 2u8..8, Just(255)],
        bam in proptest::bool::weighted(0.2),
        faults in arb_schedule(),
    ) {
        let mut cfg_b = TpConfig::gbt27930();
        cfg_b.packets_per_cts = per_cts;
        let mut sim = Sim::pair(TpConfig::gbt27930(), cfg_b);
        sim.faults = faults;
        let data = payload(len);
        let to = if bam { Address::GLOBAL } else { PILE };
        sim.a.send(message(0x0200, BMS, to, data.clone()), sim.now).unwrap();
        prop_assert!(sim.run(), "pump did not settle");
        prop_assert_eq!(sim.a.session_count() + sim.b.session_count(), 0);
        prop_assert!(sim.wire.is_empty());

        let mut delivered = 0;
        let mut receive_aborts = 0;
        for e in &sim.events_b {
            match e {
                TpEvent::Received(m) => {
                    prop_assert_eq!(&m.data, &data, "wrong payload");
                    prop_assert_eq!((m.pgn, m.source, m.destination), (pgn(0x0200), BMS, to));
                    delivered += 1;
                }
                TpEvent::ReceiveAborted { reason, pgn: p, source } => {
                    prop_assert!(lossy_reason(*reason), "receiver: {:?}", reason);
                    prop_assert_eq!((*p, *source), (pgn(0x0200), BMS));
                    receive_aborts += 1;
                }
                other => prop_assert!(false, "unexpected receiver event {:?}", other),
            }
        }
        // A receiver that heard the announcement ends with the message or an
        // abort; one that did not has nothing to report.
        let heard = sim.heard_by_b.iter().any(|f| {
            J1939Id::from_can_id(f.id()).unwrap().pgn == TP_CM
                && matches!(Cm::parse(f.data()), Ok(Cm::Rts { .. } | Cm::Bam { .. }))
        });
        prop_assert!(!heard || delivered >= 1 || receive_aborts >= 1, "receiver ended silently");
        prop_assert!(heard || sim.events_b.is_empty());

        prop_assert_eq!(sim.events_a.len(), 1, "sender ends exactly once: {:?}", sim.events_a);
        match &sim.events_a[0] {
            TpEvent::Sent { .. } if bam => {
                // Nobody acknowledges a broadcast, so Sent says nothing about
                // delivery; but a BAM is never delivered twice.
                prop_assert!(delivered <= 1, "BAM delivered {} times", delivered);
            }
            TpEvent::Sent { .. } => prop_assert!(delivered >= 1, "Sent without delivery"),
            TpEvent::SendAborted { reason, .. } => {
                prop_assert!(!bam, "a BAM send cannot be aborted");
                prop_assert!(lossy_reason(*reason), "sender: {:?}", reason);
            }
            other => prop_assert!(false, "unexpected sender event {:?}", other),
        }
    }
}

/// A clean link with no faults delivers every size, as a sanity check of
/// the fault pump itself.
#[test]
fn fault_free_schedule_always_delivers() {
    let mut sim = Sim::pair(TpConfig::gbt27930(), TpConfig::gbt27930());
    sim.faults = vec![Fault::Pass; 10].into();
    sim.a
        .send(message(0x0200, BMS, PILE, payload(300)), sim.now)
        .unwrap();
    assert!(sim.run());
    assert!(matches!(&sim.events_b[..], [TpEvent::Received(m)] if m.data == payload(300)));
}

#[test]
fn a_lost_packet_is_recovered_by_retransmission() {
    let mut sim = Sim::pair(TpConfig::gbt27930(), TpConfig::gbt27930());
    // RTS, CTS, DT1 pass; DT2 is lost; the rest pass.
    sim.faults = vec![Fault::Pass, Fault::Pass, Fault::Pass, Fault::Drop].into();
    let data = payload(35);
    sim.a
        .send(message(0x0200, BMS, PILE, data.clone()), sim.now)
        .unwrap();
    assert!(sim.run());
    assert!(matches!(&sim.events_b[..], [TpEvent::Received(m)] if m.data == data));
    assert_eq!(
        sim.events_a,
        vec![TpEvent::Sent {
            pgn: pgn(0x0200),
            destination: PILE
        }]
    );
    let retransmit_request = sim
        .frames_from(PILE)
        .iter()
        .any(|(_, f)| as_cm(f).1 == cts(1, 2, 0x0200));
    assert!(retransmit_request);
}

/// Move frames between two transports until neither sends anything.
fn exchange(a: &mut Transport, b: &mut Transport, now: Timestamp) {
    loop {
        let (from_a, from_b) = (drain(a), drain(b));
        if from_a.is_empty() && from_b.is_empty() {
            return;
        }
        from_a.iter().for_each(|f| b.handle_frame(f, now));
        from_b.iter().for_each(|f| a.handle_frame(f, now));
    }
}

#[test]
fn send_replacing_restarts_a_stalled_transfer_and_the_receiver_follows() {
    let data = payload(40);
    let mut a = Transport::new(TpConfig::j1939(), BMS);
    let mut b = Transport::new(TpConfig::j1939(), PILE);
    a.send(message(0xB600, BMS, PILE, data.clone()), ms(0))
        .expect("the first copy is queued");
    // The first RTS reaches the receiver; its CTS is lost.
    for f in drain(&mut a) {
        b.handle_frame(&f, ms(0));
    }
    assert_eq!(drain(&mut b).len(), 1, "the CTS");
    // A plain send is refused while the first transfer waits for T3 ...
    assert!(matches!(
        a.send(message(0xB600, BMS, PILE, data.clone()), ms(300)),
        Err(TpError::Busy { .. })
    ));
    // ... send_replacing abandons it (no Abort on the wire) and starts anew.
    a.send_replacing(message(0xB600, BMS, PILE, data.clone()), ms(300))
        .expect("the stalled copy is replaced");
    let frames = drain(&mut a);
    assert_eq!(frames.len(), 1);
    assert!(
        matches!(as_cm(&frames[0]).1, Cm::Rts { .. }),
        "a new RTS, no Abort"
    );
    for f in &frames {
        b.handle_frame(f, ms(300));
    }
    exchange(&mut a, &mut b, ms(300));
    let received: Vec<_> = events(&mut b)
        .into_iter()
        .filter_map(|e| match e {
            TpEvent::Received(m) => Some(m.data),
            _ => None,
        })
        .collect();
    assert_eq!(received, vec![data], "delivered once, whole");
    assert!(events(&mut a).contains(&TpEvent::Sent {
        pgn: pgn(0xB600),
        destination: PILE
    }));
    assert_eq!((a.session_count(), b.session_count()), (0, 0));
}

// ---------------------------------------------------------------- field deviations

fn field_cts(count: u8, next: u8, bytes_4_5: u16, pgn: Option<u32>) -> Cm {
    Cm::Cts {
        count,
        next,
        bytes_4_5,
        pgn: pgn.map(self::pgn),
    }
}

fn deviations(events: &[TpEvent]) -> Vec<(crate::interop::Deviation, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            TpEvent::Deviation {
                peer,
                deviation,
                refused,
                ..
            } if *peer == PILE => Some((*deviation, *refused)),
            _ => None,
        })
        .collect()
}

/// A receiver's packet interval spaces the window (field profile); T3
/// starts after the window, and the spacing is capped at MAX_CTS_GAP.
#[test]
fn a_cts_interval_paces_the_window_and_is_capped() {
    use crate::interop::Deviation;
    let data = payload(20); // 3 packets
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(
        &cm_frame(PILE, BMS, field_cts(3, 1, 10, Some(0x0200))),
        ms(100),
    );
    assert_eq!(drain(&mut tp), vec![dt_frame(BMS, PILE, &data, 1)]);
    assert_eq!(tp.poll_timeout(), Some(ms(110)));
    tp.handle_timeout(ms(109));
    assert!(drain(&mut tp).is_empty());
    tp.handle_timeout(ms(110));
    assert_eq!(drain(&mut tp), vec![dt_frame(BMS, PILE, &data, 2)]);
    tp.handle_timeout(ms(120));
    assert_eq!(drain(&mut tp), vec![dt_frame(BMS, PILE, &data, 3)]);
    // T3 from the end of the window: 100 + 3 x 10 + 1250.
    assert_eq!(tp.poll_timeout(), Some(ms(1380)));
    assert_eq!(
        deviations(&events(&mut tp)),
        [(Deviation::CtsPacketInterval, false)]
    );

    // 0xFFFE ms (65 s): cut to MAX_CTS_GAP, so the receiver's T1 holds.
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(
        &cm_frame(PILE, BMS, field_cts(3, 1, 0xFFFE, Some(0x0200))),
        ms(0),
    );
    assert_eq!(drain(&mut tp).len(), 1);
    assert_eq!(tp.poll_timeout(), Some(ms(0) + MAX_CTS_GAP));
}

/// FF FF (J1939-21) and 00 00 (ours) are no interval: nothing reported.
#[test]
fn standard_and_our_own_cts_bytes_are_no_deviation() {
    for bytes in [0xFFFF, 0x0000] {
        let data = payload(20);
        let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
        tp.handle_frame(
            &cm_frame(PILE, BMS, field_cts(3, 1, bytes, Some(0x0200))),
            ms(0),
        );
        assert_eq!(drain(&mut tp).len(), 3);
        assert!(deviations(&events(&mut tp)).is_empty());
    }
}

/// A CTS without its PGN is taken for the transfer in progress to that
/// peer (field), and counted once per transfer.
#[test]
fn a_cts_without_pgn_drives_the_open_transfer() {
    use crate::interop::Deviation;
    let data = payload(20);
    let mut tp = sender_with_rts(TpConfig::gbt27930(), &data);
    tp.handle_frame(&cm_frame(PILE, BMS, field_cts(2, 1, 0xFFFF, None)), ms(10));
    assert_eq!(drain(&mut tp).len(), 2);
    tp.handle_frame(&cm_frame(PILE, BMS, field_cts(1, 3, 0xFFFF, None)), ms(20));
    assert_eq!(drain(&mut tp), vec![dt_frame(BMS, PILE, &data, 3)]);
    tp.handle_frame(
        &cm_frame(
            PILE,
            BMS,
            Cm::EndOfMsgAck {
                size: 20,
                packets: 3,
                pgn: pgn(0x0200),
            },
        ),
        ms(30),
    );
    let ev = events(&mut tp);
    assert_eq!(deviations(&ev), [(Deviation::CtsWithoutPgn, false)]);
    assert!(ev.contains(&TpEvent::Sent {
        pgn: pgn(0x0200),
        destination: PILE
    }));
    // From a node we have no transfer with, it does nothing.
    let mut idle = Transport::new(TpConfig::gbt27930(), BMS);
    idle.handle_frame(&cm_frame(PILE, BMS, field_cts(2, 1, 0xFFFF, None)), ms(0));
    assert!(drain(&mut idle).is_empty() && events(&mut idle).is_empty());
}

/// The strict profile aborts the transfer on either, naming the deviation.
#[test]
fn strict_aborts_on_a_cts_interval_or_a_missing_pgn() {
    use crate::interop::{Deviation, Profile};
    for (cts, d) in [
        (
            field_cts(3, 1, 10, Some(0x0200)),
            Deviation::CtsPacketInterval,
        ),
        (field_cts(3, 1, 0xFFFF, None), Deviation::CtsWithoutPgn),
    ] {
        let cfg = TpConfig::gbt27930().with_profile(Profile::Strict);
        let mut tp = sender_with_rts(cfg, &payload(20));
        tp.handle_frame(&cm_frame(PILE, BMS, cts), ms(0));
        expect_abort(&drain(&mut tp), PILE, AbortReason::ANY_OTHER);
        let ev = events(&mut tp);
        assert_eq!(deviations(&ev), [(d, true)]);
        assert!(ev.contains(&send_aborted(AbortReason::ANY_OTHER)));
        assert_eq!(tp.session_count(), 0);
    }
}
