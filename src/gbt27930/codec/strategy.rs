//! proptest strategies for every message, limited to values the wire can
//! carry (12-bit cell voltages, 24-bit charge count, two-digit BCD, list
//! lengths within the standard's maxima), so that encode → decode is exact.
//! `any::<Message>()` and `any::<Bcl>()` etc. work for other modules' tests.

use proptest::collection::vec;
use proptest::prelude::*;

use crate::gbt27930::messages::*;
use crate::gbt27930::units::*;

fn bits2() -> impl Strategy<Value = Bits2> {
    (0u8..4).prop_map(Bits2::new)
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    (any::<u8>(), any::<u16>()).prop_map(|(major, minor)| ProtocolVersion { major, minor })
}

fn deci_volt() -> impl Strategy<Value = DeciVolt> {
    any::<u16>().prop_map(DeciVolt)
}

fn centi_volt() -> impl Strategy<Value = CentiVolt> {
    any::<u16>().prop_map(CentiVolt)
}

fn current() -> impl Strategy<Value = Current> {
    any::<u16>().prop_map(Current)
}

fn temperature() -> impl Strategy<Value = Temperature> {
    any::<u8>().prop_map(Temperature)
}

fn cell() -> impl Strategy<Value = CellVoltage> {
    (0u16..0x1000, 0u8..16).prop_map(|(v, group)| CellVoltage {
        voltage: CentiVolt(v),
        group,
    })
}

fn readiness() -> impl Strategy<Value = Readiness> {
    prop_oneof![Just(Readiness::NotReady), Just(Readiness::Ready)]
}

/// `impl Arbitrary for $ty` from a strategy expression.
macro_rules! arbitrary {
    ($ty:ty, $strategy:expr) => {
        impl Arbitrary for $ty {
            type Parameters = ();
            type Strategy = BoxedStrategy<$ty>;
            fn arbitrary_with((): ()) -> Self::Strategy {
                $strategy.boxed()
            }
        }
    };
}

arbitrary!(Chm, version().prop_map(|version| Chm { version }));

arbitrary!(
    Bhm,
    deci_volt().prop_map(|max_charging_voltage| Bhm {
        max_charging_voltage
    })
);

arbitrary!(
    Crm,
    (
        prop_oneof![
            Just(Recognition::NotRecognized),
            Just(Recognition::Recognized)
        ],
        any::<u32>(),
        any::<[u8; 3]>(),
    )
        .prop_map(|(recognition, n, region)| Crm {
            recognition,
            charger_number: ChargerNumber(n),
            region_code: RegionCode(region),
        })
);

arbitrary!(
    Brm,
    (
        (version(), any::<u8>(), any::<u16>(), deci_volt()),
        (any::<[u8; 4]>(), any::<[u8; 4]>()),
        (any::<u8>(), any::<u8>(), any::<u8>(), 0u32..0x100_0000),
        (any::<u8>(), any::<[u8; 17]>(), any::<Option<[u8; 8]>>()),
    )
        .prop_map(
            |(
                (version, battery_type, capacity, rated_voltage),
                (manufacturer, pack_serial),
                (production_year, production_month, production_day, charge_count),
                (ownership, vin, software_version),
            )| Brm {
                version,
                battery_type,
                rated_capacity: DeciAh(capacity),
                rated_voltage,
                manufacturer,
                pack_serial,
                production_year,
                production_month,
                production_day,
                charge_count,
                ownership,
                vin,
                software_version,
            }
        )
);

arbitrary!(
    Bcp,
    (
        centi_volt(),
        current(),
        any::<u16>(),
        deci_volt(),
        temperature(),
        any::<u16>(),
        deci_volt(),
    )
        .prop_map(|(cell, current, energy, max_v, max_t, soc, v)| Bcp {
            max_cell_voltage: cell,
            max_charging_current: current,
            nominal_energy: DeciKwh(energy),
            max_charging_voltage: max_v,
            max_temperature: max_t,
            soc: DeciPercent(soc),
            battery_voltage: v,
        })
);

arbitrary!(
    Cts,
    // Every two-digit value, not only calendar-valid ones: the codec does BCD,
    // not calendar checks.
    (
        0u8..100,
        0u8..100,
        0u8..100,
        0u8..100,
        0u8..100,
        0u16..10_000
    )
        .prop_map(|(second, minute, hour, day, month, year)| Cts {
            second,
            minute,
            hour,
            day,
            month,
            year,
        })
);

arbitrary!(
    Cml,
    (
        deci_volt(),
        deci_volt(),
        current(),
        proptest::option::of(current())
    )
        .prop_map(|(max_v, min_v, max_i, min_i)| Cml {
            max_output_voltage: max_v,
            min_output_voltage: min_v,
            max_output_current: max_i,
            min_output_current: min_i,
        })
);

arbitrary!(Bro, readiness().prop_map(|ready| Bro { ready }));
arbitrary!(Cro, readiness().prop_map(|ready| Cro { ready }));

arbitrary!(
    Bcl,
    (
        deci_volt(),
        current(),
        prop_oneof![
            Just(ChargeMode::ConstantVoltage),
            Just(ChargeMode::ConstantCurrent)
        ],
    )
        .prop_map(|(voltage_demand, current_demand, mode)| Bcl {
            voltage_demand,
            current_demand,
            mode,
        })
);

arbitrary!(
    Bcs,
    (deci_volt(), current(), cell(), any::<u8>(), any::<u16>()).prop_map(
        |(v, i, max_cell, soc_percent, remaining_minutes)| Bcs {
            measured_voltage: v,
            measured_current: i,
            max_cell,
            soc_percent,
            remaining_minutes,
        }
    )
);

arbitrary!(
    Ccs,
    (
        deci_volt(),
        current(),
        any::<u16>(),
        proptest::option::of(bits2())
    )
        .prop_map(|(v, i, charging_minutes, charging_permitted)| Ccs {
            output_voltage: v,
            output_current: i,
            charging_minutes,
            charging_permitted,
        })
);

arbitrary!(
    Bsm,
    (
        (
            any::<u8>(),
            temperature(),
            any::<u8>(),
            temperature(),
            any::<u8>()
        ),
        [bits2(), bits2(), bits2(), bits2()],
        [bits2(), bits2(), bits2()],
    )
        .prop_map(
            |(
                (max_cell, max_t, max_t_index, min_t, min_t_index),
                [
                    cell_voltage_status,
                    soc_status,
                    overcurrent,
                    over_temperature,
                ],
                [insulation, connector, charging_allowed],
            )| Bsm {
                max_cell_voltage_index: max_cell,
                max_temperature: max_t,
                max_temperature_index: max_t_index,
                min_temperature: min_t,
                min_temperature_index: min_t_index,
                cell_voltage_status,
                soc_status,
                overcurrent,
                over_temperature,
                insulation,
                connector,
                charging_allowed,
            }
        )
);

arbitrary!(Bmv, vec(cell(), 0..=256).prop_map(|cells| Bmv { cells }));

arbitrary!(
    Bmt,
    vec(temperature(), 0..=128).prop_map(|temperatures| Bmt { temperatures })
);

arbitrary!(
    Bsp,
    vec(any::<u8>(), 0..=16).prop_map(|reserved| Bsp { reserved })
);

arbitrary!(
    Bst,
    (
        [bits2(), bits2(), bits2(), bits2()],
        [
            bits2(),
            bits2(),
            bits2(),
            bits2(),
            bits2(),
            bits2(),
            bits2(),
            bits2()
        ],
        [bits2(), bits2()],
    )
        .prop_map(|([a, b, c, d], [e, f, g, h, i, j, k, l], [m, n])| Bst {
            soc_target_reached: a,
            total_voltage_reached: b,
            cell_voltage_reached: c,
            charger_stopped: d,
            insulation_fault: e,
            connector_over_temperature: f,
            component_over_temperature: g,
            charging_connector_fault: h,
            battery_over_temperature: i,
            relay_fault: j,
            check_point2_fault: k,
            other_fault: l,
            overcurrent: m,
            voltage_abnormal: n,
        })
);

arbitrary!(
    Cst,
    (
        [bits2(), bits2(), bits2(), bits2()],
        [bits2(), bits2(), bits2(), bits2(), bits2(), bits2()],
        [bits2(), bits2()],
    )
        .prop_map(|([a, b, c, d], [e, f, g, h, i, j], [k, l])| Cst {
            conditions_reached: a,
            manual_stop: b,
            fault_stop: c,
            bms_stopped: d,
            charger_over_temperature: e,
            connector_fault: f,
            internal_over_temperature: g,
            power_unavailable: h,
            emergency_stop: i,
            other_fault: j,
            current_mismatch: k,
            voltage_abnormal: l,
        })
);

arbitrary!(
    Bsd,
    (
        any::<u8>(),
        centi_volt(),
        centi_volt(),
        temperature(),
        temperature()
    )
        .prop_map(|(soc_percent, min_v, max_v, min_t, max_t)| Bsd {
            soc_percent,
            min_cell_voltage: min_v,
            max_cell_voltage: max_v,
            min_temperature: min_t,
            max_temperature: max_t,
        })
);

arbitrary!(
    Csd,
    (any::<u16>(), any::<u16>(), any::<u32>()).prop_map(|(minutes, energy, n)| Csd {
        charging_minutes: minutes,
        energy: DeciKwh(energy),
        charger_number: ChargerNumber(n),
    })
);

arbitrary!(
    Bem,
    [
        bits2(),
        bits2(),
        bits2(),
        bits2(),
        bits2(),
        bits2(),
        bits2()
    ]
    .prop_map(|[a, b, c, d, e, f, g]| Bem {
        crm00_timeout: a,
        crmaa_timeout: b,
        cts_cml_timeout: c,
        cro_timeout: d,
        ccs_timeout: e,
        cst_timeout: f,
        csd_timeout: g,
    })
);

arbitrary!(
    Cem,
    [
        bits2(),
        bits2(),
        bits2(),
        bits2(),
        bits2(),
        bits2(),
        bits2()
    ]
    .prop_map(|[a, b, c, d, e, f, g]| Cem {
        brm_timeout: a,
        bcp_timeout: b,
        bro_timeout: c,
        bcs_timeout: d,
        bcl_timeout: e,
        bst_timeout: f,
        bsd_timeout: g,
    })
);

/// Any message of the given kind.
pub(crate) fn message_of(kind: MessageKind) -> BoxedStrategy<Message> {
    use MessageKind as K;
    match kind {
        K::Chm => any::<Chm>().prop_map(Message::Chm).boxed(),
        K::Bhm => any::<Bhm>().prop_map(Message::Bhm).boxed(),
        K::Crm => any::<Crm>().prop_map(Message::Crm).boxed(),
        K::Brm => any::<Brm>().prop_map(Message::Brm).boxed(),
        K::Bcp => any::<Bcp>().prop_map(Message::Bcp).boxed(),
        K::Cts => any::<Cts>().prop_map(Message::Cts).boxed(),
        K::Cml => any::<Cml>().prop_map(Message::Cml).boxed(),
        K::Bro => any::<Bro>().prop_map(Message::Bro).boxed(),
        K::Cro => any::<Cro>().prop_map(Message::Cro).boxed(),
        K::Bcl => any::<Bcl>().prop_map(Message::Bcl).boxed(),
        K::Bcs => any::<Bcs>().prop_map(Message::Bcs).boxed(),
        K::Ccs => any::<Ccs>().prop_map(Message::Ccs).boxed(),
        K::Bsm => any::<Bsm>().prop_map(Message::Bsm).boxed(),
        K::Bmv => any::<Bmv>().prop_map(Message::Bmv).boxed(),
        K::Bmt => any::<Bmt>().prop_map(Message::Bmt).boxed(),
        K::Bsp => any::<Bsp>().prop_map(Message::Bsp).boxed(),
        K::Bst => any::<Bst>().prop_map(Message::Bst).boxed(),
        K::Cst => any::<Cst>().prop_map(Message::Cst).boxed(),
        K::Bsd => any::<Bsd>().prop_map(Message::Bsd).boxed(),
        K::Csd => any::<Csd>().prop_map(Message::Csd).boxed(),
        K::Bem => any::<Bem>().prop_map(Message::Bem).boxed(),
        K::Cem => any::<Cem>().prop_map(Message::Cem).boxed(),
    }
}

arbitrary!(
    Message,
    proptest::strategy::Union::new(MessageKind::ALL.map(message_of))
);
