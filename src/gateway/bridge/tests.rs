//! Bridge tests: one per firewall rule with hand-made frames, TP through the
//! bridge between real J1939 transports standing in for the BMS and the
//! pile, and a property test feeding the pile side arbitrary frames.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::can::{CanId, ExtendedId, StandardId};
use crate::gbt27930::bms::BmsConfig;
use crate::gbt27930::units::{CentiVolt, Current, DeciKwh, DeciPercent, DeciVolt, Temperature};
use crate::gbt27930::{
    BMS_ADDRESS, Bcp, CHARGER_ADDRESS, ChargerNumber, Chm, Crm, Message, MessageKind,
    ProtocolVersion, Recognition, RegionCode,
};
use crate::interop::Deviation;
use crate::j1939::tp::{Cm, TP_CM, TP_DT};
use crate::j1939::{Address, J1939Id, Pgn, Priority};

const BMS: Address = Address(BMS_ADDRESS);
const PILE: Address = Address(CHARGER_ADDRESS);
const GATEWAY: Address = Address(0xF5);
const STRANGER: Address = Address(0x10);

fn ms(v: u64) -> Timestamp {
    Timestamp::from_millis(v)
}

fn config() -> FirewallConfig {
    FirewallConfig::gbt27930(BMS, PILE, GATEWAY)
}

fn frame(priority: u8, pgn: Pgn, source: Address, destination: Address, data: &[u8]) -> CanFrame {
    let id = J1939Id::new(Priority::new(priority).unwrap(), pgn, source, destination);
    CanFrame::new(id.to_can_id(), data).unwrap()
}

/// A GB/T message as the single frame its sender would put on the bus.
fn gbt_frame(msg: &Message, source: Address, destination: Address) -> CanFrame {
    let kind = msg.kind();
    frame(
        kind.priority().get(),
        kind.pgn(),
        source,
        destination,
        &msg.encode(),
    )
}

fn chm() -> Message {
    Message::Chm(Chm {
        version: ProtocolVersion::V1_1,
    })
}

fn crm(recognition: Recognition) -> Message {
    Message::Crm(Crm {
        recognition,
        charger_number: ChargerNumber(7),
        region_code: RegionCode(*b"123"),
    })
}

/// A BCS as the standard sends it: 9 bytes, over TP.
fn bcs_bytes() -> Vec<u8> {
    Message::Bcs(crate::gbt27930::Bcs {
        measured_voltage: DeciVolt(3700),
        measured_current: Current::charging(100.0),
        max_cell: crate::gbt27930::CellVoltage {
            voltage: CentiVolt(380),
            group: 1,
        },
        soc_percent: 51,
        remaining_minutes: 30,
    })
    .encode()
}

fn brm_bytes() -> Vec<u8> {
    Message::Brm(BmsConfig::default().identity).encode()
}

fn bcp() -> Message {
    Message::Bcp(Bcp {
        max_cell_voltage: CentiVolt(420),
        max_charging_current: Current::charging(200.0),
        nominal_energy: DeciKwh(600),
        max_charging_voltage: DeciVolt(4200),
        max_temperature: Temperature::from_celsius(60),
        soc: DeciPercent(500),
        battery_voltage: DeciVolt(3600),
    })
}

fn drain(bridge: &mut Bridge) -> Vec<(Side, CanFrame)> {
    std::iter::from_fn(|| bridge.poll_transmit()).collect()
}

fn messages(bridge: &mut Bridge) -> Vec<(Side, J1939Message)> {
    std::iter::from_fn(|| bridge.poll_message()).collect()
}

fn tp_cm(frame: &CanFrame) -> Option<Cm> {
    let id = J1939Id::from_can_id(frame.id()).ok()?;
    (id.pgn == TP_CM)
        .then(|| Cm::parse(frame.data()).ok())
        .flatten()
}

// ---------------------------------------------------------------- single frames

#[test]
fn standard_ids_are_malformed() {
    let mut b = Bridge::new(config());
    let f = CanFrame::new(StandardId::new(0x123).unwrap(), &[1, 2]).unwrap();
    b.handle_frame(Side::Pile, &f, ms(0));
    b.handle_frame(Side::Bms, &f, ms(0));
    assert_eq!(b.counters().dropped_malformed, 2);
    assert!(drain(&mut b).is_empty());
    assert!(messages(&mut b).is_empty());
}

#[test]
fn a_side_speaks_only_with_its_own_node_address() {
    let mut b = Bridge::new(config());
    // A stranger on the BMS bus, and the pile bus pretending to be the BMS.
    b.handle_frame(Side::Bms, &gbt_frame(&chm(), STRANGER, PILE), ms(0));
    b.handle_frame(Side::Pile, &gbt_frame(&chm(), BMS, PILE), ms(0));
    b.handle_frame(Side::Pile, &gbt_frame(&chm(), STRANGER, BMS), ms(0));
    // The pile's own address on the BMS bus is a spoof as well.
    b.handle_frame(Side::Bms, &gbt_frame(&chm(), PILE, BMS), ms(0));
    assert_eq!(b.counters().dropped_wrong_address, 4);
    assert!(drain(&mut b).is_empty());
}

#[test]
fn own_auth_traffic_on_the_pile_bus_is_ignored_quietly() {
    let mut b = Bridge::new(config());
    let auth = Pgn::new(crate::auth::AUTH_PGN).unwrap();
    b.handle_frame(Side::Pile, &frame(6, auth, GATEWAY, PILE, &[1; 8]), ms(0));
    assert_eq!(*b.counters(), FirewallCounters::default());
    assert!(drain(&mut b).is_empty());
}

#[test]
fn traffic_for_the_gateway_stays_on_its_bus() {
    let mut b = Bridge::new(config());
    let auth = Pgn::new(crate::auth::AUTH_PGN).unwrap();
    b.handle_frame(Side::Pile, &frame(6, auth, PILE, GATEWAY, &[1; 8]), ms(0));
    // A TP to the gateway is not ours to answer: the auth node's transport does.
    let rts = Cm::Rts {
        size: 40,
        packets: 6,
        max_per_cts: 0xFF,
        pgn: auth,
    };
    b.handle_frame(
        Side::Pile,
        &frame(7, TP_CM, PILE, GATEWAY, &rts.encode()),
        ms(0),
    );
    assert_eq!(b.counters().for_gateway, 2);
    assert!(drain(&mut b).is_empty());
    assert!(messages(&mut b).is_empty());
}

#[test]
fn destination_must_be_the_other_node_or_global() {
    let mut b = Bridge::new(config());
    b.handle_frame(Side::Pile, &gbt_frame(&chm(), PILE, STRANGER), ms(0));
    // To itself is no better.
    b.handle_frame(Side::Pile, &gbt_frame(&chm(), PILE, PILE), ms(0));
    assert_eq!(b.counters().dropped_wrong_address, 2);
    assert!(drain(&mut b).is_empty());
    let global = gbt_frame(&chm(), PILE, Address::GLOBAL);
    b.handle_frame(Side::Pile, &global, ms(0));
    assert_eq!(drain(&mut b), vec![(Side::Bms, global)]);
}

#[test]
fn an_allowed_single_frame_crosses_unchanged_and_is_reported() {
    let mut b = Bridge::new(config());
    let f = gbt_frame(&chm(), PILE, BMS);
    b.handle_frame(Side::Pile, &f, ms(0));
    assert_eq!(drain(&mut b), vec![(Side::Bms, f)]);
    let bhm = Message::Bhm(crate::gbt27930::Bhm {
        max_charging_voltage: DeciVolt(4200),
    });
    let g = gbt_frame(&bhm, BMS, PILE);
    b.handle_frame(Side::Bms, &g, ms(1));
    assert_eq!(drain(&mut b), vec![(Side::Pile, g)]);
    let seen = messages(&mut b);
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, Side::Pile);
    assert_eq!(seen[0].1.data, chm().encode());
    assert_eq!((seen[0].1.source, seen[0].1.destination), (PILE, BMS));
    assert_eq!(seen[1].0, Side::Bms);
    assert_eq!(b.counters().forwarded_pile_to_bms, 1);
    assert_eq!(b.counters().forwarded_bms_to_pile, 1);
}

#[test]
fn padding_of_a_single_frame_is_kept() {
    let mut b = Bridge::new(config());
    let mut data = chm().encode();
    data.resize(8, 0xFF);
    let f = frame(6, MessageKind::Chm.pgn(), PILE, BMS, &data);
    b.handle_frame(Side::Pile, &f, ms(0));
    assert_eq!(drain(&mut b), vec![(Side::Bms, f)]);
}

#[test]
fn pgns_outside_the_direction_allowlist_are_dropped() {
    let mut b = Bridge::new(config());
    let auth = Pgn::new(crate::auth::AUTH_PGN).unwrap();
    // A BMS message from the pile, an auth message to the BMS, anything else.
    let bcl = Message::Bcl(crate::gbt27930::Bcl {
        voltage_demand: DeciVolt(4000),
        current_demand: Current::charging(10.0),
        mode: crate::gbt27930::ChargeMode::ConstantCurrent,
    });
    b.handle_frame(Side::Pile, &gbt_frame(&bcl, PILE, BMS), ms(0));
    b.handle_frame(Side::Pile, &frame(6, auth, PILE, BMS, &[0; 8]), ms(0));
    b.handle_frame(
        Side::Pile,
        &frame(6, Pgn::new(0xFEF1).unwrap(), PILE, Address::GLOBAL, &[0; 8]),
        ms(0),
    );
    // A charger message from the BMS.
    b.handle_frame(Side::Bms, &gbt_frame(&chm(), BMS, PILE), ms(0));
    // A TP announcing a PGN the pile may not send is not even answered.
    let rts = Cm::Rts {
        size: 49,
        packets: 7,
        max_per_cts: 0xFF,
        pgn: MessageKind::Brm.pgn(),
    };
    b.handle_frame(
        Side::Pile,
        &frame(7, TP_CM, PILE, BMS, &rts.encode()),
        ms(0),
    );
    let bam = Cm::Bam {
        size: 20,
        packets: 3,
        pgn: auth,
    };
    b.handle_frame(
        Side::Pile,
        &frame(7, TP_CM, PILE, Address::GLOBAL, &bam.encode()),
        ms(0),
    );
    assert_eq!(b.counters().dropped_not_allowed, 6);
    assert!(drain(&mut b).is_empty());
    assert_eq!(b.poll_timeout(), None, "nothing buffered for refused TP");
}

#[test]
fn unreadable_tp_cm_is_malformed() {
    let mut b = Bridge::new(config());
    b.handle_frame(Side::Pile, &frame(7, TP_CM, PILE, BMS, &[16, 1]), ms(0));
    b.handle_frame(Side::Pile, &frame(7, TP_CM, PILE, BMS, &[99; 8]), ms(0));
    assert_eq!(b.counters().dropped_malformed, 2);
    assert!(drain(&mut b).is_empty());
}

#[test]
fn rate_limit_per_message_stream() {
    let mut b = Bridge::new(config());
    let crm00 = gbt_frame(&crm(Recognition::NotRecognized), PILE, BMS);
    for _ in 0..25 {
        b.handle_frame(Side::Pile, &crm00, ms(1000));
    }
    assert_eq!(drain(&mut b).len(), 20);
    assert_eq!(b.counters().dropped_rate_limited, 5);
    // Another priority is the same stream, not a fresh budget.
    let data = crm(Recognition::NotRecognized).encode();
    for p in 0..8 {
        b.handle_frame(
            Side::Pile,
            &frame(p, MessageKind::Crm.pgn(), PILE, BMS, &data),
            ms(1000),
        );
    }
    assert_eq!(b.counters().dropped_rate_limited, 13);
    // Another message has its own bucket.
    b.handle_frame(Side::Pile, &gbt_frame(&chm(), PILE, BMS), ms(1000));
    assert_eq!(drain(&mut b).len(), 1);
    // 100/s: one more every 10 ms.
    b.handle_frame(Side::Pile, &crm00, ms(1009));
    assert!(drain(&mut b).is_empty());
    b.handle_frame(Side::Pile, &crm00, ms(1010));
    assert_eq!(drain(&mut b).len(), 1);
    assert_eq!(b.counters().forwarded_pile_to_bms, 22);
}

#[test]
fn undecodable_gbt_bodies_are_dropped() {
    let mut b = Bridge::new(config());
    let pgn = MessageKind::Crm.pgn();
    // Recognition byte neither 0x00 nor 0xAA; a CRM too short; a CHM too short.
    b.handle_frame(
        Side::Pile,
        &frame(6, pgn, PILE, BMS, &[0x55, 1, 0, 0, 0, 1, 2, 3]),
        ms(0),
    );
    b.handle_frame(Side::Pile, &frame(6, pgn, PILE, BMS, &[0x00, 1, 0]), ms(0));
    b.handle_frame(
        Side::Pile,
        &frame(6, MessageKind::Chm.pgn(), PILE, BMS, &[1, 1]),
        ms(0),
    );
    assert_eq!(b.counters().dropped_malformed, 3);
    assert!(drain(&mut b).is_empty());
    assert!(messages(&mut b).is_empty());
}

#[test]
fn a_non_gbt_pgn_in_an_allowlist_passes_as_is() {
    let extra = Pgn::new(0xFF10).unwrap();
    let mut cfg = config();
    cfg.pile_to_bms.insert(extra);
    let mut b = Bridge::new(cfg);
    let f = frame(6, extra, PILE, Address::GLOBAL, &[0xDE, 0xAD]);
    b.handle_frame(Side::Pile, &f, ms(0));
    assert_eq!(drain(&mut b), vec![(Side::Bms, f)]);
}

// ---------------------------------------------------------------- recognition gate

fn crm_byte0(frames: &[(Side, CanFrame)]) -> Vec<u8> {
    frames
        .iter()
        .filter(|(s, _)| *s == Side::Bms)
        .filter_map(|(_, f)| f.data().first().copied())
        .collect()
}

#[test]
fn crm_recognition_is_held_until_the_pile_is_authenticated() {
    let mut b = Bridge::new(config());
    let crm00 = gbt_frame(&crm(Recognition::NotRecognized), PILE, BMS);
    let crmaa = gbt_frame(&crm(Recognition::Recognized), PILE, BMS);
    b.handle_frame(Side::Pile, &crm00, ms(0));
    b.handle_frame(Side::Pile, &crmaa, ms(250));
    let out = drain(&mut b);
    assert_eq!(crm_byte0(&out), vec![0x00, 0x00]);
    // Only byte 1 changes.
    assert_eq!(out[1].1.data()[1..], crmaa.data()[1..]);
    assert_eq!(out[1].1.id(), crmaa.id());
    assert_eq!(b.counters().crm_held, 1);
    // The observer sees what the BMS saw.
    let seen = messages(&mut b);
    assert_eq!(seen[1].1.data[0], 0x00);

    // Authentication releases the held CRM(0xAA) at once.
    b.set_pile_authenticated(true, ms(400));
    assert!(b.pile_authenticated());
    let out = drain(&mut b);
    assert_eq!(out, vec![(Side::Bms, crmaa)]);
    assert_eq!(messages(&mut b)[0].1.data[0], 0xAA);
    // Later ones pass unchanged; no second release.
    b.handle_frame(Side::Pile, &crmaa, ms(500));
    b.set_pile_authenticated(true, ms(510));
    assert_eq!(crm_byte0(&drain(&mut b)), vec![0xAA]);
    assert_eq!(b.counters().crm_held, 1);

    // A new session closes the gate again.
    b.set_pile_authenticated(false, ms(5000));
    b.handle_frame(Side::Pile, &crmaa, ms(5000));
    assert_eq!(crm_byte0(&drain(&mut b)), vec![0x00]);
    assert_eq!(b.counters().crm_held, 2);
    assert_eq!(b.counters().forwarded_pile_to_bms, 5);
}

#[test]
fn a_stale_held_crm_is_not_released() {
    let mut b = Bridge::new(config());
    let crmaa = gbt_frame(&crm(Recognition::Recognized), PILE, BMS);
    b.handle_frame(Side::Pile, &crmaa, ms(0));
    drain(&mut b);
    b.set_pile_authenticated(true, ms(501));
    assert!(drain(&mut b).is_empty());
    // And a session reset forgets it.
    let mut b = Bridge::new(config());
    b.handle_frame(Side::Pile, &crmaa, ms(0));
    drain(&mut b);
    b.set_pile_authenticated(false, ms(100));
    b.set_pile_authenticated(true, ms(200));
    assert!(drain(&mut b).is_empty());
}

#[test]
fn without_the_gate_recognition_passes() {
    let mut cfg = config();
    cfg.gate_recognition = false;
    let mut b = Bridge::new(cfg);
    let crmaa = gbt_frame(&crm(Recognition::Recognized), PILE, BMS);
    b.handle_frame(Side::Pile, &crmaa, ms(0));
    assert_eq!(drain(&mut b), vec![(Side::Bms, crmaa)]);
    assert_eq!(b.counters().crm_held, 0);
    b.set_pile_authenticated(true, ms(10));
    assert!(drain(&mut b).is_empty());
}

// ---------------------------------------------------------------- transport

/// The bridge between a J1939 transport at the BMS's address on the BMS bus
/// and one at the pile's address on the pile bus, zero latency.
struct Buses {
    bridge: Bridge,
    bms: Transport,
    pile: Transport,
    /// Whether the pile's transport hears the pile bus.
    pile_listens: bool,
    now: Timestamp,
    bms_bus: Vec<CanFrame>,
    pile_bus: Vec<CanFrame>,
}

impl Buses {
    fn new(config: FirewallConfig) -> Self {
        Buses {
            bridge: Bridge::new(config),
            bms: Transport::new(TpConfig::gbt27930(), BMS),
            pile: Transport::new(TpConfig::gbt27930(), PILE),
            pile_listens: true,
            now: Timestamp::ZERO,
            bms_bus: Vec::new(),
            pile_bus: Vec::new(),
        }
    }

    /// Moves frames until nobody has anything to send.
    fn settle(&mut self) {
        let now = self.now;
        loop {
            let mut moved = false;
            while let Some(f) = self.bms.poll_transmit() {
                moved = true;
                self.bms_bus.push(f);
                self.bridge.handle_frame(Side::Bms, &f, now);
            }
            while let Some(f) = self.pile.poll_transmit() {
                moved = true;
                self.pile_bus.push(f);
                self.bridge.handle_frame(Side::Pile, &f, now);
            }
            while let Some((side, f)) = self.bridge.poll_transmit() {
                moved = true;
                match side {
                    Side::Bms => {
                        self.bms_bus.push(f);
                        self.bms.handle_frame(&f, now);
                    }
                    Side::Pile => {
                        self.pile_bus.push(f);
                        if self.pile_listens {
                            self.pile.handle_frame(&f, now);
                        }
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Settles and runs every timer up to `end`.
    fn run_until(&mut self, end: Timestamp) {
        loop {
            self.settle();
            let next = [
                self.bridge.poll_timeout(),
                self.bms.poll_timeout(),
                self.pile.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.bridge.handle_timeout(self.now);
                    self.bms.handle_timeout(self.now);
                    self.pile.handle_timeout(self.now);
                }
                _ => break,
            }
        }
        self.now = self.now.max(end);
    }

    fn send(&mut self, from: Side, pgn: Pgn, destination: Address, data: Vec<u8>) {
        let (tp, source) = match from {
            Side::Bms => (&mut self.bms, BMS),
            Side::Pile => (&mut self.pile, PILE),
        };
        let msg = J1939Message {
            priority: Priority::new(7).unwrap(),
            pgn,
            source,
            destination,
            data,
        };
        tp.send(msg, self.now).unwrap();
    }
}

fn received(tp: &mut Transport) -> Vec<J1939Message> {
    std::iter::from_fn(|| tp.poll_event())
        .filter_map(|e| match e {
            TpEvent::Received(m) => Some(m),
            _ => None,
        })
        .collect()
}

#[test]
fn brm_is_reassembled_vin_blanked_and_cut_again_by_the_bridge() {
    let mut buses = Buses::new(config());
    let original = brm_bytes();
    buses.send(Side::Bms, MessageKind::Brm.pgn(), PILE, original.clone());
    buses.settle();

    // The BMS completed its transfer with the bridge.
    let bms_events: Vec<TpEvent> = std::iter::from_fn(|| buses.bms.poll_event()).collect();
    assert!(bms_events.contains(&TpEvent::Sent {
        pgn: MessageKind::Brm.pgn(),
        destination: PILE
    }));
    // The pile got a BRM from the BMS's address with the VIN blanked and
    // every other byte as sent.
    let got = received(&mut buses.pile);
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(
        (m.pgn, m.source, m.destination),
        (MessageKind::Brm.pgn(), BMS, PILE)
    );
    let mut expected = original.clone();
    expected[24..41].fill(0xFF);
    assert_eq!(m.data, expected);
    match Message::decode(m.pgn, &m.data) {
        Ok(Message::Brm(brm)) => assert_eq!(brm.vin, [0xFF; 17]),
        other => panic!("{other:?}"),
    }
    // Not one VIN byte went out on the pile bus.
    let vin = &original[24..41];
    let pile_bytes: Vec<u8> = buses
        .pile_bus
        .iter()
        .flat_map(|f| f.data().to_vec())
        .collect();
    assert!(
        !pile_bytes
            .windows(5)
            .any(|w| vin.windows(5).any(|v| v == w))
    );
    let c = buses.bridge.counters();
    assert_eq!(
        (c.vin_blanked, c.resegmented, c.forwarded_bms_to_pile),
        (1, 1, 1)
    );
    let seen = messages(&mut buses.bridge);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, Side::Bms);
    assert_eq!(seen[0].1.data, expected);
}

#[test]
fn the_vin_crosses_when_blanking_is_off() {
    let mut cfg = config();
    cfg.blank_vin = false;
    let mut buses = Buses::new(cfg);
    buses.send(Side::Bms, MessageKind::Brm.pgn(), PILE, brm_bytes());
    buses.settle();
    assert_eq!(received(&mut buses.pile)[0].data, brm_bytes());
    assert_eq!(buses.bridge.counters().vin_blanked, 0);
}

#[test]
fn a_tp_message_that_does_not_decode_stops_at_the_bridge() {
    let mut buses = Buses::new(config());
    // A BRM of 20 bytes: neither 41 nor 49 or more.
    buses.send(Side::Bms, MessageKind::Brm.pgn(), PILE, vec![1; 20]);
    buses.settle();
    assert_eq!(buses.bridge.counters().dropped_malformed, 1);
    assert!(buses.pile_bus.is_empty());
    assert!(received(&mut buses.pile).is_empty());
}

#[test]
fn tp_from_the_pile_reaches_the_bms_only_as_packets_the_bridge_cut() {
    let mut buses = Buses::new(config());
    // CML with trailing bytes, long enough to need TP (the codec accepts
    // bytes beyond the defined form).
    let mut cml = Message::Cml(crate::gbt27930::Cml {
        max_output_voltage: DeciVolt(7500),
        min_output_voltage: DeciVolt(2000),
        max_output_current: Current::charging(250.0),
        min_output_current: Some(Current::charging(0.0)),
    })
    .encode();
    cml.extend([0xFF; 6]);
    buses.send(Side::Pile, MessageKind::Cml.pgn(), BMS, cml.clone());
    buses.settle();
    let got = received(&mut buses.bms);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].source, got[0].destination), (PILE, BMS));
    assert_eq!(got[0].data, cml);
    // Everything the BMS heard came from the bridge's transport, and the
    // pile's frames ended at the bridge.
    let bridge_to_bms: Vec<CanFrame> = buses
        .bms_bus
        .iter()
        .filter(|f| J1939Id::from_can_id(f.id()).is_ok_and(|id| id.source == PILE))
        .copied()
        .collect();
    assert!(bridge_to_bms.iter().any(|f| tp_cm(f).is_some()));
    assert_eq!(buses.bridge.counters().resegmented, 1);
    assert_eq!(buses.bridge.counters().forwarded_pile_to_bms, 1);
}

#[test]
fn a_bam_from_the_bms_goes_out_as_a_bam() {
    let mut buses = Buses::new(config());
    // BMV, 10 cells, broadcast.
    let bmv: Vec<u8> = (0..20).map(|i| i as u8).collect();
    buses.send(
        Side::Bms,
        MessageKind::Bmv.pgn(),
        Address::GLOBAL,
        bmv.clone(),
    );
    buses.run_until(ms(2000));
    let got = received(&mut buses.pile);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].source, got[0].destination), (BMS, Address::GLOBAL));
    assert_eq!(got[0].data, bmv);
    assert!(
        buses
            .pile_bus
            .iter()
            .any(|f| matches!(tp_cm(f), Some(Cm::Bam { .. })))
    );
    assert_eq!(buses.bridge.poll_timeout(), None);
}

#[test]
fn a_busy_far_side_drops_the_newer_message_and_times_out() {
    let mut buses = Buses::new(config());
    // The pile does not answer: the bridge's RTS on the pile bus waits.
    buses.pile_listens = false;
    buses.send(Side::Bms, MessageKind::Brm.pgn(), PILE, brm_bytes());
    buses.settle();
    buses.send(Side::Bms, MessageKind::Bcs.pgn(), PILE, bcs_bytes());
    buses.settle();
    let c = buses.bridge.counters();
    assert_eq!((c.forwarded_bms_to_pile, c.dropped_busy), (1, 1));
    // Only the BRM was announced on the pile bus; T3 runs for it.
    let rts: Vec<Cm> = buses.pile_bus.iter().filter_map(tp_cm).collect();
    assert!(matches!(rts[..], [Cm::Rts { pgn, .. }] if pgn == MessageKind::Brm.pgn()));
    assert_eq!(buses.bridge.poll_timeout(), Some(ms(1250)));
    buses.run_until(ms(2000));
    let aborts: Vec<Cm> = buses.pile_bus.iter().filter_map(tp_cm).collect();
    assert!(
        matches!(aborts.last(), Some(Cm::Abort { .. })),
        "{aborts:?}"
    );
    assert_eq!(buses.bridge.poll_timeout(), None);
    // The next BCS goes.
    buses.send(Side::Bms, MessageKind::Bcs.pgn(), PILE, bcs_bytes());
    buses.settle();
    assert_eq!(buses.bridge.counters().forwarded_bms_to_pile, 2);
}

// ---------------------------------------------------------------- property

/// Interesting PGNs: every GB/T message, TP, auth, and strangers.
fn any_pgn() -> impl Strategy<Value = Pgn> {
    let mut known: Vec<Pgn> = MessageKind::ALL.iter().map(|k| k.pgn()).collect();
    known.extend([
        TP_CM,
        TP_DT,
        Pgn::new(crate::auth::AUTH_PGN).unwrap(),
        Pgn::new(0xFEF1).unwrap(),
    ]);
    prop_oneof![
        4 => proptest::sample::select(known),
        1 => (0u32..=Pgn::MAX).prop_map(|raw| {
            Pgn::new(raw).unwrap_or_else(|_| Pgn::new(raw & !0xFF).unwrap())
        }),
    ]
}

fn any_address() -> impl Strategy<Value = Address> {
    prop_oneof![
        3 => Just(PILE),
        3 => Just(BMS),
        1 => Just(GATEWAY),
        1 => Just(Address::GLOBAL),
        1 => any::<u8>().prop_map(Address),
    ]
}

/// One input on the pile bus.
#[derive(Debug, Clone)]
enum Input {
    Frame(CanFrame),
    /// A whole TP transfer from the pile, RTS or BAM, then its packets.
    Transfer {
        pgn: Pgn,
        destination: Address,
        data: Vec<u8>,
    },
    Wait(u64),
}

fn any_input() -> impl Strategy<Value = Input> {
    let frame = prop_oneof![
        8 => (0u8..8, any_pgn(), any_address(), any_address(), proptest::collection::vec(any::<u8>(), 0..=8))
            .prop_map(|(p, pgn, s, d, data)| frame(p, pgn, s, d, &data)),
        1 => (0u32..=ExtendedId::MAX, proptest::collection::vec(any::<u8>(), 0..=8))
            .prop_map(|(raw, data)| CanFrame::new(ExtendedId::new(raw).unwrap(), &data).unwrap()),
        1 => (0u16..=StandardId::MAX, proptest::collection::vec(any::<u8>(), 0..=8))
            .prop_map(|(raw, data)| CanFrame::new(CanId::Standard(StandardId::new(raw).unwrap()), &data).unwrap()),
    ];
    prop_oneof![
        6 => frame.prop_map(Input::Frame),
        2 => (any_pgn(), prop_oneof![Just(BMS), Just(Address::GLOBAL), any_address()],
              proptest::collection::vec(any::<u8>(), 1..=60))
            .prop_map(|(pgn, destination, data)| Input::Transfer { pgn, destination, data }),
        1 => (0u64..400).prop_map(Input::Wait),
    ]
}

/// The frames of a TP transfer as the pile would send them, assuming the
/// receiver grants everything in one CTS.
fn transfer_frames(pgn: Pgn, destination: Address, data: &[u8]) -> Vec<CanFrame> {
    let size = u16::try_from(data.len()).unwrap();
    let packets = u8::try_from(data.len().div_ceil(7)).unwrap();
    let cm = if destination.is_global() {
        Cm::Bam { size, packets, pgn }
    } else {
        Cm::Rts {
            size,
            packets,
            max_per_cts: 0xFF,
            pgn,
        }
    };
    let mut out = vec![frame(7, TP_CM, PILE, destination, &cm.encode())];
    for (i, chunk) in data.chunks(7).enumerate() {
        let mut p = [0xFF; 8];
        p[0] = u8::try_from(i + 1).unwrap();
        p[1..=chunk.len()].copy_from_slice(chunk);
        out.push(frame(7, TP_DT, PILE, destination, &p));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the pile bus carries, the BMS bus only ever gets frames from
    /// the pile's address that are allowed charger messages or the bridge's
    /// own TP for them, and the BMS only ever receives whole messages that
    /// are allowed and decode.
    #[test]
    fn nothing_outside_the_allowlist_reaches_the_bms(
        inputs in proptest::collection::vec(any_input(), 1..80),
    ) {
        let cfg = config();
        let allowed = cfg.pile_to_bms.clone();
        let mut bridge = Bridge::new(cfg);
        // The BMS's transport answers the bridge's RTS, so transfers complete.
        let mut bms = Transport::new(TpConfig::gbt27930(), BMS);
        let mut now = Timestamp::ZERO;
        let mut bms_got = Vec::new();
        let mut on_bms_bus = Vec::new();
        for input in inputs {
            let frames = match input {
                Input::Frame(f) => vec![f],
                Input::Transfer { pgn, destination, data } => transfer_frames(pgn, destination, &data),
                Input::Wait(d) => {
                    now = now + Duration::from_millis(d);
                    vec![]
                }
            };
            if bridge.poll_timeout().is_some_and(|t| t <= now) {
                bridge.handle_timeout(now);
            }
            for f in frames {
                bridge.handle_frame(Side::Pile, &f, now);
                // Let the BMS answer before the next frame, as on a real bus.
                loop {
                    let mut moved = false;
                    while let Some((side, out)) = bridge.poll_transmit() {
                        moved = true;
                        if side == Side::Bms {
                            on_bms_bus.push(out);
                            bms.handle_frame(&out, now);
                        }
                    }
                    while let Some(out) = bms.poll_transmit() {
                        moved = true;
                        bridge.handle_frame(Side::Bms, &out, now);
                    }
                    if !moved { break; }
                }
                bms_got.extend(received(&mut bms));
            }
            while let Some((side, m)) = bridge.poll_message() {
                if side == Side::Pile {
                    prop_assert!(allowed.contains(&m.pgn));
                    prop_assert_eq!(m.source, PILE);
                }
            }
        }
        for f in &on_bms_bus {
            let id = J1939Id::from_can_id(f.id());
            prop_assert!(id.is_ok(), "{}", f);
            let id = id.unwrap();
            prop_assert_eq!(id.source, PILE, "{}", f);
            prop_assert!(id.destination == BMS || id.destination.is_global(), "{}", f);
            if id.pgn == TP_CM {
                match Cm::parse(f.data()) {
                    Ok(Cm::Rts { pgn, .. } | Cm::Bam { pgn, .. } | Cm::Abort { pgn, .. }) => {
                        prop_assert!(allowed.contains(&pgn), "{}", f);
                    }
                    // The bridge's transport sends to the BMS; it never receives from it.
                    other => prop_assert!(false, "unexpected TP.CM {:?} in {}", other, f),
                }
            } else if id.pgn != TP_DT {
                prop_assert!(allowed.contains(&id.pgn), "{}", f);
            }
        }
        for m in &bms_got {
            prop_assert_eq!(m.source, PILE);
            prop_assert!(allowed.contains(&m.pgn));
            prop_assert!(Message::decode(m.pgn, &m.data).is_ok(), "{:?}", m);
        }
    }
}

// ---------------------------------------------------------------- field deviations
//
// No tolerance lets anything past the firewall's allowlist, its rate
// limits, the recognition gate or authentication (docs/interop.md).

fn cts_frame(source: Address, destination: Address, bytes_4_5: [u8; 2], pgn: [u8; 3]) -> CanFrame {
    let [r0, r1] = bytes_4_5;
    let [p0, p1, p2] = pgn;
    frame(
        7,
        TP_CM,
        source,
        destination,
        &[0x11, 7, 1, r0, r1, p0, p1, p2],
    )
}

fn is_dt(f: &CanFrame) -> bool {
    J1939Id::from_can_id(f.id()).is_ok_and(|id| id.pgn == TP_DT)
}

/// A CTS without its PGN only ever releases packets of the one transfer
/// the bridge has open to the pile, a message the firewall already
/// admitted; with none open it does nothing, and it never crosses.
#[test]
fn a_cts_without_pgn_only_drives_the_transfer_already_open() {
    let mut b = Bridge::new(config());
    b.handle_frame(
        Side::Pile,
        &cts_frame(PILE, BMS, [0xFF; 2], [0xFF; 3]),
        ms(0),
    );
    assert!(drain(&mut b).is_empty());
    assert!(b.deviations().pile.is_empty());

    // A BRM from the BMS on its way to a pile that only answers by hand.
    let mut buses = Buses::new(config());
    buses.pile_listens = false;
    buses.send(Side::Bms, MessageKind::Brm.pgn(), PILE, brm_bytes());
    buses.settle();
    let before = buses.pile_bus.len();
    let cts = cts_frame(PILE, BMS, [0xFF; 2], [0; 3]);
    buses.pile_bus.push(cts);
    buses.bridge.handle_frame(Side::Pile, &cts, buses.now);
    let out = drain(&mut buses.bridge);
    assert_eq!(out.len(), 7, "{out:?}");
    assert!(out.iter().all(|(side, f)| *side == Side::Pile && is_dt(f)));
    assert_eq!(before, 1, "only the RTS before the CTS");
    assert_eq!(
        buses
            .bridge
            .deviations()
            .pile
            .accepted
            .get(Deviation::CtsWithoutPgn),
        1
    );
    // Under the strict profile the transfer is aborted instead.
    let mut cfg = config();
    cfg.pile_profile = crate::interop::Profile::Strict;
    let mut buses = Buses::new(cfg);
    buses.pile_listens = false;
    buses.send(Side::Bms, MessageKind::Brm.pgn(), PILE, brm_bytes());
    buses.settle();
    buses.bridge.handle_frame(
        Side::Pile,
        &cts_frame(PILE, BMS, [0xFF; 2], [0xFF; 3]),
        buses.now,
    );
    let out = drain(&mut buses.bridge);
    assert!(
        matches!(out.as_slice(), [(Side::Pile, f)] if matches!(tp_cm(f), Some(Cm::Abort { .. }))),
        "{out:?}"
    );
    assert_eq!(buses.bridge.counters().refused, 1);
    assert_eq!(
        buses
            .bridge
            .deviations()
            .pile
            .refused
            .get(Deviation::CtsWithoutPgn),
        1
    );
}

/// The early BCP reaches the pile only once CRM(0xAA) has reached the BMS,
/// which only the recognition gate lets happen: a pile that never proves
/// itself never gets it. Its copies are bounded.
#[test]
fn an_early_bcp_waits_for_the_gate_and_its_copies_are_bounded() {
    let mut buses = Buses::new(config());
    buses.send(Side::Bms, MessageKind::Bcp.pgn(), PILE, bcp().encode());
    buses.settle();
    let bcp_rts = |bus: &[CanFrame]| {
        bus.iter()
            .filter(
                |f| matches!(tp_cm(f), Some(Cm::Rts { pgn, .. }) if pgn == MessageKind::Bcp.pgn()),
            )
            .count()
    };
    assert_eq!(bcp_rts(&buses.pile_bus), 0, "BCP crossed before CRM(0xAA)");
    assert_eq!(
        buses
            .bridge
            .deviations()
            .bms
            .accepted
            .get(Deviation::BcpBeforeRecognition),
        1
    );
    // The pile's CRM(0xAA) while it is not authenticated: held, and no BCP.
    let crmaa = gbt_frame(&crm(Recognition::Recognized), PILE, BMS);
    buses.bridge.handle_frame(Side::Pile, &crmaa, buses.now);
    buses.run_until(ms(5_000));
    assert_eq!(
        bcp_rts(&buses.pile_bus),
        0,
        "BCP crossed with the gate closed"
    );
    // Authenticated, at the pile's next CRM(0xAA): BCP follows, at BCP's
    // period, at most BCP_REPLAYS times while the pile does not move on.
    buses.bridge.set_pile_authenticated(true, buses.now);
    buses.bridge.handle_frame(Side::Pile, &crmaa, buses.now);
    buses.run_until(ms(20_000));
    let copies = bcp_rts(&buses.pile_bus);
    assert_eq!(copies, usize::from(BCP_REPLAYS), "{copies}");
    assert_eq!(buses.bridge.counters().bcp_replayed, u64::from(BCP_REPLAYS));
    assert!(
        received(&mut buses.pile)
            .iter()
            .any(|m| m.pgn == MessageKind::Bcp.pgn() && m.source == BMS)
    );
}

fn bcl(raw_current: u16) -> Message {
    Message::Bcl(crate::gbt27930::Bcl {
        voltage_demand: DeciVolt(4000),
        current_demand: Current(raw_current),
        mode: crate::gbt27930::ChargeMode::ConstantCurrent,
    })
}

/// A BMS that counts current positive: the bridge turns its BCLs round,
/// and they are rate-limited like any other stream before that.
#[test]
fn positive_currents_are_turned_round_and_still_rate_limited() {
    let mut cfg = config();
    cfg.gate_recognition = false;
    let mut buses = Buses::new(cfg);
    // CRM(0xAA) reaches the BMS, then its BCP: 200 A counted positive.
    let crmaa = gbt_frame(&crm(Recognition::Recognized), PILE, BMS);
    buses.bridge.handle_frame(Side::Pile, &crmaa, buses.now);
    let mut positive = bcp();
    if let Message::Bcp(b) = &mut positive {
        b.max_charging_current = Current(6000);
    }
    buses.send(Side::Bms, MessageKind::Bcp.pgn(), PILE, positive.encode());
    buses.run_until(ms(100));
    let got = received(&mut buses.pile);
    let bcp_in = got
        .iter()
        .find(|m| m.pgn == MessageKind::Bcp.pgn())
        .expect("BCP crossed");
    assert!(matches!(
        Message::decode(bcp_in.pgn, &bcp_in.data),
        Ok(Message::Bcp(b)) if b.max_charging_current == Current(2000)
    ));
    // 25 BCLs at once: the burst of 20 crosses, turned round (100 A).
    let f = gbt_frame(&bcl(5000), BMS, PILE);
    let t = ms(200);
    for _ in 0..25 {
        buses.bridge.handle_frame(Side::Bms, &f, t);
    }
    let out = drain(&mut buses.bridge);
    assert_eq!(out.len(), 20);
    assert!(
        out.iter()
            .all(|(side, f)| *side == Side::Pile && f.data()[2..4] == 3000u16.to_le_bytes())
    );
    assert_eq!(buses.bridge.counters().dropped_rate_limited, 5);
    assert_eq!(
        buses
            .bridge
            .deviations()
            .bms
            .accepted
            .get(Deviation::PositiveCurrent),
        1
    );
}

/// A message that cannot be acted on never crosses, and its sender gets
/// the standard's error message at most once per ERROR_REPEAT, however
/// many it sends.
#[test]
fn refused_messages_stay_and_their_error_is_bounded() {
    let mut cfg = config();
    cfg.gate_recognition = false;
    let mut b = Bridge::new(cfg);
    // No BCP settled the sign: a BCL on the discharge side is refused.
    let f = gbt_frame(&bcl(5000), BMS, PILE);
    for i in 0..100 {
        b.handle_frame(Side::Bms, &f, ms(i * 5));
    }
    let out = drain(&mut b);
    assert!(out.iter().all(|(side, _)| *side == Side::Bms), "{out:?}");
    let cems: Vec<_> = out
        .iter()
        .filter(|(_, f)| {
            J1939Id::from_can_id(f.id())
                .is_ok_and(|id| id.pgn == MessageKind::Cem.pgn() && id.source == PILE)
        })
        .collect();
    // 500 ms of refusals: at 0, 250 and 500 ms at most.
    assert!((1..=3).contains(&cems.len()), "{}", cems.len());
    assert!(matches!(
        Message::decode(MessageKind::Cem.pgn(), cems[0].1.data()),
        Ok(Message::Cem(c)) if c.bcl_timeout == crate::gbt27930::Bits2::ALT
    ));
    // The rate limit comes first; what it admits is refused.
    let c = b.counters();
    assert_eq!(c.refused + c.dropped_rate_limited, 100);
    assert!(c.refused >= 20, "{c:?}");
    assert_eq!(c.forwarded_bms_to_pile, 0);
}

/// A BEM that reports a CCS timeout before any CCS was due stays on the
/// BMS's side; a later one crosses.
#[test]
fn an_early_ccs_timeout_stays_and_a_real_one_crosses() {
    let mut cfg = config();
    cfg.gate_recognition = false;
    let mut b = Bridge::new(cfg);
    let cro = gbt_frame(
        &Message::Cro(crate::gbt27930::Cro {
            ready: crate::gbt27930::Readiness::Ready,
        }),
        PILE,
        BMS,
    );
    b.handle_frame(Side::Pile, &cro, ms(0));
    drain(&mut b);
    let bem = gbt_frame(
        &Message::Bem(crate::gbt27930::Bem {
            ccs_timeout: crate::gbt27930::Bits2::SET,
            ..Default::default()
        }),
        BMS,
        PILE,
    );
    b.handle_frame(Side::Bms, &bem, ms(40));
    assert!(drain(&mut b).is_empty());
    assert_eq!(
        b.deviations().bms.accepted.get(Deviation::EarlyCcsTimeout),
        1
    );
    b.handle_frame(Side::Bms, &bem, ms(1500));
    assert_eq!(drain(&mut b), vec![(Side::Pile, bem)]);
}
