//! `/api/client/*`: the named tunnel clients a server accepts.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::fields;

/// `POST /api/client/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateClient {
    /// 1 to 64 of `a-z`, `0-9`, `-`, `_`.
    pub name: String,
}

/// `POST /api/client/create`'s answer: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCreated {
    /// The new client's name.
    pub name: String,
    /// Its secret, for the client's `client.secret`.
    pub secret: String,
}

/// `POST /api/client/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveClient {
    /// The client to forget.
    pub name: String,
    /// Remove it even while mappings name it; they then wait for a client of
    /// that name (absent or `null`: `false`).
    #[serde(default, deserialize_with = "fields::null_as_default")]
    pub force: bool,
}

/// `POST /api/client/remove`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRemoved {
    /// The removed client.
    pub name: String,
    /// Ports of the mappings that still name it (only with `force`).
    pub mappings_waiting: Vec<u16>,
}

/// A tunnel client as `/api/client/list` and the traffic report show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Client {
    /// Its name.
    pub name: String,
    /// Whether it has an authenticated session now.
    pub connected: bool,
    /// While connected: the control connection's source address, else `null`.
    pub peer: Option<SocketAddr>,
    /// While connected: when the session authenticated (Unix seconds), else `null`.
    pub connected_since: Option<f64>,
    /// Tunnel wire bytes server → client since the daemon started.
    pub bytes_sent: u64,
    /// Tunnel wire bytes client → server since the daemon started.
    pub bytes_received: u64,
    /// When tunnel bytes last moved (Unix seconds), or `null`.
    pub last_update: Option<f64>,
    /// How many mappings name it.
    pub mappings: usize,
    /// While connected: the latest heartbeat round trip of its tunnel, in
    /// seconds (measured every heartbeat interval); `null` before the first, or
    /// with a client too old to echo heartbeats. Read as `None` from a server
    /// older than it.
    #[serde(default)]
    pub rtt_seconds: Option<f64>,
    /// `"config"`: declared in the server's config file (`[[clients]]`), which
    /// the API may not remove; `"api"`: made through the API (and `default`).
    #[serde(default)]
    pub source: super::Source,
    /// How its tunnel carries UDP mappings' datagrams now: `"quic"` (QUIC
    /// datagrams on the tunnel port over UDP), `"framed"` (framed on a data
    /// channel: UDP to the server blocked, or a plain tunnel), or `null` (not
    /// connected, or no UDP session through it yet this session). Read as
    /// `None` from a server older than it.
    #[serde(default)]
    pub udp_transport: Option<String>,
}

/// `GET /api/client/list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientList {
    /// Every client, `default` included.
    pub clients: Vec<Client>,
    /// `clients.len()`.
    pub count: usize,
}
