//! The CAN frame as every other layer sees it, independent of any backend.

use std::fmt;

/// Largest payload of a classical CAN frame.
///
/// CAN FD (64 bytes) is not carried yet. GB/T 27930-2015 runs on classical
/// CAN; when an FD profile arrives it gets its own frame type next to this
/// one rather than widening every classical frame to 64 bytes.
pub const CAN_MAX_DLEN: usize = 8;

/// Why a frame or identifier could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("standard CAN id {0:#x} does not fit in 11 bits")]
    StandardIdTooLarge(u32),
    #[error("extended CAN id {0:#x} does not fit in 29 bits")]
    ExtendedIdTooLarge(u32),
    #[error("CAN payload of {len} bytes exceeds the classical limit of {max}")]
    TooLong { len: usize, max: usize },
}

/// An 11-bit identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StandardId(u16);

impl StandardId {
    pub const MAX: u16 = 0x7FF;

    pub fn new(raw: u16) -> Result<Self, FrameError> {
        if raw > Self::MAX {
            return Err(FrameError::StandardIdTooLarge(raw.into()));
        }
        Ok(StandardId(raw))
    }

    pub fn raw(self) -> u16 {
        self.0
    }
}

/// A 29-bit identifier (what J1939 and GB/T 27930 use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtendedId(u32);

impl ExtendedId {
    pub const MAX: u32 = 0x1FFF_FFFF;

    pub fn new(raw: u32) -> Result<Self, FrameError> {
        if raw > Self::MAX {
            return Err(FrameError::ExtendedIdTooLarge(raw));
        }
        Ok(ExtendedId(raw))
    }

    pub fn raw(self) -> u32 {
        self.0
    }
}

/// A CAN identifier, standard or extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CanId {
    Standard(StandardId),
    Extended(ExtendedId),
}

impl CanId {
    /// The identifier bits without any format flag.
    pub fn raw(self) -> u32 {
        match self {
            CanId::Standard(id) => id.raw().into(),
            CanId::Extended(id) => id.raw(),
        }
    }

    pub fn is_extended(self) -> bool {
        matches!(self, CanId::Extended(_))
    }
}

impl From<StandardId> for CanId {
    fn from(id: StandardId) -> Self {
        CanId::Standard(id)
    }
}

impl From<ExtendedId> for CanId {
    fn from(id: ExtendedId) -> Self {
        CanId::Extended(id)
    }
}

impl fmt::Display for CanId {
    /// The `candump` spelling: 3 hex digits for standard, 8 for extended.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CanId::Standard(id) => write!(f, "{:03X}", id.raw()),
            CanId::Extended(id) => write!(f, "{:08X}", id.raw()),
        }
    }
}

/// A classical CAN data frame. Remote frames are not used by GB/T 27930 and
/// are not modelled; backends drop them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CanFrame {
    id: CanId,
    len: u8,
    data: [u8; CAN_MAX_DLEN],
}

impl CanFrame {
    pub fn new(id: impl Into<CanId>, data: &[u8]) -> Result<Self, FrameError> {
        if data.len() > CAN_MAX_DLEN {
            return Err(FrameError::TooLong {
                len: data.len(),
                max: CAN_MAX_DLEN,
            });
        }
        let mut buf = [0u8; CAN_MAX_DLEN];
        buf[..data.len()].copy_from_slice(data);
        Ok(CanFrame {
            id: id.into(),
            // Checked just above: at most 8.
            len: data.len() as u8,
            data: buf,
        })
    }

    pub fn id(&self) -> CanId {
        self.id
    }

    pub fn data(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for CanFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for CanFrame {
    /// `18EC56F4#1122334455667788`, as in a `candump -L` line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#", self.id)?;
        for b in self.data() {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_range_checked() {
        assert!(StandardId::new(0x7FF).is_ok());
        assert_eq!(
            StandardId::new(0x800),
            Err(FrameError::StandardIdTooLarge(0x800))
        );
        assert!(ExtendedId::new(0x1FFF_FFFF).is_ok());
        assert!(ExtendedId::new(0x2000_0000).is_err());
    }

    #[test]
    fn frame_rejects_more_than_eight_bytes_and_formats_like_candump() {
        let id = ExtendedId::new(0x18EC_56F4).unwrap();
        assert!(CanFrame::new(id, &[0; 9]).is_err());
        let f = CanFrame::new(id, &[0x11, 0x22]).unwrap();
        assert_eq!(f.to_string(), "18EC56F4#1122");
        let s = CanFrame::new(StandardId::new(0x12).unwrap(), &[]).unwrap();
        assert_eq!(s.to_string(), "012#");
        assert!(s.is_empty());
    }
}
