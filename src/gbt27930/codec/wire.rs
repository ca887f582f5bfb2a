//! The wire primitives every message codec is built from: a bounds-checked
//! little-endian reader, its writer counterpart, 2-bit flag packing, cell
//! voltages and BCD.

use super::{DecodeError, ExpectedLen};
use crate::gbt27930::messages::{Bits2, CellVoltage, MessageKind};
use crate::gbt27930::units::CentiVolt;

/// Reads a message body front to back. Every read is checked, so a body that
/// is too short becomes a [`DecodeError::Length`], never a panic.
pub(super) struct Reader<'a> {
    kind: MessageKind,
    len: usize,
    expected: ExpectedLen,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the body length against what `kind` accepts before any field is
    /// read, so a short body is reported with its full length.
    pub(super) fn new(
        kind: MessageKind,
        data: &'a [u8],
        expected: ExpectedLen,
    ) -> Result<Self, DecodeError> {
        if !expected.accepts(data.len()) {
            return Err(DecodeError::Length {
                kind,
                len: data.len(),
                expected,
            });
        }
        Ok(Reader {
            kind,
            len: data.len(),
            expected,
            rest: data,
        })
    }

    pub(super) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(super) fn bytes<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Length {
                kind: self.kind,
                len: self.len,
                expected: self.expected,
            })?;
        self.rest = rest;
        Ok(*head)
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        let [b] = self.bytes()?;
        Ok(b)
    }

    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.bytes().map(u16::from_le_bytes)
    }

    pub(super) fn u24(&mut self) -> Result<u32, DecodeError> {
        let [a, b, c] = self.bytes()?;
        Ok(u32::from_le_bytes([a, b, c, 0]))
    }

    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.bytes().map(u32::from_le_bytes)
    }
}

/// Appends little-endian fields; the mirror of [`Reader`].
pub(super) struct Writer(Vec<u8>);

impl Writer {
    pub(super) fn with_capacity(n: usize) -> Self {
        Writer(Vec::with_capacity(n))
    }

    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Writes the low 24 bits; the field has no room for more.
    pub(super) fn u24(&mut self, v: u32) {
        let [a, b, c, _] = v.to_le_bytes();
        self.0.extend_from_slice(&[a, b, c]);
    }

    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub(super) fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

/// Packs 2-bit fields from bit 1 upward. Bits no field covers stay 1, which
/// is how the standard fills reserved bits.
pub(super) fn pack16<const N: usize>(fields: [Bits2; N]) -> u16 {
    const { assert!(N <= 8, "a u16 holds at most eight 2-bit fields") };
    fields.iter().enumerate().fold(u16::MAX, |acc, (i, field)| {
        let shift = 2 * i;
        (acc & !(0b11 << shift)) | (u16::from(field.get()) << shift)
    })
}

/// [`pack16`] for a single byte.
pub(super) fn pack8<const N: usize>(fields: [Bits2; N]) -> u8 {
    const { assert!(N <= 4, "a byte holds at most four 2-bit fields") };
    let [lo, _] = pack16(fields).to_le_bytes();
    lo
}

/// The inverse of [`pack16`]; reserved bits are ignored.
pub(super) fn unpack<const N: usize>(word: u16) -> [Bits2; N] {
    const { assert!(N <= 8, "a u16 holds at most eight 2-bit fields") };
    std::array::from_fn(|i| {
        let [lo, _] = (word >> (2 * i)).to_le_bytes();
        Bits2::new(lo)
    })
}

/// Bits 1–12 voltage at 0.01 V, bits 13–16 group number. Out-of-range values
/// are masked to their field width, as the wire cannot carry more.
pub(super) fn cell_to_wire(cell: CellVoltage) -> u16 {
    (cell.voltage.0 & 0x0FFF) | (u16::from(cell.group & 0x0F) << 12)
}

pub(super) fn cell_from_wire(raw: u16) -> CellVoltage {
    let [_, hi] = raw.to_le_bytes();
    CellVoltage {
        voltage: CentiVolt(raw & 0x0FFF),
        group: hi >> 4,
    }
}

/// Two BCD digits. Only the last two decimal digits fit, so larger values
/// are reduced modulo 100.
pub(super) fn to_bcd(v: u8) -> u8 {
    let v = v % 100;
    ((v / 10) << 4) | (v % 10)
}

/// `None` if either nibble is above 9.
pub(super) fn from_bcd(b: u8) -> Option<u8> {
    let (hi, lo) = (b >> 4, b & 0x0F);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_fills_unused_bits_with_one() {
        assert_eq!(pack8([Bits2::SET]), 0b1111_1101);
        assert_eq!(pack8([Bits2::NORMAL, Bits2::ALT]), 0b1111_1000);
        assert_eq!(pack8::<0>([]), 0xFF);
        assert_eq!(pack16([Bits2::NORMAL; 6]), 0xF000);
    }

    #[test]
    fn unpack_inverts_pack() {
        let fields = [Bits2::SET, Bits2::ALT, Bits2::NOT_AVAILABLE, Bits2::NORMAL];
        assert_eq!(unpack::<4>(u16::from(pack8(fields))), fields);
        let eight = [
            Bits2::NORMAL,
            Bits2::SET,
            Bits2::ALT,
            Bits2::NOT_AVAILABLE,
            Bits2::SET,
            Bits2::SET,
            Bits2::NORMAL,
            Bits2::ALT,
        ];
        assert_eq!(unpack::<8>(pack16(eight)), eight);
    }

    #[test]
    fn bcd() {
        assert_eq!(to_bcd(59), 0x59);
        assert_eq!(to_bcd(7), 0x07);
        assert_eq!(to_bcd(123), 0x23);
        assert_eq!(from_bcd(0x59), Some(59));
        assert_eq!(from_bcd(0x6A), None);
        assert_eq!(from_bcd(0xA0), None);
    }

    #[test]
    fn cell_voltage_layout() {
        let cell = CellVoltage {
            voltage: CentiVolt(365),
            group: 2,
        };
        assert_eq!(cell_to_wire(cell), 0x216D);
        assert_eq!(cell_from_wire(0x216D), cell);
        assert_eq!(cell_from_wire(0xFFFF).group, 15);
    }

    #[test]
    fn reader_reports_the_whole_body_when_short() {
        let mut r = Reader::new(MessageKind::Bhm, &[1, 2], ExpectedLen::Fixed(2)).unwrap();
        assert_eq!(r.u16(), Ok(0x0201));
        assert_eq!(
            r.u8(),
            Err(DecodeError::Length {
                kind: MessageKind::Bhm,
                len: 2,
                expected: ExpectedLen::Fixed(2)
            })
        );
    }
}
