//! What can be wrong with a configuration, with the key and where it came from.

use std::path::PathBuf;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` names a file that is not there.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value that does not parse, or an unknown key; says which and from where.
    #[error("{0}")]
    Source(String),
    /// A value that parses but breaks a rule.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// The dotted key (`api.token`).
        key: &'static str,
        /// What the rule is.
        reason: String,
    },
    /// A `[[clients]]` or `[[mappings]]` entry that cannot be served.
    #[error("invalid `{entry}`: {reason}")]
    Declared {
        /// Which entry: `mappings[1] (source_port 4001)`.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A reload found the file empty (truncated by accident, most likely).
    #[error("config file {0} is empty; refusing to replace the running configuration with defaults")]
    EmptyFile(PathBuf),
}
