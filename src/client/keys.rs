//! End-to-end encryption: device and one-time keys, cross-signing keys and signatures, device list changes, and
//! send-to-device messaging.
//!
//! Local users are answered from the store. With federation on, remote users' keys are queried and claimed from
//! their servers (unreachable ones are reported in `failures`), and to-device messages and our users' key changes
//! go out as EDUs through the outbox; with federation off, remote users are reported as failures and to-device
//! messages for them are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::client::account::require_password;
use crate::client::sync::parse_token;
use crate::e2ee::{claim_local, query_local, visible_to};
use crate::error::{Error, Result};
use crate::http::{random_string, AppState, Auth, Json, Query};
use crate::store::{e2ee, outbox, txn_ids, Db};

const CROSS_SIGNING_TYPES: [&str; 3] = ["master", "self_signing", "user_signing"];

fn server_of(user_id: &str) -> &str {
    user_id.split_once(':').map(|x| x.1).unwrap_or_default()
}

fn failure(message: impl std::fmt::Display) -> Value {
    json!({"status": 503, "message": message.to_string()})
}

/// Sends one federation key request (`/user/keys/query` or `/user/keys/claim`) to `server`.
async fn ask_remote(
    s: &AppState,
    server: String,
    path: &'static str,
    body: Value,
    timeout: Duration,
) -> (String, std::result::Result<Value, Value>) {
    let Some(fed) = s.federation.as_ref() else {
        return (server, Err(failure("federation is disabled on this server")));
    };
    let r = fed.client.request_timeout(reqwest::Method::POST, &server, path, Some(&body), timeout).await;
    (server, r.map_err(failure))
}

/// Copies `from[user]` into `into[user]` for the users of `server` only (a server answers for its own users).
fn merge_for_server(into: &mut Value, from: &Value, server: &str) {
    for (user, v) in from.as_object().into_iter().flatten() {
        if server_of(user) == server {
            into[user] = v.clone();
        }
    }
}

/// The client's `timeout` for remote servers (10 s by default, at most 30 s).
fn remote_timeout(ms: Option<u64>) -> Duration {
    Duration::from_millis(ms.unwrap_or(10_000).clamp(1_000, 30_000))
}

/// Tells the servers sharing a room with `user_id` that its keys changed: one device's (`device_id`, at device
/// list position `stream_id`) or, with `device_id` None, the cross-signing keys. Their users then refetch.
pub(crate) fn announce_keys(
    conn: Db<'_>,
    our_server: &str,
    user_id: &str,
    device_id: Option<&str>,
    stream_id: i64,
) -> Result<()> {
    let servers = e2ee::servers_sharing_rooms(conn, user_id, our_server)?;
    if servers.is_empty() {
        return Ok(());
    }
    let edu = match device_id {
        Some(d) => e2ee::device_update_edu(conn, user_id, d, stream_id)?,
        None => {
            let mut content = json!({"user_id": user_id});
            for (t, field) in [("master", "master_key"), ("self_signing", "self_signing_key")] {
                if let Some(k) = e2ee::cross_signing_key(conn, user_id, t)? {
                    content[field] = visible_to(k, user_id, user_id);
                }
            }
            json!({"edu_type": "m.signing_key_update", "content": content})
        }
    };
    let edu = edu.to_string();
    for server in servers {
        outbox::enqueue_edu(conn, &server, &edu)?;
    }
    Ok(())
}

/// `algorithm:id` -> key maps of /keys/upload.
fn check_key_map(keys: &Map<String, Value>, what: &str) -> Result<()> {
    for (id, key) in keys {
        if !id.contains(':') || !(key.is_string() || key.is_object()) {
            return Err(Error::bad_json(format!("{what}: `{id}` is not an `algorithm:id` key")));
        }
    }
    Ok(())
}

/// The object without `signatures` and `unsigned`: what a signature covers, and what must not change when only
/// signatures are added.
fn signed_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("signatures");
        o.remove("unsigned");
    }
    v
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Checks `obj.signatures[signer][key_id]` against the ed25519 `public_key` over the canonical JSON of `obj`.
fn verify(obj: &Value, signer: &str, key_id: &str, public_key: &str) -> bool {
    let Some(sig) = obj["signatures"][signer][key_id].as_str().and_then(b64) else { return false };
    let Some(pk) = b64(public_key) else { return false };
    let Ok(canonical) = ruma::canonical_json::CanonicalJsonValue::try_from(signed_part(obj)) else { return false };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
        .verify(canonical.to_string().as_bytes(), &sig)
        .is_ok()
}

/// Adds `signatures[signer][key_id]` from `from` to `to`.
fn add_signature(to: &mut Value, from: &Value, signer: &str, key_id: &str) {
    let sig = from["signatures"][signer][key_id].clone();
    if !to["signatures"].is_object() {
        to["signatures"] = json!({});
    }
    if !to["signatures"][signer].is_object() {
        to["signatures"][signer] = json!({});
    }
    to["signatures"][signer][key_id] = sig;
}

/// The public key of a cross-signing key after checking its shape: owned by `user_id`, with `usage`, and exactly
/// one `ed25519:<public key>` entry.
fn cross_signing_public(key: &Value, user_id: &str, usage: &str) -> Result<String> {
    if key["user_id"] != user_id {
        return Err(Error::bad_json(format!("{usage} key: user_id must be {user_id}")));
    }
    if !key["usage"].as_array().is_some_and(|u| u.iter().any(|x| x == usage)) {
        return Err(Error::bad_json(format!("{usage} key: usage must include `{usage}`")));
    }
    let keys = key["keys"]
        .as_object()
        .filter(|k| k.len() == 1)
        .ok_or_else(|| Error::bad_json(format!("{usage} key: `keys` must hold exactly one key")))?;
    let (id, value) = keys.iter().next().expect("one key");
    match (id.strip_prefix("ed25519:"), value.as_str()) {
        (Some(public), Some(v)) if public == v && !public.is_empty() => Ok(public.to_owned()),
        _ => Err(Error::bad_json(format!("{usage} key: the key must be `ed25519:<public key>`: <public key>"))),
    }
}

// ------------------------------------------------------------------------------------------------------------
// /keys/upload, /keys/query, /keys/claim, /keys/changes

#[derive(Deserialize)]
pub struct UploadKeys {
    device_keys: Option<Value>,
    one_time_keys: Option<Map<String, Value>>,
    fallback_keys: Option<Map<String, Value>>,
}

pub async fn upload(State(s): State<AppState>, auth: Auth, Json(body): Json<UploadKeys>) -> Result<impl IntoResponse> {
    if let Some(dk) = &body.device_keys {
        if !dk.is_object() || !dk["keys"].is_object() {
            return Err(Error::bad_json("device_keys must be an object with `keys`"));
        }
        if dk["user_id"] != auth.user_id.as_str() || dk["device_id"] != auth.device_id {
            return Err(Error::invalid_param("device_keys must be for the user and device of the access token"));
        }
    }
    let otks = body.one_time_keys.unwrap_or_default();
    let fallbacks = body.fallback_keys.unwrap_or_default();
    check_key_map(&otks, "one_time_keys")?;
    check_key_map(&fallbacks, "fallback_keys")?;
    let (u, d) = (auth.user_id.clone(), auth.device_id.clone());
    let (federating, our_server) = (s.federation.is_some(), s.identity.server_name.to_string());
    let mut counts = s
        .store
        .write(move |w| {
            if let Some(dk) = body.device_keys {
                // `unsigned` is ours to fill in when answering queries.
                let mut dk = dk;
                dk.as_object_mut().map(|o| o.remove("unsigned"));
                if e2ee::set_device_keys(w.db(), u.as_str(), &d, &dk)? {
                    let pos = e2ee::device_list_changed(w, u.as_str())?;
                    if federating {
                        announce_keys(w.db(), &our_server, u.as_str(), Some(&d), pos)?;
                    }
                }
            }
            if let Some(conflict) = e2ee::add_one_time_keys(w.db(), u.as_str(), &d, &otks)? {
                return Err(Error::invalid_param(format!(
                    "one-time key {conflict} already exists with different content"
                )));
            }
            e2ee::set_fallback_keys(w.db(), u.as_str(), &d, &fallbacks)?;
            e2ee::one_time_key_counts(w.db(), u.as_str(), &d)
        })
        .await?;
    counts.entry("signed_curve25519").or_insert(json!(0));
    Ok(axum::Json(json!({"one_time_key_counts": counts})))
}

#[derive(Deserialize)]
pub struct QueryKeys {
    device_keys: Map<String, Value>,
    timeout: Option<u64>,
}

pub async fn query(State(s): State<AppState>, auth: Auth, Json(body): Json<QueryKeys>) -> Result<impl IntoResponse> {
    let mut wanted: Vec<(String, Vec<String>)> = Vec::new();
    let mut remote: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (user_id, devices) in body.device_keys {
        crate::util::parse_user_id(&user_id)?;
        let devices: Vec<String> = match devices {
            Value::Null => Vec::new(),
            Value::Array(a) if a.iter().all(Value::is_string) => {
                a.iter().filter_map(Value::as_str).map(str::to_owned).collect()
            }
            _ => return Err(Error::bad_json("device_keys values must be lists of device ids")),
        };
        if s.identity.is_local_user(&user_id) {
            wanted.push((user_id, devices));
        } else {
            remote.entry(server_of(&user_id).to_owned()).or_default().insert(user_id, json!(devices));
        }
    }
    let requester = auth.user_id.clone();
    let mut out = s.store.read(move |c| query_local(c, requester.as_str(), &wanted)).await?;

    // Remote users: from the device list cache, or their servers (in parallel, each bounded by the timeout).
    let mut failures = Map::new();
    if s.federation.is_none() {
        for server in remote.into_keys() {
            failures.insert(server, failure("federation is disabled on this server"));
        }
    } else if !remote.is_empty() {
        let answer = crate::federation::devices::query_keys(&s.fed, remote, remote_timeout(body.timeout)).await?;
        for (field, got) in [
            ("device_keys", answer.device_keys),
            ("master_keys", answer.master_keys),
            ("self_signing_keys", answer.self_signing_keys),
        ] {
            for (user, v) in got {
                out[field][user] = v;
            }
        }
        failures = answer.failures;
    }
    out["failures"] = Value::Object(failures);
    Ok(axum::Json(out))
}

#[derive(Deserialize)]
pub struct ClaimKeys {
    one_time_keys: Map<String, Value>,
    timeout: Option<u64>,
}

/// Any user may claim keys (the token only has to be valid).
pub async fn claim(State(s): State<AppState>, _auth: Auth, Json(body): Json<ClaimKeys>) -> Result<impl IntoResponse> {
    let mut wanted: Vec<(String, String, String)> = Vec::new();
    let mut remote: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (user_id, devices) in body.one_time_keys {
        crate::util::parse_user_id(&user_id)?;
        let devices = devices.as_object().ok_or_else(|| Error::bad_json("one_time_keys values must be objects"))?;
        if devices.values().any(|a| !a.is_string()) {
            return Err(Error::bad_json("algorithms must be strings"));
        }
        if !s.identity.is_local_user(&user_id) {
            remote.entry(server_of(&user_id).to_owned()).or_default().insert(user_id, Value::Object(devices.clone()));
            continue;
        }
        for (device_id, algorithm) in devices {
            wanted.push((user_id.clone(), device_id.clone(), algorithm.as_str().unwrap_or_default().to_owned()));
        }
    }
    // A write: a claimed one-time key is deleted in the same transaction that hands it out.
    let mut claimed = s.store.write(move |w| claim_local(w.db(), &wanted)).await?;

    let timeout = remote_timeout(body.timeout);
    let asks = remote.into_iter().map(|(server, users)| {
        ask_remote(&s, server, "/_matrix/federation/v1/user/keys/claim", json!({"one_time_keys": users}), timeout)
    });
    let mut failures = Map::new();
    for (server, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(a) => merge_for_server(&mut claimed, &a["one_time_keys"], &server),
            Err(f) => {
                failures.insert(server, f);
            }
        }
    }
    Ok(axum::Json(json!({"one_time_keys": claimed, "failures": failures})))
}

#[derive(Deserialize)]
pub struct ChangesQuery {
    from: Option<String>,
    to: Option<String>,
}

pub async fn changes(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<ChangesQuery>,
) -> Result<impl IntoResponse> {
    let from = parse_token(q.from.as_deref().ok_or_else(|| Error::missing_param("`from` is required"))?)?.stream;
    let to = match q.to.as_deref() {
        Some(t) => parse_token(t)?.stream,
        None => s.store.current_stream(),
    };
    let user_id = auth.user_id.clone();
    let (changed, left) = s.store.read(move |c| e2ee::device_list_changes(c, user_id.as_str(), from, to, true)).await?;
    Ok(axum::Json(json!({"changed": changed, "left": left})))
}

// ------------------------------------------------------------------------------------------------------------
// Cross-signing

#[derive(Deserialize)]
pub struct SigningKeys {
    master_key: Option<Value>,
    self_signing_key: Option<Value>,
    user_signing_key: Option<Value>,
    auth: Option<Value>,
}

pub async fn upload_signing_keys(
    State(s): State<AppState>,
    auth: Auth,
    Json(body): Json<SigningKeys>,
) -> Result<impl IntoResponse> {
    let new: Vec<(&'static str, Value)> =
        [("master", body.master_key), ("self_signing", body.self_signing_key), ("user_signing", body.user_signing_key)]
            .into_iter()
            .filter_map(|(t, k)| k.map(|k| (t, k)))
            .collect();
    let mut publics = Vec::new();
    for (t, k) in &new {
        publics.push(cross_signing_public(k, auth.user_id.as_str(), t)?);
    }

    let uid = auth.user_id.clone();
    let (existing, devices) = s
        .store
        .read(move |c| {
            let mut existing = Vec::new();
            for t in CROSS_SIGNING_TYPES {
                existing.push(e2ee::cross_signing_key(c, uid.as_str(), t)?);
            }
            Ok((existing, e2ee::device_ids(c, uid.as_str())?))
        })
        .await?;
    let stored = |t: &str| existing[CROSS_SIGNING_TYPES.iter().position(|x| *x == t).expect("known type")].clone();
    if publics.iter().any(|p| devices.contains(p)) {
        return Err(Error::forbidden("a cross-signing public key may not equal one of your device ids"));
    }

    // Uploading the first keys, or re-sending the same ones (a retry), needs no password; replacing keys does.
    let same = |t: &str, k: &Value| stored(t).is_some_and(|e| e["keys"] == k["keys"] && e["usage"] == k["usage"]);
    let changed: Vec<(&'static str, Value)> = new.into_iter().filter(|(t, k)| !same(t, k)).collect();
    if changed.is_empty() {
        return Ok(axum::Json(json!({})));
    }
    if stored("master").is_some() {
        require_password(&s, &auth, body.auth.as_ref()).await?;
    }

    // The self-signing and user-signing keys must carry a signature of the (new or current) master key.
    let master = changed.iter().find(|(t, _)| *t == "master").map(|(_, k)| k.clone()).or_else(|| stored("master"));
    let master = master.ok_or_else(|| Error::missing_param("no master key uploaded"))?;
    let master_public = cross_signing_public(&master, auth.user_id.as_str(), "master")?;
    for (t, k) in &changed {
        if *t != "master" && !verify(k, auth.user_id.as_str(), &format!("ed25519:{master_public}"), &master_public) {
            return Err(Error::invalid_signature(format!("the {t} key is not signed by the master key")));
        }
    }

    let uid = auth.user_id.clone();
    let (federating, our_server) = (s.federation.is_some(), s.identity.server_name.to_string());
    s.store
        .write(move |w| {
            for (t, k) in &changed {
                e2ee::set_cross_signing_key(w.db(), uid.as_str(), t, k)?;
            }
            let pos = e2ee::device_list_changed(w, uid.as_str())?;
            // The user-signing key is private: only a change of the others is news to other servers.
            if federating && changed.iter().any(|(t, _)| *t != "user_signing") {
                announce_keys(w.db(), &our_server, uid.as_str(), None, pos)?;
            }
            Ok(())
        })
        .await?;
    Ok(axum::Json(json!({})))
}

/// Which stored key a signature upload changed.
enum SignedKey {
    OwnDevice(String),
    OwnMaster,
    OthersMaster,
}

/// Adds the signatures in one signed object to the stored key it signs. Matrix errors are per-key failures.
fn sign_one(c: Db<'_>, signer: &str, target: &str, key_id: &str, signed: &Value) -> Result<SignedKey> {
    let stored_public = |user: &str, t: &str| -> Result<Option<(Value, String)>> {
        Ok(match e2ee::cross_signing_key(c, user, t)? {
            Some(k) => cross_signing_public(&k, user, t).ok().map(|p| (k, p)),
            None => None,
        })
    };
    let mismatch = || Error::invalid_signature("the signed object does not match the stored key");
    if target == signer {
        if let Some(dk) = e2ee::device_keys(c, signer, &[key_id.to_owned()])?.pop() {
            // One of our devices, signed by our self-signing key.
            let (_, ssk) = stored_public(signer, "self_signing")?
                .ok_or_else(|| Error::invalid_signature("no self-signing key uploaded"))?;
            if signed_part(&dk.keys) != signed_part(signed) {
                return Err(mismatch());
            }
            let sig_id = format!("ed25519:{ssk}");
            if !verify(signed, signer, &sig_id, &ssk) {
                return Err(Error::invalid_signature("invalid self-signing signature"));
            }
            let mut keys = dk.keys;
            add_signature(&mut keys, signed, signer, &sig_id);
            e2ee::set_device_keys(c, signer, key_id, &keys)?;
            return Ok(SignedKey::OwnDevice(key_id.to_owned()));
        }
        let (mut master, master_public) = stored_public(signer, "master")?
            .filter(|(_, p)| p == key_id)
            .ok_or_else(|| Error::not_found(format!("unknown key {key_id}")))?;
        if signed_part(&master) != signed_part(signed) {
            return Err(mismatch());
        }
        // Our master key, signed by one of our devices.
        let mut added = 0;
        let sigs = signed["signatures"][signer].as_object().cloned().unwrap_or_default();
        for sig_id in sigs.keys() {
            let Some(device) = sig_id.strip_prefix("ed25519:").filter(|d| *d != master_public) else { continue };
            let Some(dk) = e2ee::device_keys(c, signer, &[device.to_owned()])?.pop() else { continue };
            let Some(device_key) = dk.keys["keys"][sig_id].as_str() else { continue };
            if !verify(signed, signer, sig_id, device_key) {
                return Err(Error::invalid_signature(format!("invalid signature by device {device}")));
            }
            add_signature(&mut master, signed, signer, sig_id);
            added += 1;
        }
        if added == 0 {
            return Err(Error::invalid_signature("no signature by one of your devices"));
        }
        e2ee::set_cross_signing_key(c, signer, "master", &master)?;
        return Ok(SignedKey::OwnMaster);
    }
    // Another user's master key, signed by our user-signing key.
    let (mut master, _) = stored_public(target, "master")?
        .filter(|(_, p)| p == key_id)
        .ok_or_else(|| Error::not_found(format!("unknown key {key_id} of {target}")))?;
    let (_, usk) = stored_public(signer, "user_signing")?
        .ok_or_else(|| Error::invalid_signature("no user-signing key uploaded"))?;
    if signed_part(&master) != signed_part(signed) {
        return Err(mismatch());
    }
    let sig_id = format!("ed25519:{usk}");
    if !verify(signed, signer, &sig_id, &usk) {
        return Err(Error::invalid_signature("invalid user-signing signature"));
    }
    add_signature(&mut master, signed, signer, &sig_id);
    e2ee::set_cross_signing_key(c, target, "master", &master)?;
    Ok(SignedKey::OthersMaster)
}

pub async fn upload_signatures(
    State(s): State<AppState>,
    auth: Auth,
    Json(body): Json<Map<String, Value>>,
) -> Result<impl IntoResponse> {
    let well_formed = |keys: &Value| keys.as_object().is_some_and(|k| k.values().all(Value::is_object));
    if let Some((target, _)) = body.iter().find(|(_, keys)| !well_formed(keys)) {
        return Err(Error::bad_json(format!("signatures for {target} must be an object of key id to signed key")));
    }
    let signer = auth.user_id.clone();
    let (federating, our_server) = (s.federation.is_some(), s.identity.server_name.to_string());
    let failures = s
        .store
        .write(move |w| {
            let mut failures = Map::new();
            let mut changed = BTreeSet::new();
            let mut announce: BTreeSet<Option<String>> = BTreeSet::new();
            for (target, keys) in &body {
                let Some(keys) = keys.as_object() else { continue };
                for (key_id, signed) in keys {
                    match sign_one(w.db(), signer.as_str(), target, key_id, signed) {
                        Ok(what) => {
                            changed.insert(target.clone());
                            match what {
                                SignedKey::OwnDevice(d) => announce.insert(Some(d)),
                                SignedKey::OwnMaster => announce.insert(None),
                                // A user-signing signature is private to the signer: nothing for other servers.
                                SignedKey::OthersMaster => false,
                            };
                        }
                        Err(Error::Matrix(m)) => {
                            let entry = failures.entry(target.clone()).or_insert_with(|| json!({}));
                            entry[key_id] = json!({"errcode": m.errcode(), "error": m.message});
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            // Whoever shares a room with the signed users refetches their keys and sees the new signatures.
            let mut own_pos = None;
            for u in changed {
                let pos = e2ee::device_list_changed(w, &u)?;
                if u == signer {
                    own_pos = Some(pos);
                }
            }
            if let (true, Some(pos)) = (federating, own_pos) {
                for device in &announce {
                    announce_keys(w.db(), &our_server, signer.as_str(), device.as_deref(), pos)?;
                }
            }
            Ok(failures)
        })
        .await?;
    Ok(axum::Json(json!({"failures": failures})))
}

// ------------------------------------------------------------------------------------------------------------
// Send-to-device

#[derive(Deserialize)]
pub struct ToDeviceBody {
    messages: Map<String, Value>,
}

pub async fn send_to_device(
    State(s): State<AppState>,
    auth: Auth,
    Path((event_type, txn_id)): Path<(String, String)>,
    Json(body): Json<ToDeviceBody>,
) -> Result<impl IntoResponse> {
    let mut messages: Vec<(String, String, Value)> = Vec::new();
    // Remote users' messages, per server: one `m.direct_to_device` EDU each.
    let mut remote: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (user_id, devices) in body.messages {
        // Every recipient is checked before anything is queued: one bad id refuses the whole request.
        crate::util::parse_user_id(&user_id)?;
        let devices = devices.as_object().ok_or_else(|| Error::bad_json("messages must map users to device maps"))?;
        if devices.values().any(|c| !c.is_object()) {
            return Err(Error::bad_json("to-device message content must be an object"));
        }
        if !s.identity.is_local_user(&user_id) {
            remote.entry(server_of(&user_id).to_owned()).or_default().insert(user_id, Value::Object(devices.clone()));
            continue;
        }
        for (device_id, content) in devices {
            messages.push((user_id.clone(), device_id.clone(), content.clone()));
        }
    }
    if s.federation.is_none() && !remote.is_empty() {
        tracing::debug!(servers = remote.len(), "dropping to-device messages for remote users (federation is off)");
        remote.clear();
    }
    s.store
        .write(move |w| {
            if txn_ids::to_device_txn_seen(w.db(), auth.user_id.as_str(), &auth.device_id, &txn_id)? {
                return Ok(()); // a retry: already delivered once
            }
            for (server, users) in &remote {
                let edu = json!({"edu_type": "m.direct_to_device", "content": {
                    "sender": auth.user_id, "type": event_type, "message_id": random_string(16), "messages": users,
                }});
                outbox::enqueue_edu(w.db(), server, &edu.to_string())?;
            }
            for (user_id, device_id, content) in &messages {
                let all = e2ee::device_ids(w.db(), user_id)?;
                // `*` is every device of the user; unknown devices would never fetch the message, so skip them.
                let targets: Vec<&String> = all.iter().filter(|d| device_id == "*" || *d == device_id).collect();
                for d in targets {
                    e2ee::queue_to_device(w, user_id, d, auth.user_id.as_str(), &event_type, content)?;
                }
            }
            txn_ids::record_to_device_txn(w.db(), auth.user_id.as_str(), &auth.device_id, &txn_id)
        })
        .await?;
    Ok(axum::Json(json!({})))
}
