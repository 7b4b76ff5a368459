//! The calendar of history buckets and quota periods: minutes, hours, local days
//! and months at a fixed UTC offset (`history.utc_offset`), without a time-zone
//! database.

/// A bucket size. Hours, days and months begin at the configured UTC offset's
/// local boundaries; minutes are the same everywhere that has whole-minute offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Minute,
    Hour,
    Day,
    Month,
}

impl Step {
    pub fn parse(text: &str) -> Option<Step> {
        match text {
            "minute" => Some(Step::Minute),
            "hour" => Some(Step::Hour),
            "day" => Some(Step::Day),
            "month" => Some(Step::Month),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::Minute => "minute",
            Step::Hour => "hour",
            Step::Day => "day",
            Step::Month => "month",
        }
    }

    /// The next coarser step, for "use a coarser step" messages.
    pub fn coarser(self) -> Option<Step> {
        match self {
            Step::Minute => Some(Step::Hour),
            Step::Hour => Some(Step::Day),
            Step::Day => Some(Step::Month),
            Step::Month => None,
        }
    }

    /// Start (Unix seconds) of the bucket holding `t`.
    pub fn bucket_start(self, t: i64, utc_offset: i64) -> i64 {
        let local = t + utc_offset;
        match self {
            Step::Minute => t - t.rem_euclid(60),
            Step::Hour => local - local.rem_euclid(3600) - utc_offset,
            Step::Day => local - local.rem_euclid(86_400) - utc_offset,
            Step::Month => {
                let (y, m, _) = civil_from_days(local.div_euclid(86_400));
                days_from_civil(y, m, 1) * 86_400 - utc_offset
            }
        }
    }

    /// Start of the bucket after the one starting at `start`.
    pub fn next(self, start: i64, utc_offset: i64) -> i64 {
        match self {
            Step::Minute => start + 60,
            Step::Hour => start + 3600,
            Step::Day => start + 86_400,
            Step::Month => {
                let (y, m, _) = civil_from_days((start + utc_offset).div_euclid(86_400));
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m, 1) * 86_400 - utc_offset
            }
        }
    }

    /// How many buckets `[from, to)` spans, computed without walking it.
    pub fn count(self, from: i64, to: i64, utc_offset: i64) -> i64 {
        let first = self.bucket_start(from, utc_offset);
        match self {
            Step::Minute => (to - first + 59) / 60,
            Step::Hour => (to - first + 3599) / 3600,
            Step::Day => (to - first + 86_399) / 86_400,
            Step::Month => {
                let month_index = |t: i64| {
                    let (y, m, _) = civil_from_days((t + utc_offset).div_euclid(86_400));
                    y * 12 + i64::from(m)
                };
                month_index(to - 1) - month_index(first) + 1
            }
        }
    }
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) -> days since 1970-01-01; inverse of [`civil_from_days`].
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The local calendar label of a bucket: `2026-11-29` for days (and finer), `2026-11` for months.
pub fn period_label(start: i64, step: Step, utc_offset: i64) -> String {
    let (y, m, d) = civil_from_days((start + utc_offset).div_euclid(86_400));
    match step {
        Step::Month => format!("{y:04}-{m:02}"),
        _ => format!("{y:04}-{m:02}-{d:02}"),
    }
}

/// `+08:00`, `-05:30`, `+00:00` (also `Z`) -> seconds east of UTC.
pub fn parse_utc_offset(text: &str) -> Option<i64> {
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
pub fn utc_offset_text(secs: i64) -> String {
    let sign = if secs < 0 { '-' } else { '+' };
    let abs = secs.abs();
    format!("{sign}{:02}:{:02}", abs / 3600, (abs % 3600) / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUS_8: i64 = 8 * 3600;

    #[test]
    fn civil_dates_round_trip() {
        for days in [-800_000, -1, 0, 1, 59, 365, 11_016, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn day_and_month_boundaries_follow_the_offset() {
        // 2026-11-29 15:30 UTC is 23:30 on the 29th at +08:00; 16:30 UTC is the 30th.
        let t = days_from_civil(2026, 11, 29) * 86_400 + 15 * 3600 + 1800;
        let local_midnight_29 = days_from_civil(2026, 11, 29) * 86_400 - PLUS_8;
        assert_eq!(Step::Day.bucket_start(t, PLUS_8), local_midnight_29);
        assert_eq!(Step::Day.bucket_start(t + 3600, PLUS_8), local_midnight_29 + 86_400);
        assert_eq!(period_label(Step::Day.bucket_start(t + 3600, PLUS_8), Step::Day, PLUS_8), "2026-11-30");
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
