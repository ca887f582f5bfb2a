//! Reassembly of one multi-packet message from sequence-numbered TP.DT
//! packets, shared by the [`Transport`](super::Transport) receiver and the
//! passive [`Monitor`](crate::j1939::monitor::Monitor).
//!
//! Packets are stored by sequence number rather than appended, so duplicates,
//! retransmissions and reordering cannot shift bytes: a packet's data always
//! lands at `(seq - 1) * 7`, and a message is complete only when every
//! sequence number from 1 to the announced count has arrived.

use super::wire::{MAX_TP_LEN, PACKET_BYTES, packets_for};

/// Why an RTS or BAM announcement cannot be reassembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AnnounceError {
    #[error("announced size {size} exceeds the {MAX_TP_LEN}-byte transport limit")]
    TooLarge { size: u16 },
    #[error("announced size {size} needs {expected} packets, but the announcement says {packets}")]
    Inconsistent {
        size: u16,
        packets: u8,
        expected: usize,
    },
}

/// Checks an announcement before any memory is committed to it.
pub(crate) fn validate_announce(size: u16, packets: u8) -> Result<(), AnnounceError> {
    if usize::from(size) > MAX_TP_LEN {
        return Err(AnnounceError::TooLarge { size });
    }
    let expected = packets_for(usize::from(size));
    if size == 0 || usize::from(packets) != expected {
        return Err(AnnounceError::Inconsistent {
            size,
            packets,
            expected,
        });
    }
    Ok(())
}

/// Which of the 255 possible sequence numbers have arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PacketSet([u64; 4]);

impl PacketSet {
    fn slot(seq: u8) -> (usize, u64) {
        (usize::from(seq >> 6), 1u64 << (seq & 63))
    }

    fn contains(&self, seq: u8) -> bool {
        let (word, bit) = Self::slot(seq);
        self.0.get(word).is_some_and(|w| w & bit != 0)
    }

    fn insert(&mut self, seq: u8) {
        let (word, bit) = Self::slot(seq);
        if let Some(w) = self.0.get_mut(word) {
            *w |= bit;
        }
    }

    fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
}

/// What became of one TP.DT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Insert {
    /// Stored; it had not arrived before.
    New,
    /// Already held; the copy is dropped.
    Duplicate,
    /// Sequence number 0 or beyond the announced packet count.
    OutOfRange,
    /// Fewer data bytes than this packet must carry; dropped as if lost.
    Short,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reassembly {
    data: Vec<u8>,
    total: u8,
    have: PacketSet,
}

impl Reassembly {
    pub(crate) fn new(size: u16, packets: u8) -> Result<Self, AnnounceError> {
        validate_announce(size, packets)?;
        Ok(Reassembly {
            data: vec![0; usize::from(size)],
            total: packets,
            have: PacketSet::default(),
        })
    }

    /// Bytes this reassembly holds (the announced message size).
    pub(crate) fn size(&self) -> usize {
        self.data.len()
    }

    pub(crate) fn total(&self) -> u8 {
        self.total
    }

    /// Distinct packets received so far.
    pub(crate) fn received(&self) -> u8 {
        u8::try_from(self.have.len()).unwrap_or(u8::MAX)
    }

    pub(crate) fn insert(&mut self, seq: u8, bytes: &[u8]) -> Insert {
        if seq == 0 || seq > self.total {
            return Insert::OutOfRange;
        }
        if self.have.contains(seq) {
            return Insert::Duplicate;
        }
        let start = usize::from(seq - 1) * PACKET_BYTES;
        let end = (start + PACKET_BYTES).min(self.data.len());
        let Some(src) = bytes.get(..end.saturating_sub(start)) else {
            return Insert::Short;
        };
        let Some(dst) = self.data.get_mut(start..end) else {
            // seq <= total = ceil(len / 7), so start < len; kept as a guard.
            return Insert::OutOfRange;
        };
        dst.copy_from_slice(src);
        self.have.insert(seq);
        Insert::New
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.have.len() == u32::from(self.total)
    }

    /// Every packet in `first..=last` has arrived.
    pub(crate) fn has_all(&self, first: u8, last: u8) -> bool {
        (first..=last).all(|seq| self.have.contains(seq))
    }

    pub(crate) fn first_missing(&self) -> Option<u8> {
        (1..=self.total).find(|&seq| !self.have.contains(seq))
    }

    /// The highest missing packet in `first..=last`.
    pub(crate) fn last_missing_in(&self, first: u8, last: u8) -> Option<u8> {
        (first..=last).rev().find(|&seq| !self.have.contains(seq))
    }

    pub(crate) fn into_data(self) -> Vec<u8> {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_checked() {
        assert_eq!(validate_announce(9, 2), Ok(()));
        assert_eq!(validate_announce(1785, 255), Ok(()));
        assert_eq!(
            validate_announce(1786, 0),
            Err(AnnounceError::TooLarge { size: 1786 })
        );
        assert!(validate_announce(9, 3).is_err());
        assert!(validate_announce(0, 0).is_err());
    }

    #[test]
    fn packets_land_by_sequence_whatever_the_order() {
        let mut r = Reassembly::new(16, 3).unwrap();
        assert_eq!(
            r.insert(3, &[15, 16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Insert::New
        );
        assert_eq!(r.insert(1, &[1, 2, 3, 4, 5, 6, 7]), Insert::New);
        assert_eq!(r.insert(1, &[9, 9, 9, 9, 9, 9, 9]), Insert::Duplicate);
        assert_eq!(r.first_missing(), Some(2));
        assert_eq!(r.last_missing_in(1, 3), Some(2));
        assert!(!r.is_complete());
        assert_eq!(r.insert(2, &[8, 9, 10]), Insert::Short);
        assert_eq!(r.insert(4, &[0; 7]), Insert::OutOfRange);
        assert_eq!(r.insert(0, &[0; 7]), Insert::OutOfRange);
        assert_eq!(r.insert(2, &[8, 9, 10, 11, 12, 13, 14]), Insert::New);
        assert!(r.is_complete());
        assert_eq!(r.received(), 3);
        assert_eq!(r.into_data(), (1..=16).collect::<Vec<u8>>());
    }

    #[test]
    fn unpadded_last_packet_is_accepted() {
        let mut r = Reassembly::new(9, 2).unwrap();
        assert_eq!(r.insert(2, &[8, 9]), Insert::New);
        assert!(r.has_all(2, 2));
        assert!(!r.has_all(1, 2));
    }
}
