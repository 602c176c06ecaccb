//! Hearth: a Matrix homeserver in one binary and one SQLite file.

pub mod backup;
pub mod client;
pub mod config;
pub mod error;
pub mod federation;
pub mod http;
pub mod jobs;
pub mod media;
pub mod metrics;
pub mod room;
pub mod server;
pub mod store;
