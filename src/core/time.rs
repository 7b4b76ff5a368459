//! Wall-clock time as the metrics, the history and the API give it: Unix seconds.

use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

/// Seconds since the Unix epoch, as Prometheus timestamps are.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `YYYY-MM-DD HH:MM:SS UTC` from Unix seconds; a time outside the calendar's
/// years (±999,999), which only a damaged value can be, stays a number.
pub(crate) fn format_utc(unix: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => {
            let (year, month, day) = (t.year(), u8::from(t.month()), t.day());
            format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", t.hour(), t.minute(), t.second())
        }
        Err(_) => format!("{unix} (Unix seconds)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_795_936_660), "2026-11-29 07:17:40 UTC");
        assert_eq!(format_utc(-1), "1969-12-31 23:59:59 UTC");
        assert_eq!(format_utc(i64::MAX), "9223372036854775807 (Unix seconds)");
    }
}
