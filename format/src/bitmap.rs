//! The keep-bitmap a filter returns: bit `i % 8` of byte `i / 8` is set when event `i` is kept.

use crate::FormatError;

/// One bit per event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepBitmap {
    bits: Vec<u8>,
    len: usize,
}

impl KeepBitmap {
    /// A bitmap for `len` events with every event dropped.
    pub fn none(len: usize) -> Self {
        KeepBitmap {
            bits: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// A bitmap for `len` events with every event kept.
    pub fn all(len: usize) -> Self {
        let mut bitmap = KeepBitmap::none(len);
        for i in 0..len {
            bitmap.set(i, true);
        }
        bitmap
    }

    /// Checks a bitmap a plugin returned for a batch of `len` events.
    pub fn from_bytes(bits: Vec<u8>, len: usize) -> Result<Self, FormatError> {
        let expected = len.div_ceil(8);
        if bits.len() != expected {
            return Err(FormatError::BitmapLength {
                got: bits.len(),
                events: len,
                expected,
            });
        }
        Ok(KeepBitmap { bits, len })
    }

    /// Number of events the bitmap answers for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap answers for no event.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks event `i` kept or dropped. Panics when `i` is out of range (a caller bug).
    pub fn set(&mut self, i: usize, keep: bool) {
        assert!(i < self.len, "event {i} out of a bitmap of {}", self.len);
        let mask = 1u8 << (i % 8);
        if keep {
            self.bits[i / 8] |= mask;
        } else {
            self.bits[i / 8] &= !mask;
        }
    }

    /// Whether event `i` is kept; false out of range.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    /// Number of kept events.
    pub fn count(&self) -> usize {
        (0..self.len).filter(|&i| self.get(i)).count()
    }

    /// The bytes, as they cross the plugin boundary.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// The bytes, as they cross the plugin boundary.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bits
    }
}
