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
        let mut bitmap = KeepBitmap {
            bits: vec![u8::MAX; len.div_ceil(8)],
            len,
        };
        bitmap.clear_tail();
        bitmap
    }

    /// Clears the bits past `len` in the last byte, which answer for no event: a plugin may
    /// set them, and [`KeepBitmap::count`] and equality read whole bytes.
    fn clear_tail(&mut self) {
        if let (Some(last), tail @ 1..) = (self.bits.last_mut(), self.len % 8) {
            *last &= (1u8 << tail) - 1;
        }
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
        let mut bitmap = KeepBitmap { bits, len };
        bitmap.clear_tail();
        Ok(bitmap)
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
        self.bits.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// The events both bitmaps keep. Panics when they answer for different numbers of events
    /// (a caller bug).
    pub fn and(&self, other: &KeepBitmap) -> KeepBitmap {
        assert_eq!(self.len, other.len, "bitmaps of different batches");
        KeepBitmap {
            bits: self
                .bits
                .iter()
                .zip(&other.bits)
                .map(|(a, b)| a & b)
                .collect(),
            len: self.len,
        }
    }

    /// The indices of the kept events, ascending.
    pub fn kept(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits.iter().enumerate().flat_map(|(byte, &bits)| {
            (0..8)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| byte * 8 + bit)
        })
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
