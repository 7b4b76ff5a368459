//! The calendar of history buckets and quota periods: minutes, hours, local days
//! and months at a fixed UTC offset (`history.utc_offset`), without a time-zone
//! database. Dates come from the `time` crate; this module only says where
//! buckets begin, in Unix seconds.

use time::{Date, OffsetDateTime};

/// A bucket size. Hours, days and months begin at the configured UTC offset's
/// local boundaries; minutes are the same everywhere that has whole-minute offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Minute,
    Hour,
    Day,
    Month,
}

impl Step {
    pub(crate) fn parse(text: &str) -> Option<Step> {
        match text {
            "minute" => Some(Step::Minute),
            "hour" => Some(Step::Hour),
            "day" => Some(Step::Day),
            "month" => Some(Step::Month),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Step::Minute => "minute",
            Step::Hour => "hour",
            Step::Day => "day",
            Step::Month => "month",
        }
    }

    /// The next coarser step, for "use a coarser step" messages.
    pub(crate) fn coarser(self) -> Option<Step> {
        match self {
            Step::Minute => Some(Step::Hour),
            Step::Hour => Some(Step::Day),
            Step::Day => Some(Step::Month),
            Step::Month => None,
        }
    }

    /// Start (Unix seconds) of the bucket holding `t`.
    pub(crate) fn bucket_start(self, t: i64, utc_offset: i64) -> i64 {
        let local = t + utc_offset;
        match self {
            Step::Minute => t - t.rem_euclid(60),
            Step::Hour => local - local.rem_euclid(3600) - utc_offset,
            Step::Day => local - local.rem_euclid(86_400) - utc_offset,
            Step::Month => {
                // Back from the local day to the 1st of its month.
                let day = local.div_euclid(86_400);
                (day - i64::from(date_of_day(day).day()) + 1) * 86_400 - utc_offset
            }
        }
    }

    /// Start of the bucket after the one starting at `start`.
    pub(crate) fn next(self, start: i64, utc_offset: i64) -> i64 {
        match self {
            Step::Minute => start + 60,
            Step::Hour => start + 3600,
            Step::Day => start + 86_400,
            Step::Month => {
                let first = Step::Month.bucket_start(start, utc_offset);
                let date = local_date(first, utc_offset);
                first + i64::from(date.month().length(date.year())) * 86_400
            }
        }
    }

    /// How many buckets `[from, to)` spans, computed without walking it.
    pub(crate) fn count(self, from: i64, to: i64, utc_offset: i64) -> i64 {
        let first = self.bucket_start(from, utc_offset);
        match self {
            Step::Minute => (to - first + 59) / 60,
            Step::Hour => (to - first + 3599) / 3600,
            Step::Day => (to - first + 86_399) / 86_400,
            Step::Month => {
                let month_index = |t: i64| {
                    let date = local_date(t, utc_offset);
                    i64::from(date.year()) * 12 + i64::from(u8::from(date.month()))
                };
                month_index(to - 1) - month_index(first) + 1
            }
        }
    }
}

/// The Julian day number of 1970-01-01.
const UNIX_EPOCH_JULIAN_DAY: i32 = OffsetDateTime::UNIX_EPOCH.to_julian_day();

/// The proleptic Gregorian date `days` days after 1970-01-01. `time` (with
/// `large-dates`) covers the years ±999,999; days beyond that, which no clock,
/// stored bucket or API range (the years 1970 to 9999) comes near, are held at
/// its first or last date instead of failing.
fn date_of_day(days: i64) -> Date {
    let julian = days.saturating_add(i64::from(UNIX_EPOCH_JULIAN_DAY));
    let end = if days < 0 { Date::MIN } else { Date::MAX };
    i32::try_from(julian).ok().and_then(|julian| Date::from_julian_day(julian).ok()).unwrap_or(end)
}

/// Days since 1970-01-01 of a date, the inverse of [`date_of_day`]: for tests
/// that name a day.
#[cfg(test)]
pub(crate) fn days_from_civil(year: i32, month: u8, day: u8) -> i64 {
    let date = Date::from_calendar_date(year, time::Month::try_from(month).unwrap(), day).unwrap();
    i64::from(date.to_julian_day() - UNIX_EPOCH_JULIAN_DAY)
}

/// The local date, at `utc_offset`, of Unix second `t`.
fn local_date(t: i64, utc_offset: i64) -> Date {
    date_of_day((t + utc_offset).div_euclid(86_400))
}

/// The local calendar label of a bucket: `2026-11` for months, `2026-11-29`
/// for days, `2026-11-29T14:00` for hours and minutes (each label names one
/// bucket: hours of a day must not share the day's label).
pub(crate) fn period_label(start: i64, step: Step, utc_offset: i64) -> String {
    let date = local_date(start, utc_offset);
    let (y, m, d) = (date.year(), u8::from(date.month()), date.day());
    let local_secs = (start + utc_offset).rem_euclid(86_400);
    let (hour, minute) = (local_secs / 3600, local_secs % 3600 / 60);
    match step {
        Step::Month => format!("{y:04}-{m:02}"),
        Step::Day => format!("{y:04}-{m:02}-{d:02}"),
        Step::Hour | Step::Minute => format!("{y:04}-{m:02}-{d:02}T{hour:02}:{minute:02}"),
    }
}

/// `+08:00`, `-05:30`, `+00:00` (also `Z`) -> seconds east of UTC.
pub(crate) fn parse_utc_offset(text: &str) -> Option<i64> {
    if text == "Z" {
        return Some(0);
    }
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 14 && m < 60 && h * 60 + m <= 14 * 60).then_some(sign * (h * 3600 + m * 60))
}

/// Seconds east of UTC -> `+08:00`.
pub(crate) fn utc_offset_text(secs: i64) -> String {
    let sign = if secs < 0 { '-' } else { '+' };
    let abs = secs.abs();
    format!("{sign}{:02}:{:02}", abs / 3600, (abs % 3600) / 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Month;

    const PLUS_8: i64 = 8 * 3600;

    #[test]
    fn civil_dates_round_trip() {
        for days in [-800_000, -1, 0, 1, 59, 365, 11_016, 20_000, 2_000_000] {
            let date = date_of_day(days);
            assert_eq!(days_from_civil(date.year(), u8::from(date.month()), date.day()), days);
        }
        assert_eq!(date_of_day(0), Date::from_calendar_date(1970, Month::January, 1).unwrap());
        assert_eq!(date_of_day(days_from_civil(2024, 2, 29)), Date::from_calendar_date(2024, Month::February, 29).unwrap());
        // Far outside any real time: held at the ends, no panic.
        assert_eq!(date_of_day(i64::MAX), Date::MAX);
        assert_eq!(date_of_day(i64::MIN), Date::MIN);
    }

    #[test]
    fn months_have_their_lengths_and_the_api_range_is_exact() {
        let feb_2024 = days_from_civil(2024, 2, 1) * 86_400;
        assert_eq!(Step::Month.next(feb_2024, 0), days_from_civil(2024, 3, 1) * 86_400);
        assert_eq!(Step::Month.next(days_from_civil(2023, 2, 1) * 86_400, 0), days_from_civil(2023, 3, 1) * 86_400);
        assert_eq!(Step::Month.next(days_from_civil(2026, 12, 1) * 86_400, 0), days_from_civil(2027, 1, 1) * 86_400);
        // The API admits times up to 9999-12-31 23:59:59 UTC, which is already the
        // year 10000 east of UTC.
        let latest = 253_402_300_799;
        let plus_14 = 14 * 3600;
        assert_eq!(period_label(Step::Month.bucket_start(latest, plus_14), Step::Month, plus_14), "10000-01");
        let dec_9999 = Step::Month.bucket_start(latest, 0);
        assert_eq!(period_label(dec_9999, Step::Month, 0), "9999-12");
        assert_eq!(Step::Month.next(dec_9999, 0), latest + 1);
        assert_eq!(Step::Month.count(0, latest, 0), (9999 - 1970 + 1) * 12);
    }

    #[test]
    fn day_and_month_boundaries_follow_the_offset() {
        // 2026-11-29 15:30 UTC is 23:30 on the 29th at +08:00; 16:30 UTC is the 30th.
        let t = days_from_civil(2026, 11, 29) * 86_400 + 15 * 3600 + 1800;
        let local_midnight_29 = days_from_civil(2026, 11, 29) * 86_400 - PLUS_8;
        assert_eq!(Step::Day.bucket_start(t, PLUS_8), local_midnight_29);
        assert_eq!(Step::Day.bucket_start(t + 3600, PLUS_8), local_midnight_29 + 86_400);
        assert_eq!(period_label(Step::Day.bucket_start(t + 3600, PLUS_8), Step::Day, PLUS_8), "2026-11-30");
        // Hours are labelled with their local hour: 15:30 UTC is 23:00's bucket at +08:00.
        assert_eq!(period_label(Step::Hour.bucket_start(t, PLUS_8), Step::Hour, PLUS_8), "2026-11-29T23:00");
        assert_eq!(period_label(Step::Hour.bucket_start(t + 3600, PLUS_8), Step::Hour, PLUS_8), "2026-11-30T00:00");
        assert_eq!(period_label(Step::Hour.bucket_start(1800, 5 * 3600 + 1800), Step::Hour, 5 * 3600 + 1800), "1970-01-01T06:00");
        // 2026-11-30 16:30 UTC is already December at +08:00.
        let dec = days_from_civil(2026, 11, 30) * 86_400 + 16 * 3600 + 1800;
        assert_eq!(period_label(Step::Month.bucket_start(dec, PLUS_8), Step::Month, PLUS_8), "2026-12");
        assert_eq!(period_label(Step::Month.bucket_start(dec, 0), Step::Month, 0), "2026-11");
        assert_eq!(Step::Month.next(Step::Month.bucket_start(dec, PLUS_8), PLUS_8), days_from_civil(2027, 1, 1) * 86_400 - PLUS_8);
        // Half-hour offsets move hour boundaries too.
        assert_eq!(Step::Hour.bucket_start(1800, 5 * 3600 + 1800), 1800);
        assert_eq!(Step::Hour.bucket_start(1799, 5 * 3600 + 1800), -1800);
        assert_eq!(Step::Month.count(local_midnight_29, dec + 86_400 * 40, PLUS_8), 3);
        assert_eq!(Step::Minute.count(0, 3600, 0), 60);
    }
}
