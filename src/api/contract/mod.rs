//! The HTTP API's contract as types: every request body and every answer, shared
//! by the handlers that serialize them, `tunneld ctl` that reads them back, and
//! the tests that check the wire against them — so a field renamed on one side
//! fails to compile on the other instead of reading as `null`.
//!
//! Requests refuse unknown fields (a typo must not fall back to a default) and,
//! through serde's derive, duplicate ones; their field checks say what was
//! expected, and the body extractor ([`super::body`]) names the field. Answers
//! accept fields they do not know, so an older `ctl` can read a newer server.
//!
//! Conventions the types keep: a field that is `null` when unset is an `Option`
//! that is always written; one that is left out when unset says so with
//! `skip_serializing_if`; times are Unix seconds (`f64` where the daemon keeps
//! sub-second precision, `i64` for whole-second records), byte counts `u64`.

mod clients;
mod connections;
mod events;
mod fields;
mod health;
mod history;
mod mappings;
mod traffic;

use serde::{Deserialize, Serialize};

pub use crate::core::protocol::Protocol;
pub use clients::{Client, ClientCreated, ClientList, ClientRemoved, CreateClient, RemoveClient};
pub use connections::{
    CloseConnection, ConnectionClosed, ConnectionList, ConnectionLog, LoggedConnection, OpenConnection, SourceTotals, Sources,
};
pub use events::{Event, EventList};
pub use health::{Health, HealthStatus};
pub use history::{History, HistoryPoint, Report, ReportRow, Span};
pub use mappings::{
    CreateMapping, Mapping, MappingClient, MappingHealth, MappingList, MappingRemoved, MappingStatus, RemoveMapping, Source, UpdateMapping,
};
pub use traffic::{MappingTraffic, TrafficReport, TunnelTraffic, UdpTraffic};

/// Every `/api/*` answer: `data` on success, left out on failure (then `message`
/// says why).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Whether the request did what it asked.
    pub success: bool,
    /// `"ok"`, what was done, or why not.
    pub message: String,
    /// The answer; absent on failure (read as `None`, as serde reads a missing
    /// `Option`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    /// On some refusals: what kind, for programs. `message` is for people and
    /// its advice is phrased for the API (a header, a body field); a client
    /// with its own flags (`tunneld ctl`) reads this instead of the words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

/// A refusal a client can do something about, named for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The API has a token and the request carried none.
    TokenRequired,
    /// The request carried a token, not the API's.
    TokenInvalid,
    /// The request names a tunnel client that does not exist.
    UnknownClient,
    /// The client is named by mappings; removing it anyway needs `force`.
    ClientInUse,
    /// The mapping or client is declared in the server's config file: the API
    /// may not change or remove it (edit the file and reload instead).
    DeclaredInConfig,
    /// A code this build does not know (a newer server's).
    #[serde(other)]
    Other,
}

impl<T> Envelope<T> {
    /// A successful answer carrying `data`.
    pub fn success(message: impl Into<String>, data: T) -> Envelope<T> {
        Envelope { success: true, message: message.into(), data: Some(data), code: None }
    }

    /// A refusal: no data, a message that says why.
    pub fn failure(message: impl Into<String>) -> Envelope<T> {
        Envelope { success: false, message: message.into(), data: None, code: None }
    }

    /// A refusal of a kind programs tell apart by its `code`.
    pub fn refusal(code: Option<ErrorCode>, message: impl Into<String>) -> Envelope<T> {
        Envelope { code, ..Envelope::failure(message) }
    }
}
