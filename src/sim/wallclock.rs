//! Calendar time for CTS, without a date library: the charger only needs
//! the UTC date and time of "now".

use std::time::{SystemTime, UNIX_EPOCH};

use crate::gbt27930::Cts;

/// The current UTC time as CTS carries it.
pub fn now_cts() -> Cts {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    cts_from_unix(secs)
}

/// Split Unix seconds into a civil UTC date and time (proleptic Gregorian).
pub fn cts_from_unix(secs: u64) -> Cts {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Shift the epoch to 0000-03-01 so that leap days fall at the end of a
    // 400-year era's years; then each era has exactly 146097 days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Cts {
        second: (rem % 60) as u8,
        minute: ((rem / 60) % 60) as u8,
        hour: (rem / 3600) as u8,
        day: day as u8,
        month: month as u8,
        year: u16::try_from(year).unwrap_or(u16::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        let c = cts_from_unix(0);
        assert_eq!((c.year, c.month, c.day, c.hour), (1970, 1, 1, 0));
        // 2024-02-29T12:34:56Z, a leap day.
        let c = cts_from_unix(1_709_210_096);
        assert_eq!(
            (c.year, c.month, c.day, c.hour, c.minute, c.second),
            (2024, 2, 29, 12, 34, 56)
        );
        // 2026-11-21T00:00:00Z
        let c = cts_from_unix(1_795_219_200);
        assert_eq!((c.year, c.month, c.day), (2026, 11, 21));
    }
}
