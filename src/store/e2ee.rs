//! End-to-end encryption plumbing: device keys, one-time and fallback keys, cross-signing keys, to-device
//! messages and the device list stream.
//!
//! `one_time_keys.fallback`: 0 = one-time key, 1 = fallback key not yet handed out, 2 = fallback key already used
//! (so /sync's `device_unused_fallback_key_types`, which reads `fallback = 1`, stops listing it).

use std::collections::BTreeSet;

use rusqlite::{params, OptionalExtension};
use serde_json::{Map, Value};

use crate::error::Result;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::{Db, Writer};

// ------------------------------------------------------------------------------------------------------------
// Device list stream

/// Records that `user_id`'s devices or keys changed, for /sync `device_lists` and /keys/changes. Returns the
/// stream position (the `stream_id` of a federation device list update).
pub fn device_list_changed(w: &mut Writer<'_>, user_id: &str) -> Result<i64> {
    let pos = w.next_stream();
    w.db()
        .prepare_cached("INSERT INTO device_list_stream (stream_ordering, user_id) VALUES (?1, ?2)")?
        .execute(params![pos, user_id])?;
    Ok(pos)
}

/// The position of `user_id`'s device list change before `pos` (a federation update's `prev_id`).
pub fn previous_device_list_pos(conn: Db<'_>, user_id: &str, pos: i64) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT max(stream_ordering) FROM device_list_stream WHERE user_id = ?1 AND stream_ordering < ?2",
        )?
        .query_row(params![user_id, pos], |r| r.get(0))?)
}

/// The position of `user_id`'s latest device list change, 0 if none (a federation device list's `stream_id`).
pub fn latest_device_list_pos(conn: Db<'_>, user_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT coalesce(max(stream_ordering), 0) FROM device_list_stream WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))?)
}

/// Other servers in a room that `user_id` is joined to (who must hear of its key changes): those with a joined
/// member, plus, for rooms still partial (lazy joins), the servers the resident named in `servers_in_room`.
pub fn servers_sharing_rooms(conn: Db<'_>, user_id: &str, our_server: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.server_name FROM room_members me JOIN room_members o ON o.room_nid = me.room_nid
         WHERE me.user_id = ?1 AND me.membership = 'join' AND o.membership = 'join' AND o.server_name != ?2
         UNION
         SELECT p.server_name FROM room_members me JOIN partial_state_servers p ON p.room_nid = me.room_nid
         WHERE me.user_id = ?1 AND me.membership = 'join' AND p.server_name != ?2",
    )?;
    let rows = stmt.query_map(params![user_id, our_server], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The `m.device_list_update` EDU for one of `user_id`'s devices at device list position `stream_id`, with the
/// device's current keys and name.
pub fn device_update_edu(conn: Db<'_>, user_id: &str, device_id: &str, stream_id: i64) -> Result<Value> {
    let prev: Vec<i64> = previous_device_list_pos(conn, user_id, stream_id)?.into_iter().collect();
    let mut content = serde_json::json!({
        "user_id": user_id, "device_id": device_id, "stream_id": stream_id, "prev_id": prev, "deleted": false,
    });
    if let Some(dk) = device_keys(conn, user_id, &[device_id.to_owned()])?.pop() {
        content["keys"] = dk.keys;
        if let Some(name) = dk.display_name {
            content["device_display_name"] = Value::String(name);
        }
    }
    Ok(serde_json::json!({"edu_type": "m.device_list_update", "content": content}))
}

/// Queues, for each other server joined to `room`, an `m.device_list_update` for each of local `user_id`'s
/// devices at the user's current device list position (they just joined the room). A server that already
/// tracks the user finds nothing new in it; one that does not fetches the list. Returns the EDUs queued.
pub fn announce_devices_to_room(conn: Db<'_>, our_server: &str, user_id: &str, room: RoomNid) -> Result<usize> {
    let servers: Vec<String> =
        crate::store::members::joined_servers(conn, room)?.into_iter().filter(|s| s != our_server).collect();
    if servers.is_empty() {
        return Ok(0);
    }
    let pos = latest_device_list_pos(conn, user_id)?;
    let mut queued = 0;
    for device in crate::store::accounts::list_devices(conn, user_id)? {
        let edu = device_update_edu(conn, user_id, &device.device_id, pos)?.to_string();
        for server in &servers {
            crate::store::outbox::enqueue_edu(conn, server, &edu)?;
            queued += 1;
        }
    }
    Ok(queued)
}

/// Whether `other` has a membership other than join in a room `user_id` is joined to.
fn was_member_with(conn: Db<'_>, user_id: &str, other: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM room_members x JOIN room_members y ON x.room_nid = y.room_nid
             WHERE x.user_id = ?1 AND x.membership = 'join' AND y.user_id = ?2 AND y.membership != 'join' LIMIT 1",
        )?
        .exists(params![user_id, other])?)
}

/// Whether two users are both joined to at least one common room.
pub fn shares_room(conn: Db<'_>, a: &str, b: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM room_members x JOIN room_members y ON x.room_nid = y.room_nid
             WHERE x.user_id = ?1 AND x.membership = 'join' AND y.user_id = ?2 AND y.membership = 'join' LIMIT 1",
        )?
        .exists(params![a, b])?)
}

/// Users whose device lists `user_id` must refetch for the window (`from`, `to`], and users it no longer shares
/// any room with (`left`). "Changed" covers key/device updates of users sharing a room now, users who joined one
/// of our rooms and the members of rooms we joined; "left" covers members who left, and members of rooms we left.
/// With `rejoins` false, a join of ours that follows a join of ours in the same room (the end of a lazy join's
/// resync records one, so eager syncs show the room anew) does not make its members "changed": lazy-loading syncs
/// saw the room all along (as Synapse, whose un-partial-stated rooms are newly joined for eager syncs only).
pub fn device_list_changes(
    conn: Db<'_>,
    user_id: &str,
    from: i64,
    to: i64,
    rejoins: bool,
) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut changed = BTreeSet::new();
    let mut candidates_left = BTreeSet::new();

    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT user_id FROM device_list_stream WHERE stream_ordering > ?1 AND stream_ordering <= ?2",
    )?;
    let updated: Vec<String> = stmt.query_map(params![from, to], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    for u in updated {
        if u == user_id || shares_room(conn, user_id, &u)? {
            changed.insert(u);
        } else if was_member_with(conn, user_id, &u)? {
            // No room shared any more, though they were in one of ours: they left (a lazy join's resync records
            // the members it finds were never really joined this way).
            candidates_left.insert(u);
        }
    }

    // Membership changes of others in rooms we are joined to now.
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT k.state_key, json_extract(e.json, '$.content.membership') FROM events e
         JOIN state_keys k ON k.state_key_nid = e.state_key_nid
         JOIN room_members me ON me.room_nid = e.room_nid AND me.user_id = ?1 AND me.membership = 'join'
         WHERE e.event_type = 'm.room.member' AND e.stream_ordering > ?2 AND e.stream_ordering <= ?3 AND k.state_key != ?1",
    )?;
    let rows =
        stmt.query_map(params![user_id, from, to], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))?;
    for r in rows {
        match r? {
            (u, Some(m)) if m == "join" => {
                changed.insert(u);
            }
            (u, Some(m)) if m == "leave" || m == "ban" => {
                candidates_left.insert(u);
            }
            _ => {}
        }
    }

    // Our own joins and leaves in the window: everyone in those rooms is new to us, or possibly gone.
    let mut stmt = conn.prepare_cached(
        "SELECT m.user_id, s.membership,
                (SELECT p.membership FROM local_membership_stream p WHERE p.user_id = s.user_id
                 AND p.room_nid = s.room_nid AND p.stream_ordering < s.stream_ordering
                 ORDER BY p.stream_ordering DESC LIMIT 1)
         FROM local_membership_stream s JOIN room_members m ON m.room_nid = s.room_nid
         WHERE s.user_id = ?1 AND s.stream_ordering > ?2 AND s.stream_ordering <= ?3 AND m.user_id != ?1
         AND m.membership = 'join'",
    )?;
    let rows = stmt.query_map(params![user_id, from, to], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?))
    })?;
    for r in rows {
        let (u, m, before) = r?;
        if m == "join" && !rejoins && before.as_deref() == Some("join") {
            continue;
        }
        if m == "join" {
            changed.insert(u);
        } else if m == "leave" || m == "ban" {
            candidates_left.insert(u);
        }
    }

    // A room we joined: our own other devices may need to know too (as Synapse and Complement's
    // TestDeviceListsUpdateOverFederation expect the joiner in its own `changed`). Not the fresh join that ends a
    // lazy join's resync: nothing changed for our own devices then.
    let mut stmt = conn.prepare_cached(
        "SELECT 1 FROM local_membership_stream s WHERE s.user_id = ?1 AND s.stream_ordering > ?2
         AND s.stream_ordering <= ?3 AND s.membership = 'join' AND coalesce((SELECT p.membership
             FROM local_membership_stream p WHERE p.user_id = s.user_id AND p.room_nid = s.room_nid
             AND p.stream_ordering < s.stream_ordering ORDER BY p.stream_ordering DESC LIMIT 1), '') != 'join'
         LIMIT 1",
    )?;
    if stmt.exists(params![user_id, from, to])? {
        changed.insert(user_id.to_owned());
    }

    let mut left = BTreeSet::new();
    for u in candidates_left {
        if !shares_room(conn, user_id, &u)? {
            changed.remove(&u);
            left.insert(u);
        }
    }
    Ok((changed, left))
}

// ------------------------------------------------------------------------------------------------------------
// Device keys

/// Stores a device's identity keys; returns whether they differ from what was stored. When a client re-uploads
/// the same keys, signatures added since (cross-signing) are kept: they still sign the same content.
pub fn set_device_keys(conn: Db<'_>, user_id: &str, device_id: &str, keys: &Value) -> Result<bool> {
    let old: Option<Value> = conn
        .prepare_cached("SELECT keys FROM device_keys WHERE user_id = ?1 AND device_id = ?2")?
        .query_row(params![user_id, device_id], |r| r.get::<_, String>(0))
        .optional()?
        .and_then(|o| serde_json::from_str(&o).ok());
    let mut keys = keys.clone();
    if let Some(old) = &old {
        let content = |v: &Value| {
            let mut v = v.clone();
            v.as_object_mut().map(|o| o.remove("signatures"));
            v
        };
        if content(old) == content(&keys) {
            if let (Some(old_sigs), Some(new)) = (old["signatures"].as_object(), keys.as_object_mut()) {
                let sigs = new.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
                if !sigs.is_object() {
                    *sigs = Value::Object(Map::new());
                }
                for (signer, by_key) in old_sigs {
                    for (key_id, sig) in by_key.as_object().into_iter().flatten() {
                        if sigs[signer].get(key_id).is_none() {
                            if !sigs[signer].is_object() {
                                sigs[signer] = Value::Object(Map::new());
                            }
                            sigs[signer][key_id] = sig.clone();
                        }
                    }
                }
            }
        }
        if *old == keys {
            return Ok(false);
        }
    }
    conn.prepare_cached(
        "INSERT INTO device_keys (user_id, device_id, keys) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id, device_id) DO UPDATE SET keys = excluded.keys",
    )?
    .execute(params![user_id, device_id, keys.to_string()])?;
    Ok(true)
}

pub struct DeviceKeys {
    pub device_id: String,
    pub keys: Value,
    pub display_name: Option<String>,
}

/// Keys of a user's devices (only devices that uploaded keys); `devices` empty = all.
pub fn device_keys(conn: Db<'_>, user_id: &str, devices: &[String]) -> Result<Vec<DeviceKeys>> {
    let mut stmt = conn.prepare_cached(
        "SELECT k.device_id, k.keys, d.display_name FROM device_keys k
         JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id
         WHERE k.user_id = ?1 ORDER BY k.device_id",
    )?;
    let rows = stmt.query_map([user_id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (device_id, keys, display_name) = r?;
        if devices.is_empty() || devices.contains(&device_id) {
            out.push(DeviceKeys { device_id, keys: serde_json::from_str(&keys)?, display_name });
        }
    }
    Ok(out)
}

/// The ids of all of a user's devices.
pub fn device_ids(conn: Db<'_>, user_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT device_id FROM devices WHERE user_id = ?1")?;
    let rows = stmt.query_map([user_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ------------------------------------------------------------------------------------------------------------
// One-time and fallback keys

/// Adds one-time keys (`algorithm:id` -> key). A re-upload of an identical key is ignored; returns the id of the
/// first key that exists with different content (the caller rejects the whole upload).
pub fn add_one_time_keys(
    conn: Db<'_>,
    user_id: &str,
    device_id: &str,
    keys: &Map<String, Value>,
) -> Result<Option<String>> {
    // All keys of one upload share a sequence number: claims hand out older uploads first.
    let seq: i64 = conn
        .prepare_cached(
            "SELECT coalesce(max(upload_seq), 0) + 1 FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2",
        )?
        .query_row(params![user_id, device_id], |r| r.get(0))?;
    for (key_id, key) in keys {
        let algorithm = key_id.split_once(':').map(|x| x.0).unwrap_or_default();
        let existing: Option<String> = conn
            .prepare_cached("SELECT key_json FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3")?
            .query_row(params![user_id, device_id, key_id], |r| r.get(0))
            .optional()?;
        match existing {
            Some(old) if serde_json::from_str::<Value>(&old).ok().as_ref() == Some(key) => continue,
            Some(_) => return Ok(Some(key_id.clone())),
            None => {}
        }
        conn.prepare_cached(
            "INSERT INTO one_time_keys (user_id, device_id, key_id, algorithm, key_json, fallback, upload_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)",
        )?
        .execute(params![user_id, device_id, key_id, algorithm, key.to_string(), seq])?;
    }
    Ok(None)
}

/// Replaces the fallback key of each algorithm present (one per algorithm). Re-uploading the current key keeps its
/// "used" mark.
pub fn set_fallback_keys(conn: Db<'_>, user_id: &str, device_id: &str, keys: &Map<String, Value>) -> Result<()> {
    for (key_id, key) in keys {
        let algorithm = key_id.split_once(':').map(|x| x.0).unwrap_or_default();
        let same: bool = conn
            .prepare_cached(
                "SELECT 1 FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3 AND fallback > 0
                 AND key_json = ?4",
            )?
            .exists(params![user_id, device_id, key_id, key.to_string()])?;
        if same {
            continue;
        }
        conn.prepare_cached(
            "DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND fallback > 0",
        )?
        .execute(params![user_id, device_id, algorithm])?;
        conn.prepare_cached(
            "INSERT INTO one_time_keys (user_id, device_id, key_id, algorithm, key_json, fallback) VALUES (?1, ?2, ?3, ?4, ?5, 1)
             ON CONFLICT (user_id, device_id, key_id) DO UPDATE SET algorithm = excluded.algorithm,
             key_json = excluded.key_json, fallback = 1",
        )?
        .execute(params![user_id, device_id, key_id, algorithm, key.to_string()])?;
    }
    Ok(())
}

/// Unclaimed one-time keys per algorithm (fallback keys excluded).
pub fn one_time_key_counts(conn: Db<'_>, user_id: &str, device_id: &str) -> Result<Map<String, Value>> {
    let mut stmt = conn.prepare_cached(
        "SELECT algorithm, count(*) FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND fallback = 0
         GROUP BY algorithm",
    )?;
    let rows = stmt.query_map(params![user_id, device_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Map::new();
    for r in rows {
        let (alg, n) = r?;
        out.insert(alg, n.into());
    }
    Ok(out)
}

/// Algorithms of the device's fallback keys not handed out yet (`device_unused_fallback_key_types`).
pub fn unused_fallback_key_types(conn: Db<'_>, user_id: &str, device_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT algorithm FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND fallback = 1",
    )?;
    let rows = stmt.query_map(params![user_id, device_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Hands out one key of `algorithm` for a device: the oldest one-time key (deleted, so it is never given out
/// twice), else the fallback key (kept, marked used). Returns `(key_id, key)`.
pub fn claim_key(conn: Db<'_>, user_id: &str, device_id: &str, algorithm: &str) -> Result<Option<(String, Value)>> {
    let otk: Option<(String, String)> = conn
        .prepare_cached(
            "SELECT key_id, key_json FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3
             AND fallback = 0 ORDER BY upload_seq, key_id LIMIT 1",
        )?
        .query_row(params![user_id, device_id, algorithm], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((key_id, json)) = otk {
        conn.prepare_cached("DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3")?
            .execute(params![user_id, device_id, key_id])?;
        return Ok(Some((key_id, serde_json::from_str(&json)?)));
    }
    let fallback: Option<(String, String)> = conn
        .prepare_cached(
            "SELECT key_id, key_json FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3
             AND fallback > 0 LIMIT 1",
        )?
        .query_row(params![user_id, device_id, algorithm], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((key_id, json)) = fallback {
        conn.prepare_cached(
            "UPDATE one_time_keys SET fallback = 2 WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3",
        )?
        .execute(params![user_id, device_id, key_id])?;
        return Ok(Some((key_id, serde_json::from_str(&json)?)));
    }
    Ok(None)
}

// ------------------------------------------------------------------------------------------------------------
// Cross-signing keys

/// A user's `master`, `self_signing` or `user_signing` key, with the signatures added to it since.
pub fn cross_signing_key(conn: Db<'_>, user_id: &str, key_type: &str) -> Result<Option<Value>> {
    let raw: Option<String> = conn
        .prepare_cached("SELECT key_json FROM cross_signing_keys WHERE user_id = ?1 AND key_type = ?2")?
        .query_row(params![user_id, key_type], |r| r.get(0))
        .optional()?;
    Ok(raw.map(|s| serde_json::from_str(&s)).transpose()?)
}

pub fn set_cross_signing_key(conn: Db<'_>, user_id: &str, key_type: &str, key: &Value) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO cross_signing_keys (user_id, key_type, key_json) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id, key_type) DO UPDATE SET key_json = excluded.key_json",
    )?
    .execute(params![user_id, key_type, key.to_string()])?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// To-device messages

/// Queues one message for a local device, at a new stream position.
pub fn queue_to_device(
    w: &mut Writer<'_>,
    user_id: &str,
    device_id: &str,
    sender: &str,
    event_type: &str,
    content: &Value,
) -> Result<()> {
    let pos = w.next_stream();
    w.db()
        .prepare_cached(
            "INSERT INTO to_device (stream_ordering, user_id, device_id, sender, event_type, content)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![pos, user_id, device_id, sender, event_type, content.to_string()])?;
    Ok(())
}

/// A to-device message waiting for its device.
#[derive(Debug, Clone, PartialEq)]
pub struct ToDeviceMessage {
    pub sender: String,
    pub event_type: String,
    pub content: Value,
}

/// The messages for a device queued in the window (`after`, `upto`], oldest first. No limit: the device's next
/// sync deletes everything up to `upto`, so a message left out would be lost.
pub fn to_device_messages(
    conn: Db<'_>,
    user_id: &str,
    device_id: &str,
    after: StreamPos,
    upto: StreamPos,
) -> Result<Vec<ToDeviceMessage>> {
    let mut stmt = conn.prepare_cached(
        "SELECT sender, event_type, content FROM to_device WHERE user_id = ?1 AND device_id = ?2
         AND stream_ordering > ?3 AND stream_ordering <= ?4 ORDER BY stream_ordering",
    )?;
    let rows = stmt.query_map(params![user_id, device_id, after, upto], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (sender, event_type, content) = r?;
        out.push(ToDeviceMessage { sender, event_type, content: serde_json::from_str(&content)? });
    }
    Ok(out)
}

/// At most `limit` of the messages for a device queued in the window (`after`, `upto`], oldest first, each with
/// its stream position (a client that got fewer than there are continues from the last one's).
pub fn to_device_page(
    conn: Db<'_>,
    user_id: &str,
    device_id: &str,
    after: StreamPos,
    upto: StreamPos,
    limit: usize,
) -> Result<Vec<(StreamPos, ToDeviceMessage)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT stream_ordering, sender, event_type, content FROM to_device WHERE user_id = ?1 AND device_id = ?2
         AND stream_ordering > ?3 AND stream_ordering <= ?4 ORDER BY stream_ordering LIMIT ?5",
    )?;
    let rows = stmt.query_map(params![user_id, device_id, after, upto, limit as i64], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (pos, sender, event_type, content) = r?;
        out.push((StreamPos(pos), ToDeviceMessage { sender, event_type, content: serde_json::from_str(&content)? }));
    }
    Ok(out)
}

/// Whether `user_id`'s `device_id` holds to-device messages at or before `upto` (what
/// [`delete_to_device_upto`] would delete).
pub fn has_to_device_upto(conn: Db<'_>, user_id: &str, device_id: &str, upto: StreamPos) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM to_device WHERE user_id = ?1 AND device_id = ?2 AND stream_ordering <= ?3")?
        .exists(params![user_id, device_id, upto])?)
}

/// Deletes a device's messages up to `upto` (its sync acknowledged them).
pub fn delete_to_device_upto(conn: Db<'_>, user_id: &str, device_id: &str, upto: StreamPos) -> Result<()> {
    conn.prepare_cached("DELETE FROM to_device WHERE user_id = ?1 AND device_id = ?2 AND stream_ordering <= ?3")?
        .execute(params![user_id, device_id, upto])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::testing::{memory_db, write};

    #[test]
    fn to_device_messages_come_in_order_within_the_window_until_deleted() {
        let mut conn = memory_db();
        let mut stream = 0;
        write(&mut conn, &mut stream, |w| {
            queue_to_device(w, "@a:x", "D1", "@s:x", "m.one", &json!({"n": 1}))?;
            queue_to_device(w, "@a:x", "D2", "@s:x", "m.other_device", &json!({}))?;
            queue_to_device(w, "@a:x", "D1", "@s:x", "m.two", &json!({"n": 2}))?;
            queue_to_device(w, "@a:x", "D1", "@s:x", "m.three", &json!({"n": 3}))
        })
        .unwrap();
        assert_eq!(stream, 4);
        let types = |conn: Db<'_>, after: i64, upto: i64| -> Vec<String> {
            to_device_messages(conn, "@a:x", "D1", StreamPos(after), StreamPos(upto))
                .unwrap()
                .into_iter()
                .map(|m| m.event_type)
                .collect()
        };
        assert_eq!(types(conn.db(), 0, 4), ["m.one", "m.two", "m.three"]);
        assert_eq!(types(conn.db(), 1, 3), ["m.two"], "after is exclusive, upto inclusive");
        let first = to_device_messages(conn.db(), "@a:x", "D1", StreamPos(0), StreamPos(1)).unwrap();
        assert_eq!(
            first,
            [ToDeviceMessage { sender: "@s:x".into(), event_type: "m.one".into(), content: json!({"n": 1}) }]
        );

        let page = to_device_page(conn.db(), "@a:x", "D1", StreamPos(0), StreamPos(4), 1).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!((page[0].0, page[0].1.event_type.as_str()), (StreamPos(1), "m.one"));
        let rest = to_device_page(conn.db(), "@a:x", "D1", page[0].0, StreamPos(4), 10).unwrap();
        assert_eq!(rest.iter().map(|(p, _)| p.0).collect::<Vec<_>>(), vec![3, 4]);
        delete_to_device_upto(conn.db(), "@a:x", "D1", StreamPos(3)).unwrap();
        assert_eq!(types(conn.db(), 0, 4), ["m.three"]);
        assert_eq!(to_device_messages(conn.db(), "@a:x", "D2", StreamPos(0), StreamPos(4)).unwrap().len(), 1);
    }

    #[test]
    fn key_counts_and_unused_fallback_types() {
        let conn = memory_db();
        assert!(one_time_key_counts(conn.db(), "@a:x", "D1").unwrap().is_empty());
        assert!(unused_fallback_key_types(conn.db(), "@a:x", "D1").unwrap().is_empty());
        let otks =
            json!({"signed_curve25519:A": {"key": "a"}, "signed_curve25519:B": {"key": "b"}, "curve25519:C": "c"});
        assert_eq!(add_one_time_keys(conn.db(), "@a:x", "D1", otks.as_object().unwrap()).unwrap(), None);
        let fallback = json!({"signed_curve25519:F": {"key": "f", "fallback": true}});
        set_fallback_keys(conn.db(), "@a:x", "D1", fallback.as_object().unwrap()).unwrap();
        let counts = one_time_key_counts(conn.db(), "@a:x", "D1").unwrap();
        assert_eq!(
            Value::Object(counts),
            json!({"signed_curve25519": 2, "curve25519": 1}),
            "fallback keys not counted"
        );
        assert_eq!(unused_fallback_key_types(conn.db(), "@a:x", "D1").unwrap(), ["signed_curve25519"]);
        assert!(unused_fallback_key_types(conn.db(), "@a:x", "D2").unwrap().is_empty(), "per device");

        // Claims take one-time keys first, then the fallback key (which then no longer counts as unused).
        for _ in 0..2 {
            assert!(claim_key(conn.db(), "@a:x", "D1", "signed_curve25519").unwrap().is_some());
        }
        assert_eq!(unused_fallback_key_types(conn.db(), "@a:x", "D1").unwrap(), ["signed_curve25519"]);
        let (id, _) = claim_key(conn.db(), "@a:x", "D1", "signed_curve25519").unwrap().unwrap();
        assert_eq!(id, "signed_curve25519:F");
        assert!(unused_fallback_key_types(conn.db(), "@a:x", "D1").unwrap().is_empty());
    }
}
