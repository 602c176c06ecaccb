//! Hearth: a Matrix homeserver in one binary and one SQLite file.

pub mod admin;
pub mod appservice;
pub mod client;
pub mod config;
pub mod e2ee;
pub mod error;
pub mod federation;
pub mod federation_api;
pub mod http;
pub mod jobs;
pub mod lowprio;
pub mod media;
pub mod media_repo;
pub mod metrics;
pub mod room;
pub mod server;
pub mod store;
pub mod util;
