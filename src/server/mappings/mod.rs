//! Mappings: their lifecycle (create, restore, update, remove), their
//! listeners, and what happens to each visitor.
//!
//! Each mapping is one task that owns its listener. A mapping whose port cannot be
//! bound (say, taken by another process at start) keeps its row, shows the error in
//! `list`, and retries in the background — one bad mapping never stops the daemon.

mod clients;
mod context;
mod declared;
mod error;
mod group;
mod health;
mod listener;
mod registry;
mod target;
mod udp;
mod view;
mod visitor;

pub(crate) use context::Settings;
pub(crate) use declared::{check_declaration, Declaration, Reconciled};
pub(crate) use error::MappingError;
pub(crate) use group::MemberView;
pub(crate) use health::Health;
pub(crate) use registry::{GroupUpdate, Mappings, NewMapping};
pub(crate) use view::{MappingStatus, MappingView};
