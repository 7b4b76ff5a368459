//! The event log behind `/api/events`: quota thresholds, mappings that cannot
//! bind, clients lost and back. Bounded: only the newest [`KEEP`] events stay.

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::db::{Store, StoreError};

/// Events kept; older ones are deleted as new ones arrive.
pub(crate) const KEEP: i64 = 1_000;

/// What an event is about; stored and served as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A mapping used 80 % of its quota for the period.
    QuotaWarning,
    /// A mapping used its whole quota (visitors are refused if its action is `block`).
    QuotaExhausted,
    /// A new quota period began after an exhausted one.
    QuotaReset,
    /// A mapping cannot listen on its port.
    MappingDown,
    /// A mapping listens again.
    MappingUp,
    /// A tunnel client's session ended without a successor.
    ClientLost,
    /// A lost client is connected again.
    ClientBack,
    /// The config file's `[[mappings]]`/`[[clients]]` were applied (at start
    /// or on reload) and changed something: how many created, changed, removed.
    ConfigReconciled,
}

impl EventKind {
    /// Every kind, for parsing.
    const ALL: [EventKind; 8] = [
        EventKind::QuotaWarning,
        EventKind::QuotaExhausted,
        EventKind::QuotaReset,
        EventKind::MappingDown,
        EventKind::MappingUp,
        EventKind::ClientLost,
        EventKind::ClientBack,
        EventKind::ConfigReconciled,
    ];

    /// The name in the table, the API and the webhook.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::QuotaWarning => "quota_warning",
            EventKind::QuotaExhausted => "quota_exhausted",
            EventKind::QuotaReset => "quota_reset",
            EventKind::MappingDown => "mapping_down",
            EventKind::MappingUp => "mapping_up",
            EventKind::ClientLost => "client_lost",
            EventKind::ClientBack => "client_back",
            EventKind::ConfigReconciled => "config_reconciled",
        }
    }

    fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored kind this version does not know (written by a newer one).
fn stored_kind(column: usize, name: String) -> rusqlite::Result<EventKind> {
    EventKind::parse(&name).ok_or_else(|| {
        let unknown = std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unknown event kind {name:?}"));
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(unknown))
    })
}

/// One event as stored, listed and posted to the webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix seconds.
    pub time: f64,
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    pub message: String,
}

impl Store {
    pub(crate) async fn add_event(&self, event: Event) -> Result<(), StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO events (time, kind, port, client, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![event.time, event.kind.as_str(), event.port, event.client, event.message],
            )?;
            tx.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?1", params![KEEP])?;
            tx.commit()
        })
        .await
    }

    /// The newest `limit` events, newest first.
    pub(crate) async fn events(&self, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT time, kind, port, client, message FROM events ORDER BY id DESC LIMIT ?1")?;
            let rows = stmt.query_map(params![limit], |r| {
                Ok(Event {
                    time: r.get(0)?,
                    kind: stored_kind(1, r.get(1)?)?,
                    port: r.get::<_, Option<i64>>(2)?.and_then(|p| u16::try_from(p).ok()),
                    client: r.get(3)?,
                    message: r.get(4)?,
                })
            })?;
            rows.collect()
        })
        .await
    }
}

impl Store {
    /// Which of `kinds` were recorded for `port` at or after `since` (Unix
    /// seconds): what a restarted process has already told the operator.
    pub(crate) async fn announced_since(&self, port: u16, since: f64, kinds: &'static [EventKind]) -> Result<Vec<EventKind>, StoreError> {
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT DISTINCT kind FROM events WHERE port = ?1 AND time >= ?2")?;
            let rows = stmt.query_map(params![port, since], |r| r.get::<_, String>(0))?;
            let found: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
            Ok(kinds.iter().copied().filter(|k| found.iter().any(|name| name == k.as_str())).collect())
        })
        .await
    }
}

impl Store {
    /// The last `client_lost` or `client_back` recorded for the client `name`
    /// since it was created (a client removed and created again is a new one;
    /// `default` is never created): the store's last word on whether it is
    /// away, which outlives the process that said it.
    pub(crate) async fn last_presence(&self, name: &str) -> Result<Option<EventKind>, StoreError> {
        let name = name.to_string();
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT kind FROM events
                 WHERE client = ?1 AND kind IN ('client_lost', 'client_back')
                   AND time >= (SELECT COALESCE(MAX(created_at), 0) FROM clients WHERE name = ?1)
                 ORDER BY id DESC LIMIT 1",
            )?;
            let mut rows = stmt.query_map(params![name], |r| stored_kind(0, r.get(0)?))?;
            rows.next().transpose()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_bounded_and_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..(KEEP + 5) {
            let event = Event { time: i as f64, kind: EventKind::MappingDown, port: Some(1), client: None, message: format!("{i}") };
            store.add_event(event).await.unwrap();
        }
        let events = store.events(10_000).await.unwrap();
        assert_eq!(events.len() as i64, KEEP);
        assert_eq!(events[0].message, format!("{}", KEEP + 4));
        assert_eq!(events.last().unwrap().message, "5");
    }

    #[tokio::test]
    async fn the_last_word_on_a_client_is_its_latest_lost_or_back_since_it_was_created() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let event = |time: f64, kind, client: &str| Event { time, kind, port: None, client: Some(client.into()), message: String::new() };
        assert_eq!(store.last_presence("default").await.unwrap(), None);
        store.add_event(event(10.0, EventKind::ClientLost, "default")).await.unwrap();
        store.add_event(event(11.0, EventKind::QuotaWarning, "default")).await.unwrap();
        assert_eq!(store.last_presence("default").await.unwrap(), Some(EventKind::ClientLost));
        store.add_event(event(12.0, EventKind::ClientBack, "default")).await.unwrap();
        assert_eq!(store.last_presence("default").await.unwrap(), Some(EventKind::ClientBack));
        store.add_event(event(13.0, EventKind::ClientLost, "office")).await.unwrap();
        assert_eq!(store.last_presence("default").await.unwrap(), Some(EventKind::ClientBack), "another client's");
        assert_eq!(store.last_presence("office").await.unwrap(), Some(EventKind::ClientLost));
        let secret = crate::core::secret::Secret::new("x");
        store
            .insert_client(crate::store::clients::StoredClient {
                name: "office".into(),
                secret,
                created_at: 20,
                source: crate::store::Source::Api,
            })
            .await
            .unwrap();
        assert_eq!(store.last_presence("office").await.unwrap(), None, "lost before it was created again");
    }
}
