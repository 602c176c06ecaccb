//! The room core: building, authorising and persisting PDUs, state groups and resolution. No HTTP here.

pub mod append;
pub mod canonical;
pub mod create;
pub mod directory;
pub mod hierarchy;
pub mod import;
pub mod membership;
pub mod partial;
pub mod pdu;
pub mod peek;
pub mod power;
pub mod presence;
pub mod remote;
pub mod signatures;
pub mod state;
pub mod stripped;
#[cfg(test)]
mod tests;
pub mod timestamp;
pub mod typing;
pub mod upgrade;
pub mod version;
pub mod visibility;

use std::sync::Arc;

use ruma::signatures::Ed25519KeyPair;
use ruma::{EventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, UserId};

use crate::error::Result;
use crate::store::identity::SigningKey;
use crate::store::ids::StateGroup;
use crate::store::{events, rooms, state_groups, Db};
pub use pdu::Pdu;

/// This server's name and signing key.
pub struct Identity {
    pub server_name: OwnedServerName,
    pub keypair: Ed25519KeyPair,
    /// `ed25519:<version>`
    pub key_id: String,
    pub public_key_b64: String,
}

impl Identity {
    /// Loads the identity from the database, creating it (name and signing key, in one transaction) on first start.
    pub fn load_or_create(conn: Db<'_>, server_name: &str) -> anyhow::Result<Arc<Identity>> {
        let key = crate::store::identity::load_or_create(conn, server_name, Identity::new_signing_key)?;
        Identity::from_key(server_name, &key).map(Arc::new)
    }

    /// A fresh signing key with a random version.
    pub fn new_signing_key() -> SigningKey {
        let der = Ed25519KeyPair::generate().to_vec();
        let version = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..6).map(|_| rng.sample(rand::distributions::Alphanumeric) as char).collect()
        };
        SigningKey { der, version }
    }

    /// The identity of `server_name` signing with `key`.
    pub fn from_key(server_name: &str, key: &SigningKey) -> anyhow::Result<Identity> {
        let keypair = Ed25519KeyPair::from_der(&key.der, key.version.clone())
            .map_err(|e| anyhow::anyhow!("stored signing key is unreadable: {e}"))?;
        use base64::Engine;
        let public_key_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(keypair.public_key());
        Ok(Identity {
            server_name: ruma::ServerName::parse(server_name)?,
            keypair,
            key_id: key.key_id(),
            public_key_b64,
        })
    }

    pub fn is_local_user(&self, user_id: &str) -> bool {
        user_id.split_once(':').map(|x| x.1) == Some(self.server_name.as_str())
    }
}

/// A room id from a request, parsed at the edge: one that does not parse names no room we know (404, as an unknown
/// room would be).
pub fn parse_room_id(room_id: &str) -> Result<OwnedRoomId> {
    RoomId::parse(room_id).map_err(|_| crate::error::Error::not_found("unknown room"))
}

/// A user id from a request, parsed at the edge (400 when it does not parse).
pub fn parse_user_id(user_id: &str) -> Result<OwnedUserId> {
    UserId::parse(user_id).map_err(|e| crate::error::Error::invalid_param(e.to_string()))
}

/// Loads a stored event as a [`Pdu`] (for auth and state resolution).
pub fn load_pdu(conn: Db<'_>, event_id: &EventId) -> Result<Option<Pdu>> {
    let Some(row) = events::event_by_id(conn, event_id.as_str())? else { return Ok(None) };
    pdu_from_row(conn, &row).map(Some)
}

pub fn pdu_from_row(conn: Db<'_>, row: &events::EventRow) -> Result<Pdu> {
    let room =
        rooms::room_by_nid(conn, row.room_nid)?.ok_or_else(|| crate::error::Error::internal("event without room"))?;
    pdu_from_row_with(row, &version::rules(&room.version)?)
}

/// [`load_pdu`] when the room version's rules are at hand: no room lookup per event (auth checks of many events).
pub fn load_pdu_with(
    conn: Db<'_>,
    event_id: &str,
    rules: &ruma::room_version_rules::RoomVersionRules,
) -> Result<Option<Pdu>> {
    let Some(row) = events::event_by_id(conn, event_id)? else { return Ok(None) };
    pdu_from_row_with(&row, rules).map(Some)
}

/// [`load_pdu_with`] of many events at once: those we hold, each parsed or the reason it could not be (SQLite's
/// order).
pub fn load_pdus_with(
    conn: Db<'_>,
    event_ids: &[&str],
    rules: &ruma::room_version_rules::RoomVersionRules,
) -> Result<Vec<Result<Pdu>>> {
    let rows = events::events_by_ids(conn, event_ids)?;
    Ok(rows.iter().map(|row| pdu_from_row_with(row, rules)).collect())
}

/// How a stored event's text becomes a [`Pdu`]: whole ([`Pdu::from_stored`]) or its fields only
/// ([`Pdu::from_stored_fields`], for the auth rules, which read nothing else).
pub type ParseStored = fn(&str, &str, &ruma::room_version_rules::RoomVersionRules) -> std::result::Result<Pdu, String>;

/// A stored event's row parsed with `parse`, its rejection carried over.
pub fn pdu_from_row_by(
    row: &events::EventRow,
    rules: &ruma::room_version_rules::RoomVersionRules,
    parse: ParseStored,
) -> Result<Pdu> {
    let mut pdu = parse(&row.json, &row.event_id, rules)
        .map_err(|e| crate::error::Error::internal(format!("stored event {} unreadable: {e}", row.event_id)))?;
    pdu.rejected = row.rejected.is_some();
    Ok(pdu)
}

fn pdu_from_row_with(row: &events::EventRow, rules: &ruma::room_version_rules::RoomVersionRules) -> Result<Pdu> {
    pdu_from_row_by(row, rules, Pdu::from_stored)
}

/// Looks up `(type, state_key)` in a state group and loads that event.
pub fn state_event(conn: Db<'_>, sg: StateGroup, event_type: &str, state_key: &str) -> Result<Option<Pdu>> {
    let Some(skn) = state_groups::find_state_key_nid(conn, event_type, state_key)? else { return Ok(None) };
    let Some(nid) = state_groups::lookup_state(conn, sg, skn)? else { return Ok(None) };
    let Some(row) = events::event_by_nid(conn, nid)? else { return Ok(None) };
    pdu_from_row(conn, &row).map(Some)
}

/// Content of a state event in a group, as JSON.
pub fn state_content(
    conn: Db<'_>,
    sg: StateGroup,
    event_type: &str,
    state_key: &str,
) -> Result<Option<serde_json::Value>> {
    Ok(state_event(conn, sg, event_type, state_key)?.map(|p| p.content_value()))
}
