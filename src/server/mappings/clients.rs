//! Tunnel clients are created and removed under the mappings lock, so a
//! mapping can never name a client that is being removed.

use std::collections::BTreeMap;

use tracing::info;

use super::error::MappingError;
use super::registry::Mappings;
use crate::core::names::{invalid_client_name, DEFAULT_CLIENT};
use crate::core::secret::Secret;

impl Mappings {
    /// Registers a new tunnel client and returns its secret. The secret is stored
    /// (a client's answer is checked against it) but never shown again.
    pub async fn create_client(&self, name: &str) -> Result<String, MappingError> {
        if let Some(why) = invalid_client_name(name) {
            return Err(MappingError::Invalid(format!("name: {why}")));
        }
        // Under the mappings lock: creation and removal of clients are serialised
        // with each other and with mappings that name them.
        let _entries = self.entries.lock().await;
        if self.ctx.hub.knows(name) {
            return Err(MappingError::Conflict(format!("a client named {name:?} already exists")));
        }
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let stored = crate::store::StoredClient {
            name: name.to_string(),
            secret: Secret::new(secret.clone()),
            created_at: crate::core::time::unix_now() as i64,
            source: crate::store::Source::Api,
        };
        self.ctx.store.insert_client(stored).await.map_err(MappingError::store(format!("save the client {name:?}")))?;
        self.ctx.hub.add_client(name, Secret::new(secret.clone()));
        info!(client = name, "tunnel client created");
        Ok(secret)
    }

    /// Forgets a client: it can no longer authenticate and its session ends now.
    /// While mappings name it this is a conflict, unless `force`: then they stay,
    /// waiting for a client of that name. Returns the ports of those mappings.
    pub async fn remove_client(&self, name: &str, force: bool) -> Result<Vec<u16>, MappingError> {
        if name == DEFAULT_CLIENT {
            return Err(MappingError::Invalid(
                "the client `default` cannot be removed: its secret is server.secret; change that to lock it out".into(),
            ));
        }
        let entries = self.entries.lock().await;
        if !self.ctx.hub.knows(name) {
            return Err(MappingError::UnknownClient(name.to_string()));
        }
        if self.declared_clients().contains(name) {
            return Err(self.declared_refusal(format!("the client {name:?}")));
        }
        let users: Vec<u16> = entries.values().filter(|e| e.spec.clients.iter().any(|c| c == name)).map(|e| e.spec.source_port).collect();
        if !users.is_empty() && !force {
            return Err(MappingError::ClientInUse { name: name.to_string(), ports: users });
        }
        self.ctx.store.remove_client(name).await.map_err(MappingError::store(format!("remove the client {name:?}")))?;
        self.ctx.hub.remove_client(name);
        info!(client = name, mappings_left_waiting = users.len(), "tunnel client removed");
        Ok(users)
    }

    /// How many mappings name each client (alone or in a group).
    pub async fn mappings_per_client(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.entries.lock().await.values() {
            for client in &entry.spec.clients {
                *counts.entry(client.clone()).or_default() += 1;
            }
        }
        counts
    }
}
