//! Bytes to GB/T 27930-2015 messages and back.
//!
//! This module owns the wire layout of all 22 messages: field order, byte
//! order (little-endian), 2-bit flag packing, the BCD of CTS, and which
//! lengths a receiver accepts. It sees message bodies only; the J1939 layer
//! has already split off the identifier and reassembled transport-protocol
//! payloads.
//!
//! - [`encode`] writes the message's defined length, with reserved bits and
//!   bytes set to 1 as the standard requires.
//! - [`decode`] never panics. It accepts trailing bytes beyond the longest
//!   defined form (single frames are padded to 8 bytes with 0xFF), the field
//!   variants seen in practice (BRM 41/49, BCS 8/9, CML 6/8, CCS 6/7), and
//!   ignores the value of reserved bits. Anything shorter, or an enumerated
//!   byte outside its defined values, is a [`DecodeError`].

mod wire;

#[cfg(test)]
pub(crate) mod strategy;
#[cfg(test)]
mod tests;

use std::fmt;

use self::wire::{
    Reader, Writer, cell_from_wire, cell_to_wire, from_bcd, pack8, pack16, to_bcd, unpack,
};
use super::messages::*;
use super::units::*;
use crate::j1939::Pgn;

/// Why a message body could not be decoded. Every variant names the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown PGN {0}")]
    UnknownPgn(Pgn),
    #[error("{kind}: {len} byte{}, expected {expected}", plural(.len))]
    Length {
        kind: MessageKind,
        len: usize,
        expected: ExpectedLen,
    },
    /// An enumerated byte (CRM, BRO, CRO, BCL mode) outside its defined values.
    #[error("{kind} byte {byte}: {value:#04X} is {expected}")]
    InvalidValue {
        kind: MessageKind,
        /// 1-based, as the standard numbers bytes.
        byte: usize,
        value: u8,
        /// What the byte may be, phrased to follow "is": "neither 0x00 nor 0xAA".
        expected: &'static str,
    },
    #[error("{kind} {field}: {value:#04X} is not BCD")]
    NotBcd {
        kind: MessageKind,
        field: &'static str,
        value: u8,
    },
}

fn plural(n: &usize) -> &'static str {
    if *n == 1 { "" } else { "s" }
}

/// The body lengths a message accepts, as told in a [`DecodeError::Length`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedLen {
    /// At least this many; more is padding.
    Fixed(usize),
    /// Exactly the short form, or at least the long form.
    Either { short: usize, long: usize },
    /// Variable: an even number of bytes, at most this many (BMV).
    EvenUpTo(usize),
    /// Variable: at most this many (BMT, BSP).
    UpTo(usize),
}

impl ExpectedLen {
    pub fn accepts(self, len: usize) -> bool {
        match self {
            ExpectedLen::Fixed(n) => len >= n,
            ExpectedLen::Either { short, long } => len == short || len >= long,
            ExpectedLen::EvenUpTo(max) => len.is_multiple_of(2) && len <= max,
            ExpectedLen::UpTo(max) => len <= max,
        }
    }
}

impl fmt::Display for ExpectedLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedLen::Fixed(n) => write!(f, "{n}"),
            ExpectedLen::Either { short, long } => write!(f, "{short} or {long}"),
            ExpectedLen::EvenUpTo(max) => write!(f, "an even number up to {max}"),
            ExpectedLen::UpTo(max) => write!(f, "at most {max}"),
        }
    }
}

/// Encodes a message body at its defined length.
///
/// Encoding cannot fail: values wider than their field (a 12-bit cell
/// voltage, the 24-bit charge count, CTS beyond two BCD digits) are cut to
/// the field width. Lists are written as given, so a BMV of more than 256
/// cells, a BMT of more than 128 probes or a BSP of more than 16 bytes yields
/// a body that [`decode`] rejects.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut w = Writer::with_capacity(8);
    match msg {
        Message::Chm(m) => m.write(&mut w),
        Message::Bhm(m) => m.write(&mut w),
        Message::Crm(m) => m.write(&mut w),
        Message::Brm(m) => m.write(&mut w),
        Message::Bcp(m) => m.write(&mut w),
        Message::Cts(m) => m.write(&mut w),
        Message::Cml(m) => m.write(&mut w),
        Message::Bro(m) => m.write(&mut w),
        Message::Cro(m) => m.write(&mut w),
        Message::Bcl(m) => m.write(&mut w),
        Message::Bcs(m) => m.write(&mut w),
        Message::Ccs(m) => m.write(&mut w),
        Message::Bsm(m) => m.write(&mut w),
        Message::Bmv(m) => m.write(&mut w),
        Message::Bmt(m) => m.write(&mut w),
        Message::Bsp(m) => m.write(&mut w),
        Message::Bst(m) => m.write(&mut w),
        Message::Cst(m) => m.write(&mut w),
        Message::Bsd(m) => m.write(&mut w),
        Message::Csd(m) => m.write(&mut w),
        Message::Bem(m) => m.write(&mut w),
        Message::Cem(m) => m.write(&mut w),
    }
    w.into_bytes()
}

/// Decodes the body of the message with this PGN.
pub fn decode(pgn: Pgn, data: &[u8]) -> Result<Message, DecodeError> {
    use MessageKind as K;
    let kind = MessageKind::from_pgn(pgn).ok_or(DecodeError::UnknownPgn(pgn))?;
    Ok(match kind {
        K::Chm => Message::Chm(Chm::read(data)?),
        K::Bhm => Message::Bhm(Bhm::read(data)?),
        K::Crm => Message::Crm(Crm::read(data)?),
        K::Brm => Message::Brm(Brm::read(data)?),
        K::Bcp => Message::Bcp(Bcp::read(data)?),
        K::Cts => Message::Cts(Cts::read(data)?),
        K::Cml => Message::Cml(Cml::read(data)?),
        K::Bro => Message::Bro(Bro::read(data)?),
        K::Cro => Message::Cro(Cro::read(data)?),
        K::Bcl => Message::Bcl(Bcl::read(data)?),
        K::Bcs => Message::Bcs(Bcs::read(data)?),
        K::Ccs => Message::Ccs(Ccs::read(data)?),
        K::Bsm => Message::Bsm(Bsm::read(data)?),
        K::Bmv => Message::Bmv(Bmv::read(data)?),
        K::Bmt => Message::Bmt(Bmt::read(data)?),
        K::Bsp => Message::Bsp(Bsp::read(data)?),
        K::Bst => Message::Bst(Bst::read(data)?),
        K::Cst => Message::Cst(Cst::read(data)?),
        K::Bsd => Message::Bsd(Bsd::read(data)?),
        K::Csd => Message::Csd(Csd::read(data)?),
        K::Bem => Message::Bem(Bem::read(data)?),
        K::Cem => Message::Cem(Cem::read(data)?),
    })
}

impl Message {
    /// See [`encode`].
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// See [`decode`].
    pub fn decode(pgn: Pgn, data: &[u8]) -> Result<Message, DecodeError> {
        decode(pgn, data)
    }
}

/// One message's layout, its writer next to its reader so the two can be
/// checked against each other at a glance.
trait Body: Sized {
    const KIND: MessageKind;
    const LEN: ExpectedLen;
    fn write(&self, w: &mut Writer);
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError>;

    fn read(data: &[u8]) -> Result<Self, DecodeError> {
        Self::read_fields(&mut Reader::new(Self::KIND, data, Self::LEN)?)
    }
}

fn write_version(w: &mut Writer, v: ProtocolVersion) {
    w.u8(v.major);
    w.u16(v.minor);
}

fn read_version(r: &mut Reader<'_>) -> Result<ProtocolVersion, DecodeError> {
    Ok(ProtocolVersion {
        major: r.u8()?,
        minor: r.u16()?,
    })
}

const NOT_00_AA: &str = "neither 0x00 nor 0xAA";

fn readiness_to_wire(r: Readiness) -> u8 {
    match r {
        Readiness::NotReady => 0x00,
        Readiness::Ready => 0xAA,
    }
}

fn readiness_from_wire(kind: MessageKind, value: u8) -> Result<Readiness, DecodeError> {
    match value {
        0x00 => Ok(Readiness::NotReady),
        0xAA => Ok(Readiness::Ready),
        _ => Err(DecodeError::InvalidValue {
            kind,
            byte: 1,
            value,
            expected: NOT_00_AA,
        }),
    }
}

impl Body for Chm {
    const KIND: MessageKind = MessageKind::Chm;
    const LEN: ExpectedLen = ExpectedLen::Fixed(3);
    fn write(&self, w: &mut Writer) {
        write_version(w, self.version);
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Chm {
            version: read_version(r)?,
        })
    }
}

impl Body for Bhm {
    const KIND: MessageKind = MessageKind::Bhm;
    const LEN: ExpectedLen = ExpectedLen::Fixed(2);
    fn write(&self, w: &mut Writer) {
        w.u16(self.max_charging_voltage.0);
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Bhm {
            max_charging_voltage: DeciVolt(r.u16()?),
        })
    }
}

impl Body for Crm {
    const KIND: MessageKind = MessageKind::Crm;
    const LEN: ExpectedLen = ExpectedLen::Fixed(8);
    fn write(&self, w: &mut Writer) {
        w.u8(match self.recognition {
            Recognition::NotRecognized => 0x00,
            Recognition::Recognized => 0xAA,
        });
        w.u32(self.charger_number.0);
        w.bytes(&self.region_code.0);
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let recognition = match r.u8()? {
            0x00 => Recognition::NotRecognized,
            0xAA => Recognition::Recognized,
            value => {
                return Err(DecodeError::InvalidValue {
                    kind: Self::KIND,
                    byte: 1,
                    value,
                    expected: NOT_00_AA,
                });
            }
        };
        Ok(Crm {
            recognition,
            charger_number: ChargerNumber(r.u32()?),
            region_code: RegionCode(r.bytes()?),
        })
    }
}

impl Body for Brm {
    const KIND: MessageKind = MessageKind::Brm;
    const LEN: ExpectedLen = ExpectedLen::Either {
        short: 41,
        long: 49,
    };
    fn write(&self, w: &mut Writer) {
        write_version(w, self.version);
        w.u8(self.battery_type);
        w.u16(self.rated_capacity.0);
        w.u16(self.rated_voltage.0);
        w.bytes(&self.manufacturer);
        w.bytes(&self.pack_serial);
        w.u8(self.production_year);
        w.u8(self.production_month);
        w.u8(self.production_day);
        w.u24(self.charge_count);
        w.u8(self.ownership);
        w.u8(0xFF); // byte 24, reserved
        w.bytes(&self.vin);
        if let Some(sw) = &self.software_version {
            w.bytes(sw);
        }
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = read_version(r)?;
        let battery_type = r.u8()?;
        let rated_capacity = DeciAh(r.u16()?);
        let rated_voltage = DeciVolt(r.u16()?);
        let manufacturer = r.bytes()?;
        let pack_serial = r.bytes()?;
        let production_year = r.u8()?;
        let production_month = r.u8()?;
        let production_day = r.u8()?;
        let charge_count = r.u24()?;
        let ownership = r.u8()?;
        let _reserved = r.u8()?;
        let vin = r.bytes()?;
        // The length check admits exactly 41, or 49 and more.
        let software_version = if r.remaining() > 0 {
            Some(r.bytes()?)
        } else {
            None
        };
        Ok(Brm {
            version,
            battery_type,
            rated_capacity,
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
        })
    }
}

impl Body for Bcp {
    const KIND: MessageKind = MessageKind::Bcp;
    const LEN: ExpectedLen = ExpectedLen::Fixed(13);
    fn write(&self, w: &mut Writer) {
        w.u16(self.max_cell_voltage.0);
        w.u16(self.max_charging_current.0);
        w.u16(self.nominal_energy.0);
        w.u16(self.max_charging_voltage.0);
        w.u8(self.max_temperature.0);
        w.u16(self.soc.0);
        w.u16(self.battery_voltage.0);
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Bcp {
            max_cell_voltage: CentiVolt(r.u16()?),
            max_charging_current: Current(r.u16()?),
            nominal_energy: DeciKwh(r.u16()?),
            max_charging_voltage: DeciVolt(r.u16()?),
            max_temperature: Temperature(r.u8()?),
            soc: DeciPercent(r.u16()?),
            battery_voltage: DeciVolt(r.u16()?),
        })
    }
}

impl Body for Cts {
    const KIND: MessageKind = MessageKind::Cts;
    const LEN: ExpectedLen = ExpectedLen::Fixed(7);
    fn write(&self, w: &mut Writer) {
        w.u8(to_bcd(self.second));
        w.u8(to_bcd(self.minute));
        w.u8(to_bcd(self.hour));
        w.u8(to_bcd(self.day));
        w.u8(to_bcd(self.month));
        // Four BCD digits, low pair first like every multi-byte field: 2026 → 26 20.
        let year = self.year % 10_000;
        w.u8(to_bcd((year % 100) as u8));
        w.u8(to_bcd((year / 100) as u8));
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut bcd = |field: &'static str| -> Result<u8, DecodeError> {
            let value = r.u8()?;
            from_bcd(value).ok_or(DecodeError::NotBcd {
                kind: Self::KIND,
                field,
                value,
            })
        };
        let second = bcd("second")?;
        let minute = bcd("minute")?;
        let hour = bcd("hour")?;
        let day = bcd("day")?;
        let month = bcd("month")?;
        let year_lo = bcd("year (byte 6)")?;
        let year_hi = bcd("year (byte 7)")?;
        Ok(Cts {
            second,
            minute,
            hour,
            day,
            month,
            year: u16::from(year_hi) * 100 + u16::from(year_lo),
        })
    }
}

impl Body for Cml {
    const KIND: MessageKind = MessageKind::Cml;
    const LEN: ExpectedLen = ExpectedLen::Either { short: 6, long: 8 };
    fn write(&self, w: &mut Writer) {
        w.u16(self.max_output_voltage.0);
        w.u16(self.min_output_voltage.0);
        w.u16(self.max_output_current.0);
        if let Some(min) = self.min_output_current {
            w.u16(min.0);
        }
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Cml {
            max_output_voltage: DeciVolt(r.u16()?),
            min_output_voltage: DeciVolt(r.u16()?),
            max_output_current: Current(r.u16()?),
            // The length check admits exactly 6, or 8 and more.
            min_output_current: if r.remaining() > 0 {
                Some(Current(r.u16()?))
            } else {
                None
            },
        })
    }
}

impl Body for Bro {
    const KIND: MessageKind = MessageKind::Bro;
    const LEN: ExpectedLen = ExpectedLen::Fixed(1);
    fn write(&self, w: &mut Writer) {
        w.u8(readiness_to_wire(self.ready));
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Bro {
            ready: readiness_from_wire(Self::KIND, r.u8()?)?,
        })
    }
}

impl Body for Cro {
    const KIND: MessageKind = MessageKind::Cro;
    const LEN: ExpectedLen = ExpectedLen::Fixed(1);
    fn write(&self, w: &mut Writer) {
        w.u8(readiness_to_wire(self.ready));
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Cro {
            ready: readiness_from_wire(Self::KIND, r.u8()?)?,
        })
    }
}

impl Body for Bcl {
    const KIND: MessageKind = MessageKind::Bcl;
    const LEN: ExpectedLen = ExpectedLen::Fixed(5);
    fn write(&self, w: &mut Writer) {
        w.u16(self.voltage_demand.0);
        w.u16(self.current_demand.0);
        w.u8(match self.mode {
            ChargeMode::ConstantVoltage => 0x01,
            ChargeMode::ConstantCurrent => 0x02,
        });
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let voltage_demand = DeciVolt(r.u16()?);
        let current_demand = Current(r.u16()?);
        let mode = match r.u8()? {
            0x01 => ChargeMode::ConstantVoltage,
            0x02 => ChargeMode::ConstantCurrent,
            value => {
                return Err(DecodeError::InvalidValue {
                    kind: Self::KIND,
                    byte: 5,
                    value,
                    expected: "neither 0x01 (CV) nor 0x02 (CC)",
                });
            }
        };
        Ok(Bcl {
            voltage_demand,
            current_demand,
            mode,
        })
    }
}

impl Body for Bcs {
    const KIND: MessageKind = MessageKind::Bcs;
    const LEN: ExpectedLen = ExpectedLen::Either { short: 8, long: 9 };
    fn write(&self, w: &mut Writer) {
        w.u16(self.measured_voltage.0);
        w.u16(self.measured_current.0);
        w.u16(cell_to_wire(self.max_cell));
        w.u8(self.soc_percent);
        w.u16(self.remaining_minutes);
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Bcs {
            measured_voltage: DeciVolt(r.u16()?),
            measured_current: Current(r.u16()?),
            max_cell: cell_from_wire(r.u16()?),
            soc_percent: r.u8()?,
            // The 8-byte single-frame variant has room for the low byte only.
            remaining_minutes: if r.remaining() >= 2 {
                r.u16()?
            } else {
                u16::from(r.u8()?)
            },
        })
    }
}

impl Body for Ccs {
    const KIND: MessageKind = MessageKind::Ccs;
    const LEN: ExpectedLen = ExpectedLen::Either { short: 6, long: 7 };
    fn write(&self, w: &mut Writer) {
        w.u16(self.output_voltage.0);
        w.u16(self.output_current.0);
        w.u16(self.charging_minutes);
        if let Some(permitted) = self.charging_permitted {
            w.u8(pack8([permitted]));
        }
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Ccs {
            output_voltage: DeciVolt(r.u16()?),
            output_current: Current(r.u16()?),
            charging_minutes: r.u16()?,
            charging_permitted: if r.remaining() > 0 {
                let [permitted] = unpack(u16::from(r.u8()?));
                Some(permitted)
            } else {
                None
            },
        })
    }
}

impl Body for Bsm {
    const KIND: MessageKind = MessageKind::Bsm;
    const LEN: ExpectedLen = ExpectedLen::Fixed(7);
    fn write(&self, w: &mut Writer) {
        w.u8(self.max_cell_voltage_index);
        w.u8(self.max_temperature.0);
        w.u8(self.max_temperature_index);
        w.u8(self.min_temperature.0);
        w.u8(self.min_temperature_index);
        w.u8(pack8([
            self.cell_voltage_status,
            self.soc_status,
            self.overcurrent,
            self.over_temperature,
        ]));
        w.u8(pack8([
            self.insulation,
            self.connector,
            self.charging_allowed,
        ]));
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let max_cell_voltage_index = r.u8()?;
        let max_temperature = Temperature(r.u8()?);
        let max_temperature_index = r.u8()?;
        let min_temperature = Temperature(r.u8()?);
        let min_temperature_index = r.u8()?;
        let [
            cell_voltage_status,
            soc_status,
            overcurrent,
            over_temperature,
        ] = unpack(u16::from(r.u8()?));
        let [insulation, connector, charging_allowed] = unpack(u16::from(r.u8()?));
        Ok(Bsm {
            max_cell_voltage_index,
            max_temperature,
            max_temperature_index,
            min_temperature,
            min_temperature_index,
            cell_voltage_status,
            soc_status,
            overcurrent,
            over_temperature,
            insulation,
            connector,
            charging_allowed,
        })
    }
}

impl Body for Bmv {
    const KIND: MessageKind = MessageKind::Bmv;
    // 256 cells of 2 bytes.
    const LEN: ExpectedLen = ExpectedLen::EvenUpTo(512);
    fn write(&self, w: &mut Writer) {
        for cell in &self.cells {
            w.u16(cell_to_wire(*cell));
        }
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut cells = Vec::with_capacity(r.remaining() / 2);
        while r.remaining() > 0 {
            cells.push(cell_from_wire(r.u16()?));
        }
        Ok(Bmv { cells })
    }
}

impl Body for Bmt {
    const KIND: MessageKind = MessageKind::Bmt;
    const LEN: ExpectedLen = ExpectedLen::UpTo(128);
    fn write(&self, w: &mut Writer) {
        for t in &self.temperatures {
            w.u8(t.0);
        }
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut temperatures = Vec::with_capacity(r.remaining());
        while r.remaining() > 0 {
            temperatures.push(Temperature(r.u8()?));
        }
        Ok(Bmt { temperatures })
    }
}

impl Body for Bsp {
    const KIND: MessageKind = MessageKind::Bsp;
    const LEN: ExpectedLen = ExpectedLen::UpTo(16);
    fn write(&self, w: &mut Writer) {
        w.bytes(&self.reserved);
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut reserved = Vec::with_capacity(r.remaining());
        while r.remaining() > 0 {
            reserved.push(r.u8()?);
        }
        Ok(Bsp { reserved })
    }
}

impl Body for Bst {
    const KIND: MessageKind = MessageKind::Bst;
    const LEN: ExpectedLen = ExpectedLen::Fixed(4);
    fn write(&self, w: &mut Writer) {
        w.u8(pack8([
            self.soc_target_reached,
            self.total_voltage_reached,
            self.cell_voltage_reached,
            self.charger_stopped,
        ]));
        w.u16(pack16([
            self.insulation_fault,
            self.connector_over_temperature,
            self.component_over_temperature,
            self.charging_connector_fault,
            self.battery_over_temperature,
            self.relay_fault,
            self.check_point2_fault,
            self.other_fault,
        ]));
        w.u8(pack8([self.overcurrent, self.voltage_abnormal]));
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let [
            soc_target_reached,
            total_voltage_reached,
            cell_voltage_reached,
            charger_stopped,
        ] = unpack(u16::from(r.u8()?));
        let [
            insulation_fault,
            connector_over_temperature,
            component_over_temperature,
            charging_connector_fault,
            battery_over_temperature,
            relay_fault,
            check_point2_fault,
            other_fault,
        ] = unpack(r.u16()?);
        let [overcurrent, voltage_abnormal] = unpack(u16::from(r.u8()?));
        Ok(Bst {
            soc_target_reached,
            total_voltage_reached,
            cell_voltage_reached,
            charger_stopped,
            insulation_fault,
            connector_over_temperature,
            component_over_temperature,
            charging_connector_fault,
            battery_over_temperature,
            relay_fault,
            check_point2_fault,
            other_fault,
            overcurrent,
            voltage_abnormal,
        })
    }
}

impl Body for Cst {
    const KIND: MessageKind = MessageKind::Cst;
    const LEN: ExpectedLen = ExpectedLen::Fixed(4);
    fn write(&self, w: &mut Writer) {
        w.u8(pack8([
            self.conditions_reached,
            self.manual_stop,
            self.fault_stop,
            self.bms_stopped,
        ]));
        w.u16(pack16([
            self.charger_over_temperature,
            self.connector_fault,
            self.internal_over_temperature,
            self.power_unavailable,
            self.emergency_stop,
            self.other_fault,
        ]));
        w.u8(pack8([self.current_mismatch, self.voltage_abnormal]));
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let [conditions_reached, manual_stop, fault_stop, bms_stopped] = unpack(u16::from(r.u8()?));
        let [
            charger_over_temperature,
            connector_fault,
            internal_over_temperature,
            power_unavailable,
            emergency_stop,
            other_fault,
        ] = unpack(r.u16()?);
        let [current_mismatch, voltage_abnormal] = unpack(u16::from(r.u8()?));
        Ok(Cst {
            conditions_reached,
            manual_stop,
            fault_stop,
            bms_stopped,
            charger_over_temperature,
            connector_fault,
            internal_over_temperature,
            power_unavailable,
            emergency_stop,
            other_fault,
            current_mismatch,
            voltage_abnormal,
        })
    }
}

impl Body for Bsd {
    const KIND: MessageKind = MessageKind::Bsd;
    const LEN: ExpectedLen = ExpectedLen::Fixed(7);
    fn write(&self, w: &mut Writer) {
        w.u8(self.soc_percent);
        w.u16(self.min_cell_voltage.0);
        w.u16(self.max_cell_voltage.0);
        w.u8(self.min_temperature.0);
        w.u8(self.max_temperature.0);
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Bsd {
            soc_percent: r.u8()?,
            min_cell_voltage: CentiVolt(r.u16()?),
            max_cell_voltage: CentiVolt(r.u16()?),
            min_temperature: Temperature(r.u8()?),
            max_temperature: Temperature(r.u8()?),
        })
    }
}

impl Body for Csd {
    const KIND: MessageKind = MessageKind::Csd;
    const LEN: ExpectedLen = ExpectedLen::Fixed(8);
    fn write(&self, w: &mut Writer) {
        w.u16(self.charging_minutes);
        w.u16(self.energy.0);
        w.u32(self.charger_number.0);
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Csd {
            charging_minutes: r.u16()?,
            energy: DeciKwh(r.u16()?),
            charger_number: ChargerNumber(r.u32()?),
        })
    }
}

impl Body for Bem {
    const KIND: MessageKind = MessageKind::Bem;
    const LEN: ExpectedLen = ExpectedLen::Fixed(4);
    fn write(&self, w: &mut Writer) {
        w.u8(pack8([self.crm00_timeout, self.crmaa_timeout]));
        w.u8(pack8([self.cts_cml_timeout, self.cro_timeout]));
        w.u8(pack8([self.ccs_timeout, self.cst_timeout]));
        w.u8(pack8([self.csd_timeout]));
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let [crm00_timeout, crmaa_timeout] = unpack(u16::from(r.u8()?));
        let [cts_cml_timeout, cro_timeout] = unpack(u16::from(r.u8()?));
        let [ccs_timeout, cst_timeout] = unpack(u16::from(r.u8()?));
        let [csd_timeout] = unpack(u16::from(r.u8()?));
        Ok(Bem {
            crm00_timeout,
            crmaa_timeout,
            cts_cml_timeout,
            cro_timeout,
            ccs_timeout,
            cst_timeout,
            csd_timeout,
        })
    }
}

impl Body for Cem {
    const KIND: MessageKind = MessageKind::Cem;
    const LEN: ExpectedLen = ExpectedLen::Fixed(4);
    fn write(&self, w: &mut Writer) {
        w.u8(pack8([self.brm_timeout]));
        w.u8(pack8([self.bcp_timeout, self.bro_timeout]));
        w.u8(pack8([
            self.bcs_timeout,
            self.bcl_timeout,
            self.bst_timeout,
        ]));
        w.u8(pack8([self.bsd_timeout]));
    }
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let [brm_timeout] = unpack(u16::from(r.u8()?));
        let [bcp_timeout, bro_timeout] = unpack(u16::from(r.u8()?));
        let [bcs_timeout, bcl_timeout, bst_timeout] = unpack(u16::from(r.u8()?));
        let [bsd_timeout] = unpack(u16::from(r.u8()?));
        Ok(Cem {
            brm_timeout,
            bcp_timeout,
            bro_timeout,
            bcs_timeout,
            bcl_timeout,
            bst_timeout,
            bsd_timeout,
        })
    }
}
