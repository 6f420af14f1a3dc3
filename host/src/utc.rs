//! Wall-clock times as UTC text, for file names and for people: weir needs no time zones and
//! no date arithmetic beyond this, so it carries no date crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// A moment in UTC, to the millisecond (a clock before 1970 counts as 1970).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    year: u64,
    month: u64,
    day: u64,
    hour: u64,
    minute: u64,
    second: u64,
    millis: u64,
}

impl Utc {
    /// `now` in UTC.
    pub fn of(now: SystemTime) -> Utc {
        let ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Utc::of_millis(ms)
    }

    /// Milliseconds since the Unix epoch in UTC.
    pub fn of_millis(ms: u64) -> Utc {
        let (secs, millis) = (ms / 1000, ms % 1000);
        let (days, day_secs) = (secs / 86_400, secs % 86_400);
        // Days since 1970-01-01 to a civil date (H. Hinnant, "chrono-compatible low-level date
        // algorithms", days_from_civil's inverse), shifted to eras starting on 0000-03-01.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z % 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Utc {
            year: yoe + era * 400 + u64::from(month <= 2),
            month,
            day,
            hour: day_secs / 3_600,
            minute: day_secs / 60 % 60,
            second: day_secs % 60,
            millis,
        }
    }

    /// `YYYYMMDDTHHMMSS.mmmZ` (basic ISO 8601: sorts as it reads, fits a file name).
    pub fn compact(&self) -> String {
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second, self.millis
        )
    }

    /// `YYYY-MM-DD HH:MM:SS UTC`, for people.
    pub fn readable(&self) -> String {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_stamps_are_exact() {
        let stamp = |ms: u64| Utc::of(UNIX_EPOCH + Duration::from_millis(ms)).compact();
        assert_eq!(stamp(0), "19700101T000000.000Z");
        assert_eq!(stamp(951_782_399_999), "20000228T235959.999Z");
        assert_eq!(stamp(951_782_400_000), "20000229T000000.000Z");
        assert_eq!(stamp(4_107_542_400_001), "21000301T000000.001Z");
        assert_eq!(stamp(1_795_311_902_123), "20261122T014502.123Z");
        assert_eq!(
            Utc::of(UNIX_EPOCH - Duration::from_secs(1)).compact(),
            "19700101T000000.000Z"
        );
        assert_eq!(
            Utc::of_millis(1_795_311_902_123).readable(),
            "2026-11-22 01:45:02 UTC"
        );
    }
}
