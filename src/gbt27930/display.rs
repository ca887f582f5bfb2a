//! One line per message for people reading a capture (`bmsgw decode`, the
//! demo timeline): `NAME field=value …`, values in physical units, values
//! never containing spaces, and fault/timeout flags printed only when set.

use std::fmt::{self, Display, Formatter};

use super::messages::*;

impl Display for Message {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().name())?;
        match self {
            Message::Chm(m) => write!(f, " version={}", Version(m.version)),
            Message::Bhm(m) => write!(f, " max_V={}", m.max_charging_voltage),
            Message::Crm(m) => write!(
                f,
                " recognition={} charger={} region={}",
                match m.recognition {
                    Recognition::NotRecognized => "0x00",
                    Recognition::Recognized => "0xAA",
                },
                m.charger_number.0,
                Hex(&m.region_code.0),
            ),
            Message::Brm(m) => brm(f, m),
            Message::Bcp(m) => write!(
                f,
                " max_cell={} max_I={} energy={} max_V={} max_T={} soc={} V={}",
                m.max_cell_voltage,
                m.max_charging_current,
                m.nominal_energy,
                m.max_charging_voltage,
                m.max_temperature,
                m.soc,
                m.battery_voltage,
            ),
            Message::Cts(m) => write!(
                f,
                " time={:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                m.year, m.month, m.day, m.hour, m.minute, m.second
            ),
            Message::Cml(m) => {
                write!(
                    f,
                    " max_V={} min_V={} max_I={}",
                    m.max_output_voltage, m.min_output_voltage, m.max_output_current
                )?;
                if let Some(min) = m.min_output_current {
                    write!(f, " min_I={min}")?;
                }
                Ok(())
            }
            Message::Bro(m) => write!(f, " ready={}", Ready(m.ready)),
            Message::Cro(m) => write!(f, " ready={}", Ready(m.ready)),
            Message::Bcl(m) => write!(
                f,
                " V={} I={} mode={}",
                m.voltage_demand,
                m.current_demand,
                match m.mode {
                    ChargeMode::ConstantVoltage => "CV",
                    ChargeMode::ConstantCurrent => "CC",
                }
            ),
            Message::Bcs(m) => write!(
                f,
                " V={} I={} max_cell={} group={} soc={}% remaining={}min",
                m.measured_voltage,
                m.measured_current,
                m.max_cell.voltage,
                m.max_cell.group,
                m.soc_percent,
                m.remaining_minutes,
            ),
            Message::Ccs(m) => {
                write!(
                    f,
                    " V={} I={} time={}min",
                    m.output_voltage, m.output_current, m.charging_minutes
                )?;
                if let Some(permitted) = m.charging_permitted {
                    write!(f, " charging={}", State(permitted, &["paused", "allowed"]))?;
                }
                Ok(())
            }
            Message::Bsm(m) => bsm(f, m),
            Message::Bmv(m) => bmv(f, m),
            Message::Bmt(m) => {
                write!(f, " probes={}", m.temperatures.len())?;
                if let (Some(min), Some(max)) =
                    (m.temperatures.iter().min(), m.temperatures.iter().max())
                {
                    write!(f, " min={min} max={max}")?;
                }
                Ok(())
            }
            Message::Bsp(m) => {
                write!(f, " bytes={}", m.reserved.len())?;
                if !m.reserved.is_empty() {
                    write!(f, " data={}", Hex(&m.reserved))?;
                }
                Ok(())
            }
            Message::Bst(m) => flag_groups(
                f,
                &[
                    (
                        "reason",
                        &[
                            (m.soc_target_reached, "SOC-target"),
                            (m.total_voltage_reached, "total-V"),
                            (m.cell_voltage_reached, "cell-V"),
                            (m.charger_stopped, "charger-stop"),
                        ],
                    ),
                    (
                        "fault",
                        &[
                            (m.insulation_fault, "insulation"),
                            (m.connector_over_temperature, "connector-overtemp"),
                            (m.component_over_temperature, "component-overtemp"),
                            (m.charging_connector_fault, "connector"),
                            (m.battery_over_temperature, "battery-overtemp"),
                            (m.relay_fault, "relay"),
                            (m.check_point2_fault, "check-point-2"),
                            (m.other_fault, "other"),
                        ],
                    ),
                    (
                        "error",
                        &[
                            (m.overcurrent, "overcurrent"),
                            (m.voltage_abnormal, "voltage"),
                        ],
                    ),
                ],
            ),
            Message::Cst(m) => flag_groups(
                f,
                &[
                    (
                        "reason",
                        &[
                            (m.conditions_reached, "conditions-reached"),
                            (m.manual_stop, "manual"),
                            (m.fault_stop, "fault"),
                            (m.bms_stopped, "BMS-stop"),
                        ],
                    ),
                    (
                        "fault",
                        &[
                            (m.charger_over_temperature, "charger-overtemp"),
                            (m.connector_fault, "connector"),
                            (m.internal_over_temperature, "internal-overtemp"),
                            (m.power_unavailable, "power-unavailable"),
                            (m.emergency_stop, "emergency-stop"),
                            (m.other_fault, "other"),
                        ],
                    ),
                    (
                        "error",
                        &[
                            (m.current_mismatch, "current-mismatch"),
                            (m.voltage_abnormal, "voltage"),
                        ],
                    ),
                ],
            ),
            Message::Bsd(m) => write!(
                f,
                " soc={}% min_cell={} max_cell={} min_T={} max_T={}",
                m.soc_percent,
                m.min_cell_voltage,
                m.max_cell_voltage,
                m.min_temperature,
                m.max_temperature,
            ),
            Message::Csd(m) => write!(
                f,
                " time={}min energy={} charger={}",
                m.charging_minutes, m.energy, m.charger_number.0
            ),
            Message::Bem(m) => flag_groups(
                f,
                &[(
                    "timeout",
                    &[
                        (m.crm00_timeout, "CRM00"),
                        (m.crmaa_timeout, "CRMAA"),
                        (m.cts_cml_timeout, "CTS/CML"),
                        (m.cro_timeout, "CRO"),
                        (m.ccs_timeout, "CCS"),
                        (m.cst_timeout, "CST"),
                        (m.csd_timeout, "CSD"),
                    ],
                )],
            ),
            Message::Cem(m) => flag_groups(
                f,
                &[(
                    "timeout",
                    &[
                        (m.brm_timeout, "BRM"),
                        (m.bcp_timeout, "BCP"),
                        (m.bro_timeout, "BRO"),
                        (m.bcs_timeout, "BCS"),
                        (m.bcl_timeout, "BCL"),
                        (m.bst_timeout, "BST"),
                        (m.bsd_timeout, "BSD"),
                    ],
                )],
            ),
        }
    }
}

fn brm(f: &mut Formatter<'_>, m: &Brm) -> fmt::Result {
    write!(
        f,
        " version={} battery={} capacity={} rated_V={} maker={} serial={}",
        Version(m.version),
        BatteryType(m.battery_type),
        m.rated_capacity,
        m.rated_voltage,
        Text(&m.manufacturer),
        Text(&m.pack_serial),
    )?;
    // The year is carried as an offset from 1985.
    write!(
        f,
        " made={:04}-{:02}-{:02} charges={}",
        1985 + u16::from(m.production_year),
        m.production_month,
        m.production_day,
        m.charge_count,
    )?;
    match m.ownership {
        0 => f.write_str(" owner=leased")?,
        1 => f.write_str(" owner=private")?,
        other => write!(f, " owner={other:#04X}")?,
    }
    write!(f, " vin={}", Text(&m.vin))?;
    if let Some(sw) = &m.software_version {
        write!(f, " sw={}", Hex(sw))?;
    }
    Ok(())
}

fn bsm(f: &mut Formatter<'_>, m: &Bsm) -> fmt::Result {
    // Cell and probe numbers are sent with an offset of 1: raw 0 is #1.
    write!(
        f,
        " max_cell=#{} max_T={}@#{} min_T={}@#{} charging={}",
        u16::from(m.max_cell_voltage_index) + 1,
        m.max_temperature,
        u16::from(m.max_temperature_index) + 1,
        m.min_temperature,
        u16::from(m.min_temperature_index) + 1,
        State(m.charging_allowed, &["prohibited", "allowed"]),
    )?;
    let abnormal = [
        ("cell_V", m.cell_voltage_status, ["high", "low"]),
        ("soc", m.soc_status, ["high", "low"]),
        ("current", m.overcurrent, ["over", "unreliable"]),
        ("temp", m.over_temperature, ["high", "unreliable"]),
        ("insulation", m.insulation, ["abnormal", "unreliable"]),
        ("connector", m.connector, ["abnormal", "unreliable"]),
    ];
    for (name, value, [set, alt]) in abnormal {
        if value != Bits2::NORMAL {
            write!(f, " {name}={}", State(value, &["normal", set, alt]))?;
        }
    }
    Ok(())
}

fn bmv(f: &mut Formatter<'_>, m: &Bmv) -> fmt::Result {
    write!(f, " cells={}", m.cells.len())?;
    // A capture reader wants the spread, not 256 numbers; cells are numbered from 1.
    let by_voltage =
        |a: &(usize, &CellVoltage), b: &(usize, &CellVoltage)| a.1.voltage.cmp(&b.1.voltage);
    let min = m.cells.iter().enumerate().min_by(by_voltage);
    let max = m.cells.iter().enumerate().max_by(by_voltage);
    if let (Some((lo_i, lo)), Some((hi_i, hi))) = (min, max) {
        write!(
            f,
            " min={}@#{} max={}@#{}",
            lo.voltage,
            lo_i + 1,
            hi.voltage,
            hi_i + 1
        )?;
    }
    Ok(())
}

/// Prints ` label=a,b` for each group with at least one flag that is not
/// normal, or ` flags=none` when nothing is set.
fn flag_groups(f: &mut Formatter<'_>, groups: &[(&str, &[(Bits2, &str)])]) -> fmt::Result {
    let mut any = false;
    for (label, flags) in groups {
        let mut first = true;
        for (value, name) in flags.iter().filter(|(v, _)| *v != Bits2::NORMAL) {
            if first {
                write!(f, " {label}=")?;
            } else {
                f.write_str(",")?;
            }
            first = false;
            any = true;
            f.write_str(name)?;
            // 01 is the flag itself; 10 and 11 are qualified.
            match *value {
                Bits2::ALT => f.write_str("(unreliable)")?,
                Bits2::NOT_AVAILABLE => f.write_str("(n/a)")?,
                _ => {}
            }
        }
    }
    if !any {
        f.write_str(" flags=none")?;
    }
    Ok(())
}

struct Version(ProtocolVersion);

impl Display for Version {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0.major, self.0.minor)
    }
}

struct Ready(Readiness);

impl Display for Ready {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Readiness::NotReady => "0x00",
            Readiness::Ready => "0xAA",
        })
    }
}

/// A 2-bit status with names for 00, 01 and optionally 10; the rest print
/// as `n/a` (11) or bits.
struct State<'a>(Bits2, &'a [&'a str]);

impl Display for State<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.1.get(usize::from(self.0.get())) {
            Some(name) => f.write_str(name),
            None => match self.0 {
                Bits2::NOT_AVAILABLE => f.write_str("n/a"),
                other => write!(f, "{:#04b}", other.get()),
            },
        }
    }
}

struct BatteryType(u8);

impl Display for BatteryType {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            0x01 => "lead-acid",
            0x02 => "NiMH",
            0x03 => "LiFePO4",
            0x04 => "LiMn2O4",
            0x05 => "LiCoO2",
            0x06 => "ternary",
            0x07 => "Li-polymer",
            0x08 => "Li-titanate",
            0xFF => "other",
            raw => return write!(f, "{raw:#04X}"),
        };
        f.write_str(name)
    }
}

/// Uppercase hex without separators.
struct Hex<'a>(&'a [u8]);

impl Display for Hex<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02X}"))
    }
}

/// ASCII when every byte is a visible character (so the value stays one
/// token), hex otherwise.
struct Text<'a>(&'a [u8]);

impl Display for Text<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if !self.0.is_empty() && self.0.iter().all(u8::is_ascii_graphic) {
            self.0
                .iter()
                .try_for_each(|&b| write!(f, "{}", char::from(b)))
        } else {
            Hex(self.0).fmt(f)
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::gbt27930::units::*;

    fn show(m: Message) -> String {
        m.to_string()
    }

    fn brm(vin: [u8; 17], software_version: Option<[u8; 8]>) -> Message {
        Message::Brm(Brm {
            version: ProtocolVersion::V1_1,
            battery_type: 0x03,
            rated_capacity: DeciAh(1500),
            rated_voltage: DeciVolt(3500),
            manufacturer: *b"CATL",
            pack_serial: [0, 0, 0, 1],
            production_year: 35,
            production_month: 5,
            production_day: 1,
            charge_count: 123_456,
            ownership: 1,
            vin,
            software_version,
        })
    }

    #[test]
    fn handshake_and_identification() {
        assert_eq!(
            show(Message::Chm(Chm {
                version: ProtocolVersion::V1_1
            })),
            "CHM version=1.1"
        );
        assert_eq!(
            show(Message::Bhm(Bhm {
                max_charging_voltage: DeciVolt(7500)
            })),
            "BHM max_V=750.0V"
        );
        assert_eq!(
            show(Message::Crm(Crm {
                recognition: Recognition::Recognized,
                charger_number: ChargerNumber(12345),
                region_code: RegionCode(*b"123"),
            })),
            "CRM recognition=0xAA charger=12345 region=313233"
        );
    }

    #[test]
    fn brm_vin_is_ascii_when_printable_else_hex() {
        assert_eq!(
            show(brm(*b"LFV2A21K0A3000001", None)),
            "BRM version=1.1 battery=LiFePO4 capacity=150.0Ah rated_V=350.0V maker=CATL \
             serial=00000001 made=2020-05-01 charges=123456 owner=private vin=LFV2A21K0A3000001"
        );
        let blanked = show(brm([0xFF; 17], Some([1, 2, 3, 4, 5, 6, 7, 8])));
        assert!(
            blanked.ends_with(&format!(" vin={} sw=0102030405060708", "FF".repeat(17))),
            "{blanked}"
        );
    }

    #[test]
    fn charging_parameters() {
        assert_eq!(
            show(Message::Bcp(Bcp {
                max_cell_voltage: CentiVolt(420),
                max_charging_current: Current::charging(250.0),
                nominal_energy: DeciKwh(600),
                max_charging_voltage: DeciVolt(5000),
                max_temperature: Temperature::from_celsius(55),
                soc: DeciPercent(450),
                battery_voltage: DeciVolt(3800),
            })),
            "BCP max_cell=4.20V max_I=250.0A energy=60.0kWh max_V=500.0V max_T=55°C soc=45.0% V=380.0V"
        );
        assert_eq!(
            show(Message::Cts(Cts {
                second: 5,
                minute: 4,
                hour: 3,
                day: 14,
                month: 3,
                year: 2026
            })),
            "CTS time=2026-03-14T03:04:05"
        );
        let cml = Cml {
            max_output_voltage: DeciVolt(7500),
            min_output_voltage: DeciVolt(2000),
            max_output_current: Current::charging(250.0),
            min_output_current: Some(Current::charging(0.0)),
        };
        assert_eq!(
            show(Message::Cml(cml.clone())),
            "CML max_V=750.0V min_V=200.0V max_I=250.0A min_I=0.0A"
        );
        assert_eq!(
            show(Message::Cml(Cml {
                min_output_current: None,
                ..cml
            })),
            "CML max_V=750.0V min_V=200.0V max_I=250.0A"
        );
        assert_eq!(
            show(Message::Bro(Bro {
                ready: Readiness::Ready
            })),
            "BRO ready=0xAA"
        );
        assert_eq!(
            show(Message::Cro(Cro {
                ready: Readiness::NotReady
            })),
            "CRO ready=0x00"
        );
    }

    #[test]
    fn charging_stage() {
        assert_eq!(
            show(Message::Bcl(Bcl {
                voltage_demand: DeciVolt(4000),
                current_demand: Current::charging(100.0),
                mode: ChargeMode::ConstantCurrent,
            })),
            "BCL V=400.0V I=100.0A mode=CC"
        );
        assert_eq!(
            show(Message::Bcs(Bcs {
                measured_voltage: DeciVolt(3800),
                measured_current: Current::charging(100.0),
                max_cell: CellVoltage {
                    voltage: CentiVolt(365),
                    group: 2
                },
                soc_percent: 45,
                remaining_minutes: 30,
            })),
            "BCS V=380.0V I=100.0A max_cell=3.65V group=2 soc=45% remaining=30min"
        );
        let ccs = Ccs {
            output_voltage: DeciVolt(3995),
            output_current: Current::charging(99.8),
            charging_minutes: 12,
            charging_permitted: Some(Bits2::SET),
        };
        assert_eq!(
            show(Message::Ccs(ccs.clone())),
            "CCS V=399.5V I=99.8A time=12min charging=allowed"
        );
        assert_eq!(
            show(Message::Ccs(Ccs {
                charging_permitted: Some(Bits2::NOT_AVAILABLE),
                ..ccs.clone()
            })),
            "CCS V=399.5V I=99.8A time=12min charging=n/a"
        );
        assert_eq!(
            show(Message::Ccs(Ccs {
                charging_permitted: None,
                ..ccs
            })),
            "CCS V=399.5V I=99.8A time=12min"
        );
    }

    #[test]
    fn bsm_shows_abnormal_states_only() {
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
        assert_eq!(
            show(Message::Bsm(bsm.clone())),
            "BSM max_cell=#12 max_T=35°C@#3 min_T=25°C@#7 charging=allowed"
        );
        assert_eq!(
            show(Message::Bsm(Bsm {
                soc_status: Bits2::ALT,
                insulation: Bits2::SET,
                charging_allowed: Bits2::NORMAL,
                ..bsm
            })),
            "BSM max_cell=#12 max_T=35°C@#3 min_T=25°C@#7 charging=prohibited soc=low insulation=abnormal"
        );
    }

    #[test]
    fn detail_lists_are_summarised() {
        let cell = |v, group| CellVoltage {
            voltage: CentiVolt(v),
            group,
        };
        assert_eq!(
            show(Message::Bmv(Bmv {
                cells: vec![cell(330, 0), cell(320, 0), cell(345, 1)]
            })),
            "BMV cells=3 min=3.20V@#2 max=3.45V@#3"
        );
        assert_eq!(show(Message::Bmv(Bmv { cells: vec![] })), "BMV cells=0");
        assert_eq!(
            show(Message::Bmt(Bmt {
                temperatures: vec![Temperature::from_celsius(26), Temperature::from_celsius(20)]
            })),
            "BMT probes=2 min=20°C max=26°C"
        );
        assert_eq!(
            show(Message::Bsp(Bsp {
                reserved: vec![0xAB, 0x01]
            })),
            "BSP bytes=2 data=AB01"
        );
        assert_eq!(show(Message::Bsp(Bsp { reserved: vec![] })), "BSP bytes=0");
    }

    #[test]
    fn stop_messages_list_set_flags_by_group() {
        assert_eq!(
            show(Message::Bst(Bst {
                soc_target_reached: Bits2::SET,
                ..Bst::default()
            })),
            "BST reason=SOC-target"
        );
        assert_eq!(
            show(Message::Bst(Bst {
                charger_stopped: Bits2::SET,
                insulation_fault: Bits2::SET,
                relay_fault: Bits2::ALT,
                voltage_abnormal: Bits2::SET,
                ..Bst::default()
            })),
            "BST reason=charger-stop fault=insulation,relay(unreliable) error=voltage"
        );
        assert_eq!(show(Message::Bst(Bst::default())), "BST flags=none");
        assert_eq!(
            show(Message::Cst(Cst {
                manual_stop: Bits2::SET,
                emergency_stop: Bits2::SET,
                ..Cst::default()
            })),
            "CST reason=manual fault=emergency-stop"
        );
    }

    #[test]
    fn statistics_and_errors() {
        assert_eq!(
            show(Message::Bsd(Bsd {
                soc_percent: 95,
                min_cell_voltage: CentiVolt(320),
                max_cell_voltage: CentiVolt(345),
                min_temperature: Temperature::from_celsius(20),
                max_temperature: Temperature::from_celsius(30),
            })),
            "BSD soc=95% min_cell=3.20V max_cell=3.45V min_T=20°C max_T=30°C"
        );
        assert_eq!(
            show(Message::Csd(Csd {
                charging_minutes: 45,
                energy: DeciKwh(305),
                charger_number: ChargerNumber(12345),
            })),
            "CSD time=45min energy=30.5kWh charger=12345"
        );
        assert_eq!(
            show(Message::Bem(Bem {
                crm00_timeout: Bits2::SET,
                cts_cml_timeout: Bits2::SET,
                ..Bem::default()
            })),
            "BEM timeout=CRM00,CTS/CML"
        );
        assert_eq!(
            show(Message::Cem(Cem {
                bsd_timeout: Bits2::NOT_AVAILABLE,
                ..Cem::default()
            })),
            "CEM timeout=BSD(n/a)"
        );
        assert_eq!(show(Message::Cem(Cem::default())), "CEM flags=none");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// One line, starting with the name, every field a `key=value` token.
        #[test]
        fn every_message_is_one_line_of_tokens(msg in any::<Message>()) {
            let line = msg.to_string();
            prop_assert!(!line.contains('\n'));
            let mut tokens = line.split(' ');
            prop_assert_eq!(tokens.next(), Some(msg.kind().name()));
            for token in tokens {
                prop_assert!(token.contains('='), "{:?} in {:?}", token, line);
            }
        }
    }
}
