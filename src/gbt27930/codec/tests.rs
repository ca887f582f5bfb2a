use proptest::prelude::*;

use super::*;
use crate::gbt27930::codec::strategy::message_of;

const VIN: [u8; 17] = *b"LFV2A21K0A3000001";

fn pgn(kind: MessageKind) -> Pgn {
    kind.pgn()
}

/// Encodes `msg`, checks the bytes, and checks they decode back to `msg`.
#[track_caller]
fn golden(msg: Message, bytes: &[u8]) {
    assert_eq!(encode(&msg), bytes, "encoding of {:?}", msg.kind());
    assert_eq!(decode(pgn(msg.kind()), bytes), Ok(msg));
}

#[track_caller]
fn decode_err(kind: MessageKind, bytes: &[u8]) -> String {
    match decode(pgn(kind), bytes) {
        Ok(m) => panic!("{kind}: {bytes:02X?} decoded to {m:?}"),
        Err(e) => e.to_string(),
    }
}

fn bits(v: u8) -> Bits2 {
    Bits2::new(v)
}

fn sample_brm(software_version: Option<[u8; 8]>) -> Brm {
    Brm {
        version: ProtocolVersion::V1_1,
        battery_type: 0x03,
        rated_capacity: DeciAh(1500),
        rated_voltage: DeciVolt::from_volts(350.0),
        manufacturer: *b"CATL",
        pack_serial: [0, 0, 0, 1],
        production_year: 35, // 2020
        production_month: 5,
        production_day: 1,
        charge_count: 123_456,
        ownership: 1,
        vin: VIN,
        software_version,
    }
}

const BRM_41: [u8; 41] = {
    let head: [u8; 24] = [
        0x01, 0x01, 0x00, // version 1.1
        0x03, // LiFePO4
        0xDC, 0x05, // 150.0 Ah
        0xAC, 0x0D, // 350.0 V
        b'C', b'A', b'T', b'L', // manufacturer
        0x00, 0x00, 0x00, 0x01, // pack serial
        35, 5, 1, // 2020-05-01
        0x40, 0xE2, 0x01, // 123456 charges
        0x01, // owned
        0xFF, // reserved
    ];
    let mut out = [0u8; 41];
    let mut i = 0;
    while i < 24 {
        out[i] = head[i];
        i += 1;
    }
    while i < 41 {
        out[i] = VIN[i - 24];
        i += 1;
    }
    out
};

const SW: [u8; 8] = [0x01, 0x0F, 0x0A, 0xE7, 0x07, 0xFF, 0xFF, 0xFF];

fn brm_49() -> Vec<u8> {
    [&BRM_41[..], &SW[..]].concat()
}

fn sample_bcs() -> Bcs {
    Bcs {
        measured_voltage: DeciVolt(3800),
        measured_current: Current::charging(100.0),
        max_cell: CellVoltage {
            voltage: CentiVolt(365),
            group: 2,
        },
        soc_percent: 45,
        remaining_minutes: 300,
    }
}

fn sample_cml(min_output_current: Option<Current>) -> Cml {
    Cml {
        max_output_voltage: DeciVolt(7500),
        min_output_voltage: DeciVolt(2000),
        max_output_current: Current::charging(250.0),
        min_output_current,
    }
}

// ---- golden vectors, one or more per message ----

#[test]
fn chm() {
    golden(
        Message::Chm(Chm {
            version: ProtocolVersion::V1_1,
        }),
        &[0x01, 0x01, 0x00],
    );
}

#[test]
fn bhm() {
    golden(
        Message::Bhm(Bhm {
            max_charging_voltage: DeciVolt::from_volts(750.0),
        }),
        &[0x4C, 0x1D],
    );
}

#[test]
fn crm() {
    golden(
        Message::Crm(Crm {
            recognition: Recognition::Recognized,
            charger_number: ChargerNumber(12345),
            region_code: RegionCode(*b"123"),
        }),
        &[0xAA, 0x39, 0x30, 0x00, 0x00, 0x31, 0x32, 0x33],
    );
    golden(
        Message::Crm(Crm {
            recognition: Recognition::NotRecognized,
            charger_number: ChargerNumber(0x0403_0201),
            region_code: RegionCode([0xFF; 3]),
        }),
        &[0x00, 0x01, 0x02, 0x03, 0x04, 0xFF, 0xFF, 0xFF],
    );
}

#[test]
fn brm_both_lengths() {
    golden(Message::Brm(sample_brm(None)), &BRM_41);
    golden(Message::Brm(sample_brm(Some(SW))), &brm_49());
}

#[test]
fn brm_lengths_between_the_forms_are_rejected() {
    assert_eq!(
        decode_err(MessageKind::Brm, &BRM_41[..40]),
        "BRM: 40 bytes, expected 41 or 49"
    );
    assert_eq!(
        decode_err(MessageKind::Brm, &brm_49()[..45]),
        "BRM: 45 bytes, expected 41 or 49"
    );
}

#[test]
fn bcp() {
    golden(
        Message::Bcp(Bcp {
            max_cell_voltage: CentiVolt(420),
            max_charging_current: Current::charging(250.0),
            nominal_energy: DeciKwh(600),
            max_charging_voltage: DeciVolt(5000),
            max_temperature: Temperature::from_celsius(55),
            soc: DeciPercent(450),
            battery_voltage: DeciVolt(3800),
        }),
        &[
            0xA4, 0x01, 0xDC, 0x05, 0x58, 0x02, 0x88, 0x13, 0x69, 0xC2, 0x01, 0xD8, 0x0E,
        ],
    );
}

#[test]
fn cts() {
    golden(
        Message::Cts(Cts {
            second: 56,
            minute: 34,
            hour: 12,
            day: 14,
            month: 3,
            year: 2026,
        }),
        &[0x56, 0x34, 0x12, 0x14, 0x03, 0x26, 0x20],
    );
}

#[test]
fn cts_rejects_non_bcd() {
    assert_eq!(
        decode_err(MessageKind::Cts, &[0x6A, 0, 0, 1, 1, 0x26, 0x20]),
        "CTS second: 0x6A is not BCD"
    );
    assert_eq!(
        decode_err(MessageKind::Cts, &[0, 0, 0, 1, 1, 0x26, 0xA0]),
        "CTS year (byte 7): 0xA0 is not BCD"
    );
}

#[test]
fn cml_both_lengths() {
    let long = [0x4C, 0x1D, 0xD0, 0x07, 0xDC, 0x05, 0xA0, 0x0F];
    golden(
        Message::Cml(sample_cml(Some(Current::charging(0.0)))),
        &long,
    );
    golden(Message::Cml(sample_cml(None)), &long[..6]);
    assert_eq!(
        decode_err(MessageKind::Cml, &long[..7]),
        "CML: 7 bytes, expected 6 or 8"
    );
}

#[test]
fn bro_cro() {
    golden(
        Message::Bro(Bro {
            ready: Readiness::Ready,
        }),
        &[0xAA],
    );
    golden(
        Message::Bro(Bro {
            ready: Readiness::NotReady,
        }),
        &[0x00],
    );
    golden(
        Message::Cro(Cro {
            ready: Readiness::Ready,
        }),
        &[0xAA],
    );
    assert_eq!(
        decode_err(MessageKind::Cro, &[0x01]),
        "CRO byte 1: 0x01 is neither 0x00 nor 0xAA"
    );
}

#[test]
fn bcl() {
    golden(
        Message::Bcl(Bcl {
            voltage_demand: DeciVolt::from_volts(400.0),
            current_demand: Current::charging(100.0),
            mode: ChargeMode::ConstantCurrent,
        }),
        &[0xA0, 0x0F, 0xB8, 0x0B, 0x02],
    );
    assert_eq!(
        decode_err(MessageKind::Bcl, &[0xA0, 0x0F, 0xB8, 0x0B, 0x03]),
        "BCL byte 5: 0x03 is neither 0x01 (CV) nor 0x02 (CC)"
    );
}

#[test]
fn bcs_both_lengths() {
    let nine = [0xD8, 0x0E, 0xB8, 0x0B, 0x6D, 0x21, 0x2D, 0x2C, 0x01];
    golden(Message::Bcs(sample_bcs()), &nine);
    // The single-frame variant: remaining time is its low byte, 0x2C.
    assert_eq!(
        decode(pgn(MessageKind::Bcs), &nine[..8]),
        Ok(Message::Bcs(Bcs {
            remaining_minutes: 0x2C,
            ..sample_bcs()
        }))
    );
    assert_eq!(
        decode_err(MessageKind::Bcs, &nine[..7]),
        "BCS: 7 bytes, expected 8 or 9"
    );
}

#[test]
fn ccs_both_lengths() {
    let ccs = |charging_permitted| Ccs {
        output_voltage: DeciVolt(3995),
        output_current: Current::charging(99.8),
        charging_minutes: 12,
        charging_permitted,
    };
    let bytes = [0x9B, 0x0F, 0xBA, 0x0B, 0x0C, 0x00, 0xFD];
    golden(Message::Ccs(ccs(Some(Bits2::SET))), &bytes);
    golden(Message::Ccs(ccs(None)), &bytes[..6]);
    // Reserved bits 3–8 carry no meaning when decoding.
    assert_eq!(
        decode(
            pgn(MessageKind::Ccs),
            &[0x9B, 0x0F, 0xBA, 0x0B, 0x0C, 0x00, 0x00]
        ),
        Ok(Message::Ccs(ccs(Some(Bits2::NORMAL))))
    );
}

#[test]
fn bsm() {
    let bsm = Bsm {
        max_cell_voltage_index: 11,
        max_temperature: Temperature::from_celsius(35),
        max_temperature_index: 2,
        min_temperature: Temperature::from_celsius(25),
        min_temperature_index: 6,
        cell_voltage_status: Bits2::NORMAL,
        soc_status: Bits2::NORMAL,
        overcurrent: Bits2::NORMAL,
        over_temperature: Bits2::NORMAL,
        insulation: Bits2::NORMAL,
        connector: Bits2::NORMAL,
        charging_allowed: Bits2::SET,
    };
    golden(
        Message::Bsm(bsm.clone()),
        &[0x0B, 0x55, 0x02, 0x4B, 0x06, 0x00, 0xD0],
    );
    golden(
        Message::Bsm(Bsm {
            cell_voltage_status: bits(0b01),
            soc_status: bits(0b10),
            over_temperature: bits(0b01),
            connector: bits(0b10),
            charging_allowed: Bits2::NORMAL,
            ..bsm
        }),
        &[0x0B, 0x55, 0x02, 0x4B, 0x06, 0b0100_1001, 0b1100_1000],
    );
}

#[test]
fn bmv() {
    golden(
        Message::Bmv(Bmv {
            cells: vec![
                CellVoltage {
                    voltage: CentiVolt(330),
                    group: 0,
                },
                CellVoltage {
                    voltage: CentiVolt(331),
                    group: 1,
                },
            ],
        }),
        &[0x4A, 0x01, 0x4B, 0x11],
    );
    golden(Message::Bmv(Bmv { cells: vec![] }), &[]);
    assert_eq!(
        decode_err(MessageKind::Bmv, &[0x4A, 0x01, 0x4B]),
        "BMV: 3 bytes, expected an even number up to 512"
    );
    assert_eq!(
        decode_err(MessageKind::Bmv, &[0; 514]),
        "BMV: 514 bytes, expected an even number up to 512"
    );
    assert!(decode(pgn(MessageKind::Bmv), &[0; 512]).is_ok());
}

#[test]
fn bmt() {
    golden(
        Message::Bmt(Bmt {
            temperatures: vec![Temperature::from_celsius(25), Temperature::from_celsius(26)],
        }),
        &[0x4B, 0x4C],
    );
    assert!(decode(pgn(MessageKind::Bmt), &[0; 128]).is_ok());
    assert_eq!(
        decode_err(MessageKind::Bmt, &[0; 129]),
        "BMT: 129 bytes, expected at most 128"
    );
}

#[test]
fn bsp() {
    golden(
        Message::Bsp(Bsp {
            reserved: vec![1, 2, 3],
        }),
        &[1, 2, 3],
    );
    assert!(decode(pgn(MessageKind::Bsp), &[0; 16]).is_ok());
    assert_eq!(
        decode_err(MessageKind::Bsp, &[0; 17]),
        "BSP: 17 bytes, expected at most 16"
    );
}

#[test]
fn bst() {
    golden(
        Message::Bst(Bst {
            soc_target_reached: Bits2::SET,
            ..Bst::default()
        }),
        &[0x01, 0x00, 0x00, 0xF0],
    );
    golden(
        Message::Bst(Bst {
            charger_stopped: Bits2::SET,
            insulation_fault: Bits2::SET,
            other_fault: bits(0b10),
            voltage_abnormal: Bits2::SET,
            ..Bst::default()
        }),
        &[0x40, 0x01, 0x80, 0xF4],
    );
}

#[test]
fn cst() {
    golden(
        Message::Cst(Cst {
            manual_stop: Bits2::SET,
            emergency_stop: Bits2::SET,
            current_mismatch: Bits2::SET,
            ..Cst::default()
        }),
        &[0x04, 0x00, 0xF1, 0xF1],
    );
    golden(
        Message::Cst(Cst {
            bms_stopped: Bits2::SET,
            charger_over_temperature: bits(0b10),
            other_fault: Bits2::SET,
            voltage_abnormal: Bits2::SET,
            ..Cst::default()
        }),
        &[0x40, 0x02, 0xF4, 0xF4],
    );
}

#[test]
fn bsd() {
    golden(
        Message::Bsd(Bsd {
            soc_percent: 95,
            min_cell_voltage: CentiVolt(320),
            max_cell_voltage: CentiVolt(345),
            min_temperature: Temperature::from_celsius(20),
            max_temperature: Temperature::from_celsius(30),
        }),
        &[0x5F, 0x40, 0x01, 0x59, 0x01, 0x46, 0x50],
    );
}

#[test]
fn csd() {
    golden(
        Message::Csd(Csd {
            charging_minutes: 45,
            energy: DeciKwh(305),
            charger_number: ChargerNumber(12345),
        }),
        &[0x2D, 0x00, 0x31, 0x01, 0x39, 0x30, 0x00, 0x00],
    );
}

#[test]
fn bem() {
    golden(Message::Bem(Bem::default()), &[0xF0, 0xF0, 0xF0, 0xFC]);
    golden(
        Message::Bem(Bem {
            crmaa_timeout: Bits2::SET,
            cro_timeout: Bits2::SET,
            ccs_timeout: bits(0b10),
            csd_timeout: Bits2::SET,
            ..Bem::default()
        }),
        &[0xF4, 0xF4, 0xF2, 0xFD],
    );
}

#[test]
fn cem() {
    golden(Message::Cem(Cem::default()), &[0xFC, 0xF0, 0xC0, 0xFC]);
    golden(
        Message::Cem(Cem {
            brm_timeout: Bits2::SET,
            bro_timeout: Bits2::SET,
            bst_timeout: Bits2::SET,
            bsd_timeout: bits(0b10),
            ..Cem::default()
        }),
        &[0xFD, 0xF4, 0xD0, 0xFE],
    );
}

// ---- receiver leniency and errors ----

#[test]
fn single_frames_padded_to_eight_bytes_decode() {
    assert_eq!(
        decode(
            pgn(MessageKind::Bro),
            &[0xAA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        ),
        Ok(Message::Bro(Bro {
            ready: Readiness::Ready
        }))
    );
    assert_eq!(
        decode(
            pgn(MessageKind::Bhm),
            &[0x4C, 0x1D, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        ),
        Ok(Message::Bhm(Bhm {
            max_charging_voltage: DeciVolt(7500)
        }))
    );
    assert_eq!(
        decode(
            pgn(MessageKind::Bcl),
            &[0xA0, 0x0F, 0xB8, 0x0B, 0x01, 0xFF, 0xFF, 0xFF]
        )
        .map(|m| m.kind()),
        Ok(MessageKind::Bcl)
    );
}

#[test]
fn reserved_bits_are_ignored_when_decoding() {
    assert_eq!(
        decode(pgn(MessageKind::Bst), &[0x01, 0x00, 0x00, 0x00]),
        Ok(Message::Bst(Bst {
            soc_target_reached: Bits2::SET,
            ..Bst::default()
        }))
    );
    assert_eq!(
        decode(pgn(MessageKind::Cem), &[0, 0, 0, 0]),
        Ok(Message::Cem(Cem::default()))
    );
}

#[test]
fn short_bodies_name_the_message_and_lengths() {
    assert_eq!(
        decode_err(MessageKind::Chm, &[1, 1]),
        "CHM: 2 bytes, expected 3"
    );
    assert_eq!(
        decode_err(MessageKind::Bhm, &[1]),
        "BHM: 1 byte, expected 2"
    );
    assert_eq!(
        decode_err(MessageKind::Bro, &[]),
        "BRO: 0 bytes, expected 1"
    );
    assert_eq!(
        decode_err(MessageKind::Bcp, &[0; 8]),
        "BCP: 8 bytes, expected 13"
    );
    assert_eq!(
        decode_err(MessageKind::Ccs, &[0; 5]),
        "CCS: 5 bytes, expected 6 or 7"
    );
}

#[test]
fn invalid_enumerated_bytes_name_byte_and_value() {
    assert_eq!(
        decode_err(MessageKind::Crm, &[0x55, 0, 0, 0, 0, 0, 0, 0]),
        "CRM byte 1: 0x55 is neither 0x00 nor 0xAA"
    );
    assert_eq!(
        decode(pgn(MessageKind::Bro), &[0xFF]),
        Err(DecodeError::InvalidValue {
            kind: MessageKind::Bro,
            byte: 1,
            value: 0xFF,
            expected: "neither 0x00 nor 0xAA",
        })
    );
}

#[test]
fn unknown_pgn() {
    let pgn = Pgn::new(0x1B00).unwrap();
    assert_eq!(decode(pgn, &[]), Err(DecodeError::UnknownPgn(pgn)));
    assert_eq!(
        DecodeError::UnknownPgn(pgn).to_string(),
        "unknown PGN 0x1B00"
    );
}

#[test]
fn message_methods_match_free_functions() {
    let msg = Message::Bcs(sample_bcs());
    assert_eq!(msg.encode(), encode(&msg));
    assert_eq!(
        Message::decode(pgn(MessageKind::Bcs), &msg.encode()),
        Ok(msg)
    );
}

// ---- properties ----

/// Defined encoded length of each message.
fn defined_len(msg: &Message) -> usize {
    match msg {
        Message::Chm(_) => 3,
        Message::Bhm(_) => 2,
        Message::Crm(_) => 8,
        Message::Brm(m) => {
            if m.software_version.is_some() {
                49
            } else {
                41
            }
        }
        Message::Bcp(_) => 13,
        Message::Cts(_) => 7,
        Message::Cml(m) => {
            if m.min_output_current.is_some() {
                8
            } else {
                6
            }
        }
        Message::Bro(_) | Message::Cro(_) => 1,
        Message::Bcl(_) => 5,
        Message::Bcs(_) => 9,
        Message::Ccs(m) => {
            if m.charging_permitted.is_some() {
                7
            } else {
                6
            }
        }
        Message::Bsm(_) => 7,
        Message::Bmv(m) => 2 * m.cells.len(),
        Message::Bmt(m) => m.temperatures.len(),
        Message::Bsp(m) => m.reserved.len(),
        Message::Bst(_) | Message::Cst(_) | Message::Bem(_) | Message::Cem(_) => 4,
        Message::Bsd(_) => 7,
        Message::Csd(_) => 8,
    }
}

/// (0-based byte, mask of reserved bits) per message; those bits must be 1.
fn reserved_bits(msg: &Message) -> &'static [(usize, u8)] {
    match msg {
        Message::Brm(_) => &[(23, 0xFF)],
        // The 6-byte form has no byte 7.
        Message::Ccs(m) if m.charging_permitted.is_some() => &[(6, 0b1111_1100)],
        Message::Bsm(_) => &[(6, 0b1100_0000)],
        Message::Bst(_) => &[(3, 0b1111_0000)],
        Message::Cst(_) => &[(2, 0b1111_0000), (3, 0b1111_0000)],
        Message::Bem(_) => &[
            (0, 0b1111_0000),
            (1, 0b1111_0000),
            (2, 0b1111_0000),
            (3, 0b1111_1100),
        ],
        Message::Cem(_) => &[
            (0, 0b1111_1100),
            (1, 0b1111_0000),
            (2, 0b1100_0000),
            (3, 0b1111_1100),
        ],
        _ => &[],
    }
}

fn any_kind() -> impl Strategy<Value = MessageKind> {
    proptest::sample::select(MessageKind::ALL.to_vec())
}

/// One round-trip property per message, so each gets its own case budget
/// and a failure names the message.
macro_rules! round_trip {
    ($($name:ident => $kind:ident),* $(,)?) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            $(
                #[test]
                fn $name(msg in message_of(MessageKind::$kind)) {
                    let bytes = encode(&msg);
                    prop_assert_eq!(bytes.len(), defined_len(&msg));
                    prop_assert_eq!(decode(MessageKind::$kind.pgn(), &bytes), Ok(msg));
                }
            )*
        }
    };
}

round_trip! {
    round_trip_chm => Chm,
    round_trip_bhm => Bhm,
    round_trip_crm => Crm,
    round_trip_brm => Brm,
    round_trip_bcp => Bcp,
    round_trip_cts => Cts,
    round_trip_cml => Cml,
    round_trip_bro => Bro,
    round_trip_cro => Cro,
    round_trip_bcl => Bcl,
    round_trip_bcs => Bcs,
    round_trip_ccs => Ccs,
    round_trip_bsm => Bsm,
    round_trip_bmv => Bmv,
    round_trip_bmt => Bmt,
    round_trip_bsp => Bsp,
    round_trip_bst => Bst,
    round_trip_cst => Cst,
    round_trip_bsd => Bsd,
    round_trip_csd => Csd,
    round_trip_bem => Bem,
    round_trip_cem => Cem,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn reserved_bits_are_one(msg in any::<Message>()) {
        let bytes = encode(&msg);
        for &(i, mask) in reserved_bits(&msg) {
            let byte = bytes.get(i).copied();
            prop_assert_eq!(byte.map(|b| b & mask), Some(mask), "{} byte {}", msg.kind(), i + 1);
        }
    }

    /// Whatever decodes re-encodes to something that decodes to the same message.
    #[test]
    fn arbitrary_bytes_never_panic(
        kind in any_kind(),
        data in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        if let Ok(msg) = decode(kind.pgn(), &data) {
            prop_assert_eq!(msg.kind(), kind);
            prop_assert_eq!(decode(kind.pgn(), &encode(&msg)), Ok(msg));
        }
    }

    /// Short bodies, where every length boundary lies.
    #[test]
    fn arbitrary_short_bytes_never_panic(
        kind in any_kind(),
        data in proptest::collection::vec(any::<u8>(), 0..=50),
    ) {
        let _ = decode(kind.pgn(), &data);
    }

    #[test]
    fn random_pgns_never_panic(
        raw in 0u32..=Pgn::MAX,
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        if let Ok(pgn) = Pgn::new(raw) {
            match decode(pgn, &data) {
                Err(DecodeError::UnknownPgn(p)) => {
                    prop_assert_eq!(p, pgn);
                    prop_assert!(MessageKind::from_pgn(pgn).is_none());
                }
                Ok(msg) => prop_assert_eq!(msg.kind().pgn(), pgn),
                Err(_) => prop_assert!(MessageKind::from_pgn(pgn).is_some()),
            }
        }
    }
}
