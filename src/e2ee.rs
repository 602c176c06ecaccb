//! End-to-end encryption keys of local users as the APIs hand them out: `/keys/query` and `/keys/claim` answers,
//! shared by the client API and the federation API (which asks with a requester of `""`).

use serde_json::{json, Map, Value};

use crate::error::Result;
use crate::store::e2ee;
use crate::store::Db;

/// Hides signatures made by third parties (user-signing signatures are private to whoever made them).
pub fn visible_to(mut key: Value, owner: &str, requester: &str) -> Value {
    if let Some(sigs) = key.get_mut("signatures").and_then(Value::as_object_mut) {
        sigs.retain(|signer, _| signer == owner || signer == requester);
    }
    key
}

/// Keys of local users as `/keys/query` returns them; `requester` sees its own user-signing key and its own
/// signatures on others' keys. (Federation answers may reuse this with a requester of `""`.)
pub fn query_local(c: Db<'_>, requester: &str, wanted: &[(String, Vec<String>)]) -> Result<Value> {
    let (mut device_keys, mut master, mut self_signing, mut user_signing) =
        (Map::new(), Map::new(), Map::new(), Map::new());
    for (user_id, devices) in wanted {
        let mut found = Map::new();
        for dk in e2ee::device_keys(c, user_id, devices)? {
            let mut keys = dk.keys;
            if let Some(name) = dk.display_name {
                keys["unsigned"] = json!({"device_display_name": name});
            }
            found.insert(dk.device_id, keys);
        }
        device_keys.insert(user_id.clone(), Value::Object(found));
        if let Some(k) = e2ee::cross_signing_key(c, user_id, "master")? {
            master.insert(user_id.clone(), visible_to(k, user_id, requester));
        }
        if let Some(k) = e2ee::cross_signing_key(c, user_id, "self_signing")? {
            self_signing.insert(user_id.clone(), visible_to(k, user_id, requester));
        }
        if user_id == requester {
            if let Some(k) = e2ee::cross_signing_key(c, user_id, "user_signing")? {
                user_signing.insert(user_id.clone(), k);
            }
        }
    }
    Ok(json!({
        "device_keys": device_keys,
        "master_keys": master,
        "self_signing_keys": self_signing,
        "user_signing_keys": user_signing,
    }))
}

/// Claims one key per `(user, device, algorithm)` of local users: `{user: {device: {key_id: key}}}`. Must run in
/// a write transaction (claimed one-time keys are deleted). Federation answers may reuse this.
pub fn claim_local(conn: Db<'_>, wanted: &[(String, String, String)]) -> Result<Value> {
    let mut out = json!({});
    for (user_id, device_id, algorithm) in wanted {
        if let Some((key_id, key)) = e2ee::claim_key(conn, user_id, device_id, algorithm)? {
            if !out[user_id].is_object() {
                out[user_id] = json!({});
            }
            out[user_id][device_id] = json!({ key_id: key });
        }
    }
    Ok(out)
}
