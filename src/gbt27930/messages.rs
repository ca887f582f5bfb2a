//! The messages of GB/T 27930-2015, as typed values.
//!
//! Every message knows its PGN, priority and period ([`MessageKind`]). Field
//! types carry the standard's scaling (see [`super::units`]). The codecs live
//! in [`super::codec`].

use std::time::Duration;

use super::units::*;
use crate::j1939::{Pgn, Priority};

/// The charger's default J1939 source address.
pub const CHARGER_ADDRESS: u8 = 0x56;
/// The BMS's default J1939 source address.
pub const BMS_ADDRESS: u8 = 0xF4;

/// One row of the standard's message table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageKind {
    Chm,
    Bhm,
    Crm,
    Brm,
    Bcp,
    Cts,
    Cml,
    Bro,
    Cro,
    Bcl,
    Bcs,
    Ccs,
    Bsm,
    Bmv,
    Bmt,
    Bsp,
    Bst,
    Cst,
    Bsd,
    Csd,
    Bem,
    Cem,
}

/// Which side sends a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sender {
    Charger,
    Bms,
}

impl MessageKind {
    pub const ALL: [MessageKind; 22] = [
        MessageKind::Chm,
        MessageKind::Bhm,
        MessageKind::Crm,
        MessageKind::Brm,
        MessageKind::Bcp,
        MessageKind::Cts,
        MessageKind::Cml,
        MessageKind::Bro,
        MessageKind::Cro,
        MessageKind::Bcl,
        MessageKind::Bcs,
        MessageKind::Ccs,
        MessageKind::Bsm,
        MessageKind::Bmv,
        MessageKind::Bmt,
        MessageKind::Bsp,
        MessageKind::Bst,
        MessageKind::Cst,
        MessageKind::Bsd,
        MessageKind::Csd,
        MessageKind::Bem,
        MessageKind::Cem,
    ];

    /// (PGN, priority, period in ms, sender) from the standard's tables.
    const fn row(self) -> (u32, u8, u64, Sender) {
        use MessageKind::*;
        use Sender::*;
        match self {
            Chm => (0x2600, 6, 250, Charger),
            Bhm => (0x2700, 6, 250, Bms),
            Crm => (0x0100, 6, 250, Charger),
            Brm => (0x0200, 7, 250, Bms),
            Bcp => (0x0600, 7, 500, Bms),
            Cts => (0x0700, 6, 500, Charger),
            Cml => (0x0800, 6, 250, Charger),
            Bro => (0x0900, 4, 250, Bms),
            Cro => (0x0A00, 4, 250, Charger),
            Bcl => (0x1000, 6, 50, Bms),
            Bcs => (0x1100, 7, 250, Bms),
            Ccs => (0x1200, 6, 50, Charger),
            Bsm => (0x1300, 6, 250, Bms),
            Bmv => (0x1500, 7, 10_000, Bms),
            Bmt => (0x1600, 7, 10_000, Bms),
            Bsp => (0x1700, 7, 10_000, Bms),
            Bst => (0x1900, 4, 10, Bms),
            Cst => (0x1A00, 4, 10, Charger),
            Bsd => (0x1C00, 6, 250, Bms),
            Csd => (0x1D00, 6, 250, Charger),
            Bem => (0x1E00, 2, 250, Bms),
            Cem => (0x1F00, 2, 250, Charger),
        }
    }

    pub fn pgn(self) -> Pgn {
        Pgn::from_const(self.row().0)
    }

    pub fn priority(self) -> Priority {
        // Every priority in the table is within 0..=7.
        Priority::new(self.row().1).expect("table priorities are 0..=7")
    }

    /// The standard's transmit period.
    pub fn period(self) -> Duration {
        Duration::from_millis(self.row().2)
    }

    pub fn sender(self) -> Sender {
        self.row().3
    }

    pub fn from_pgn(pgn: Pgn) -> Option<MessageKind> {
        Self::ALL.into_iter().find(|k| k.pgn() == pgn)
    }

    pub fn name(self) -> &'static str {
        use MessageKind::*;
        match self {
            Chm => "CHM",
            Bhm => "BHM",
            Crm => "CRM",
            Brm => "BRM",
            Bcp => "BCP",
            Cts => "CTS",
            Cml => "CML",
            Bro => "BRO",
            Cro => "CRO",
            Bcl => "BCL",
            Bcs => "BCS",
            Ccs => "CCS",
            Bsm => "BSM",
            Bmv => "BMV",
            Bmt => "BMT",
            Bsp => "BSP",
            Bst => "BST",
            Cst => "CST",
            Bsd => "BSD",
            Csd => "CSD",
            Bem => "BEM",
            Cem => "CEM",
        }
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Communication protocol version: byte 1 major, bytes 2–3 minor (LE).
/// V1.1 is `01 01 00`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProtocolVersion {
    pub major: u8,
    pub minor: u16,
}

impl ProtocolVersion {
    pub const V1_1: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };
}

/// The charger's number, CRM bytes 2–5 (LE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChargerNumber(pub u32);

/// The charger's region code, CRM bytes 6–8 (three raw bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionCode(pub [u8; 3]);

/// A 2-bit status field: 00, 01, 10, 11. Meanings depend on the field; for
/// most GB/T flags 00 is normal, 01 is the flagged condition ("timeout",
/// "fault", "too high"), 10 is "unreliable" or "too low", 11 is not available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bits2(u8);

impl Bits2 {
    pub const NORMAL: Bits2 = Bits2(0b00);
    pub const SET: Bits2 = Bits2(0b01);
    pub const ALT: Bits2 = Bits2(0b10);
    pub const NOT_AVAILABLE: Bits2 = Bits2(0b11);

    /// Keeps only the low two bits.
    pub fn new(v: u8) -> Self {
        Bits2(v & 0b11)
    }
    pub fn get(self) -> u8 {
        self.0
    }
    pub fn is_set(self) -> bool {
        self == Self::SET
    }
}

/// CHM: charger handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chm {
    pub version: ProtocolVersion,
}

/// BHM: BMS handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bhm {
    pub max_charging_voltage: DeciVolt,
}

/// CRM byte 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recognition {
    /// 0x00: the BMS is not (yet) recognised.
    NotRecognized,
    /// 0xAA: the BMS is recognised.
    Recognized,
}

/// CRM: charger recognition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crm {
    pub recognition: Recognition,
    pub charger_number: ChargerNumber,
    pub region_code: RegionCode,
}

/// BRM: BMS and vehicle identification. 41 bytes per the standard's table,
/// 49 with the BMS software version its field list adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Brm {
    pub version: ProtocolVersion,
    /// 01 lead-acid, 02 NiMH, 03 LiFePO4, 04 LiMn2O4, 05 LiCoO2, 06 ternary,
    /// 07 polymer Li-ion, 08 lithium titanate, FF other.
    pub battery_type: u8,
    pub rated_capacity: DeciAh,
    pub rated_voltage: DeciVolt,
    pub manufacturer: [u8; 4],
    pub pack_serial: [u8; 4],
    /// Year of production minus 1985.
    pub production_year: u8,
    pub production_month: u8,
    pub production_day: u8,
    /// Number of charges, 24 bits.
    pub charge_count: u32,
    /// 0 leased, 1 owned by the vehicle owner.
    pub ownership: u8,
    pub vin: [u8; 17],
    /// Bytes 42–49; absent in the 41-byte form.
    pub software_version: Option<[u8; 8]>,
}

/// BCP: battery charging parameters (13 bytes, over TP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bcp {
    pub max_cell_voltage: CentiVolt,
    pub max_charging_current: Current,
    pub nominal_energy: DeciKwh,
    pub max_charging_voltage: DeciVolt,
    pub max_temperature: Temperature,
    pub soc: DeciPercent,
    pub battery_voltage: DeciVolt,
}

/// CTS: charger time sync, 7 bytes of BCD: second, minute, hour, day, month,
/// year (4 digits in 2 bytes, low pair first: 2026 is `26 20` on the wire).
/// Fields hold decimal values (`year: 2026`); the codec does the BCD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cts {
    pub second: u8,
    pub minute: u8,
    pub hour: u8,
    pub day: u8,
    pub month: u8,
    pub year: u16,
}

/// CML: charger maximum output capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cml {
    pub max_output_voltage: DeciVolt,
    pub min_output_voltage: DeciVolt,
    pub max_output_current: Current,
    /// Absent in the 6-byte (2011) form.
    pub min_output_current: Option<Current>,
}

/// BRO/CRO byte 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Readiness {
    /// 0x00
    NotReady,
    /// 0xAA
    Ready,
}

/// BRO: BMS ready for charging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bro {
    pub ready: Readiness,
}

/// CRO: charger ready for charging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cro {
    pub ready: Readiness,
}

/// BCL byte 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChargeMode {
    /// 0x01
    ConstantVoltage,
    /// 0x02
    ConstantCurrent,
}

/// BCL: battery charging demand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bcl {
    pub voltage_demand: DeciVolt,
    pub current_demand: Current,
    pub mode: ChargeMode,
}

/// A cell voltage with its group number: bits 1–12 voltage at 0.01 V/bit,
/// bits 13–16 group number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CellVoltage {
    /// 12 bits.
    pub voltage: CentiVolt,
    /// 4 bits.
    pub group: u8,
}

/// BCS: battery charging status. 9 bytes over TP; an 8-byte single-frame
/// variant seen in the field carries only the low byte of the remaining time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bcs {
    pub measured_voltage: DeciVolt,
    pub measured_current: Current,
    pub max_cell: CellVoltage,
    /// 1 %/bit.
    pub soc_percent: u8,
    /// Estimated minutes to full, 0–600.
    pub remaining_minutes: u16,
}

/// CCS: charger charging status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ccs {
    pub output_voltage: DeciVolt,
    pub output_current: Current,
    pub charging_minutes: u16,
    /// Byte 7 bits 1–2: 00 paused, 01 allowed. Absent in the 6-byte (2011) form.
    pub charging_permitted: Option<Bits2>,
}

/// BSM: battery status details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bsm {
    /// Number of the cell with the highest voltage, as the raw wire value:
    /// the standard sends it with an offset of 1, so raw 0 is cell #1 (1–256).
    pub max_cell_voltage_index: u8,
    pub max_temperature: Temperature,
    /// Probe number, raw with an offset of 1 like the cell number (1–128).
    pub max_temperature_index: u8,
    pub min_temperature: Temperature,
    /// Probe number, raw with an offset of 1 like the cell number (1–128).
    pub min_temperature_index: u8,
    /// Byte 6 bits 1–2: 00 normal, 01 too high, 10 too low.
    pub cell_voltage_status: Bits2,
    /// Byte 6 bits 3–4: 00 normal, 01 too high, 10 too low.
    pub soc_status: Bits2,
    /// Byte 6 bits 5–6: 00 normal, 01 overcurrent, 10 unreliable.
    pub overcurrent: Bits2,
    /// Byte 6 bits 7–8: 00 normal, 01 too high, 10 unreliable.
    pub over_temperature: Bits2,
    /// Byte 7 bits 1–2: 00 normal, 01 abnormal, 10 unreliable.
    pub insulation: Bits2,
    /// Byte 7 bits 3–4: 00 normal, 01 abnormal, 10 unreliable.
    pub connector: Bits2,
    /// Byte 7 bits 5–6: 00 prohibited, 01 allowed.
    pub charging_allowed: Bits2,
}

/// BMV: individual cell voltages (up to 256 cells).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bmv {
    pub cells: Vec<CellVoltage>,
}

/// BMT: battery temperatures (up to 128 probes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bmt {
    pub temperatures: Vec<Temperature>,
}

/// BSP: battery reserved message (up to 16 bytes, content unspecified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bsp {
    pub reserved: Vec<u8>,
}

/// BST: BMS stop. Each field is a 2-bit flag: 00 normal, 01 set, 10 unreliable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bst {
    // byte 1: stop reason
    pub soc_target_reached: Bits2,
    pub total_voltage_reached: Bits2,
    pub cell_voltage_reached: Bits2,
    pub charger_stopped: Bits2,
    // bytes 2–3: fault
    pub insulation_fault: Bits2,
    pub connector_over_temperature: Bits2,
    pub component_over_temperature: Bits2,
    pub charging_connector_fault: Bits2,
    pub battery_over_temperature: Bits2,
    pub relay_fault: Bits2,
    pub check_point2_fault: Bits2,
    pub other_fault: Bits2,
    // byte 4: error
    pub overcurrent: Bits2,
    pub voltage_abnormal: Bits2,
}

/// CST: charger stop. Each field is a 2-bit flag: 00 normal, 01 set, 10 unreliable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cst {
    // byte 1: stop reason
    pub conditions_reached: Bits2,
    pub manual_stop: Bits2,
    pub fault_stop: Bits2,
    pub bms_stopped: Bits2,
    // bytes 2–3: fault
    pub charger_over_temperature: Bits2,
    pub connector_fault: Bits2,
    pub internal_over_temperature: Bits2,
    pub power_unavailable: Bits2,
    pub emergency_stop: Bits2,
    pub other_fault: Bits2,
    // byte 4: error
    pub current_mismatch: Bits2,
    pub voltage_abnormal: Bits2,
}

/// BSD: BMS statistics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bsd {
    pub soc_percent: u8,
    pub min_cell_voltage: CentiVolt,
    pub max_cell_voltage: CentiVolt,
    pub min_temperature: Temperature,
    pub max_temperature: Temperature,
}

/// CSD: charger statistics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Csd {
    pub charging_minutes: u16,
    pub energy: DeciKwh,
    pub charger_number: ChargerNumber,
}

/// BEM: BMS error (timeouts seen by the BMS). 00 normal, 01 timeout, 10 unreliable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bem {
    /// byte 1 bits 1–2
    pub crm00_timeout: Bits2,
    /// byte 1 bits 3–4
    pub crmaa_timeout: Bits2,
    /// byte 2 bits 1–2
    pub cts_cml_timeout: Bits2,
    /// byte 2 bits 3–4
    pub cro_timeout: Bits2,
    /// byte 3 bits 1–2
    pub ccs_timeout: Bits2,
    /// byte 3 bits 3–4
    pub cst_timeout: Bits2,
    /// byte 4 bits 1–2
    pub csd_timeout: Bits2,
}

/// CEM: charger error (timeouts seen by the charger). 00 normal, 01 timeout, 10 unreliable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cem {
    /// byte 1 bits 1–2
    pub brm_timeout: Bits2,
    /// byte 2 bits 1–2
    pub bcp_timeout: Bits2,
    /// byte 2 bits 3–4
    pub bro_timeout: Bits2,
    /// byte 3 bits 1–2
    pub bcs_timeout: Bits2,
    /// byte 3 bits 3–4
    pub bcl_timeout: Bits2,
    /// byte 3 bits 5–6
    pub bst_timeout: Bits2,
    /// byte 4 bits 1–2
    pub bsd_timeout: Bits2,
}

impl Bem {
    /// A BEM with `flag` (01 timeout, 10 unreliable) in the field for the
    /// charger's message `kind`: CRM's field is CRM(0xAA)'s when
    /// `crm_recognized`, else CRM(0x00)'s. Kinds without a field give none.
    pub fn flagging(kind: MessageKind, crm_recognized: bool, flag: Bits2) -> Bem {
        let mut bem = Bem::default();
        match kind {
            MessageKind::Crm if crm_recognized => bem.crmaa_timeout = flag,
            MessageKind::Crm => bem.crm00_timeout = flag,
            MessageKind::Cml | MessageKind::Cts => bem.cts_cml_timeout = flag,
            MessageKind::Cro => bem.cro_timeout = flag,
            MessageKind::Ccs => bem.ccs_timeout = flag,
            MessageKind::Cst => bem.cst_timeout = flag,
            MessageKind::Csd => bem.csd_timeout = flag,
            _ => {}
        }
        bem
    }
}

impl Cem {
    /// A CEM with `flag` (01 timeout, 10 unreliable) in the field for the
    /// BMS's message `kind`. Kinds without a field give none.
    pub fn flagging(kind: MessageKind, flag: Bits2) -> Cem {
        let mut cem = Cem::default();
        match kind {
            MessageKind::Brm => cem.brm_timeout = flag,
            MessageKind::Bcp => cem.bcp_timeout = flag,
            MessageKind::Bro => cem.bro_timeout = flag,
            MessageKind::Bcs => cem.bcs_timeout = flag,
            MessageKind::Bcl => cem.bcl_timeout = flag,
            MessageKind::Bst => cem.bst_timeout = flag,
            MessageKind::Bsd => cem.bsd_timeout = flag,
            _ => {}
        }
        cem
    }
}

/// Any GB/T 27930 message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Chm(Chm),
    Bhm(Bhm),
    Crm(Crm),
    Brm(Brm),
    Bcp(Bcp),
    Cts(Cts),
    Cml(Cml),
    Bro(Bro),
    Cro(Cro),
    Bcl(Bcl),
    Bcs(Bcs),
    Ccs(Ccs),
    Bsm(Bsm),
    Bmv(Bmv),
    Bmt(Bmt),
    Bsp(Bsp),
    Bst(Bst),
    Cst(Cst),
    Bsd(Bsd),
    Csd(Csd),
    Bem(Bem),
    Cem(Cem),
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        use MessageKind as K;
        match self {
            Message::Chm(_) => K::Chm,
            Message::Bhm(_) => K::Bhm,
            Message::Crm(_) => K::Crm,
            Message::Brm(_) => K::Brm,
            Message::Bcp(_) => K::Bcp,
            Message::Cts(_) => K::Cts,
            Message::Cml(_) => K::Cml,
            Message::Bro(_) => K::Bro,
            Message::Cro(_) => K::Cro,
            Message::Bcl(_) => K::Bcl,
            Message::Bcs(_) => K::Bcs,
            Message::Ccs(_) => K::Ccs,
            Message::Bsm(_) => K::Bsm,
            Message::Bmv(_) => K::Bmv,
            Message::Bmt(_) => K::Bmt,
            Message::Bsp(_) => K::Bsp,
            Message::Bst(_) => K::Bst,
            Message::Cst(_) => K::Cst,
            Message::Bsd(_) => K::Bsd,
            Message::Csd(_) => K::Csd,
            Message::Bem(_) => K::Bem,
            Message::Cem(_) => K::Cem,
        }
    }
}
