//! What can be wrong with a configuration, with the key and where it came from.

use std::path::PathBuf;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value that does not parse, or an unknown key; says which and from where.
    #[error("{0}")]
    Source(String),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("config file {0} is empty; refusing to replace the running configuration with defaults")]
    EmptyFile(PathBuf),
}
