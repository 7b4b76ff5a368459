//! Sizes and rates as operators type them (`300MB`, `1.5GiB`, `8Mbit/s`), read
//! exactly: a value that is not a whole number of bytes is refused rather than
//! rounded, so what is stored is what was typed.

use crate::policy::{Cidr, Quota, QuotaAction, QuotaPeriod};

/// Byte units: SI (`kB` = 1000) and IEC (`KiB` = 1024), and the bare `B`.
const BYTE_UNITS: [(&str, u128); 10] = [
    ("B", 1),
    ("kB", 1000),
    ("KB", 1000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// Bit units for rates, as network people write them (SI): bits per unit.
const BIT_UNITS: [(&str, u128); 8] = [
    ("kbit", 1000),
    ("Kbit", 1000),
    ("Mbit", 1_000_000),
    ("Gbit", 1_000_000_000),
    ("kbps", 1000),
    ("Kbps", 1000),
    ("Mbps", 1_000_000),
    ("Gbps", 1_000_000_000),
];

const SIZE_FORMS: &str = "a number of bytes, or with a unit: 300MB, 1.5GiB (kB MB GB TB = 1000s, KiB MiB GiB TiB = 1024s)";

/// A size in bytes: `300000000`, `300MB`, `1.5 GiB`.
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text).ok_or_else(|| format!("{text:?} is not {SIZE_FORMS}"))?;
    let per = if unit.is_empty() {
        1
    } else {
        lookup(&BYTE_UNITS, unit).ok_or_else(|| format!("{text:?}: unknown unit {unit:?}; {SIZE_FORMS}"))?
    };
    exact(number, per, 1).ok_or_else(|| format!("{text:?} is not a whole number of bytes"))
}

/// A rate in bytes per second: a size (`10MB`, `/s` optional) or bits
/// (`8Mbit/s`, `100Mbps`).
pub(super) fn parse_rate(text: &str) -> Result<u64, String> {
    let forms = "bytes per second, or with a unit: 10MB/s, 1.5MiB/s, 8Mbit/s, 100Mbps";
    let trimmed = text.trim();
    let bare = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    let (number, unit) = split_number(bare).ok_or_else(|| format!("{text:?} is not {forms}"))?;
    let bytes = if unit.is_empty() {
        exact(number, 1, 1)
    } else if let Some(per) = lookup(&BYTE_UNITS, unit) {
        exact(number, per, 1)
    } else if let Some(bits) = lookup(&BIT_UNITS, unit) {
        exact(number, bits, 8)
    } else {
        return Err(format!("{text:?}: unknown unit {unit:?}; {forms}"));
    };
    match bytes {
        Some(0) => Err("a bandwidth limit must be above 0 (to remove it: --no-bandwidth-limit)".into()),
        Some(b) => Ok(b),
        None => Err(format!("{text:?} is not a whole number of bytes per second")),
    }
}

/// `SIZE/PERIOD:ACTION`: `300GB/month:block`, `10GiB/day:alert`.
pub(super) fn parse_quota(text: &str) -> Result<Quota, String> {
    let forms = "SIZE/day|month:alert|block, e.g. 300GB/month:block";
    let (size, rest) = text.rsplit_once('/').ok_or_else(|| format!("{text:?} is not {forms}"))?;
    let (period, action) =
        rest.split_once(':').ok_or_else(|| format!("{text:?}: say what a used-up quota does (:alert or :block); {forms}"))?;
    let period = match period.trim() {
        "day" => QuotaPeriod::Day,
        "month" => QuotaPeriod::Month,
        other => return Err(format!("{text:?}: the period is day or month, not {other:?}")),
    };
    let action = match action.trim() {
        "alert" => QuotaAction::Alert,
        "block" => QuotaAction::Block,
        other => return Err(format!("{text:?}: the action is alert or block, not {other:?}")),
    };
    let bytes = parse_size(size)?;
    if bytes == 0 {
        return Err("a quota must be above 0 bytes (to remove it: --no-quota)".into());
    }
    Ok(Quota { bytes, period, action })
}

/// One visitor address block: `10.0.0.0/8`, `2001:db8::/32`, `192.168.1.7`.
pub(super) fn parse_cidr(text: &str) -> Result<Cidr, String> {
    Cidr::parse(text.trim()).ok_or_else(|| format!("{text:?} is not an address or a CIDR block (10.0.0.0/8, 2001:db8::/32)"))
}

/// `"1.5 GiB"` -> (`"1.5"`, `"GiB"`); `None` without a leading number.
fn split_number(text: &str) -> Option<(&str, &str)> {
    let text = text.trim();
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    let valid = !number.is_empty() && number.matches('.').count() <= 1 && !number.starts_with('.') && !number.ends_with('.');
    valid.then_some((number, unit.trim()))
}

fn lookup(units: &[(&str, u128)], unit: &str) -> Option<u128> {
    units.iter().find(|(name, _)| *name == unit).map(|(_, value)| *value)
}

/// `number × per ÷ divisor` when that is a whole number that fits a `u64`.
fn exact(number: &str, per: u128, divisor: u128) -> Option<u64> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.len() + fraction.len() > 30 {
        return None;
    }
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    let scale = 10u128.checked_pow(fraction.len() as u32)? * divisor;
    let scaled = digits.checked_mul(per)?;
    (scaled % scale == 0).then(|| u64::try_from(scaled / scale).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_are_read_exactly() {
        assert_eq!(parse_size("300000000"), Ok(300_000_000));
        assert_eq!(parse_size("300MB"), Ok(300_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(1_610_612_736));
        assert_eq!(parse_size("0.5KiB"), Ok(512));
        assert!(parse_size("1.5B").is_err());
        assert!(parse_size("0.1KiB").is_err(), "102.4 bytes");
        assert!(parse_size("3Mb").is_err(), "bits or bytes? refused");
        assert!(parse_size("1..5MB").is_err() && parse_size(".5MB").is_err() && parse_size("MB").is_err());
        assert!(parse_size("99999999999TiB").is_err(), "beyond u64");
        assert_eq!(parse_rate("8Mbit/s"), Ok(1_000_000));
        assert_eq!(parse_rate("100Mbps"), Ok(12_500_000));
        assert_eq!(parse_rate("1000000"), Ok(1_000_000));
        assert_eq!(parse_rate("1.5MiB/s"), Ok(1_572_864));
        assert!(parse_rate("1kbit").is_ok() && parse_rate("1bit").is_err());
        assert!(parse_rate("3kbit").is_ok(), "375 B/s");
        assert!(parse_rate("0").is_err() && parse_rate("fast").is_err());
    }

    #[test]
    fn quotas_name_their_period_and_action() {
        let q = parse_quota("300MB/month:block").unwrap();
        assert_eq!((q.bytes, q.period, q.action), (300_000_000, QuotaPeriod::Month, QuotaAction::Block));
        assert_eq!(parse_quota("1GiB/day:alert").unwrap().bytes, 1 << 30);
        for bad in ["300MB", "300MB/month", "300MB/week:block", "300MB/month:stop", "0B/day:alert"] {
            assert!(parse_quota(bad).is_err(), "{bad}");
        }
    }
}
