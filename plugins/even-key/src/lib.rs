//! even-key: the trivial filter of the Fluvio comparison (docs/BENCHMARKS.md). It keeps an
//! event when the last byte of its key is an even ASCII digit: on `weir::workload`'s keys
//! (`user-<n>`, n cycling) exactly half the events, so that what a filter stage does with the
//! events it drops is measured, while the check itself costs next to nothing.

use weir_sdk::Event;

/// Keeps events whose key ends in 0, 2, 4, 6 or 8.
#[weir_sdk::filter]
pub fn keep(e: &Event) -> bool {
    e.key().is_some_and(ends_even)
}

/// Whether `key` ends in an even ASCII digit.
pub fn ends_even(key: &[u8]) -> bool {
    key.last()
        .is_some_and(|last| last.is_ascii_digit() && last % 2 == 0)
}

#[cfg(test)]
mod tests {
    use super::ends_even;

    #[test]
    fn only_an_even_last_digit_keeps() {
        assert!(ends_even(b"user-0"));
        assert!(ends_even(b"user-48"));
        assert!(!ends_even(b"user-7"));
        assert!(!ends_even(b"user-x"));
        assert!(!ends_even(b""));
    }
}
