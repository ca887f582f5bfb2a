//! Bounds-checked reading of stored values. The file may have been edited
//! (see the module docs of [`super`]), so every read can fail and none panics.

/// Reads fixed-size fields from the front of a byte string.
pub(super) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Reader(bytes)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(super) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(super) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    pub(super) fn bytes(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }

    /// Everything not read yet.
    pub(super) fn rest(self) -> &'a [u8] {
        self.0
    }

    /// `Some(())` when every byte has been read.
    pub(super) fn end(self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

/// A u64 stored on its own (ids, counters): exactly 8 big-endian bytes.
pub(super) fn u64_value(bytes: &[u8]) -> Option<u64> {
    let mut r = Reader::new(bytes);
    let v = r.u64()?;
    r.end().map(|()| v)
}

/// A stored key shown in an error: hex of at most 32 bytes.
pub(super) fn show_key(bytes: &[u8]) -> String {
    let shown = bytes.get(..32).unwrap_or(bytes);
    let mut s = hex::encode(shown);
    if shown.len() < bytes.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_fields_in_order_and_refuses_short_input() {
        let mut r = Reader::new(&[1, 0, 2, 0, 0, 0, 3, 9, 9]);
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.u16(), Some(2));
        assert_eq!(r.u32(), Some(3));
        assert_eq!(r.u64(), None);
        assert_eq!(r.bytes(3), None);
        assert_eq!(r.bytes(2), Some(&[9u8, 9][..]));
        assert_eq!(r.end(), Some(()));
        assert_eq!(u64_value(&[0; 7]), None);
        assert_eq!(u64_value(&[0; 9]), None);
        assert_eq!(u64_value(&7u64.to_be_bytes()), Some(7));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), len in 0usize..64) {
            let mut r = Reader::new(&bytes);
            let _ = (r.u8(), r.u16(), r.u32(), r.u64(), r.bytes(len));
            let _ = r.rest();
            let _ = show_key(&bytes);
        }
    }
}
