//! The transport a mapping forwards: TCP streams or UDP datagrams. A mapping is
//! identified by its protocol and its port together, so UDP 53 and TCP 53 are
//! two mappings.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `tcp` (the default, what every mapping was before UDP) or `udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Streams: one visitor connection, one target connection.
    #[default]
    Tcp,
    /// Datagrams: one session (own socket toward the target) per visitor address.
    Udp,
}

impl Protocol {
    /// The name on the API, in metrics' `protocol` label and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Whether it is TCP (what a request without `protocol` means).
    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }

    /// Reads a name as the API and the command line spell it.
    pub fn parse(name: &str) -> Option<Protocol> {
        match name {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What identifies a mapping: its port and its protocol. Ordered by port first,
/// so lists show UDP 53 beside TCP 53.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MappingKey {
    /// The listening port.
    pub port: u16,
    /// What it listens for.
    pub protocol: Protocol,
}

impl MappingKey {
    /// A TCP mapping's key: what a bare port has always meant.
    #[cfg(test)]
    pub(crate) fn tcp(port: u16) -> MappingKey {
        MappingKey { port, protocol: Protocol::Tcp }
    }

    /// The key as one integer, for the history tables whose rows were keyed by
    /// the port alone before UDP: a TCP mapping keeps its port (old rows stay
    /// valid without a migration), a UDP mapping is its port + 65536.
    pub(crate) fn history_id(self) -> i64 {
        match self.protocol {
            Protocol::Tcp => i64::from(self.port),
            Protocol::Udp => i64::from(self.port) + 65536,
        }
    }

    /// The inverse of [`MappingKey::history_id`].
    pub(crate) fn from_history_id(id: i64) -> Option<MappingKey> {
        match id {
            1..=65535 => Some(MappingKey { port: id as u16, protocol: Protocol::Tcp }),
            65537..=131071 => Some(MappingKey { port: (id - 65536) as u16, protocol: Protocol::Udp }),
            _ => None,
        }
    }
}

impl fmt::Display for MappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Tcp => write!(f, "{}", self.port),
            Protocol::Udp => write!(f, "{}/udp", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_ids_keep_tcp_ports_and_round_trip() {
        assert_eq!(MappingKey::tcp(53).history_id(), 53);
        for key in [MappingKey::tcp(1), MappingKey::tcp(65535), MappingKey { port: 53, protocol: Protocol::Udp }] {
            assert_eq!(MappingKey::from_history_id(key.history_id()), Some(key));
        }
        assert_eq!(MappingKey::from_history_id(0), None);
        assert_eq!(MappingKey::from_history_id(65536), None);
    }
}
