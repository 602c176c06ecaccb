//! The partial-state lifecycle's tables and writes: a partial room's flags (`rooms.partial_state`,
//! `state_groups.partial`, `partial_state_servers`), the resync's list of the full state ids (`resync_state`), and
//! the event, state group and extremity updates that completing a partial room needs (re-judged events,
//! filled base group). The steps that use them are in `crate::room::partial`.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::events::{self, EventRow};
use crate::store::ids::{EventNid, RoomNid, StateGroup, StateKeyNid, StreamPos};
use crate::store::members::{member_content_at, MemberContent, MEMBER_CONTENT_COLS};
use crate::store::Db;

// ------------------------------------------------------------------------------------------------------------
// Partial-state flags

/// Marks a room partial (members omitted at join) or complete.
pub fn set_room_partial(conn: Db<'_>, room: RoomNid, partial: bool) -> Result<()> {
    conn.execute("UPDATE rooms SET partial_state = ?2 WHERE room_nid = ?1", params![room, partial])?;
    Ok(())
}

/// Marks a state group as lacking the omitted memberships (the partial room's base group) or complete.
pub fn set_group_partial(conn: Db<'_>, sg: StateGroup, partial: bool) -> Result<()> {
    conn.execute("UPDATE state_groups SET partial = ?2 WHERE sg = ?1", params![sg, partial])?;
    Ok(())
}

/// Records servers the resident said are in a partial room (our events go to them while partial).
pub fn add_partial_servers<'a>(conn: Db<'_>, room: RoomNid, servers: impl IntoIterator<Item = &'a str>) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("INSERT OR IGNORE INTO partial_state_servers (room_nid, server_name) VALUES (?1, ?2)")?;
    for s in servers {
        stmt.execute(params![room, s])?;
    }
    Ok(())
}

pub fn clear_partial_servers(conn: Db<'_>, room: RoomNid) -> Result<()> {
    conn.execute("DELETE FROM partial_state_servers WHERE room_nid = ?1", [room])?;
    Ok(())
}

/// Servers with a joined member (by `room_members`) that were not among the partial room's servers, ours aside:
/// they missed what was sent to the servers known while partial.
pub fn servers_missed_while_partial(conn: Db<'_>, room: RoomNid, ours: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT DISTINCT server_name FROM room_members WHERE room_nid = ?1 AND membership = 'join'
         AND server_name != ?2
         AND server_name NOT IN (SELECT server_name FROM partial_state_servers WHERE room_nid = ?1)",
    )?;
    let rows = stmt.query_map(params![room, ours], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Joined members of server `ours` whose device list changed after `since`, with their latest change.
pub fn device_changes_since(
    conn: Db<'_>,
    room: RoomNid,
    since: StreamPos,
    ours: &str,
) -> Result<Vec<(String, StreamPos)>> {
    let mut stmt = conn.prepare(
        "SELECT m.user_id, max(d.stream_ordering) FROM room_members m
         JOIN device_list_stream d ON d.user_id = m.user_id AND d.stream_ordering > ?2
         WHERE m.room_nid = ?1 AND m.membership = 'join' AND m.server_name = ?3 GROUP BY m.user_id",
    )?;
    let rows = stmt.query_map(params![room, since, ours], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Every joined member of the room with their membership event.
pub fn joined_members(conn: Db<'_>, room: RoomNid) -> Result<Vec<(String, EventNid)>> {
    let mut stmt =
        conn.prepare_cached("SELECT user_id, event_nid FROM room_members WHERE room_nid = ?1 AND membership = 'join'")?;
    let rows = stmt.query_map([room], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The users (and their member state keys) whose membership events the room got at or after stream `since`.
pub fn members_touched_since(conn: Db<'_>, room: RoomNid, since: StreamPos) -> Result<Vec<(String, StateKeyNid)>> {
    let mut stmt = conn.prepare(
        "SELECT DISTINCT k.state_key, k.state_key_nid FROM events e JOIN state_keys k ON k.state_key_nid = e.state_key_nid
         WHERE e.room_nid = ?1 AND e.stream_ordering >= ?2 AND k.event_type = 'm.room.member'",
    )?;
    let rows = stmt.query_map(params![room, since], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ------------------------------------------------------------------------------------------------------------
// The full state ids (`resync_state`)

/// Records the full state's ids (replacing earlier rows for them), each marked missing when we do not hold it.
/// Returns how many are missing.
pub fn record_state_ids(conn: Db<'_>, room: RoomNid, ids: &[String]) -> Result<i64> {
    let mut missing = 0i64;
    let mut ins =
        conn.prepare_cached("INSERT OR REPLACE INTO resync_state (room_nid, event_id, missing) VALUES (?1, ?2, ?3)")?;
    for id in ids {
        let have = events::event_nid(conn, id)?.is_some();
        ins.execute(params![room, id, !have])?;
        missing += i64::from(!have);
    }
    Ok(missing)
}

/// The rows of `resync_state r` (room `?1`) whose event is still not stored: `missing` was set when the ids
/// arrived, and an event counts as fetched once it is in `events`.
const STILL_MISSING: &str =
    "r.room_nid = ?1 AND r.missing = 1 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = r.event_id)";

/// Listed ids whose events we still lack.
pub fn still_missing(conn: Db<'_>, room: RoomNid) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT r.event_id FROM resync_state r WHERE {STILL_MISSING}"))?;
    let rows = stmt.query_map([room], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// (listed ids, of which still missing).
pub fn listed_and_missing(conn: Db<'_>, room: RoomNid) -> Result<(i64, i64)> {
    let missing: i64 =
        conn.query_row(&format!("SELECT count(*) FROM resync_state r WHERE {STILL_MISSING}"), [room], |r| r.get(0))?;
    let listed: i64 = conn.query_row("SELECT count(*) FROM resync_state WHERE room_nid = ?1", [room], |r| r.get(0))?;
    Ok((listed, missing))
}

pub fn clear_state_ids(conn: Db<'_>, room: RoomNid) -> Result<()> {
    conn.execute("DELETE FROM resync_state WHERE room_nid = ?1", [room])?;
    Ok(())
}

/// Deletes up to `limit` of the room's listed state ids; returns how many.
pub fn clear_some_state_ids(conn: Db<'_>, room: RoomNid, limit: usize) -> Result<usize> {
    let n = conn
        .prepare_cached(
            "DELETE FROM resync_state WHERE room_nid = ?1 AND event_id IN
                 (SELECT event_id FROM resync_state WHERE room_nid = ?1 LIMIT ?2)",
        )?
        .execute(params![room, limit as i64])?;
    Ok(n)
}

/// The listed state events we hold, by event number, after `after`: the auth phase's walk, read once per run of
/// the job (8 bytes an event). The listed ids are looked up in the `event_id` index only (it holds the numbers), and
/// the walk then reads the rows in the order they were written.
pub fn auth_order(conn: Db<'_>, room: RoomNid, after: Option<EventNid>) -> Result<Vec<EventNid>> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.event_nid FROM resync_state r JOIN events e ON e.event_id = r.event_id
         WHERE r.room_nid = ?1 AND (?2 IS NULL OR e.event_nid > ?2) ORDER BY e.event_nid",
    )?;
    let rows = stmt.query_map(params![room, after], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A listed state event that we hold and did not reject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedState {
    pub event_id: String,
    pub state_key_nid: StateKeyNid,
    pub event_nid: EventNid,
    pub event_type: String,
    pub state_key: String,
    /// A member event's content as `room_members` keeps it (read with the row: the fill applies each one).
    pub member: Option<MemberContent>,
}

/// Where the fill stands: the `(event type, state key, event nid)` of the last listed event it handled.
pub type FillKey = (String, String, i64);

/// The listed state events we hold and did not reject, in fill order (event type, state key, event nid), after
/// `after`: the walk of the fill, read once per run of the job (8 bytes an event). In that order each fill write
/// appends to `room_members` and its user index instead of touching pages all over them: 100k memberships in the
/// listed ids' (random) order wrote 397 MB to the log in 1.25 s, in user order 79 MB in 0.46 s
/// (bench/PROFILE.md, round 9).
pub fn fill_order(conn: Db<'_>, room: RoomNid, after: Option<&FillKey>) -> Result<Vec<EventNid>> {
    let (t, k, n) = match after {
        Some((t, k, n)) => (Some(t.as_str()), Some(k.as_str()), Some(*n)),
        None => (None, None, None),
    };
    let mut stmt = conn.prepare_cached(
        "SELECT e.event_nid FROM resync_state r
         JOIN events e ON e.event_id = r.event_id JOIN state_keys k ON k.state_key_nid = e.state_key_nid
         WHERE r.room_nid = ?1 AND e.rejected IS NULL
           AND (?2 IS NULL OR (k.event_type, k.state_key, e.event_nid) > (?2, ?3, ?4))
         ORDER BY k.event_type, k.state_key, e.event_nid",
    )?;
    let rows = stmt.query_map(params![room, t, k, n], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The fetched state events `nids`, in that order, with what the fill needs of each (those rejected or gone since
/// are left out).
pub fn fetched_state_of(conn: Db<'_>, nids: &[EventNid]) -> Result<Vec<FetchedState>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT e.event_id, e.state_key_nid, e.event_nid, k.event_type, k.state_key, {MEMBER_CONTENT_COLS}
         FROM events e JOIN state_keys k ON k.state_key_nid = e.state_key_nid
         WHERE e.event_nid = ?1 AND e.rejected IS NULL"
    ))?;
    let mut out = Vec::with_capacity(nids.len());
    for nid in nids {
        let row = stmt
            .query_row([nid], |r| {
                let event_type: String = r.get(3)?;
                let member = if event_type == "m.room.member" { Some(member_content_at(r, 5)?) } else { None };
                Ok(FetchedState {
                    event_id: r.get(0)?,
                    state_key_nid: r.get(1)?,
                    event_nid: r.get(2)?,
                    event_type,
                    state_key: r.get(4)?,
                    member,
                })
            })
            .optional()?;
        out.extend(row);
    }
    Ok(out)
}

/// Adds entries to a state group in place, keeping the entries it already has for those keys.
pub fn add_group_entries_if_absent(conn: Db<'_>, sg: StateGroup, entries: &[(StateKeyNid, EventNid)]) -> Result<()> {
    let mut ins = conn.prepare_cached(
        "INSERT OR IGNORE INTO state_group_entries (sg, state_key_nid, event_nid) VALUES (?1, ?2, ?3)",
    )?;
    for (skn, nid) in entries {
        ins.execute(params![sg, skn, nid])?;
    }
    Ok(())
}

/// Sets a state group's entry for a key in place, replacing the one it has.
pub fn set_group_entry(conn: Db<'_>, sg: StateGroup, skn: StateKeyNid, nid: EventNid) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO state_group_entries (sg, state_key_nid, event_nid) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![sg, skn, nid])?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// Events judged again, extremities, outliers

/// Marks a stored event rejected, by id.
pub fn set_rejected(conn: Db<'_>, event_id: &str, reason: &str) -> Result<()> {
    conn.prepare_cached("UPDATE events SET rejected = ?2 WHERE event_id = ?1")?.execute(params![event_id, reason])?;
    Ok(())
}

/// Marks a stored event rejected, by nid.
pub fn set_rejected_nid(conn: Db<'_>, nid: EventNid, reason: &str) -> Result<()> {
    conn.prepare_cached("UPDATE events SET rejected = ?2 WHERE event_nid = ?1")?.execute(params![nid, reason])?;
    Ok(())
}

/// A re-judged timeline event's outcome (`None`: accepted) and the state after it.
pub fn set_outcome(conn: Db<'_>, nid: EventNid, rejected: Option<&str>, sg_after: StateGroup) -> Result<()> {
    conn.prepare_cached("UPDATE events SET rejected = ?2, sg_after = ?3 WHERE event_nid = ?1")?
        .execute(params![nid, rejected, sg_after])?;
    Ok(())
}

/// The room's timeline events after stream position `since`, in stream order.
pub fn timeline_since(conn: Db<'_>, room: RoomNid, since: StreamPos) -> Result<Vec<EventRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {} FROM events WHERE room_nid = ?1 AND stream_ordering > ?2 AND outlier = 0 ORDER BY stream_ordering",
        events::EVENT_COLS
    ))?;
    let rows = stmt.query_map(params![room, since], events::event_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether event `prev_id` has an accepted timeline child in the room other than `except`.
pub fn has_accepted_child(conn: Db<'_>, room: RoomNid, prev_id: &str, except: EventNid) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM event_edges x JOIN events e ON e.event_nid = x.event_nid
             WHERE x.prev_event_id = ?1 AND e.room_nid = ?2 AND e.event_nid != ?3 AND e.rejected IS NULL AND e.outlier = 0",
        )?
        .exists(params![prev_id, room, except])?)
}

pub fn remove_extremity(conn: Db<'_>, room: RoomNid, nid: EventNid) -> Result<()> {
    conn.execute("DELETE FROM forward_extremities WHERE room_nid = ?1 AND event_nid = ?2", params![room, nid])?;
    Ok(())
}

pub fn add_extremity(conn: Db<'_>, room: RoomNid, nid: EventNid) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO forward_extremities (room_nid, event_nid) VALUES (?1, ?2)",
        params![room, nid],
    )?;
    Ok(())
}

/// Gives an outlier of the room the state after it (learned across a gap), unless it has one.
pub fn set_outlier_state(conn: Db<'_>, room: RoomNid, event_id: &str, sg: StateGroup) -> Result<()> {
    conn.execute(
        "UPDATE events SET sg_after = ?2 WHERE event_id = ?1 AND room_nid = ?3 AND outlier = 1 AND sg_after IS NULL",
        params![event_id, sg, room],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::events::NewEvent;
    use crate::store::testing::memory_db;
    use crate::store::{rooms, state_groups};

    fn event(conn: Db<'_>, room: RoomNid, id: &str, key: Option<(&str, &str)>) -> EventNid {
        let skn = key.map(|(t, k)| state_groups::state_key_nid(conn, t, k).unwrap());
        events::insert_event(
            conn,
            &NewEvent {
                event_id: id,
                room_nid: room,
                event_type: key.map_or("m.room.message", |k| k.0),
                state_key_nid: skn,
                sender: "@a:x",
                origin_server_ts: 0,
                depth: 1,
                stream_ordering: None,
                outlier: true,
                rejected: None,
                soft_failed: false,
                txn: None,
                json: "{}",
            },
        )
        .unwrap()
    }

    #[test]
    fn state_ids_missing_and_fetched() {
        let conn = memory_db();
        let room = rooms::insert_room(conn.db(), "!r:x", "12").unwrap();
        event(conn.db(), room, "$held", Some(("m.room.member", "@a:x")));
        let ids = vec!["$held".to_owned(), "$b".to_owned(), "$c".to_owned()];
        assert_eq!(record_state_ids(conn.db(), room, &ids).unwrap(), 2);
        assert_eq!(still_missing(conn.db(), room).unwrap().len(), 2);
        event(conn.db(), room, "$b", Some(("m.room.member", "@b:x")));
        assert_eq!(still_missing(conn.db(), room).unwrap(), vec!["$c".to_owned()]);
        assert_eq!(listed_and_missing(conn.db(), room).unwrap(), (3, 1));
        // The auth phase's walk: the listed events held, by number.
        let (held, b) = (events::event_nid(conn.db(), "$held").unwrap(), events::event_nid(conn.db(), "$b").unwrap());
        assert_eq!(auth_order(conn.db(), room, None).unwrap(), [held.unwrap(), b.unwrap()]);
        assert_eq!(auth_order(conn.db(), room, held).unwrap(), [b.unwrap()]);
        // The fill's walk is in state key order (@a before @b), whatever the ids' order.
        let order = fill_order(conn.db(), room, None).unwrap();
        let fetched = fetched_state_of(conn.db(), &order).unwrap();
        assert_eq!(fetched.iter().map(|f| f.event_id.as_str()).collect::<Vec<_>>(), ["$held", "$b"]);
        let at_held: FillKey = ("m.room.member".into(), "@a:x".into(), fetched[0].event_nid.0);
        assert_eq!(fill_order(conn.db(), room, Some(&at_held)).unwrap(), [fetched[1].event_nid]);
        set_rejected(conn.db(), "$b", "forbidden").unwrap();
        assert_eq!(fetched_state_of(conn.db(), &order).unwrap().len(), 1);
        assert_eq!(fill_order(conn.db(), room, None).unwrap().len(), 1);
        clear_state_ids(conn.db(), room).unwrap();
        assert_eq!(listed_and_missing(conn.db(), room).unwrap(), (0, 0));
    }

    #[test]
    fn partial_flags_and_servers() {
        let conn = memory_db();
        let room = rooms::insert_room(conn.db(), "!r:x", "12").unwrap();
        set_room_partial(conn.db(), room, true).unwrap();
        assert!(rooms::room_by_nid(conn.db(), room).unwrap().unwrap().partial_state);
        add_partial_servers(conn.db(), room, ["a", "b", "a"]).unwrap();
        assert!(servers_missed_while_partial(conn.db(), room, "us").unwrap().is_empty());
        clear_partial_servers(conn.db(), room).unwrap();
        set_room_partial(conn.db(), room, false).unwrap();
        assert!(!rooms::room_by_nid(conn.db(), room).unwrap().unwrap().partial_state);
    }
}
