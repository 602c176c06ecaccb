//! Server signing keys: serving ours, fetching and caching others' (from the origin or trusted notaries), and
//! verifying PDUs and requests with them. Keys are fetched once per need and in batches per server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use base64::Engine;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::serde::Base64;
use ruma::signatures::{PublicKeyMap, PublicKeySet};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::client::FedClient;
use crate::room::signatures::DecodedKeys;
use crate::room::Identity;
use crate::store::accounts::now_ms;
use crate::store::server_keys::{self, OldKey};
use crate::store::{Db, Store};

/// How long our published key response is valid.
const OWN_VALIDITY_MS: i64 = 7 * 24 * 3600 * 1000;

/// Our `GET /_matrix/key/v2/server` response, signed.
pub fn own_key_response(identity: &Identity) -> Result<Value> {
    own_key_response_with_old(identity, &[])
}

/// Our key response including keys retired by `hearth keys rotate`.
pub fn own_key_response_with_old(identity: &Identity, old: &[OldKey]) -> Result<Value> {
    let old_keys: serde_json::Map<String, Value> =
        old.iter().map(|k| (k.key_id.clone(), json!({"key": k.public_key, "expired_ts": k.expired_ts}))).collect();
    let body = json!({
        "server_name": identity.server_name.as_str(),
        "verify_keys": { identity.key_id.clone(): {"key": identity.public_key_b64} },
        "old_verify_keys": old_keys,
        "valid_until_ts": now_ms() + OWN_VALIDITY_MS,
    });
    sign_value(identity, body)
}

/// Our retired keys, from the key table.
pub fn own_old_keys(conn: Db<'_>, server_name: &str) -> Result<Vec<OldKey>> {
    server_keys::expired_keys(conn, server_name)
}

/// Retires the current signing key (kept as an old verify key) and generates a new one, in one transaction. Takes
/// effect at the next start. Returns the new key id.
pub fn rotate_own_key(conn: Db<'_>, identity: &Identity) -> Result<String> {
    let new = Identity::new_signing_key();
    let server_name = identity.server_name.as_str();
    crate::store::identity::rotate(conn, server_name, &identity.key_id, &identity.public_key_b64, &new, now_ms())?;
    Ok(new.key_id())
}

/// Signs a JSON object as this server.
pub fn sign_value(identity: &Identity, v: Value) -> Result<Value> {
    let mut obj: CanonicalJsonObject =
        match CanonicalJsonValue::try_from(v).map_err(|e| Error::internal(e.to_string()))? {
            CanonicalJsonValue::Object(o) => o,
            _ => return Err(Error::internal("not an object")),
        };
    ruma::signatures::sign_json(identity.server_name.as_str(), &identity.keypair, &mut obj)
        .map_err(|e| Error::internal(e.to_string()))?;
    Ok(serde_json::to_value(obj)?)
}

pub struct KeyStore {
    store: Store,
    client: Arc<FedClient>,
    identity: Arc<Identity>,
    notaries: Vec<String>,
    /// Serialises fetches so concurrent needs for the same server make one request.
    fetch_lock: tokio::sync::Mutex<()>,
    /// Keys as curve points, for checking events' signatures without decoding a key per event.
    decoded: Arc<DecodedKeys>,
}

impl KeyStore {
    pub fn new(store: Store, client: Arc<FedClient>, identity: Arc<Identity>, notaries: Vec<String>) -> KeyStore {
        KeyStore {
            store,
            client,
            identity,
            notaries,
            fetch_lock: tokio::sync::Mutex::new(()),
            decoded: Arc::new(DecodedKeys::default()),
        }
    }

    /// The keys decoded so far (kept for the life of the server; see [`DecodedKeys`]).
    pub fn decoded(&self) -> Arc<DecodedKeys> {
        self.decoded.clone()
    }

    async fn cached(&self, servers: &BTreeSet<String>) -> Result<PublicKeyMap> {
        let servers: Vec<String> = servers.iter().cloned().collect();
        self.store
            .read(move |c| {
                let mut map = PublicKeyMap::new();
                for s in &servers {
                    let mut set = PublicKeySet::new();
                    for (id, key) in server_keys::keys_of(c, s)? {
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
        own.insert(
            self.identity.key_id.clone(),
            Base64::parse(&self.identity.public_key_b64).map_err(|e| Error::internal(e.to_string()))?,
        );
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
        let fetch_started = std::time::Instant::now();
        // Few servers: direct from each origin first, then one batched notary query for the rest. Many (a
        // resync's state from thousands of servers): the notaries first, in one request, as Synapse does, and
        // direct only for what they lacked: thousands of origin requests, many to dead servers, cost seconds.
        let mut missing = missing;
        if missing.len() > MANY_SERVERS && !self.notaries.is_empty() {
            self.fetch_from_notaries(&missing).await;
            let got = self.cached(&missing.iter().cloned().collect()).await?;
            missing.retain(|s| {
                needed.get(s).is_none_or(|ids| ids.iter().any(|id| !got.get(s).is_some_and(|set| set.contains_key(id))))
            });
            map.extend(got);
        }
        use futures::StreamExt;
        let direct: Vec<(String, bool)> = futures::stream::iter(missing.iter().cloned())
            .map(|server| async move {
                let ok = match self.client.get_unsigned(&server, "/_matrix/key/v2/server").await {
                    Ok(v) => self.store_response(&server, &v).await.is_ok(),
                    Err(e) => {
                        tracing::debug!(%server, error = %e, "direct key fetch failed");
                        false
                    }
                };
                (server, ok)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let still: Vec<String> = direct.into_iter().filter(|(_, ok)| !ok).map(|(s, _)| s).collect();
        if !still.is_empty() {
            self.fetch_from_notaries(&still).await;
        }
        let refreshed = self.cached(&missing.iter().cloned().collect()).await?;
        tracing::debug!(
            servers = missing.len(),
            found = refreshed.len(),
            ms = fetch_started.elapsed().as_millis() as u64,
            "fetched signing keys"
        );
        map.extend(refreshed);
        Ok(map)
    }

    /// Asks the trusted notaries for many servers' keys in one request each. The answers' signatures (two per
    /// server: the notary's and the server's own) are checked on a blocking thread and their keys stored in one
    /// write: a big room's resync asks for thousands of servers at once, and a write and two checks per server on
    /// an async thread held its start back.
    async fn fetch_from_notaries(&self, servers: &[String]) {
        for notary in &self.notaries {
            let wanted: serde_json::Map<String, Value> = servers.iter().map(|s| (s.clone(), json!({}))).collect();
            let body = json!({"server_keys": wanted});
            match self.client.request(reqwest::Method::POST, notary, "/_matrix/key/v2/query", Some(&body)).await {
                Ok(v) => {
                    let notary_key = self.notary_keys(notary).await;
                    let answers = answers_for(v, servers);
                    let name = notary.clone();
                    let checking =
                        tokio::task::spawn_blocking(move || check_relayed(&name, notary_key.as_ref(), answers));
                    match checking.await {
                        Ok(checked) => {
                            if let Err(e) = self.store.write(move |w| store_key_rows(w.db(), &checked)).await {
                                tracing::info!(%notary, error = %e, "storing notary keys failed");
                            }
                        }
                        Err(e) => tracing::info!(%notary, error = %e, "checking notary key responses failed"),
                    }
                    return;
                }
                Err(e) => tracing::info!(%notary, error = %e, "notary key query failed"),
            }
        }
    }

    /// The notary's own keys (direct fetch), to check its countersignature.
    async fn notary_keys(&self, notary: &str) -> Option<PublicKeyMap> {
        let mut need = BTreeSet::new();
        need.insert(notary.to_owned());
        if let Ok(m) = self.cached(&need).await {
            if m.contains_key(notary) {
                return Some(m);
            }
        }
        let v = self.client.get_unsigned(notary, "/_matrix/key/v2/server").await.ok()?;
        self.store_response(notary, &v).await.ok()?;
        self.cached(&need).await.ok()
    }

    /// Checks a key response's self-signature and caches its keys.
    pub async fn store_response(&self, server: &str, v: &Value) -> Result<()> {
        let rows = vec![(server.to_owned(), checked_key_rows(server, v)?)];
        self.store.write(move |w| store_key_rows(w.db(), &rows)).await
    }

    /// Public keys of one server (for verifying an `X-Matrix` request).
    pub async fn server_key(&self, server: &str, key_id: &str) -> Result<Option<Vec<u8>>> {
        let mut need = BTreeMap::new();
        need.insert(server.to_owned(), BTreeSet::from([key_id.to_owned()]));
        let map = self.keys_for(&need).await?;
        Ok(map.get(server).and_then(|s| s.get(key_id)).map(|k| k.as_bytes().to_vec()))
    }
}

/// A key of a server as stored: (key id, public key, valid until or expired at, whether it is an old key).
type KeyRow = (String, String, i64, bool);

/// The keys of `server`'s key response `v`, once its self-signature is checked.
fn checked_key_rows(server: &str, v: &Value) -> Result<Vec<KeyRow>> {
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
                let until =
                    if expired { k.get("expired_ts").and_then(Value::as_i64).unwrap_or(0) } else { valid_until };
                rows.push((id.clone(), key.to_owned(), until, expired));
            }
        }
    }
    let mut map = PublicKeyMap::new();
    map.insert(server.to_owned(), set);
    let obj: CanonicalJsonObject = serde_json::from_value(v.clone()).map_err(|e| Error::bad_json(e.to_string()))?;
    ruma::signatures::verify_json(&map, &only_signatures_of(obj, server))
        .map_err(|e| Error::forbidden(format!("bad self-signature: {e}")))?;
    Ok(rows)
}

/// [`checked_key_rows`] of a response relayed by `notary`, which must have countersigned it (when its keys are
/// known: `notary_key`).
fn relayed_key_rows(notary: &str, notary_key: Option<&PublicKeyMap>, server: &str, r: Value) -> Result<Vec<KeyRow>> {
    if let Some(nk) = notary_key {
        let obj: CanonicalJsonObject = serde_json::from_value(r.clone()).map_err(|e| Error::bad_json(e.to_string()))?;
        ruma::signatures::verify_json(nk, &only_signatures_of(obj, notary))
            .map_err(|_| Error::forbidden("no valid notary signature"))?;
    }
    checked_key_rows(server, &r)
}

/// The key responses of a notary's answer `v` for the servers that were asked for, with their server names.
fn answers_for(v: Value, asked: &[String]) -> Vec<(String, Value)> {
    let asked: std::collections::HashSet<&str> = asked.iter().map(String::as_str).collect();
    let list = match v {
        Value::Object(mut o) => o.remove("server_keys"),
        _ => None,
    };
    let Some(Value::Array(list)) = list else { return Vec::new() };
    list.into_iter()
        .filter_map(|r| {
            let server = r.get("server_name").and_then(Value::as_str)?.to_owned();
            asked.contains(server.as_str()).then_some((server, r))
        })
        .collect()
}

/// The keys of each relayed response that [`relayed_key_rows`] accepts; the others are logged and left out.
fn check_relayed(
    notary: &str,
    notary_key: Option<&PublicKeyMap>,
    answers: Vec<(String, Value)>,
) -> Vec<(String, Vec<KeyRow>)> {
    answers
        .into_iter()
        .filter_map(|(server, r)| match relayed_key_rows(notary, notary_key, &server, r) {
            Ok(rows) => Some((server, rows)),
            Err(e) => {
                tracing::info!(%notary, %server, error = %e, "rejected notary key response");
                None
            }
        })
        .collect()
}

/// Stores checked keys, per server.
fn store_key_rows(conn: Db<'_>, servers: &[(String, Vec<KeyRow>)]) -> Result<()> {
    for (server, rows) in servers {
        for (id, key, until, expired) in rows {
            server_keys::store_key(conn, server, id, key, *until, expired.then_some(*until))?;
        }
    }
    Ok(())
}

/// Which keys verifying these PDUs needs: server -> key ids, from their `signatures`.
/// More missing servers than this and the notaries are asked first (see [`KeyStore::keys_for`]).
const MANY_SERVERS: usize = 8;

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

/// The object with only `server`'s signatures (a key response may carry a notary's too).
fn only_signatures_of(mut obj: CanonicalJsonObject, server: &str) -> CanonicalJsonObject {
    if let Some(CanonicalJsonValue::Object(sigs)) = obj.get_mut("signatures") {
        sigs.retain(|k, _| k == server);
    }
    obj
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}
