//! Scaled quantities of GB/T 27930. Each newtype holds the raw wire value, so
//! encoding is lossless, and offers the physical value for display and logic.

use std::fmt;

/// Voltage at 0.1 V/bit, no offset (pack voltages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeciVolt(pub u16);

impl DeciVolt {
    pub fn from_volts(v: f32) -> Self {
        DeciVolt((v * 10.0).round().clamp(0.0, f32::from(u16::MAX)) as u16)
    }
    pub fn volts(self) -> f32 {
        f32::from(self.0) / 10.0
    }
}

impl fmt::Display for DeciVolt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}V", self.volts())
    }
}

/// Voltage at 0.01 V/bit, no offset (cell voltages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CentiVolt(pub u16);

impl CentiVolt {
    pub fn volts(self) -> f32 {
        f32::from(self.0) / 100.0
    }
}

impl fmt::Display for CentiVolt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}V", self.volts())
    }
}

/// Current at 0.1 A/bit with a −400 A offset.
///
/// The standard counts charging current as negative (range −400 A to 0 A), so
/// the raw value 3000 means 100 A flowing into the battery. Use
/// [`Current::charging`] to build one from a positive charging current.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Current(pub u16);

impl Current {
    const OFFSET_DECIAMPS: i32 = 4000;

    /// A charging current of `amps` (positive into the battery).
    pub fn charging(amps: f32) -> Self {
        let raw = (Self::OFFSET_DECIAMPS as f32 - amps * 10.0).round();
        Current(raw.clamp(0.0, f32::from(u16::MAX)) as u16)
    }

    /// Signed current as the standard defines it, in 0.1 A (negative = charging).
    pub fn signed_deciamps(self) -> i32 {
        i32::from(self.0) - Self::OFFSET_DECIAMPS
    }

    /// Charging current in amps, positive into the battery.
    pub fn charging_amps(self) -> f32 {
        // Negate the integer, not the float: -(0.0) would display as "-0.0A".
        (-self.signed_deciamps()) as f32 / 10.0
    }
}

impl fmt::Display for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}A", self.charging_amps())
    }
}

/// Temperature at 1 °C/bit with a −50 °C offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Temperature(pub u8);

impl Temperature {
    pub fn from_celsius(c: i16) -> Self {
        Temperature((c + 50).clamp(0, 255) as u8)
    }
    pub fn celsius(self) -> i16 {
        i16::from(self.0) - 50
    }
}

impl fmt::Display for Temperature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}°C", self.celsius())
    }
}

/// State of charge at 0.1 %/bit (BCP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeciPercent(pub u16);

impl fmt::Display for DeciPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}%", f32::from(self.0) / 10.0)
    }
}

/// Energy at 0.1 kWh/bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeciKwh(pub u16);

impl fmt::Display for DeciKwh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}kWh", f32::from(self.0) / 10.0)
    }
}

/// Capacity at 0.1 Ah/bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeciAh(pub u16);

impl fmt::Display for DeciAh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}Ah", f32::from(self.0) / 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_offset_and_sign() {
        assert_eq!(Current::charging(100.0), Current(3000));
        assert_eq!(Current(3000).charging_amps(), 100.0);
        assert_eq!(Current(4000).to_string(), "0.0A");
        assert_eq!(Current(4010).to_string(), "-1.0A");
    }
}
