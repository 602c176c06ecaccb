//! What an application service's transaction carries beside timeline events, for the same stream window as its
//! events (so it is written into the same durable transaction, and a restart loses none of it):
//!
//! - MSC2409 (`receive_ephemeral`): `ephemeral` — receipts (not private ones) of rooms the service is interested
//!   in, presence of its users and of users sharing a room with them, and typing (kept in memory, so it rides along
//!   with the next transaction made after it changes); `to_device` — messages queued for its users' devices, each
//!   with `to_user_id` / `to_device_id` (as Synapse). Both also under Synapse's unstable names.
//! - MSC3202 (`org.matrix.msc3202: true`): `device_lists` (`changed`: users sharing a room with its users whose
//!   devices changed; `left`: users who left a room of its users and share none with them any more), and
//!   `device_one_time_keys_count` / `device_unused_fallback_key_types` for the devices of its users the
//!   transaction mentions (and of its sender), also under the `org.matrix.msc3202.` names Synapse uses.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use crate::appservice::AppService;
use crate::error::Result;
use crate::store::ids::StreamPos;
use crate::store::{appservice as store, e2ee, presence, rooms, Db};

/// Whether the service hears of what happens in a room: one of its users is joined, or the room or one of its
/// aliases is in its namespaces (the same test as for timeline events).
pub fn interested_in_room(
    c: Db<'_>,
    svc: &AppService,
    room_nid: crate::store::ids::RoomNid,
    room_id: &str,
    ours: &str,
) -> Result<bool> {
    Ok(svc.owns_room(room_id)
        || (!svc.aliases.is_empty() && rooms::aliases_of(c, room_id)?.iter().any(|a| svc.owns_alias(a)))
        || crate::store::pushers::local_members(c, room_nid, ours)?.iter().any(|u| svc.owns_user(u)))
}

/// Whether the service hears of a user's presence and device changes: one of its users, or sharing a room with one.
fn interested_in_user(c: Db<'_>, svc: &AppService, user_id: &str) -> Result<bool> {
    Ok(svc.owns_user(user_id) || store::joined_co_members(c, user_id)?.iter().any(|u| svc.owns_user(u)))
}

/// Adds the MSC2409 and MSC3202 keys for the window (`from`, `to`] to `body` (whose `events` are already there).
/// `typing` is what changed in memory since the last transaction: (room id, who types now). Returns whether the
/// body is worth a transaction: events, ephemeral events, to-device messages or device list changes (key counts
/// alone are not; they ride along with the next transaction).
pub fn add(
    c: Db<'_>,
    svc: &AppService,
    from: StreamPos,
    to: StreamPos,
    typing: &[(String, Vec<String>)],
    ours: &str,
    body: &mut Map<String, Value>,
) -> Result<bool> {
    let mut worth = body.get("events").and_then(Value::as_array).is_some_and(|e| !e.is_empty());
    let mut mentioned: BTreeSet<String> = BTreeSet::new();
    for ev in body.get("events").and_then(Value::as_array).into_iter().flatten() {
        for key in ["sender", "state_key"] {
            if let Some(u) = ev.get(key).and_then(Value::as_str).filter(|u| svc.owns_user(u)) {
                mentioned.insert(u.to_owned());
            }
        }
    }
    if svc.receive_ephemeral {
        let ephemeral = ephemeral(c, svc, from, to, typing, ours)?;
        let to_device = to_device(c, svc, from, to, &mut mentioned)?;
        worth |= !ephemeral.is_empty() || !to_device.is_empty();
        body.insert("ephemeral".into(), json!(ephemeral));
        body.insert("de.sorunome.msc2409.ephemeral".into(), json!(ephemeral));
        if !to_device.is_empty() {
            body.insert("to_device".into(), json!(to_device));
            body.insert("de.sorunome.msc2409.to_device".into(), json!(to_device));
        }
    }
    if svc.msc3202 {
        let (changed, left) = device_lists(c, svc, from, to, body)?;
        if !changed.is_empty() || !left.is_empty() {
            worth = true;
            let lists = json!({"changed": changed, "left": left});
            body.insert("device_lists".into(), lists.clone());
            body.insert("org.matrix.msc3202.device_lists".into(), lists);
        }
        if !worth {
            return Ok(false);
        }
        mentioned.insert(svc.sender.clone());
        let (counts, fallback) = key_counts(c, &mentioned)?;
        if !counts.is_empty() {
            body.insert("device_one_time_keys_count".into(), json!(counts));
            body.insert("org.matrix.msc3202.device_one_time_keys_count".into(), json!(counts));
            // The name of MSC3202's first drafts, still read by some bridges (Synapse sends both).
            body.insert("org.matrix.msc3202.device_one_time_key_counts".into(), json!(counts));
        }
        if !fallback.is_empty() {
            body.insert("device_unused_fallback_key_types".into(), json!(fallback));
            body.insert("org.matrix.msc3202.device_unused_fallback_key_types".into(), json!(fallback));
        }
    }
    Ok(worth)
}

fn ephemeral(
    c: Db<'_>,
    svc: &AppService,
    from: StreamPos,
    to: StreamPos,
    typing: &[(String, Vec<String>)],
    ours: &str,
) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (room_id, users) in typing {
        let Some(room) = rooms::room_by_id(c, room_id)? else { continue };
        if interested_in_room(c, svc, room.room_nid, room_id, ours)? {
            out.push(json!({"type": "m.typing", "room_id": room_id, "content": {"user_ids": users}}));
        }
    }
    for room_nid in store::receipt_rooms_in(c, from, to)? {
        let Some(room) = rooms::room_by_nid(c, room_nid)? else { continue };
        if !interested_in_room(c, svc, room_nid, &room.room_id, ours)? {
            continue;
        }
        // No viewer: private receipts stay out.
        if let Some(mut ev) = crate::client::sync::receipts_since(c, room_nid, from.0, to.0, "")? {
            ev["room_id"] = json!(room.room_id);
            out.push(ev);
        }
    }
    let now = crate::store::accounts::now_ms();
    for user in store::presence_users_in(c, from, to)? {
        if !interested_in_user(c, svc, &user)? {
            continue;
        }
        if let Some(row) = presence::get(c, &user)? {
            out.push(crate::room::presence::sync_event(&row, now));
        }
    }
    Ok(out)
}

fn to_device(
    c: Db<'_>,
    svc: &AppService,
    from: StreamPos,
    to: StreamPos,
    mentioned: &mut BTreeSet<String>,
) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (user, device, sender, kind, content) in store::to_device_in(c, from, to)? {
        if !svc.owns_user(&user) {
            continue;
        }
        let content: Value = serde_json::from_str(&content)?;
        out.push(
            json!({"type": kind, "sender": sender, "content": content, "to_user_id": user, "to_device_id": device}),
        );
        mentioned.insert(user);
    }
    Ok(out)
}

fn device_lists(
    c: Db<'_>,
    svc: &AppService,
    from: StreamPos,
    to: StreamPos,
    body: &Map<String, Value>,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut changed = Vec::new();
    for user in store::device_list_users_in(c, from, to)? {
        if interested_in_user(c, svc, &user)? {
            changed.push(user);
        }
    }
    // Users who left a room (the events of interest are those of rooms the service hears of) and now share none
    // with the service's users.
    let mut left = BTreeSet::new();
    for ev in body.get("events").and_then(Value::as_array).into_iter().flatten() {
        let membership = ev["content"]["membership"].as_str().unwrap_or_default();
        if ev["type"] != "m.room.member" || !matches!(membership, "leave" | "ban") {
            continue;
        }
        let Some(user) = ev["state_key"].as_str() else { continue };
        if !svc.owns_user(user) && !interested_in_user(c, svc, user)? {
            left.insert(user.to_owned());
        }
    }
    changed.retain(|u| !left.contains(u));
    Ok((changed, left.into_iter().collect()))
}

type PerDevice<T> = BTreeMap<String, BTreeMap<String, T>>;

fn key_counts(c: Db<'_>, users: &BTreeSet<String>) -> Result<(PerDevice<Value>, PerDevice<Vec<String>>)> {
    let (mut counts, mut fallback) = (PerDevice::new(), PerDevice::new());
    for user in users {
        for device in e2ee::device_ids(c, user)? {
            let mut n = e2ee::one_time_key_counts(c, user, &device)?;
            n.entry("signed_curve25519").or_insert(json!(0));
            counts.entry(user.clone()).or_insert_with(BTreeMap::new).insert(device.clone(), Value::Object(n));
            let types = e2ee::unused_fallback_key_types(c, user, &device)?;
            fallback.entry(user.clone()).or_insert_with(BTreeMap::new).insert(device, types);
        }
    }
    Ok((counts, fallback))
}
