//! `GET /api/events`: what happened to mappings, quotas and clients.

use serde::{Deserialize, Serialize};

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When (Unix seconds).
    pub time: f64,
    /// `quota_warning`, `quota_exhausted`, `quota_reset`, `mapping_down`,
    /// `mapping_up`, `client_lost`, `client_back`, ... (new kinds may come).
    pub kind: String,
    /// The mapping it concerns, when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The client it concerns, when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// What happened, in words.
    pub message: String,
}

impl From<crate::store::events::Event> for Event {
    fn from(e: crate::store::events::Event) -> Event {
        Event { time: e.time, kind: e.kind.as_str().to_string(), port: e.port, client: e.client, message: e.message }
    }
}

/// `GET /api/events`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    /// At most `?limit=` of them (default 100).
    pub events: Vec<Event>,
    /// `events.len()`.
    pub count: usize,
}
