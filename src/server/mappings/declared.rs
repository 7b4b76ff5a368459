//! Mappings and clients declared in the config file (`[[mappings]]`,
//! `[[clients]]`): reconciled with what runs at start and on every reload —
//! created, changed and removed to match — and refused to the API, which may
//! change only what it made.
//!
//! A declared mapping whose route (target, tunnel) is unchanged keeps its
//! listener and its open connections; a changed policy or group (clients,
//! balance, health check) goes through the same live path as
//! `/api/mapping/update`. A changed route is a new mapping on
//! the same port (the old one's connections end). A port the API had mapped is
//! taken over by the file: the file is what the operator (or Ansible, Salt,
//! NixOS) says this server serves, and a server must converge on it without
//! someone first clearing the API's mappings by hand; the replaced mapping is
//! logged with its target, so nothing goes silently.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use tracing::{info, warn};

use super::error::MappingError;
use super::listener::{bind, describe_bind_error};
use super::registry::{check_request, Entry, GroupUpdate, Mappings, NewMapping};
use crate::core::names::DEFAULT_CLIENT;
use crate::core::protocol::MappingKey;
use crate::core::secret::Secret;
use crate::core::sync::lock;
use crate::policy::PolicyUpdate;
use crate::store::{Source, StoredClient};

/// What the config file declares, read and checked (by the process layer,
/// which reads `[[mappings]]` with the API's request type).
#[derive(Debug, Clone, Default)]
pub(crate) struct Declaration {
    /// The file, for the API's refusals ("declared in /etc/tunneld/server.toml").
    pub file: Option<PathBuf>,
    /// `[[clients]]`: name and secret.
    pub clients: Vec<(String, Secret)>,
    /// `[[mappings]]`, in the file's order.
    pub mappings: Vec<NewMapping>,
}

/// How many of each were created, changed and removed by one reconcile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub created: usize,
    pub changed: usize,
    pub removed: usize,
}

impl Tally {
    fn is_empty(&self) -> bool {
        *self == Tally::default()
    }
}

/// What a reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reconciled {
    pub mappings: Tally,
    pub clients: Tally,
    /// Ports the API had mapped that the file now declares.
    pub taken_over: Vec<u16>,
}

impl Reconciled {
    /// Whether anything changed.
    pub(crate) fn changed_anything(&self) -> bool {
        !self.mappings.is_empty() || !self.clients.is_empty()
    }
}

impl std::fmt::Display for Reconciled {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let (m, c) = (self.mappings, self.clients);
        write!(
            f,
            "mappings: created {}, changed {}, removed {}; clients: created {}, changed {}, removed {}",
            m.created, m.changed, m.removed, c.created, c.changed, c.removed
        )?;
        if !self.taken_over.is_empty() {
            write!(f, "; taken over from the API: ports {:?}", self.taken_over)?;
        }
        Ok(())
    }
}

/// The checks a declaration needs on its own (`tunneld check-config` runs
/// them too): each mapping's own checks, no port declared twice, and a
/// tunneled mapping names `default` or a client the file declares — so what
/// the file declares never depends on what the API made, and `check-config`
/// can tell whether it will be served. Errors name the entry.
pub(crate) fn check_declaration(declaration: &mut Declaration) -> Result<(), (usize, String)> {
    let clients: BTreeSet<&str> = declaration.clients.iter().map(|(name, _)| name.as_str()).collect();
    let mut ports = BTreeMap::new();
    for (index, mapping) in declaration.mappings.iter_mut().enumerate() {
        check_request(mapping).map_err(|e| (index, e.to_string()))?;
        if let Some(first) = ports.insert((mapping.source_port, mapping.protocol), index) {
            return Err((index, format!("{} source_port {} is declared by mappings[{first}] too", mapping.protocol, mapping.source_port)));
        }
        // `check_request` made `clients` the whole group (`client` is its first).
        let group = mapping.clients.iter().flatten();
        if let Some(name) = group.map(String::as_str).find(|name| *name != DEFAULT_CLIENT && !clients.contains(name)) {
            return Err((
                index,
                format!("clients: no client named {name:?} in [[clients]] (a declared mapping names `default` or declared clients)"),
            ));
        }
    }
    Ok(())
}

impl Mappings {
    /// Remembers the clients an earlier run's file declared (stored with
    /// `source = config`), so the next reconcile sees which it still declares.
    pub(crate) fn remember_declared_clients(&self, clients: &[StoredClient]) {
        let mut state = lock(&self.declared);
        for client in clients.iter().filter(|c| c.source == Source::Config) {
            state.clients.insert(client.name.clone(), client.secret.clone());
        }
    }

    /// Names of the clients the config file declares, for the API's `source`.
    pub(crate) fn declared_clients(&self) -> BTreeSet<String> {
        lock(&self.declared).clients.keys().cloned().collect()
    }

    /// The refusal for a change the API asks to `what` (declared in the file).
    pub(super) fn declared_refusal(&self, what: String) -> MappingError {
        MappingError::Declared { what, file: lock(&self.declared).file.clone() }
    }

    /// Refuses an API change to a mapping the config file declares.
    pub(super) fn refuse_declared(&self, entry: &Entry) -> Result<(), MappingError> {
        match entry.spec.source {
            Source::Config => Err(self.declared_refusal(format!("the mapping on port {}", entry.spec.source_port))),
            Source::Api => Ok(()),
        }
    }

    /// Makes the running mappings and clients match `declaration`. Everything
    /// is checked before anything changes, so a declaration that is refused
    /// (an error naming the entry) leaves the running set as it was.
    pub(crate) async fn reconcile(&self, mut declaration: Declaration) -> Result<Reconciled, MappingError> {
        check_declaration(&mut declaration).map_err(|(index, why)| entry_error(&declaration, index, MappingError::Invalid(why)))?;
        let mut checked = Vec::with_capacity(declaration.mappings.len());
        for (index, mapping) in declaration.mappings.iter().enumerate() {
            checked.push(self.prepare(mapping.clone(), false).await.map_err(|e| entry_error(&declaration, index, e))?);
        }
        let mut entries = self.entries.lock().await;
        let declared_ports: BTreeSet<MappingKey> =
            declaration.mappings.iter().map(|m| MappingKey { port: m.source_port, protocol: m.protocol }).collect();
        let api_ports: BTreeSet<MappingKey> = entries
            .values()
            .filter(|e| e.spec.source == Source::Api)
            .map(|e| e.spec.key())
            .filter(|p| !declared_ports.contains(p))
            .collect();
        for (index, c) in checked.iter().enumerate() {
            let protocol = c.req.protocol;
            let mapped = |port| {
                let key = MappingKey { port, protocol };
                declared_ports.contains(&key) || api_ports.contains(&key)
            };
            self.check_loops(c, mapped).map_err(|e| entry_error(&declaration, index, e))?;
        }

        let mut done = Reconciled::default();
        lock(&self.declared).file = declaration.file.clone();
        // Clients first: the mappings below may name them.
        let known: BTreeMap<String, Secret> = lock(&self.declared).clients.clone();
        let declared_names: BTreeSet<&str> = declaration.clients.iter().map(|(n, _)| n.as_str()).collect();
        for (name, secret) in &declaration.clients {
            // A known name gets the file's secret: a rotated one, or one the API had made.
            let rotated = match known.get(name) {
                Some(old) if old == secret => continue,
                Some(_) => true,
                None if self.ctx.hub.knows(name) => false,
                None => {
                    let stored = StoredClient {
                        name: name.clone(),
                        secret: secret.clone(),
                        created_at: crate::core::time::unix_now() as i64,
                        source: Source::Config,
                    };
                    self.ctx.store.insert_client(stored).await.map_err(MappingError::store(format!("save the client {name:?}")))?;
                    self.ctx.hub.add_client(name, secret.clone());
                    info!(client = %name, "declared client created");
                    done.clients.created += 1;
                    lock(&self.declared).clients.insert(name.clone(), secret.clone());
                    continue;
                }
            };
            self.ctx
                .store
                .set_client(name, secret, Source::Config)
                .await
                .map_err(MappingError::store(format!("save the client {name:?}")))?;
            // Its session authenticated with the old secret: end it.
            self.ctx.hub.remove_client(name);
            self.ctx.hub.add_client(name, secret.clone());
            if rotated {
                info!(client = %name, "declared client's secret changed; its session ends and it authenticates again");
            } else {
                warn!(client = %name, "the config file declares a client the API had created: the file's secret now applies");
            }
            done.clients.changed += 1;
            lock(&self.declared).clients.insert(name.clone(), secret.clone());
        }

        // Mappings the file no longer declares.
        let gone: Vec<MappingKey> = entries
            .values()
            .filter(|e| e.spec.source == Source::Config && !declared_ports.contains(&e.spec.key()))
            .map(|e| e.spec.key())
            .collect();
        for port in gone {
            self.remove_entry(&mut entries, port).await?;
            done.mappings.removed += 1;
        }
        for c in checked {
            let port = c.req.source_port;
            let key = MappingKey { port, protocol: c.req.protocol };
            if let Some(entry) = entries.get_mut(&key) {
                match entry.spec.source {
                    Source::Config if same_route(entry, &c.req) => {
                        let mut changed = false;
                        if entry.policy() != c.req.policy {
                            self.update_entry(entry, PolicyUpdate::to(c.req.policy.clone())).await?;
                            changed = true;
                        }
                        if entry.spec.use_tunnel {
                            let group = GroupUpdate {
                                clients: c.req.clients.clone(),
                                balance: Some(c.req.balance.unwrap_or_default()),
                                health_check: Some(c.req.health_check),
                            };
                            changed |= self.change_group(entry, group).await?;
                        }
                        done.mappings.changed += usize::from(changed);
                        continue;
                    }
                    Source::Config => done.mappings.changed += 1,
                    Source::Api => {
                        let target = format!("{}:{}", entry.spec.target_host, entry.spec.target_port);
                        warn!(port, %target, "the config file declares a port the API had mapped: the file's mapping replaces it");
                        done.taken_over.push(port);
                        done.mappings.created += 1;
                    }
                }
                self.remove_entry(&mut entries, key).await?;
            } else {
                done.mappings.created += 1;
            }
            // A port held by another process is retried in the background, as
            // a stored mapping's is at start: one bad port never stops the rest.
            let (listener, bind_error) = match bind(self.ctx.settings.bind_addr, key).await {
                Ok(listener) => (Some(listener), None),
                Err(e) => {
                    warn!(port, error = %e, "declared mapping cannot bind its port; will retry");
                    (None, Some(describe_bind_error(&e)))
                }
            };
            self.install(&mut entries, c, Source::Config, listener, bind_error).await?;
        }

        // Clients the file no longer declares (after the mappings that named them went).
        let undeclared: Vec<String> = known.keys().filter(|n| !declared_names.contains(n.as_str())).cloned().collect();
        for name in undeclared {
            let users: Vec<u16> = entries.values().filter(|e| e.spec.clients.contains(&name)).map(|e| e.spec.source_port).collect();
            self.ctx.store.remove_client(&name).await.map_err(MappingError::store(format!("remove the client {name:?}")))?;
            self.ctx.hub.remove_client(&name);
            lock(&self.declared).clients.remove(&name);
            if users.is_empty() {
                info!(client = %name, "declared client removed");
            } else {
                let ports = users.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
                warn!(client = %name, %ports, "declared client removed; the API's mappings that name it wait for a client of that name");
            }
            done.clients.removed += 1;
        }
        Ok(done)
    }
}

/// Whether a declared mapping still forwards where `req` says, the same way:
/// then only its policy and its group may differ, and they change live (open
/// connections stay with the client serving them).
fn same_route(entry: &Entry, req: &NewMapping) -> bool {
    // Every field named, so that a field added to a mapping must be placed
    // here: part of the route (a new mapping) or of what changes live.
    let NewMapping {
        source_port,
        protocol,
        target_host,
        target_port,
        use_tunnel,
        client: _,
        clients: _,
        balance: _,
        health_check: _,
        policy: _,
    } = req;
    let spec = &entry.spec;
    spec.source_port == *source_port
        && spec.protocol == *protocol
        && spec.target_host == *target_host
        && spec.target_port == *target_port
        && spec.use_tunnel == *use_tunnel
}

/// `mappings[1] (source_port 4001): …`, for a refused declaration.
fn entry_error(declaration: &Declaration, index: usize, error: MappingError) -> MappingError {
    let port = declaration.mappings.get(index).map(|m| format!(" (source_port {})", m.source_port)).unwrap_or_default();
    MappingError::Invalid(format!("mappings[{index}]{port}: {error}"))
}
