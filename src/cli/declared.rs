//! The config file's `[[mappings]]` and `[[clients]]` turned into what the
//! server reconciles: each mapping table read with the API's own request type
//! (`/api/mapping/create`), so the file and the API accept the same fields
//! with the same checks and the same words for what is wrong.

use std::path::{Path, PathBuf};

use crate::api::contract::CreateMapping;
use crate::config::{mapping_entry, Config, ConfigError, Role};
use crate::server::mappings::{check_declaration, Declaration};

/// The declaration `config` (read from `file`) makes, checked as far as it can
/// be without the running server; an error names the entry
/// (`mappings[1] (source_port 4001)`).
pub(super) fn read(config: &Config, file: Option<PathBuf>) -> Result<Declaration, ConfigError> {
    let refuse = |index: usize, reason: String| ConfigError::Declared { entry: mapping_entry(index, &config.mappings[index]), reason };
    let mut mappings = Vec::with_capacity(config.mappings.len());
    for (index, table) in config.mappings.iter().enumerate() {
        let request: CreateMapping = crate::api::from_value(serde_json::Value::Object(table.clone())).map_err(|why| refuse(index, why))?;
        let own = [(config.api.listen.port(), "API"), (config.server.tunnel_listen.port(), "tunnel")];
        if let Some((_, owner)) = own.iter().find(|(port, _)| *port != 0 && *port == request.source_port) {
            return Err(refuse(index, format!("source_port {} is tunneld's own {owner} port", request.source_port)));
        }
        mappings.push(request.into_new_mapping());
    }
    let clients = config.clients.iter().map(|c| (c.name.clone(), c.secret.clone())).collect();
    let mut declaration = Declaration { file, clients, mappings };
    check_declaration(&mut declaration).map_err(|(index, why)| refuse(index, why))?;
    Ok(declaration)
}

/// The file the server's declarations come from: the one given, else the
/// packaged default when it exists.
pub(super) fn server_file(given: Option<&Path>) -> Option<PathBuf> {
    crate::config::file_for(Role::Server, given).map(Path::to_path_buf)
}
