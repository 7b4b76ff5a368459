//! Field readers the request types share, for rules serde has no word for.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;

/// A TCP port to listen on or dial: 1 to 65535 (0 would mean "any port").
pub(super) fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    d.deserialize_u16(Port)
}

struct Port;

impl<'de> Visitor<'de> for Port {
    type Value = u16;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer between 1 and 65535")
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<u16, E> {
        u16::try_from(n).ok().filter(|p| *p > 0).ok_or_else(|| E::invalid_value(Unexpected::Unsigned(n), &self))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<u16, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
        }
    }
}

/// A flag where `null` means the same as leaving it out: `false`.
pub(super) fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A field where `null` is a value of its own: absent is `None` (keep),
/// `null` is `Some(None)` (remove), a value is `Some(Some(value))`.
pub(super) fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Ok(Some(Option::<T>::deserialize(d)?))
}
