//! The federation layer: outbound client, keys, inbound PDU/EDU processing, the transaction sender, remote joins,
//! invites and leaves, backfill and the partial-state resync. Its HTTP endpoints live in `federation_api`; this
//! layer takes the narrow handles of [`FedContext`], never the HTTP state.

pub mod acl;
pub mod backfill;
pub mod batches;
pub mod client;
pub mod devices;
pub mod gap;
pub mod hierarchy;
pub mod inbound;
pub mod invite;
pub mod join;
pub mod keys;
pub mod knock;
pub mod peek;
pub mod query;
pub mod resync;
pub mod sender;
pub mod state_answers;
pub mod stream;
pub mod template;
pub mod tls;

use std::sync::Arc;

use crate::config::Config;
use crate::jobs::Jobs;
use crate::room::typing::Typing;
use crate::room::Identity;
use crate::store::Store;

pub use client::FedClient;
pub use keys::KeyStore;

/// What federation code needs beyond the store.
#[derive(Clone)]
pub struct Federation {
    pub client: Arc<FedClient>,
    pub keys: Arc<KeyStore>,
}

/// The handles of a running server that the federation layer uses (held by the HTTP state as `fed`, shared with
/// the background tasks).
pub struct FedContext {
    pub config: Arc<Config>,
    pub store: Store,
    pub identity: Arc<Identity>,
    /// None when `federation.enabled = false`.
    pub federation: Option<Federation>,
    pub typing: Arc<Typing>,
    pub presence: Arc<crate::room::presence::Presence>,
    pub jobs: Jobs,
    /// Resyncs of remote users' device lists under way (one per user at a time).
    pub device_resyncs: Arc<devices::Resyncs>,
}

/// Parses an `Authorization: X-Matrix origin=..,destination=..,key=..,sig=..` header (public for the fuzz targets).
pub fn parse_x_matrix(h: &str) -> Option<(String, Option<String>, String, String)> {
    let rest = h.strip_prefix("X-Matrix ")?;
    let mut origin = None;
    let mut destination = None;
    let mut key = None;
    let mut sig = None;
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim() {
            "origin" => origin = Some(v),
            "destination" => destination = Some(v),
            "key" => key = Some(v),
            "sig" => sig = Some(v),
            _ => {}
        }
    }
    Some((origin?, destination, key?, sig?))
}
