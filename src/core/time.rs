//! Wall-clock time as the metrics, the history and the API give it: Unix seconds.

use std::time::{SystemTime, UNIX_EPOCH};

use super::calendar::civil_from_days;

/// Seconds since the Unix epoch, as Prometheus timestamps are.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `YYYY-MM-DD HH:MM:SS UTC` from Unix seconds, with the history's calendar
/// arithmetic (no time zone database needed).
pub fn format_utc(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_795_936_660), "2026-11-29 07:17:40 UTC");
    }
}
