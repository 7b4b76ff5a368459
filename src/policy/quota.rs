//! A mapping's traffic quota: how much per day or month, and what happens when
//! it is used up.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize};

/// The allowance per period and what happens when it is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Allowance per period, both directions together.
    #[serde(deserialize_with = "quota_bytes")]
    pub bytes: u64,
    /// Per local day or month (`history.utc_offset`).
    pub period: QuotaPeriod,
    /// What a used-up quota does.
    pub action: QuotaAction,
}

/// Where a quota's period begins again (local midnight, the first of the month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    /// From local midnight to local midnight.
    Day,
    /// From the first of the month, local time.
    Month,
}

/// What a used-up quota does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaAction {
    /// Events only.
    Alert,
    /// Events, and new visitors refused until the period rolls over.
    Block,
}

/// `quota.bytes`: a positive whole number (a zero quota would block at once).
fn quota_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_u64(Positive("a positive whole number of bytes"))
}

/// A whole number above zero; the text says what it counts.
pub(super) struct Positive(pub(super) &'static str);

impl<'de> Visitor<'de> for Positive {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
        match n {
            0 => Err(E::invalid_value(Unexpected::Unsigned(0), &self)),
            n => Ok(n),
        }
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
        }
    }
}
