use proptest::prelude::*;

use super::*;
use crate::gbt27930::codec::strategy::message_of;
use crate::gbt27930::messages::{Bhm, ChargerNumber, Chm, Crm, ProtocolVersion, RegionCode};
use crate::gbt27930::units::{CentiVolt, DeciKwh, DeciPercent, Temperature};

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn pile_limits() -> Limits {
    Limits {
        min_voltage: Some(DeciVolt(2000)),
        max_voltage: Some(DeciVolt(7500)),
        max_current: Some(Current::charging(250.0)),
    }
}

fn bms_check(profile: Profile) -> PeerCheck {
    PeerCheck::for_bms(profile, Some(pile_limits()))
}

fn crm(recognized: bool) -> Message {
    Message::Crm(Crm {
        recognition: if recognized {
            Recognition::Recognized
        } else {
            Recognition::NotRecognized
        },
        charger_number: ChargerNumber(1),
        region_code: RegionCode(*b"310"),
    })
}

fn bcp(max_current_raw: u16) -> Bcp {
    Bcp {
        max_cell_voltage: CentiVolt(420),
        max_charging_current: Current(max_current_raw),
        nominal_energy: DeciKwh(600),
        max_charging_voltage: DeciVolt(4200),
        max_temperature: Temperature::from_celsius(60),
        soc: DeciPercent(500),
        battery_voltage: DeciVolt(3600),
    }
}

fn bcl(current_raw: u16) -> Message {
    Message::Bcl(Bcl {
        voltage_demand: DeciVolt(4000),
        current_demand: Current(current_raw),
        mode: ChargeMode::ConstantCurrent,
    })
}

fn bcs(current_raw: u16) -> Message {
    Message::Bcs(Bcs {
        measured_voltage: DeciVolt(3700),
        measured_current: Current(current_raw),
        max_cell: crate::gbt27930::CellVoltage {
            voltage: CentiVolt(380),
            group: 1,
        },
        soc_percent: 51,
        remaining_minutes: 30,
    })
}

fn ccs(current_raw: u16) -> Message {
    Message::Ccs(Ccs {
        output_voltage: DeciVolt(3700),
        output_current: Current(current_raw),
        charging_minutes: 1,
        charging_permitted: Some(crate::gbt27930::Bits2::SET),
    })
}

fn only_ccs_timeout() -> Message {
    Message::Bem(Bem {
        ccs_timeout: crate::gbt27930::Bits2::SET,
        ..Bem::default()
    })
}

/// A check that has seen recognition complete.
fn recognized(profile: Profile) -> PeerCheck {
    let mut c = bms_check(profile);
    c.context(&crm(true), t(0));
    c
}

/// A check that has seen CRO(0xAA): the BMS's charging phase began.
fn charger_ready(profile: Profile) -> PeerCheck {
    let mut c = recognized(profile);
    c.context(
        &Message::Cro(crate::gbt27930::messages::Cro {
            ready: crate::gbt27930::messages::Readiness::Ready,
        }),
        t(0),
    );
    c
}

fn deviations(c: &mut PeerCheck) -> Vec<Deviation> {
    std::iter::from_fn(|| c.poll_deviation())
        .map(|(d, _)| d)
        .collect()
}

fn refused_deviation(v: &Verdict) -> Option<Deviation> {
    match v {
        Verdict::Refuse(f) => f.reason.deviation(),
        _ => None,
    }
}

#[test]
fn a_standard_session_passes_unchanged_and_shows_nothing() {
    let mut c = recognized(Profile::Strict);
    for (msg, len) in [
        (Message::Bcp(bcp(1500)), 13),
        (bcl(3000), 5),
        (bcs(3010), 9),
    ] {
        assert_eq!(c.inbound(msg.clone(), len, t(10)), Verdict::Pass(msg));
    }
    assert_eq!(c.current_sign(), Some(CurrentSign::Standard));
    assert!(deviations(&mut c).is_empty());
}

#[test]
fn a_positive_count_is_turned_round_once_settled_by_bcp() {
    let mut c = recognized(Profile::Field);
    // 250 A counted positive is raw 6500; the standard's is 1500.
    let Verdict::Pass(Message::Bcp(b)) = c.inbound(Message::Bcp(bcp(6500)), 13, t(10)) else {
        panic!("BCP refused");
    };
    assert_eq!(b.max_charging_current, Current(1500));
    assert_eq!(c.current_sign(), Some(CurrentSign::Positive));
    // 100 A demanded, counted positive (5000): read as the standard's 3000.
    assert_eq!(c.inbound(bcl(5000), 5, t(20)), Verdict::Pass(bcl(3000)));
    // A measured 100 A counted positive.
    assert_eq!(c.inbound(bcs(5000), 9, t(30)), Verdict::Pass(bcs(3000)));
    assert_eq!(deviations(&mut c), [Deviation::PositiveCurrent]);
}

#[test]
fn strict_refuses_a_positive_count_by_name() {
    let mut c = recognized(Profile::Strict);
    let v = c.inbound(Message::Bcp(bcp(6500)), 13, t(10));
    assert_eq!(refused_deviation(&v), Some(Deviation::PositiveCurrent));
    let Verdict::Refuse(fault) = v else {
        unreachable!()
    };
    assert_eq!(fault.kind, MessageKind::Bcp);
    assert!(fault.to_string().contains("positive-current"), "{fault}");
}

#[test]
fn a_sign_that_cannot_be_settled_is_refused_in_both_profiles() {
    for profile in [Profile::Field, Profile::Strict] {
        // BCP says standard, BCL says the other side of zero.
        let mut c = recognized(profile);
        assert!(matches!(
            c.inbound(Message::Bcp(bcp(1500)), 13, t(0)),
            Verdict::Pass(_)
        ));
        let Verdict::Refuse(f) = c.inbound(bcl(5000), 5, t(10)) else {
            panic!("{profile}: a contradicting BCL passed");
        };
        assert_eq!(f.kind, MessageKind::Bcl);
        assert!(f.to_string().contains("cannot be settled"), "{f}");
        // No BCP at all: a BCL on the discharge side has nothing to settle it.
        let mut c = recognized(profile);
        assert!(matches!(c.inbound(bcl(5000), 5, t(10)), Verdict::Refuse(_)));
        // A measured current far on the other side of a settled sign.
        let mut c = recognized(profile);
        c.inbound(Message::Bcp(bcp(1500)), 13, t(0));
        assert!(matches!(c.inbound(bcs(4500), 9, t(10)), Verdict::Refuse(_)));
    }
}

#[test]
fn a_measured_current_may_stray_a_little_across_zero() {
    let mut c = recognized(Profile::Strict);
    c.inbound(Message::Bcp(bcp(1500)), 13, t(0));
    // 1 A "discharging" at zero current: sensor offset, not a sign.
    assert_eq!(c.inbound(bcs(4010), 9, t(10)), Verdict::Pass(bcs(4010)));
}

#[test]
fn plausibility_against_the_stated_limits() {
    let mut c = recognized(Profile::Field);
    c.inbound(Message::Bcp(bcp(3000)), 13, t(0)); // max 100 A, 420 V
    // Demand far above the BMS's own maximum current, or voltage; a little
    // above is rounding, met at the maximum by the charger.
    assert!(matches!(c.inbound(bcl(2000), 5, t(10)), Verdict::Refuse(_)));
    assert!(matches!(c.inbound(bcl(2990), 5, t(10)), Verdict::Pass(_)));
    let mut high_v = bcl(3500);
    if let Message::Bcl(b) = &mut high_v {
        b.voltage_demand = DeciVolt(4500);
    }
    assert!(matches!(c.inbound(high_v, 5, t(10)), Verdict::Refuse(_)));
    // A measured voltage far above the maximum.
    let mut high = bcs(3500);
    if let Message::Bcs(b) = &mut high {
        b.measured_voltage = DeciVolt(4500);
    }
    let Verdict::Refuse(f) = c.inbound(high, 9, t(20)) else {
        panic!("an over-voltage BCS passed");
    };
    assert!(f.to_string().contains("measured voltage"), "{f}");
    // BCP: 0 A maximum, or over 100 % state of charge.
    let mut c = recognized(Profile::Field);
    assert!(matches!(
        c.inbound(Message::Bcp(bcp(4000)), 13, t(0)),
        Verdict::Refuse(_)
    ));
    let mut over = bcp(3000);
    over.soc = DeciPercent(1200);
    assert!(matches!(
        c.inbound(Message::Bcp(over), 13, t(0)),
        Verdict::Refuse(_)
    ));
}

#[test]
fn bcp_before_crm_aa_is_a_deviation_and_after_it_is_not() {
    let mut c = bms_check(Profile::Field);
    c.context(&crm(false), t(0));
    assert!(matches!(
        c.inbound(Message::Bcp(bcp(1500)), 13, t(10)),
        Verdict::Pass(_)
    ));
    assert_eq!(deviations(&mut c), [Deviation::BcpBeforeRecognition]);
    let mut strict = bms_check(Profile::Strict);
    let v = strict.inbound(Message::Bcp(bcp(1500)), 13, t(10));
    assert_eq!(refused_deviation(&v), Some(Deviation::BcpBeforeRecognition));
    let mut c = recognized(Profile::Strict);
    assert!(matches!(
        c.inbound(Message::Bcp(bcp(1500)), 13, t(10)),
        Verdict::Pass(_)
    ));
}

#[test]
fn an_early_ccs_timeout_is_dropped_and_a_real_one_passes() {
    // Before CRO(0xAA) no CCS timer runs: a BEM then is from an earlier session.
    let mut c = recognized(Profile::Field);
    assert_eq!(
        c.inbound(only_ccs_timeout(), 4, t(100)),
        Verdict::Pass(only_ccs_timeout())
    );
    let mut c = charger_ready(Profile::Field);
    assert_eq!(c.inbound(only_ccs_timeout(), 4, t(100)), Verdict::Drop);
    // 1 s after CRO(0xAA) without any CCS, the timeout is real.
    let mut late = charger_ready(Profile::Field);
    assert_eq!(
        late.inbound(only_ccs_timeout(), 4, t(1100)),
        Verdict::Pass(only_ccs_timeout())
    );
    assert_eq!(deviations(&mut c), [Deviation::EarlyCcsTimeout]);
    // CCS started at 1 s: within 1 s of it a CCS timeout is still impossible.
    c.context(&ccs(4000), t(1000));
    assert_eq!(c.inbound(only_ccs_timeout(), 4, t(1500)), Verdict::Drop);
    // After that it may be real.
    assert_eq!(
        c.inbound(only_ccs_timeout(), 4, t(2100)),
        Verdict::Pass(only_ccs_timeout())
    );
    // A BEM with other flags is never taken for the early kind.
    let mut c = charger_ready(Profile::Field);
    let both = Message::Bem(Bem {
        ccs_timeout: crate::gbt27930::Bits2::SET,
        cro_timeout: crate::gbt27930::Bits2::SET,
        ..Bem::default()
    });
    assert_eq!(c.inbound(both.clone(), 4, t(100)), Verdict::Pass(both));
    let mut strict = charger_ready(Profile::Strict);
    let v = strict.inbound(only_ccs_timeout(), 4, t(100));
    assert_eq!(refused_deviation(&v), Some(Deviation::EarlyCcsTimeout));
}

#[test]
fn a_first_bcl_after_ccs_is_a_bms_that_waited_for_it() {
    let mut c = recognized(Profile::Field);
    c.inbound(Message::Bcp(bcp(1500)), 13, t(0));
    c.context(&ccs(4000), t(600));
    assert!(matches!(c.inbound(bcl(3000), 5, t(650)), Verdict::Pass(_)));
    assert_eq!(deviations(&mut c), [Deviation::BclWaitsForCcs]);
    // A BMS that sent BCL first shows nothing, whatever follows.
    let mut c = recognized(Profile::Field);
    c.inbound(Message::Bcp(bcp(1500)), 13, t(0));
    c.inbound(bcl(3000), 5, t(10));
    c.context(&ccs(4000), t(60));
    c.inbound(bcl(3000), 5, t(70));
    assert!(deviations(&mut c).is_empty());
}

#[test]
fn bcs_in_one_frame_is_a_deviation() {
    let mut c = recognized(Profile::Field);
    assert!(matches!(c.inbound(bcs(3000), 8, t(0)), Verdict::Pass(_)));
    assert_eq!(deviations(&mut c), [Deviation::BcsSingleFrame]);
    let mut strict = recognized(Profile::Strict);
    let v = strict.inbound(bcs(3000), 8, t(0));
    assert_eq!(refused_deviation(&v), Some(Deviation::BcsSingleFrame));
}

#[test]
fn a_bhm_with_version_bytes_is_set_aside_or_refused() {
    // 01 01: 25.7 V, below this charger's 200 V minimum.
    let bhm = Message::Bhm(Bhm {
        max_charging_voltage: DeciVolt(257),
    });
    let mut c = bms_check(Profile::Field);
    assert_eq!(c.inbound(bhm.clone(), 2, t(0)), Verdict::Pass(bhm.clone()));
    assert_eq!(deviations(&mut c), [Deviation::BhmImplausible]);
    let v = bms_check(Profile::Strict).inbound(bhm.clone(), 2, t(0));
    assert_eq!(refused_deviation(&v), Some(Deviation::BhmImplausible));
    // A watcher with no charger limits uses the 100 V floor.
    let mut watcher = PeerCheck::for_bms(Profile::Field, None);
    watcher.inbound(bhm, 2, t(0));
    assert_eq!(deviations(&mut watcher), [Deviation::BhmImplausible]);
    let fine = Message::Bhm(Bhm {
        max_charging_voltage: DeciVolt(4200),
    });
    let mut c = bms_check(Profile::Strict);
    assert_eq!(c.inbound(fine.clone(), 2, t(0)), Verdict::Pass(fine));
}

#[test]
fn deviations_are_reported_once_per_session_and_a_new_session_starts_over() {
    let mut c = recognized(Profile::Field);
    c.inbound(bcs(3000), 8, t(0));
    c.inbound(bcs(3000), 8, t(250));
    assert_eq!(deviations(&mut c), [Deviation::BcsSingleFrame]);
    c.context(
        &Message::Chm(Chm {
            version: ProtocolVersion::V1_1,
        }),
        t(10_000),
    );
    c.inbound(bcs(3000), 8, t(10_100));
    assert_eq!(deviations(&mut c), [Deviation::BcsSingleFrame]);
}

#[test]
fn a_charger_counting_positive_is_read_the_standard_way() {
    let cml = |max_raw| {
        Message::Cml(Cml {
            max_output_voltage: DeciVolt(7500),
            min_output_voltage: DeciVolt(2000),
            max_output_current: Current(max_raw),
            min_output_current: Some(Current(4000)),
        })
    };
    let bms = Limits {
        min_voltage: None,
        max_voltage: Some(DeciVolt(4200)),
        max_current: Some(Current::charging(200.0)),
    };
    let mut c = PeerCheck::for_charger(Profile::Field, Some(bms));
    // 250 A counted positive.
    assert_eq!(c.inbound(cml(6500), 8, t(0)), Verdict::Pass(cml(1500)));
    assert_eq!(c.inbound(ccs(5000), 7, t(10)), Verdict::Pass(ccs(3000)));
    assert_eq!(deviations(&mut c), [Deviation::PositiveCurrent]);
    // Output above the BMS's maximum current is refused.
    assert!(matches!(c.inbound(ccs(6500), 7, t(20)), Verdict::Refuse(_)));
    let v = PeerCheck::for_charger(Profile::Strict, Some(bms)).inbound(cml(6500), 8, t(0));
    assert_eq!(refused_deviation(&v), Some(Deviation::PositiveCurrent));
    // A garbled minimum (above the maximum, seen in the field) is no reason to refuse.
    let odd = Message::Cml(Cml {
        max_output_voltage: DeciVolt(7500),
        min_output_voltage: DeciVolt(2000),
        max_output_current: Current(3500),
        min_output_current: Some(Current(1200)),
    });
    let mut c = PeerCheck::for_charger(Profile::Strict, Some(bms));
    assert!(matches!(c.inbound(odd, 8, t(0)), Verdict::Pass(_)));
}

#[test]
fn a_link_watch_reports_each_side() {
    let mut w = LinkWatch::default();
    let early = w.message(Sender::Bms, &Message::Bcp(bcp(6500)), 13, t(0));
    let kinds: Vec<_> = early
        .iter()
        .filter_map(|f| match f {
            Finding::Deviation { by, deviation, .. } => Some((*by, *deviation)),
            Finding::Fault { .. } | Finding::Ignored { .. } => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (Sender::Bms, Deviation::BcpBeforeRecognition),
            (Sender::Bms, Deviation::PositiveCurrent)
        ]
    );
    let refused = w.message(Sender::Bms, &bcl(2000), 5, t(10));
    assert!(matches!(
        refused.as_slice(),
        [Finding::Fault {
            by: Sender::Bms,
            ..
        }]
    ));
}

proptest! {
    /// Whatever a peer sends, in whatever order, judging it never panics,
    /// and what passes is within the standard's range of current.
    #[test]
    fn any_messages_in_any_order_never_panic(
        msgs in prop::collection::vec(
            prop::sample::select(MessageKind::ALL.to_vec()).prop_flat_map(message_of),
            0..40
        ),
        lens in prop::collection::vec(0usize..20, 40),
        strict: bool,
    ) {
        let profile = if strict { Profile::Strict } else { Profile::Field };
        let mut bms = PeerCheck::for_bms(profile, None);
        let mut charger = PeerCheck::for_charger(profile, None);
        for (i, (m, len)) in msgs.into_iter().zip(lens).enumerate() {
            let now = t(i as u64 * 50);
            let (judge, other) = match m.kind().sender() {
                Sender::Bms => (&mut bms, &mut charger),
                Sender::Charger => (&mut charger, &mut bms),
            };
            if let Verdict::Pass(out) = judge.inbound(m, len, now) {
                if let Message::Bcl(b) = &out {
                    prop_assert!(b.current_demand.0 <= 8000);
                }
                other.context(&out, now);
            }
            while judge.poll_deviation().is_some() {}
        }
    }
}
