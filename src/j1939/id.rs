//! The 29-bit J1939 identifier: priority, PGN and addresses (SAE J1939-21).
//!
//! ```text
//!  28..26   25   24   23..16   15..8        7..0
//!  priority EDP  DP   PF       PS (DA/GE)   SA
//! ```
//! PF < 240 is PDU1: PS is the destination address and not part of the PGN.
//! PF >= 240 is PDU2: PS is a group extension, the message is broadcast.

use std::fmt;

use crate::can::{CanId, ExtendedId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("J1939 priority {0} is out of range 0..=7")]
    Priority(u8),
    #[error("PGN {0:#x} does not fit in 18 bits")]
    PgnTooLarge(u32),
    #[error("PGN {0:#x} is PDU1 (PF < 240) but its low byte is not zero")]
    Pdu1LowByte(u32),
    #[error("CAN id {0} is a standard (11-bit) id; J1939 needs an extended id")]
    NotExtended(CanId),
}

/// Message priority, 0 (highest) to 7 (lowest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(u8);

impl Priority {
    pub const HIGHEST: Priority = Priority(0);
    pub const LOWEST: Priority = Priority(7);

    pub fn new(p: u8) -> Result<Self, IdError> {
        if p > 7 {
            return Err(IdError::Priority(p));
        }
        Ok(Priority(p))
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

/// A node address. 0xFF is the global (broadcast) address, 0xFE "null".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(pub u8);

impl Address {
    pub const GLOBAL: Address = Address(0xFF);
    pub const NULL: Address = Address(0xFE);

    pub fn is_global(self) -> bool {
        self == Self::GLOBAL
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02X}", self.0)
    }
}

/// A parameter group number (18 bits). For PDU1 PGNs the low byte is zero,
/// so a `Pgn` never carries a destination address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pgn(u32);

impl Pgn {
    pub const MAX: u32 = 0x3_FFFF;

    pub fn new(raw: u32) -> Result<Self, IdError> {
        if raw > Self::MAX {
            return Err(IdError::PgnTooLarge(raw));
        }
        let pgn = Pgn(raw);
        if pgn.is_pdu1() && raw & 0xFF != 0 {
            return Err(IdError::Pdu1LowByte(raw));
        }
        Ok(pgn)
    }

    /// For constants known valid at compile time. Panics (at compile time in
    /// a `const`) on an invalid PGN.
    pub const fn from_const(raw: u32) -> Self {
        assert!(raw <= Self::MAX, "PGN exceeds 18 bits");
        assert!(
            ((raw >> 8) & 0xFF) >= 240 || raw & 0xFF == 0,
            "PDU1 PGN with non-zero low byte"
        );
        Pgn(raw)
    }

    pub fn raw(self) -> u32 {
        self.0
    }

    /// PDU format byte.
    pub fn pf(self) -> u8 {
        ((self.0 >> 8) & 0xFF) as u8
    }

    /// Destination-specific (PDU1) rather than broadcast (PDU2).
    pub fn is_pdu1(self) -> bool {
        self.pf() < 240
    }
}

impl fmt::Display for Pgn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#06X}", self.0)
    }
}

/// A decoded J1939 identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct J1939Id {
    pub priority: Priority,
    pub pgn: Pgn,
    pub source: Address,
    /// The destination for PDU1; always [`Address::GLOBAL`] for PDU2.
    pub destination: Address,
}

impl J1939Id {
    /// Build an id. For a PDU2 PGN the destination is forced to global,
    /// because PDU2 has no room for one.
    pub fn new(priority: Priority, pgn: Pgn, source: Address, destination: Address) -> Self {
        let destination = if pgn.is_pdu1() {
            destination
        } else {
            Address::GLOBAL
        };
        J1939Id {
            priority,
            pgn,
            source,
            destination,
        }
    }

    pub fn from_raw(raw: ExtendedId) -> Self {
        let raw = raw.raw();
        let priority = Priority(((raw >> 26) & 0x7) as u8);
        let pf = (raw >> 16) & 0xFF;
        let ps = ((raw >> 8) & 0xFF) as u8;
        let dp_edp = (raw >> 24) & 0x3;
        let source = Address((raw & 0xFF) as u8);
        if pf < 240 {
            J1939Id {
                priority,
                pgn: Pgn((dp_edp << 16) | (pf << 8)),
                source,
                destination: Address(ps),
            }
        } else {
            J1939Id {
                priority,
                pgn: Pgn((dp_edp << 16) | (pf << 8) | u32::from(ps)),
                source,
                destination: Address::GLOBAL,
            }
        }
    }

    pub fn from_can_id(id: CanId) -> Result<Self, IdError> {
        match id {
            CanId::Extended(e) => Ok(Self::from_raw(e)),
            CanId::Standard(_) => Err(IdError::NotExtended(id)),
        }
    }

    pub fn to_raw(self) -> ExtendedId {
        let ps = if self.pgn.is_pdu1() {
            u32::from(self.destination.0)
        } else {
            0
        };
        let raw = (u32::from(self.priority.0) << 26)
            | (self.pgn.0 << 8)
            | (ps << 8)
            | u32::from(self.source.0);
        // Priority is 3 bits and the PGN 18, so the result fits in 29 bits.
        ExtendedId::new(raw).expect("3-bit priority + 18-bit PGN + 8-bit SA fit in 29 bits")
    }

    pub fn to_can_id(self) -> CanId {
        CanId::Extended(self.to_raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gbt_examples_decode() {
        // BRM's TP.CM_RTS from the BMS (F4) to the charger (56), priority 7.
        let id = J1939Id::from_raw(ExtendedId::new(0x1CEC_56F4).unwrap());
        assert_eq!(id.priority.get(), 7);
        assert_eq!(id.pgn.raw(), 0xEC00);
        assert_eq!(id.source, Address(0xF4));
        assert_eq!(id.destination, Address(0x56));
        // CHM from the charger, priority 6.
        let chm = J1939Id::new(
            Priority::new(6).unwrap(),
            Pgn::new(0x2600).unwrap(),
            Address(0x56),
            Address(0xF4),
        );
        assert_eq!(chm.to_raw().raw(), 0x1826_F456);
    }

    #[test]
    fn pdu2_has_no_destination() {
        let id = J1939Id::new(
            Priority::new(6).unwrap(),
            Pgn::new(0xFEF1).unwrap(),
            Address(0x00),
            Address(0x12),
        );
        assert_eq!(id.destination, Address::GLOBAL);
        assert_eq!(id.to_raw().raw(), 0x18FE_F100);
        assert_eq!(J1939Id::from_raw(id.to_raw()), id);
    }

    #[test]
    fn invalid_parts_are_refused() {
        assert!(Priority::new(8).is_err());
        assert!(Pgn::new(0x4_0000).is_err());
        assert_eq!(Pgn::new(0xEC12), Err(IdError::Pdu1LowByte(0xEC12)));
        assert!(
            J1939Id::from_can_id(CanId::Standard(crate::can::StandardId::new(1).unwrap())).is_err()
        );
    }

    proptest! {
        #[test]
        fn any_extended_id_round_trips(raw in 0u32..=ExtendedId::MAX) {
            let ext = ExtendedId::new(raw).unwrap();
            let id = J1939Id::from_raw(ext);
            prop_assert_eq!(id.to_raw(), ext);
        }
    }
}
