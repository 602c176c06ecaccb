//! Server signing keys: serving ours, fetching and caching others' (from the origin or trusted notaries), and
//! verifying PDUs and requests with them. Keys are fetched once per need and in batches per server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use base64::Engine;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::serde::Base64;
use ruma::signatures::{PublicKeyMap, PublicKeySet};
use rusqlite::params;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::client::FedClient;
use crate::room::Identity;
use crate::store::accounts::now_ms;
use crate::store::Store;

/// How long our published key response is valid.
const OWN_VALIDITY_MS: i64 = 7 * 24 * 3600 * 1000;

/// Our `GET /_matrix/key/v2/server` response, signed.
pub fn own_key_response(identity: &Identity) -> Result<Value> {
    let body = json!({
        "server_name": identity.server_name.as_str(),
        "verify_keys": { identity.key_id.clone(): {"key": identity.public_key_b64} },
        "old_verify_keys": {},
        "valid_until_ts": now_ms() + OWN_VALIDITY_MS,
    });
    sign_value(identity, body)
}

/// Signs a JSON object as this server.
pub fn sign_value(identity: &Identity, v: Value) -> Result<Value> {
    let mut obj: CanonicalJsonObject = match CanonicalJsonValue::try_from(v).map_err(|e| Error::internal(e.to_string()))? {
        CanonicalJsonValue::Object(o) => o,
        _ => return Err(Error::internal("not an object")),
    };
    ruma::signatures::sign_json(identity.server_name.as_str(), &identity.keypair, &mut obj).map_err(|e| Error::internal(e.to_string()))?;
    Ok(serde_json::to_value(obj)?)
}

pub struct KeyStore {
    store: Store,
    client: Arc<FedClient>,
    identity: Arc<Identity>,
    notaries: Vec<String>,
    /// Serialises fetches so concurrent needs for the same server make one request.
    fetch_lock: tokio::sync::Mutex<()>,
}

impl KeyStore {
    pub fn new(store: Store, client: Arc<FedClient>, identity: Arc<Identity>, notaries: Vec<String>) -> KeyStore {
        KeyStore { store, client, identity, notaries, fetch_lock: tokio::sync::Mutex::new(()) }
    }

    async fn cached(&self, servers: &BTreeSet<String>) -> Result<PublicKeyMap> {
        let servers: Vec<String> = servers.iter().cloned().collect();
        self.store
            .read(move |c| {
                let mut map = PublicKeyMap::new();
                let mut stmt = c.prepare_cached("SELECT key_id, public_key FROM server_signing_keys WHERE server_name = ?1")?;
                for s in &servers {
                    let mut set = PublicKeySet::new();
                    for r in stmt.query_map([s], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                        let (id, key) = r?;
                        if let Ok(k) = Base64::parse(&key) {
                            set.insert(id, k);
                        }
                    }
                    if !set.is_empty() {
                        map.insert(s.clone(), set);
                    }
                }
                Ok(map)
            })
            .await
    }

    /// Keys for every server in `needed` (server -> key ids), fetching what is missing in one batch per server.
    pub async fn keys_for(&self, needed: &BTreeMap<String, BTreeSet<String>>) -> Result<PublicKeyMap> {
        let servers: BTreeSet<String> = needed.keys().cloned().collect();
        let mut map = self.cached(&servers).await?;
        let mut own = PublicKeySet::new();
        own.insert(self.identity.key_id.clone(), Base64::parse(&self.identity.public_key_b64).map_err(|e| Error::internal(e.to_string()))?);
        map.insert(self.identity.server_name.to_string(), own);
        let missing: Vec<String> = needed
            .iter()
            .filter(|(s, ids)| ids.iter().any(|id| !map.get(*s).is_some_and(|set| set.contains_key(id))))
            .map(|(s, _)| s.clone())
            .collect();
        if missing.is_empty() {
            return Ok(map);
        }
        let _guard = self.fetch_lock.lock().await;
        let fetches = missing.iter().map(|s| self.fetch_server(s));
        for r in futures::future::join_all(fetches).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "key fetch failed");
            }
        }
        let refreshed = self.cached(&missing.iter().cloned().collect()).await?;
        map.extend(refreshed);
        Ok(map)
    }

    /// Fetches a server's keys from itself, then from notaries; stores verified keys.
    async fn fetch_server(&self, server: &str) -> Result<()> {
        let mut responses = Vec::new();
        match self.client.get_unsigned(server, "/_matrix/key/v2/server").await {
            Ok(v) => responses.push(v),
            Err(e) => {
                tracing::info!(%server, error = %e, "direct key fetch failed; trying notaries");
                for notary in &self.notaries {
                    let body = json!({"server_keys": {server: {}}});
                    match self.client.request(reqwest::Method::POST, notary, "/_matrix/key/v2/query", Some(&body)).await {
                        Ok(v) => {
                            responses.extend(v.get("server_keys").and_then(Value::as_array).cloned().unwrap_or_default());
                            break;
                        }
                        Err(e) => tracing::info!(%notary, error = %e, "notary key query failed"),
                    }
                }
            }
        }
        for r in responses {
            if let Err(e) = self.store_response(server, &r).await {
                tracing::warn!(%server, error = %e, "rejected key response");
            }
        }
        Ok(())
    }

    /// Checks a key response's self-signature and caches its keys.
    async fn store_response(&self, server: &str, v: &Value) -> Result<()> {
        if v.get("server_name").and_then(Value::as_str) != Some(server) {
            return Err(Error::forbidden("key response for another server"));
        }
        let valid_until = v.get("valid_until_ts").and_then(Value::as_i64).unwrap_or(0);
        let mut set = PublicKeySet::new();
        let mut rows = Vec::new();
        for (field, expired) in [("verify_keys", false), ("old_verify_keys", true)] {
            if let Some(keys) = v.get(field).and_then(Value::as_object) {
                for (id, k) in keys {
                    let Some(key) = k.get("key").and_then(Value::as_str) else { continue };
                    if !expired {
                        set.insert(id.clone(), Base64::parse(key).map_err(|e| Error::bad_json(e.to_string()))?);
                    }
                    let until = if expired { k.get("expired_ts").and_then(Value::as_i64).unwrap_or(0) } else { valid_until };
                    rows.push((id.clone(), key.to_owned(), until, expired));
                }
            }
        }
        let mut map = PublicKeyMap::new();
        map.insert(server.to_owned(), set);
        let obj: CanonicalJsonObject = serde_json::from_value(v.clone()).map_err(|e| Error::bad_json(e.to_string()))?;
        ruma::signatures::verify_json(&map, &obj).map_err(|e| Error::forbidden(format!("bad self-signature: {e}")))?;
        let server = server.to_owned();
        self.store
            .write(move |w| {
                for (id, key, until, expired) in rows {
                    w.conn.execute(
                        "INSERT INTO server_signing_keys (server_name, key_id, public_key, valid_until_ts, expired_ts)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (server_name, key_id) DO UPDATE SET valid_until_ts = max(valid_until_ts, ?4)",
                        params![server, id, key, until, expired.then_some(until)],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// Public keys of one server (for verifying an `X-Matrix` request).
    pub async fn server_key(&self, server: &str, key_id: &str) -> Result<Option<Vec<u8>>> {
        let mut need = BTreeMap::new();
        need.insert(server.to_owned(), BTreeSet::from([key_id.to_owned()]));
        let map = self.keys_for(&need).await?;
        Ok(map.get(server).and_then(|s| s.get(key_id)).map(|k| k.as_bytes().to_vec()))
    }
}

/// Which keys verifying these PDUs needs: server -> key ids, from their `signatures`.
pub fn needed_keys<'a>(pdus: impl IntoIterator<Item = &'a CanonicalJsonObject>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for pdu in pdus {
        if let Some(CanonicalJsonValue::Object(sigs)) = pdu.get("signatures") {
            for (server, keys) in sigs {
                if let CanonicalJsonValue::Object(keys) = keys {
                    for id in keys.keys() {
                        out.entry(server.clone()).or_default().insert(id.clone());
                    }
                }
            }
        }
    }
    out
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}
