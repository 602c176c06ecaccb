//! The cache of remote users' device lists (`remote_device_lists`, `remote_devices`).
//!
//! We track a remote user while they are joined to a room that one of our users is joined to ([`is_tracked`]; in a
//! partial-state room that means the members we know of). A tracked user's list is fetched once (GET
//! `/user/devices`) and then kept up to date by the `m.device_list_update` EDUs their server sends us; an update
//! we cannot apply (its `prev_id`s are past what we hold) leaves the copy stale, to be fetched again. When the
//! user shares no room with our users any more, their copy is dropped: their server stops telling us about
//! changes, so a copy kept would silently go out of date.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use crate::error::Result;
use crate::store::ids::RoomNid;
use crate::store::Db;

/// One device of a remote user as their server described it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteDevice {
    pub device_id: String,
    pub display_name: Option<String>,
    /// The signed device keys, if the device has any.
    pub keys: Option<Value>,
}

/// A remote user's device list as we hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteList {
    pub devices: Vec<RemoteDevice>,
    pub master_key: Option<Value>,
    pub self_signing_key: Option<Value>,
}

/// Whether remote `user_id` is joined to a room that a user of `our_server` is joined to.
pub fn is_tracked(conn: Db<'_>, our_server: &str, user_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM room_members o WHERE o.user_id = ?1 AND o.membership = 'join' AND EXISTS (
                SELECT 1 FROM room_members me WHERE me.room_nid = o.room_nid AND me.server_name = ?2
                AND me.membership = 'join') LIMIT 1",
        )?
        .exists(params![user_id, our_server])?)
}

/// Whether we hold a fresh copy of `user_id`'s device list (fetched, and no announced change past it).
pub fn is_fresh(conn: Db<'_>, user_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM remote_device_lists WHERE user_id = ?1 AND stream_id IS NOT NULL AND stream_id >= wanted",
        )?
        .exists([user_id])?)
}

/// The copy of `user_id`'s device list we hold (fresh or not), if any.
pub fn cached(conn: Db<'_>, user_id: &str) -> Result<Option<RemoteList>> {
    let row: Option<(Option<String>, Option<String>)> = conn
        .prepare_cached(
            "SELECT master_key, self_signing_key FROM remote_device_lists WHERE user_id = ?1 AND stream_id IS NOT NULL",
        )?
        .query_row([user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((master, ssk)) = row else { return Ok(None) };
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, display_name, keys FROM remote_devices WHERE user_id = ?1 ORDER BY device_id",
    )?;
    let rows = stmt.query_map([user_id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, Option<String>>(2)?))
    })?;
    let mut devices = Vec::new();
    for r in rows {
        let (device_id, display_name, keys) = r?;
        devices.push(RemoteDevice {
            device_id,
            display_name,
            keys: keys.map(|k| serde_json::from_str(&k)).transpose()?,
        });
    }
    let parse = |k: Option<String>| k.map(|k| serde_json::from_str::<Value>(&k)).transpose();
    Ok(Some(RemoteList { devices, master_key: parse(master)?, self_signing_key: parse(ssk)? }))
}

/// Replaces the copy of `user_id`'s device list by a whole list fetched from their server at position
/// `stream_id` (an update announced past it keeps the copy stale).
pub fn store_list(conn: Db<'_>, user_id: &str, stream_id: i64, list: &RemoteList) -> Result<()> {
    let json = |v: &Option<Value>| v.as_ref().map(Value::to_string);
    conn.prepare_cached(
        "INSERT INTO remote_device_lists (user_id, stream_id, wanted, master_key, self_signing_key)
         VALUES (?1, ?2, 0, ?3, ?4)
         ON CONFLICT (user_id) DO UPDATE SET stream_id = ?2, master_key = ?3, self_signing_key = ?4",
    )?
    .execute(params![user_id, stream_id, json(&list.master_key), json(&list.self_signing_key)])?;
    conn.prepare_cached("DELETE FROM remote_devices WHERE user_id = ?1")?.execute([user_id])?;
    for d in &list.devices {
        put_device(conn, user_id, d)?;
    }
    Ok(())
}

fn put_device(conn: Db<'_>, user_id: &str, d: &RemoteDevice) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO remote_devices (user_id, device_id, display_name, keys) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id, device_id) DO UPDATE SET display_name = ?3, keys = ?4",
    )?
    .execute(params![user_id, d.device_id, d.display_name, d.keys.as_ref().map(Value::to_string)])?;
    Ok(())
}

/// One `m.device_list_update` EDU.
#[derive(Debug, Clone)]
pub struct DeviceUpdate {
    pub device_id: String,
    pub stream_id: i64,
    pub prev_ids: Vec<i64>,
    pub deleted: bool,
    pub display_name: Option<String>,
    pub keys: Option<Value>,
}

/// What became of an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied to the fresh copy we hold.
    Applied,
    /// We hold no usable copy to apply it to (or it skips changes we have not seen): the copy must be fetched
    /// again.
    Stale,
}

/// Applies an update of tracked user `user_id`: to the copy we hold when its `prev_id`s are all changes we have
/// (as Synapse, an update without `prev_id` is not applied), else the copy is marked stale up to the update's
/// position (a row is made if we held none, so a fetch started before this update does not count as fresh).
pub fn apply_update(conn: Db<'_>, user_id: &str, u: &DeviceUpdate) -> Result<Applied> {
    let held: Option<(Option<i64>, i64)> = conn
        .prepare_cached("SELECT stream_id, wanted FROM remote_device_lists WHERE user_id = ?1")?
        .query_row([user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((Some(at), wanted)) = held {
        let known = !u.prev_ids.is_empty() && u.prev_ids.iter().all(|p| *p <= at);
        if known && at >= wanted {
            if u.deleted {
                conn.prepare_cached("DELETE FROM remote_devices WHERE user_id = ?1 AND device_id = ?2")?
                    .execute(params![user_id, u.device_id])?;
            } else {
                let d = RemoteDevice {
                    device_id: u.device_id.clone(),
                    display_name: u.display_name.clone(),
                    keys: u.keys.clone(),
                };
                put_device(conn, user_id, &d)?;
            }
            conn.prepare_cached("UPDATE remote_device_lists SET stream_id = max(stream_id, ?2) WHERE user_id = ?1")?
                .execute(params![user_id, u.stream_id])?;
            return Ok(Applied::Applied);
        }
    }
    mark_stale(conn, user_id, u.stream_id)?;
    Ok(Applied::Stale)
}

/// Marks the copy of `user_id`'s list stale up to position `wanted` (making an empty row if we held none).
pub fn mark_stale(conn: Db<'_>, user_id: &str, wanted: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO remote_device_lists (user_id, stream_id, wanted) VALUES (?1, NULL, ?2)
         ON CONFLICT (user_id) DO UPDATE SET wanted = max(wanted, ?2, coalesce(stream_id, 0) + 1)",
    )?
    .execute(params![user_id, wanted])?;
    Ok(())
}

/// Records `user_id`'s new cross-signing keys (`m.signing_key_update`) in the copy we hold, if any.
pub fn set_signing_keys(
    conn: Db<'_>,
    user_id: &str,
    master: Option<&Value>,
    self_signing: Option<&Value>,
) -> Result<()> {
    if let Some(k) = master {
        conn.prepare_cached("UPDATE remote_device_lists SET master_key = ?2 WHERE user_id = ?1")?
            .execute(params![user_id, k.to_string()])?;
    }
    if let Some(k) = self_signing {
        conn.prepare_cached("UPDATE remote_device_lists SET self_signing_key = ?2 WHERE user_id = ?1")?
            .execute(params![user_id, k.to_string()])?;
    }
    Ok(())
}

/// Drops the copy of remote `user_id`'s list if they no longer share a room with our users (after one of their
/// joins ended). Returns whether a copy was dropped.
pub fn untrack_if_unshared(conn: Db<'_>, our_server: &str, user_id: &str) -> Result<bool> {
    let held = conn.prepare_cached("SELECT 1 FROM remote_device_lists WHERE user_id = ?1")?.exists([user_id])?;
    if !held || is_tracked(conn, our_server, user_id)? {
        return Ok(false);
    }
    conn.prepare_cached("DELETE FROM remote_device_lists WHERE user_id = ?1")?.execute([user_id])?;
    Ok(true)
}

/// After one of our users' joins to `room` ended: drops the copies of the room's members who no longer share a
/// room with our users. Reads only the members we hold a copy for. Returns how many were dropped.
pub fn untrack_unshared_in_room(conn: Db<'_>, our_server: &str, room: RoomNid) -> Result<usize> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.user_id FROM remote_device_lists c JOIN room_members m ON m.user_id = c.user_id
         WHERE m.room_nid = ?1",
    )?;
    let users: Vec<String> = stmt.query_map([room], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    let mut dropped = 0;
    for u in users {
        if untrack_if_unshared(conn, our_server, &u)? {
            dropped += 1;
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::testing::{member, memory_db, room};

    fn list(names: &[&str]) -> RemoteList {
        RemoteList {
            devices: names
                .iter()
                .map(|d| RemoteDevice {
                    device_id: (*d).into(),
                    display_name: Some(format!("{d} name")),
                    keys: Some(json!({"device_id": d})),
                })
                .collect(),
            master_key: Some(json!({"usage": ["master"]})),
            self_signing_key: None,
        }
    }

    fn update(device: &str, stream_id: i64, prev: &[i64]) -> DeviceUpdate {
        DeviceUpdate {
            device_id: device.into(),
            stream_id,
            prev_ids: prev.to_vec(),
            deleted: false,
            display_name: Some("new".into()),
            keys: None,
        }
    }

    #[test]
    fn tracked_means_joined_to_a_room_with_one_of_our_users() {
        let conn = memory_db();
        let (a, b) = (room(conn.db(), "!a:x"), room(conn.db(), "!b:x"));
        member(conn.db(), a, "@bob:y", "join", None);
        member(conn.db(), b, "@carol:y", "join", None);
        member(conn.db(), b, "@alice:x", "leave", None);
        assert!(!is_tracked(conn.db(), "x", "@bob:y").unwrap(), "no local member");
        member(conn.db(), a, "@alice:x", "join", None);
        assert!(is_tracked(conn.db(), "x", "@bob:y").unwrap());
        assert!(!is_tracked(conn.db(), "x", "@carol:y").unwrap(), "our user left that room");
    }

    #[test]
    fn updates_apply_in_sequence_and_a_gap_makes_the_copy_stale() {
        let conn = memory_db();
        assert_eq!(apply_update(conn.db(), "@bob:y", &update("D1", 5, &[4])).unwrap(), Applied::Stale);
        assert!(!is_fresh(conn.db(), "@bob:y").unwrap() && cached(conn.db(), "@bob:y").unwrap().is_none());

        // A fetch answered at position 3 (started before the update at 5) is not fresh; one at 5 is.
        store_list(conn.db(), "@bob:y", 3, &list(&["D1"])).unwrap();
        assert!(!is_fresh(conn.db(), "@bob:y").unwrap());
        store_list(conn.db(), "@bob:y", 5, &list(&["D1", "D2"])).unwrap();
        assert!(is_fresh(conn.db(), "@bob:y").unwrap());
        assert_eq!(cached(conn.db(), "@bob:y").unwrap().unwrap(), list(&["D1", "D2"]));

        assert_eq!(apply_update(conn.db(), "@bob:y", &update("D3", 6, &[5])).unwrap(), Applied::Applied);
        let mut gone = update("D1", 7, &[6]);
        gone.deleted = true;
        assert_eq!(apply_update(conn.db(), "@bob:y", &gone).unwrap(), Applied::Applied);
        let held = cached(conn.db(), "@bob:y").unwrap().unwrap();
        let ids: Vec<&str> = held.devices.iter().map(|d| d.device_id.as_str()).collect();
        assert_eq!(ids, ["D2", "D3"]);
        assert!(is_fresh(conn.db(), "@bob:y").unwrap());

        // Position 8 was missed: 9 cannot be applied, and the copy stays stale until fetched again.
        assert_eq!(apply_update(conn.db(), "@bob:y", &update("D2", 9, &[8])).unwrap(), Applied::Stale);
        assert!(!is_fresh(conn.db(), "@bob:y").unwrap());
        assert_eq!(apply_update(conn.db(), "@bob:y", &update("D2", 10, &[9])).unwrap(), Applied::Stale);
        assert_eq!(apply_update(conn.db(), "@bob:y", &update("D2", 4, &[])).unwrap(), Applied::Stale, "no prev_id");
        store_list(conn.db(), "@bob:y", 10, &list(&["D2"])).unwrap();
        assert!(is_fresh(conn.db(), "@bob:y").unwrap());
    }

    #[test]
    fn copies_are_dropped_when_no_room_is_shared_any_more() {
        let conn = memory_db();
        let (a, b) = (room(conn.db(), "!a:x"), room(conn.db(), "!b:x"));
        for r in [a, b] {
            member(conn.db(), r, "@alice:x", "join", None);
            member(conn.db(), r, "@bob:y", "join", None);
        }
        member(conn.db(), a, "@carol:y", "join", None);
        for u in ["@bob:y", "@carol:y"] {
            store_list(conn.db(), u, 1, &list(&["D1"])).unwrap();
        }
        member(conn.db(), a, "@bob:y", "leave", None);
        assert!(!untrack_if_unshared(conn.db(), "x", "@bob:y").unwrap(), "still shares room b");
        member(conn.db(), b, "@bob:y", "leave", None);
        assert!(untrack_if_unshared(conn.db(), "x", "@bob:y").unwrap());
        assert!(cached(conn.db(), "@bob:y").unwrap().is_none());

        member(conn.db(), a, "@alice:x", "leave", None);
        assert_eq!(untrack_unshared_in_room(conn.db(), "x", a).unwrap(), 1);
        assert!(cached(conn.db(), "@carol:y").unwrap().is_none());
    }
}
