//! Why a change to the mappings (or the clients) was refused; the API maps each
//! kind to its status code.

use crate::store::StoreError;

/// A refused change: invalid (400), conflicting (409), unknown (404), or not
/// saved (500).
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// Shown as `no mapping on port 53` (TCP) or `no mapping on port 53/udp`.
    #[error("no mapping on port {0}")]
    NotFound(crate::core::protocol::MappingKey),
    /// The client a request is about does not exist.
    #[error("no client named {0:?}")]
    UnknownClient(String),
    /// A new mapping names a client that does not exist.
    #[error("client: no client named {0:?} (create it with /api/client/create)")]
    NamesUnknownClient(String),
    /// Mappings still name the client to be removed.
    #[error("client {name:?} is used by the mappings on ports {ports:?}: remove them first, or send \"force\": true to keep them waiting for this name")]
    ClientInUse {
        /// The client.
        name: String,
        /// The ports of the mappings that name it.
        ports: Vec<u16>,
    },
    /// The API asked to change or remove what the config file declares.
    #[error("{what} is declared in {} ([[mappings]] / [[clients]]): change it there and reload (systemctl reload tunneld-server, or SIGHUP)", file.as_ref().map(|f| format!("the config file {}", f.display())).unwrap_or_else(|| "the server's config file".into()))]
    Declared {
        /// `the mapping on port 4000`, `the client "office"`.
        what: String,
        /// The config file, when known.
        file: Option<std::path::PathBuf>,
    },
    /// `action` says what failed ("save the mapping on port 4000").
    #[error("could not {action}: {error}")]
    Store { action: String, error: StoreError },
}

impl MappingError {
    /// Wraps a store failure with what was being done ("save the mapping on port 4000").
    pub(super) fn store(action: impl Into<String>) -> impl FnOnce(StoreError) -> MappingError {
        let action = action.into();
        move |error| MappingError::Store { action, error }
    }
}
