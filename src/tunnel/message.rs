//! The tunnel's messages, one type per direction and phase, so that each place
//! that reads a frame can only receive what may come there: a frame of any other
//! kind fails to decode (`ProtocolError::Malformed`) instead of needing an
//! "unexpected message" branch.
//!
//! On the wire every message is a JSON object whose `type` names it (`hello`,
//! `challenge`, `auth`, …) — the same names whichever type carries them, so the
//! format is that of protocol version 2 from its first release.
//!
//! A connection to the tunnel port opens with an [`Opening`]: `hello` for a
//! control channel, `data_hello` for a data channel. Control: the server answers
//! a [`Challenge`], the client an [`Auth`] (HMAC-SHA256(secret, nonce ‖ TLS
//! exporter), see `auth`), the server a [`Verdict`]. Then both sides exchange
//! heartbeats ([`ToClient`], [`ToServer`]). A data channel waits for a
//! [`Connect`] and answers it with a [`ConnectResult`].

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::core::names::DEFAULT_CLIENT;
use crate::net::proxy_header::ProxyVersion;

/// Bumped on any incompatible change; sent in the first frame of every connection.
pub const PROTOCOL_VERSION: u32 = 2;

/// client → server: the first frame of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Opening {
    /// Opens a control channel. `client` names whose secret the answer will use
    /// (absent from clients older than named clients: `default`).
    #[serde(rename = "hello")]
    Control {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// The client's name.
        #[serde(default = "default_client")]
        client: String,
        /// What this client can do beyond protocol version 2 as first
        /// released (see [`FEATURE_PROXY_HEADER`]). Absent from older clients;
        /// names a server does not know are ignored.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Opens a data channel for the session whose token it presents.
    #[serde(rename = "data_hello")]
    Data {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// The session token from [`Verdict::Welcome`].
        session: String,
    },
    /// Opens the session's datagram channel (see `datagram`): UDP mappings'
    /// datagrams framed on this connection, for the session whose token it
    /// presents. Sent only after [`ToClient::OpenDatagrams`].
    #[serde(rename = "datagram_hello")]
    Datagrams {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// The session token from [`Verdict::Welcome`].
        session: String,
    },
}

impl Opening {
    /// The protocol version the peer speaks.
    pub fn version(&self) -> u32 {
        match self {
            Opening::Control { version, .. } | Opening::Data { version, .. } | Opening::Datagrams { version, .. } => *version,
        }
    }
}

fn default_client() -> String {
    DEFAULT_CLIENT.to_string()
}

/// A client [`Opening::Control`] `features` entry: it writes the PROXY header a
/// [`Connect`] asks for. An older client would ignore the request and send the
/// visitor's bytes bare, so a server sends `proxy_header` only to clients that
/// list this, and refuses the visitors of such a mapping through any other.
pub const FEATURE_PROXY_HEADER: &str = "proxy_header";

/// A client [`Opening::Control`] `features` entry: it carries UDP mappings'
/// datagrams (it understands [`ToClient::OpenDatagrams`] and the `datagram`
/// link). A server sends a UDP mapping's datagrams only through clients that
/// list this; an older one's are dropped (`no_tunnel`).
pub const FEATURE_UDP: &str = "udp";

/// Every feature this build's client announces.
pub fn client_features() -> Vec<String> {
    vec![FEATURE_PROXY_HEADER.to_string(), FEATURE_UDP.to_string()]
}

/// client → server: the first frame on the stream of a QUIC connection to the
/// tunnel port over UDP, which makes it the datagram link of the client's
/// session (see `datagram`). The server answers with a [`Verdict`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum QuicOpening {
    /// Proves the connection is the named client's, for its session.
    #[serde(rename = "quic_hello")]
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// The client's name.
        client: String,
        /// The session token from [`Verdict::Welcome`]: what the connection
        /// joins, and the nonce of `mac`.
        session: String,
        /// Hex HMAC-SHA256(secret, session ‖ the QUIC connection's exporter
        /// value), so it is worthless on any other connection.
        mac: String,
    },
}

/// server → client: the answer to a control channel's [`Opening`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Challenge {
    /// Prove the secret: answer with HMAC over this nonce (hex).
    Challenge {
        /// Random, hex.
        nonce: String,
    },
    /// Refused before authentication (another protocol version, a bad name, a
    /// TLS/plain mismatch, an address the server throttles); the server closes.
    ///
    /// A throttled connection is refused before any handshake; on a TLS port
    /// it gets a fatal `access_denied` alert record and then this frame, in
    /// the clear (see `net::tls::THROTTLED_ALERT`): a TLS client stops at the
    /// alert, a tunneld client reads on to learn for how long.
    Rejected {
        /// Why, in words for the client's log.
        reason: String,
        /// Set when the server refuses this address for a while: how long, in
        /// whole seconds (rounded up). Absent from servers before it, and from
        /// every other rejection; clients that do not know it ignore it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
    },
}

/// client → server: the answer to a [`Challenge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Auth {
    /// Hex HMAC-SHA256(secret, nonce ‖ binding).
    Auth {
        /// The answer, hex.
        mac: String,
    },
}

/// server → client: the outcome of [`Auth`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Verdict {
    /// Authenticated. Data channels present `session`.
    Welcome {
        /// The token this session's data channels present.
        session: String,
        /// How often each side sends a heartbeat.
        heartbeat_interval_secs: u64,
    },
    /// Refused; the server closes.
    Rejected {
        /// Why, in words for the client's log.
        reason: String,
    },
}

/// server → client on an authenticated control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToClient {
    /// Every heartbeat interval; any frame proves the peer is alive. See
    /// [`Heartbeat`] for `ping` and `pong`.
    Heartbeat {
        /// Echo this back at once (in `pong`): the sender's clock, opaque.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ping: Option<u64>,
        /// The peer's `ping`, echoed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pong: Option<u64>,
    },
    /// A visitor is waiting and the pool is empty: open one more data channel.
    OpenDataChannel,
    /// A UDP mapping's datagram is waiting and the session carries none yet:
    /// open the datagram link (QUIC where it can be had, else a framed
    /// datagram channel, [`Opening::Datagrams`]). Sent only to clients
    /// announcing [`FEATURE_UDP`].
    OpenDatagrams,
}

/// client → server on an authenticated control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToServer {
    /// Every heartbeat interval; as [`ToClient::Heartbeat`].
    Heartbeat {
        /// Echo this back at once (in `pong`): the sender's clock, opaque.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ping: Option<u64>,
        /// The peer's `ping`, echoed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pong: Option<u64>,
    },
}

/// A message both sides of a control channel send every heartbeat interval.
///
/// The round trip is measured with two optional fields, added compatibly to
/// protocol version 2: each heartbeat carries `ping` (the sender's clock, in
/// microseconds of its own), and a peer that knows the field answers at once
/// with a heartbeat whose `pong` is that value (and no `ping`, so echoes never
/// echo). The sender's round trip is its clock now minus the `pong`. An older
/// peer ignores `ping` (unknown fields are ignored; its unit variant decodes
/// from any `heartbeat` object) and never echoes, so no round trip is measured
/// with it and nothing else changes; its bare heartbeats decode here as
/// `ping: None, pong: None`.
pub trait Heartbeat: Sized {
    /// The heartbeat frame of this direction, with the given fields.
    fn heartbeat(ping: Option<u64>, pong: Option<u64>) -> Self;

    /// `(ping, pong)` of a heartbeat; `None` for any other message.
    fn probe(&self) -> Option<(Option<u64>, Option<u64>)>;
}

impl Heartbeat for ToClient {
    fn heartbeat(ping: Option<u64>, pong: Option<u64>) -> ToClient {
        ToClient::Heartbeat { ping, pong }
    }

    fn probe(&self) -> Option<(Option<u64>, Option<u64>)> {
        match *self {
            ToClient::Heartbeat { ping, pong } => Some((ping, pong)),
            ToClient::OpenDataChannel | ToClient::OpenDatagrams => None,
        }
    }
}

impl Heartbeat for ToServer {
    fn heartbeat(ping: Option<u64>, pong: Option<u64>) -> ToServer {
        ToServer::Heartbeat { ping, pong }
    }

    fn probe(&self) -> Option<(Option<u64>, Option<u64>)> {
        let ToServer::Heartbeat { ping, pong } = *self;
        Some((ping, pong))
    }
}

/// server → client on an idle data channel: dial this target and relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Connect {
    /// The target, as the mapping names it (resolved in the client's network).
    Connect {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
        /// Write this PROXY protocol header to the target before any byte of
        /// the exchange. Only sent to clients announcing
        /// [`FEATURE_PROXY_HEADER`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proxy_header: Option<ProxyHeader>,
    },
}

/// What a PROXY protocol header says: the visitor's address (`source`) and the
/// server address it connected to (`destination`), as `ip:port` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHeader {
    /// `v1` or `v2`.
    pub version: ProxyVersion,
    /// The visitor.
    pub source: SocketAddr,
    /// The mapping's listening address and port, as the visitor reached it.
    pub destination: SocketAddr,
}

impl ProxyHeader {
    /// The bytes to write to the target.
    pub fn encode(&self) -> Vec<u8> {
        crate::net::proxy_header::encode(self.version, self.source, self.destination)
    }
}

/// client → server on that data channel; raw chunks follow when the target answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectResult {
    /// `error` is `None` when the target answered.
    ConnectResult {
        /// Why the target could not be reached, if it could not.
        error: Option<String>,
    },
}

/// What the server answers a peer speaking another protocol version.
pub fn version_rejection(peer_version: u32) -> String {
    let upgrade = if peer_version < PROTOCOL_VERSION { "upgrade the client" } else { "upgrade the server" };
    format!("protocol version {peer_version} is not supported by this server ({PROTOCOL_VERSION}); {upgrade}")
}

/// What the server tells a connection its defences refuse unheard: for how
/// long, when it refuses the address after failed attempts (`retry_after_secs`),
/// or that the address holds too many unfinished handshakes.
pub fn throttled_rejection(retry_after_secs: Option<u64>) -> String {
    match retry_after_secs {
        Some(secs) => format!("refused for {secs} s after failed attempts from this address"),
        None => "refused: too many unfinished tunnel handshakes from this address".to_string(),
    }
}

/// A rejection as the client reports it; a version-1 server words its version
/// rejection differently, so that one is translated into the same message.
pub fn explain_rejection(reason: &str) -> String {
    if reason.contains("(server speaks 1)") {
        format!("protocol version {PROTOCOL_VERSION} is not supported by this server (1); upgrade the server")
    } else {
        reason.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_without_a_client_name_is_the_default_client() {
        let hello: Opening = serde_json::from_slice(br#"{"type":"hello","version":2}"#).unwrap();
        assert_eq!(hello, Opening::Control { version: 2, client: "default".into(), features: vec![] });
    }

    #[test]
    fn proxy_headers_are_optional_fields_old_peers_ignore_and_new_ones_read() {
        // A client from before the field: its `connect` type had host and port only.
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum OldConnect {
            Connect { host: String, port: u16 },
        }
        let header =
            ProxyHeader { version: ProxyVersion::V2, source: "127.0.0.2:4000".parse().unwrap(), destination: "[::1]:80".parse().unwrap() };
        let connect = Connect::Connect { host: "h".into(), port: 22, proxy_header: Some(header) };
        let wire = serde_json::to_string(&connect).unwrap();
        assert_eq!(
            wire,
            r#"{"type":"connect","host":"h","port":22,"proxy_header":{"version":"v2","source":"127.0.0.2:4000","destination":"[::1]:80"}}"#
        );
        assert_eq!(serde_json::from_str::<Connect>(&wire).unwrap(), connect);
        assert_eq!(serde_json::from_str::<OldConnect>(&wire).unwrap(), OldConnect::Connect { host: "h".into(), port: 22 });
        // And the hello's features: absent from old clients, ignored by old servers.
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(tag = "type")]
        enum OldOpening {
            #[serde(rename = "hello")]
            Control { version: u32 },
        }
        let hello = Opening::Control { version: 2, client: "a".into(), features: client_features() };
        let wire = serde_json::to_string(&hello).unwrap();
        assert_eq!(wire, r#"{"type":"hello","version":2,"client":"a","features":["proxy_header","udp"]}"#);
        assert_eq!(serde_json::from_str::<OldOpening>(&wire).unwrap(), OldOpening::Control { version: 2 });
        let unknown: Opening = serde_json::from_str(r#"{"type":"hello","version":2,"client":"a","features":["teleport"]}"#).unwrap();
        assert!(matches!(unknown, Opening::Control { features, .. } if features == ["teleport"]));
    }

    #[test]
    fn each_message_keeps_its_wire_name() {
        let wire = |v: &dyn erased::Ser| v.json();
        assert_eq!(wire(&Opening::Data { version: 2, session: "s".into() }), r#"{"type":"data_hello","version":2,"session":"s"}"#);
        assert_eq!(wire(&Challenge::Challenge { nonce: "n".into() }), r#"{"type":"challenge","nonce":"n"}"#);
        assert_eq!(wire(&Auth::Auth { mac: "m".into() }), r#"{"type":"auth","mac":"m"}"#);
        assert_eq!(
            wire(&Verdict::Welcome { session: "s".into(), heartbeat_interval_secs: 10 }),
            r#"{"type":"welcome","session":"s","heartbeat_interval_secs":10}"#
        );
        assert_eq!(wire(&Verdict::Rejected { reason: "r".into() }), r#"{"type":"rejected","reason":"r"}"#);
        assert_eq!(wire(&Challenge::Rejected { reason: "r".into(), retry_after_secs: None }), r#"{"type":"rejected","reason":"r"}"#);
        assert_eq!(
            wire(&Challenge::Rejected { reason: "r".into(), retry_after_secs: Some(12) }),
            r#"{"type":"rejected","reason":"r","retry_after_secs":12}"#
        );
        assert_eq!(wire(&ToClient::OpenDataChannel), r#"{"type":"open_data_channel"}"#);
        assert_eq!(wire(&ToServer::Heartbeat { ping: None, pong: None }), r#"{"type":"heartbeat"}"#);
        assert_eq!(wire(&ToServer::Heartbeat { ping: Some(7), pong: None }), r#"{"type":"heartbeat","ping":7}"#);
        assert_eq!(wire(&ToClient::Heartbeat { ping: None, pong: Some(7) }), r#"{"type":"heartbeat","pong":7}"#);
        assert_eq!(
            wire(&Connect::Connect { host: "h".into(), port: 22, proxy_header: None }),
            r#"{"type":"connect","host":"h","port":22}"#
        );
        assert_eq!(wire(&ConnectResult::ConnectResult { error: None }), r#"{"type":"connect_result","error":null}"#);
    }

    #[test]
    fn a_message_of_another_phase_does_not_decode() {
        assert!(serde_json::from_slice::<Verdict>(br#"{"type":"challenge","nonce":"n"}"#).is_err());
        assert!(serde_json::from_slice::<ToServer>(br#"{"type":"open_data_channel"}"#).is_err());
    }

    #[test]
    fn heartbeats_with_and_without_a_round_trip_probe_decode_on_both_generations() {
        // A peer from before the probe: its heartbeat has no fields.
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum OldToServer {
            Heartbeat,
        }
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum OldToClient {
            Heartbeat,
            OpenDataChannel,
        }
        for new in [r#"{"type":"heartbeat","ping":123}"#, r#"{"type":"heartbeat","pong":123}"#] {
            assert_eq!(serde_json::from_str::<OldToServer>(new).unwrap(), OldToServer::Heartbeat, "{new}");
            assert_eq!(serde_json::from_str::<OldToClient>(new).unwrap(), OldToClient::Heartbeat, "{new}");
        }
        let old = r#"{"type":"heartbeat"}"#;
        assert_eq!(serde_json::from_str::<ToServer>(old).unwrap(), ToServer::Heartbeat { ping: None, pong: None });
        assert_eq!(serde_json::from_str::<ToClient>(old).unwrap(), ToClient::Heartbeat { ping: None, pong: None });
        assert_eq!(serde_json::from_str::<ToClient>(r#"{"type":"open_data_channel"}"#).unwrap(), ToClient::OpenDataChannel);
    }

    /// Serializes any message in a test without naming its type.
    mod erased {
        pub(super) trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap()
            }
        }
    }
}
