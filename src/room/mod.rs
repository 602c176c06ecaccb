//! The room core: building, authorising and persisting PDUs, state groups and resolution. No HTTP here.

pub mod append;
pub mod create;
pub mod import;
pub mod membership;
pub mod partial;
pub mod pdu;
pub mod power;
pub mod remote;
pub mod state;
pub mod version;

use std::sync::Arc;

use ruma::signatures::Ed25519KeyPair;
use ruma::OwnedServerName;
use rusqlite::{Connection, OptionalExtension};

use crate::error::Result;
use crate::store::events;
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
    /// Loads the signing key from the database, generating one on first start.
    pub fn load_or_create(conn: &Connection, server_name: &str) -> anyhow::Result<Arc<Identity>> {
        let existing: Option<(Vec<u8>, Vec<u8>)> = conn
            .query_row(
                "SELECT k.value, v.value FROM meta k JOIN meta v ON v.key = 'signing_key_version'
                 WHERE k.key = 'signing_key'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (der, version) = match existing {
            Some((der, v)) => (der, String::from_utf8(v)?),
            None => {
                let der = Ed25519KeyPair::generate().to_vec();
                let version: String = {
                    use rand::Rng;
                    let mut rng = rand::thread_rng();
                    (0..6).map(|_| rng.sample(rand::distributions::Alphanumeric) as char).collect()
                };
                conn.execute("INSERT INTO meta (key, value) VALUES ('signing_key', ?1)", [&der])?;
                conn.execute("INSERT INTO meta (key, value) VALUES ('signing_key_version', ?1)", [version.as_bytes()])?;
                (der, version)
            }
        };
        // The server name is fixed at first start: user ids and room ids embed it.
        let stored: Option<Vec<u8>> =
            conn.query_row("SELECT value FROM meta WHERE key = 'server_name'", [], |r| r.get(0)).optional()?;
        match stored {
            Some(name) if name != server_name.as_bytes() => anyhow::bail!(
                "this database belongs to server_name `{}`, but the configuration says `{server_name}`",
                String::from_utf8_lossy(&name)
            ),
            Some(_) => {}
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('server_name', ?1)", [server_name.as_bytes()])?;
            }
        }
        let keypair = Ed25519KeyPair::from_der(&der, version.clone())
            .map_err(|e| anyhow::anyhow!("stored signing key is unreadable: {e}"))?;
        use base64::Engine;
        let public_key_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(keypair.public_key());
        Ok(Arc::new(Identity {
            server_name: ruma::ServerName::parse(server_name)?,
            keypair,
            key_id: format!("ed25519:{version}"),
            public_key_b64,
        }))
    }

    pub fn is_local_user(&self, user_id: &str) -> bool {
        user_id.split_once(':').map(|x| x.1) == Some(self.server_name.as_str())
    }
}

/// Loads a stored event as a [`Pdu`] (for auth and state resolution).
pub fn load_pdu(conn: &Connection, event_id: &str) -> Result<Option<Pdu>> {
    let Some(row) = events::event_by_id(conn, event_id)? else { return Ok(None) };
    pdu_from_row(conn, &row).map(Some)
}

pub fn pdu_from_row(conn: &Connection, row: &events::EventRow) -> Result<Pdu> {
    let room =
        events::room_by_nid(conn, row.room_nid)?.ok_or_else(|| crate::error::Error::internal("event without room"))?;
    pdu_from_row_with(row, &version::rules(&room.version)?)
}

/// [`load_pdu`] when the room version's rules are at hand: no room lookup per event (auth checks of many events).
pub fn load_pdu_with(
    conn: &Connection,
    event_id: &str,
    rules: &ruma::room_version_rules::RoomVersionRules,
) -> Result<Option<Pdu>> {
    let Some(row) = events::event_by_id(conn, event_id)? else { return Ok(None) };
    pdu_from_row_with(&row, rules).map(Some)
}

fn pdu_from_row_with(row: &events::EventRow, rules: &ruma::room_version_rules::RoomVersionRules) -> Result<Pdu> {
    let mut pdu = Pdu::from_stored(&row.json, &row.event_id, rules)
        .map_err(|e| crate::error::Error::internal(format!("stored event {} unreadable: {e}", row.event_id)))?;
    pdu.rejected = row.rejected.is_some();
    Ok(pdu)
}

/// Looks up `(type, state_key)` in a state group and loads that event.
pub fn state_event(conn: &Connection, sg: i64, event_type: &str, state_key: &str) -> Result<Option<Pdu>> {
    let Some(skn) = events::find_state_key_nid(conn, event_type, state_key)? else { return Ok(None) };
    let Some(nid) = events::lookup_state(conn, sg, skn)? else { return Ok(None) };
    let Some(row) = events::event_by_nid(conn, nid)? else { return Ok(None) };
    pdu_from_row(conn, &row).map(Some)
}

/// Content of a state event in a group, as JSON.
pub fn state_content(
    conn: &Connection,
    sg: i64,
    event_type: &str,
    state_key: &str,
) -> Result<Option<serde_json::Value>> {
    Ok(state_event(conn, sg, event_type, state_key)?.map(|p| p.content_value()))
}
