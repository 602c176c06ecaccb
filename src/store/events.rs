//! Events: their rows and JSON, prev and auth edges, forward extremities, redactions.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::{EventNid, RoomNid, StateGroup, StateKeyNid, StreamPos};
use crate::store::Db;

#[derive(Clone, Debug)]
pub struct EventRow {
    pub event_nid: EventNid,
    pub event_id: String,
    pub room_nid: RoomNid,
    pub event_type: String,
    pub state_key_nid: Option<StateKeyNid>,
    pub sender: String,
    pub origin_server_ts: i64,
    pub depth: i64,
    pub stream_ordering: Option<StreamPos>,
    pub outlier: bool,
    pub rejected: Option<String>,
    pub redacted_by: Option<String>,
    pub sg_after: Option<StateGroup>,
    pub txn_device: Option<String>,
    pub txn_id: Option<String>,
    pub json: String,
}

pub const EVENT_COLS: &str = "event_nid, event_id, room_nid, event_type, state_key_nid, sender, origin_server_ts, \
     depth, stream_ordering, outlier, rejected, redacted_by, sg_after, txn_device, txn_id, json";

pub fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        event_nid: r.get(0)?,
        event_id: r.get(1)?,
        room_nid: r.get(2)?,
        event_type: r.get(3)?,
        state_key_nid: r.get(4)?,
        sender: r.get(5)?,
        origin_server_ts: r.get(6)?,
        depth: r.get(7)?,
        stream_ordering: r.get(8)?,
        outlier: r.get(9)?,
        rejected: r.get(10)?,
        redacted_by: r.get(11)?,
        sg_after: r.get(12)?,
        txn_device: r.get(13)?,
        txn_id: r.get(14)?,
        json: r.get(15)?,
    })
}

pub fn event_by_id(conn: Db<'_>, event_id: &str) -> Result<Option<EventRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {EVENT_COLS} FROM events WHERE event_id = ?1"))?
        .query_row([event_id], event_row)
        .optional()?)
}

/// The stored events among `ids` (those we hold), in one query per 1024 ids: a caller looking up thousands (a
/// resync's auth phase) saves a statement round per event. The order is SQLite's.
/// Needs the `rarray` module (loaded on pooled readers).
pub fn events_by_ids(conn: Db<'_>, ids: &[&str]) -> Result<Vec<EventRow>> {
    let values = ids.iter().map(|id| rusqlite::types::Value::Text((*id).to_owned())).collect();
    rows_in(conn, "event_id", values, "")
}

/// The events `nids` we hold, in number order.
pub fn events_by_nids(conn: Db<'_>, nids: &[EventNid]) -> Result<Vec<EventRow>> {
    rows_in(
        conn,
        "event_nid",
        nids.iter().map(|n| rusqlite::types::Value::Integer(n.0)).collect(),
        "ORDER BY event_nid",
    )
}

/// The events whose `column` is one of `values`, 1024 values a query (`rarray`: readers only), each query's rows in
/// the order `order` says.
fn rows_in(conn: Db<'_>, column: &str, values: Vec<rusqlite::types::Value>, order: &str) -> Result<Vec<EventRow>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {EVENT_COLS} FROM events WHERE {column} IN rarray(?1) {order}"))?;
    let mut out = Vec::with_capacity(values.len());
    for chunk in values.chunks(1024) {
        for row in stmt.query_map([std::rc::Rc::new(chunk.to_vec())], event_row)? {
            out.push(row?);
        }
    }
    Ok(out)
}

pub fn event_by_nid(conn: Db<'_>, nid: EventNid) -> Result<Option<EventRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {EVENT_COLS} FROM events WHERE event_nid = ?1"))?
        .query_row([nid], event_row)
        .optional()?)
}

pub fn event_nid(conn: Db<'_>, event_id: &str) -> Result<Option<EventNid>> {
    Ok(conn
        .prepare_cached("SELECT event_nid FROM events WHERE event_id = ?1")?
        .query_row([event_id], |r| r.get(0))
        .optional()?)
}

pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub room_nid: RoomNid,
    pub event_type: &'a str,
    pub state_key_nid: Option<StateKeyNid>,
    pub sender: &'a str,
    pub origin_server_ts: i64,
    pub depth: i64,
    pub stream_ordering: Option<StreamPos>,
    pub outlier: bool,
    pub rejected: Option<&'a str>,
    pub soft_failed: bool,
    pub txn: Option<(&'a str, &'a str)>,
    pub json: &'a str,
}

pub fn insert_event(conn: Db<'_>, e: &NewEvent<'_>) -> Result<EventNid> {
    insert_event_with_nid(conn, None, e)
}

/// [`insert_event`] under a given `event_nid` (that of an outlier [`take_outlier`] removed), or a new one.
pub fn insert_event_with_nid(conn: Db<'_>, event_nid: Option<EventNid>, e: &NewEvent<'_>) -> Result<EventNid> {
    conn.prepare_cached(
        "INSERT INTO events (event_id, room_nid, event_type, state_key_nid, sender, origin_server_ts, depth,
            stream_ordering, outlier, rejected, soft_failed, txn_device, txn_id, json, event_nid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        e.event_id,
        e.room_nid,
        e.event_type,
        e.state_key_nid,
        e.sender,
        e.origin_server_ts,
        e.depth,
        e.stream_ordering,
        e.outlier,
        e.rejected,
        e.soft_failed,
        e.txn.map(|t| t.0),
        e.txn.map(|t| t.1),
        e.json,
        event_nid,
    ])?;
    let nid = EventNid(conn.last_insert_rowid());
    index_content(conn, nid, e.room_nid, e.event_type, e.json)?;
    Ok(nid)
}

/// Writes an event's relation and searchable text into their indexes (the JSON is parsed only for event types
/// that are searchable or content that mentions a relation, so a bulk import of members costs nothing here).
fn index_content(conn: Db<'_>, nid: EventNid, room_nid: RoomNid, event_type: &str, json: &str) -> Result<()> {
    let searchable = crate::store::search::key_of(event_type).is_some();
    if !searchable && !json.contains("m.relates_to") {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(json)?;
    crate::store::relations::index(conn, nid, room_nid, &v)?;
    if searchable {
        crate::store::search::index(conn, nid, event_type, &v)?;
    }
    Ok(())
}

/// Drops an event's rows from the relation and search indexes.
fn unindex_content(conn: Db<'_>, nid: EventNid) -> Result<()> {
    crate::store::relations::unindex(conn, nid)?;
    crate::store::search::unindex(conn, nid)
}

/// Removes the outlier row of `event_id` (with its DAG and auth edges) so the event can be stored again as a
/// timeline event under the same `event_nid`; returns that nid, or None when the event is not held as an outlier.
/// The nid is kept because the state groups and memberships of a resync's or gap's state cite it.
pub fn take_outlier(conn: Db<'_>, event_id: &str) -> Result<Option<EventNid>> {
    let nid: Option<EventNid> = conn
        .prepare_cached("SELECT event_nid FROM events WHERE event_id = ?1 AND outlier = 1")?
        .query_row([event_id], |r| r.get(0))
        .optional()?;
    if let Some(nid) = nid {
        conn.prepare_cached("DELETE FROM event_edges WHERE event_nid = ?1")?.execute([nid])?;
        conn.prepare_cached("DELETE FROM event_auth WHERE event_nid = ?1")?.execute([nid])?;
        conn.prepare_cached("DELETE FROM events WHERE event_nid = ?1")?.execute([nid])?;
        unindex_content(conn, nid)?;
    }
    Ok(nid)
}

pub fn set_sg_after(conn: Db<'_>, event_nid: EventNid, sg: StateGroup) -> Result<()> {
    conn.prepare_cached("UPDATE events SET sg_after = ?2 WHERE event_nid = ?1")?.execute(params![event_nid, sg])?;
    Ok(())
}

pub fn insert_auth_edges(conn: Db<'_>, event_nid: EventNid, auth: &[String]) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("INSERT OR IGNORE INTO event_auth (event_nid, auth_event_id) VALUES (?1, ?2)")?;
    for a in auth {
        stmt.execute(params![event_nid, a])?;
    }
    Ok(())
}

/// The auth event ids of an event, from the edge table.
pub fn auth_event_ids(conn: Db<'_>, event_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT a.auth_event_id FROM event_auth a JOIN events e ON e.event_nid = a.event_nid WHERE e.event_id = ?1",
    )?;
    let rows = stmt.query_map([event_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The state events that cite `event_id` among their auth events: (nid, event id, state key nid). Walks the auth
/// DAG downwards over the `event_auth_by_auth` index.
pub fn auth_children(conn: Db<'_>, event_id: &str) -> Result<Vec<(EventNid, String, StateKeyNid)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.event_nid, e.event_id, e.state_key_nid FROM event_auth a JOIN events e ON e.event_nid = a.event_nid
         WHERE a.auth_event_id = ?1 AND e.state_key_nid IS NOT NULL",
    )?;
    let rows = stmt.query_map([event_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn insert_edges(conn: Db<'_>, event_nid: EventNid, prevs: &[String]) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("INSERT OR IGNORE INTO event_edges (event_nid, prev_event_id) VALUES (?1, ?2)")?;
    for p in prevs {
        stmt.execute(params![event_nid, p])?;
    }
    Ok(())
}

pub fn forward_extremities(conn: Db<'_>, room_nid: RoomNid) -> Result<Vec<EventNid>> {
    let mut stmt = conn.prepare_cached("SELECT event_nid FROM forward_extremities WHERE room_nid = ?1")?;
    let rows = stmt.query_map([room_nid], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn replace_extremities(conn: Db<'_>, room_nid: RoomNid, remove: &[EventNid], add: EventNid) -> Result<()> {
    let mut del = conn.prepare_cached("DELETE FROM forward_extremities WHERE room_nid = ?1 AND event_nid = ?2")?;
    for nid in remove {
        del.execute(params![room_nid, nid])?;
    }
    conn.prepare_cached("INSERT OR IGNORE INTO forward_extremities (room_nid, event_nid) VALUES (?1, ?2)")?
        .execute(params![room_nid, add])?;
    Ok(())
}

pub fn set_redacted(conn: Db<'_>, event_nid: EventNid, redacted_by: &str, json: &str) -> Result<()> {
    conn.execute(
        "UPDATE events SET redacted_by = ?2, json = ?3 WHERE event_nid = ?1",
        params![event_nid, redacted_by, json],
    )?;
    // A redacted event's content is gone: it relates to nothing and matches no search any more.
    unindex_content(conn, event_nid)
}

/// The auth chain (event nids) of the given events, walked over the auth-edge table; includes the starts (first, in
/// their order), then each level of the walk ([`auth_chain_beyond`]).
/// Needs the `rarray` module (loaded on pooled readers).
pub fn auth_chain_nids(conn: Db<'_>, start: &[EventNid]) -> Result<Vec<EventNid>> {
    let mut seen = std::collections::HashSet::with_capacity(start.len());
    let mut out: Vec<EventNid> = start.iter().copied().filter(|n| seen.insert(*n)).collect();
    out.extend(auth_chain_beyond(conn, start)?.into_iter().map(|x| x.0));
    Ok(out)
}

/// The events of the given events' auth chain that are not among them, with their ids, level by level. Set-based:
/// one query per level for the auth event ids of the whole frontier, and each distinct id resolved once — the
/// members of a big room share their create, power-level and join-rules auth events, which a per-row walk (a
/// recursive CTE) looked up again for every member.
/// Needs the `rarray` module (loaded on pooled readers).
pub fn auth_chain_beyond(conn: Db<'_>, start: &[EventNid]) -> Result<Vec<(EventNid, String)>> {
    use rusqlite::types::Value;
    use std::collections::HashSet;
    use std::rc::Rc;
    let mut seen: HashSet<EventNid> = start.iter().copied().collect();
    let mut out: Vec<(EventNid, String)> = Vec::new();
    // Auth event ids already resolved (or found unknown): each is looked up once.
    let mut resolved: HashSet<String> = HashSet::new();
    let mut edges = conn.prepare_cached("SELECT auth_event_id FROM event_auth WHERE event_nid IN rarray(?1)")?;
    let mut lookup = conn.prepare_cached("SELECT event_nid, event_id FROM events WHERE event_id IN rarray(?1)")?;
    let mut frontier: Vec<Value> = seen.iter().map(|n| Value::Integer(n.0)).collect();
    while !frontier.is_empty() {
        let mut fresh: Vec<Value> = Vec::new();
        let mut rows = edges.query([Rc::new(std::mem::take(&mut frontier))])?;
        while let Some(r) = rows.next()? {
            let id = r.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
            if !resolved.contains(id) {
                resolved.insert(id.to_owned());
                fresh.push(Value::Text(id.to_owned()));
            }
        }
        if fresh.is_empty() {
            break;
        }
        let mut found: Vec<(EventNid, String)> =
            lookup.query_map([Rc::new(fresh)], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        found.sort_unstable_by_key(|x| x.0);
        for (n, id) in found {
            if seen.insert(n) {
                frontier.push(Value::Integer(n.0));
                out.push((n, id));
            }
        }
    }
    Ok(out)
}

/// The stored JSON of each of `nids` (those that exist), read 1024 at a time, handed to `f` until it returns
/// false. The order of a batch is the table's; sort `nids` to read the table forwards.
pub fn each_json(conn: Db<'_>, nids: &[EventNid], mut f: impl FnMut(&str) -> bool) -> Result<()> {
    let mut stmt = conn.prepare_cached("SELECT json FROM events WHERE event_nid IN rarray(?1)")?;
    for chunk in nids.chunks(1024) {
        let values: std::rc::Rc<Vec<rusqlite::types::Value>> =
            std::rc::Rc::new(chunk.iter().map(|n| rusqlite::types::Value::Integer(n.0)).collect());
        let mut rows = stmt.query([values])?;
        while let Some(r) = rows.next()? {
            if !f(r.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Stored JSON of events by nid.
pub fn json_of(conn: Db<'_>, nid: EventNid) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT json FROM events WHERE event_nid = ?1")?
        .query_row([nid], |r| r.get(0))
        .optional()?)
}

/// The event id of an event nid.
pub fn event_id_of(conn: Db<'_>, nid: EventNid) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT event_id FROM events WHERE event_nid = ?1")?
        .query_row([nid], |r| r.get(0))
        .optional()?)
}

/// What the bulk import needs of a stored event: (event nid, state key nid, type, json).
pub type StateEntry = (EventNid, Option<StateKeyNid>, String, String);

/// The [`StateEntry`] of an event.
pub fn state_entry_by_id(conn: Db<'_>, event_id: &str) -> Result<Option<StateEntry>> {
    Ok(conn
        .prepare_cached("SELECT event_nid, state_key_nid, event_type, json FROM events WHERE event_id = ?1")?
        .query_row([event_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?)
}

/// Sets the state after every event of a room from `from` (by nid) on (bulk import).
pub fn set_sg_after_from(conn: Db<'_>, room_nid: RoomNid, from: EventNid, sg: StateGroup) -> Result<()> {
    conn.prepare_cached("UPDATE events SET sg_after = ?3 WHERE room_nid = ?1 AND event_nid >= ?2")?
        .execute(params![room_nid, from, sg])?;
    Ok(())
}

/// Drops all forward extremities of a room.
pub fn clear_extremities(conn: Db<'_>, room_nid: RoomNid) -> Result<()> {
    conn.prepare_cached("DELETE FROM forward_extremities WHERE room_nid = ?1")?.execute([room_nid])?;
    Ok(())
}

/// The room's oldest timeline event (lowest stream position): (nid, event id).
pub fn oldest_timeline_event(conn: Db<'_>, room_nid: RoomNid) -> Result<Option<(EventNid, String)>> {
    Ok(conn
        .prepare_cached(
            "SELECT event_nid, event_id FROM events WHERE room_nid = ?1 AND stream_ordering IS NOT NULL
             ORDER BY stream_ordering LIMIT 1",
        )?
        .query_row([room_nid], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// The state group of the room's oldest timeline event that has one (backfilled history, numbered below 0, is
/// held without state): the nearest state we know to the history before it.
pub fn earliest_timeline_sg(conn: Db<'_>, room_nid: RoomNid) -> Result<Option<StateGroup>> {
    Ok(conn
        .prepare_cached(
            "SELECT sg_after FROM events WHERE room_nid = ?1 AND stream_ordering >= 0 AND sg_after IS NOT NULL
             ORDER BY stream_ordering LIMIT 1",
        )?
        .query_row([room_nid], |r| r.get(0))
        .optional()?)
}

/// Prev events of an event that are not in our timeline (unknown, or known only as outliers).
pub fn prevs_missing_from_timeline(conn: Db<'_>, event_nid: EventNid) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT x.prev_event_id FROM event_edges x LEFT JOIN events e ON e.event_id = x.prev_event_id
         WHERE x.event_nid = ?1 AND (e.event_nid IS NULL OR e.stream_ordering IS NULL)",
    )?;
    let rows = stmt.query_map([event_nid], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The lowest stream position of any event, or 0 when none is below 0: backfilled history is numbered
/// downwards from here.
pub fn lowest_stream_ordering(conn: Db<'_>) -> Result<StreamPos> {
    Ok(conn
        .prepare_cached("SELECT min(0, coalesce(min(stream_ordering), 0)) FROM events")?
        .query_row([], |r| r.get(0))?)
}

/// Moves an outlier into the timeline at `stream` (backfill), with its auth outcome.
/// A redaction's event id and the event ids it names at the top level and in its content.
pub type RedactionTargets = (String, Option<String>, Option<String>);

/// The room's redactions that were not rejected, each with the event it names at the top level (`redacts`, up to
/// room version 10) and in its content (`content.redacts`, from v11): callers go by the parsed event, which knows
/// which of the two counts.
pub fn redaction_targets(conn: Db<'_>, room_nid: RoomNid) -> Result<Vec<RedactionTargets>> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id, json_extract(json, '$.redacts'), json_extract(json, '$.content.redacts') FROM events
         WHERE room_nid = ?1 AND event_type = 'm.room.redaction' AND rejected IS NULL",
    )?;
    let rows = stmt.query_map([room_nid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn set_backfilled(conn: Db<'_>, event_nid: EventNid, stream: StreamPos, rejected: Option<&str>) -> Result<()> {
    conn.prepare_cached("UPDATE events SET outlier = 0, stream_ordering = ?2, rejected = ?3 WHERE event_nid = ?1")?
        .execute(params![event_nid, stream, rejected])?;
    Ok(())
}

/// Gives an outlier a stream position while it stays an outlier: an out-of-band membership of one of our users
/// (a rejected invite's leave) that their `/sync` shows, in a room we hold no state for.
pub fn set_out_of_band_stream(conn: Db<'_>, event_nid: EventNid, stream: StreamPos) -> Result<()> {
    conn.prepare_cached("UPDATE events SET stream_ordering = ?2 WHERE event_nid = ?1 AND outlier = 1")?
        .execute(params![event_nid, stream])?;
    Ok(())
}

/// The state group after the last timeline event at or before stream position `pos`.
pub fn sg_at_stream(conn: Db<'_>, room_nid: RoomNid, pos: StreamPos) -> Result<Option<StateGroup>> {
    Ok(conn
        .prepare_cached(
            "SELECT sg_after FROM events WHERE room_nid = ?1 AND stream_ordering <= ?2 AND sg_after IS NOT NULL
             AND stream_ordering IS NOT NULL ORDER BY stream_ordering DESC LIMIT 1",
        )?
        .query_row(params![room_nid, pos], |r| r.get(0))
        .optional()?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::testing::memory_db;
    use crate::store::{rooms, state_groups};

    /// Stores a minimal event: a state event when `state` is given, in the timeline at `stream` or as an outlier.
    pub(crate) fn insert_test_event(
        conn: Db<'_>,
        room_nid: RoomNid,
        event_id: &str,
        stream: Option<i64>,
        state: Option<(&str, &str)>,
    ) -> EventNid {
        let skn = state.map(|(t, k)| state_groups::state_key_nid(conn, t, k).unwrap());
        let json = format!(r#"{{"event_id":"{event_id}"}}"#);
        insert_event(
            conn,
            &NewEvent {
                event_id,
                room_nid,
                event_type: state.map_or("m.room.message", |s| s.0),
                state_key_nid: skn,
                sender: "@u:x",
                origin_server_ts: 1,
                depth: 1,
                stream_ordering: stream.map(StreamPos),
                outlier: stream.is_none(),
                rejected: None,
                soft_failed: false,
                txn: None,
                json: &json,
            },
        )
        .unwrap()
    }

    fn room(conn: Db<'_>) -> RoomNid {
        rooms::insert_room(conn, "!r:x", "12").unwrap()
    }

    #[test]
    fn an_out_of_band_outlier_gets_a_stream_position_and_stays_an_outlier() {
        let conn = memory_db();
        let r = room(conn.db());
        let leave = insert_test_event(conn.db(), r, "$leave", None, Some(("m.room.member", "@u:x")));
        let timeline = insert_test_event(conn.db(), r, "$msg", Some(3), None);
        set_out_of_band_stream(conn.db(), leave, StreamPos(7)).unwrap();
        set_out_of_band_stream(conn.db(), timeline, StreamPos(9)).unwrap();
        let row = event_by_nid(conn.db(), leave).unwrap().unwrap();
        assert_eq!((row.outlier, row.stream_ordering), (true, Some(StreamPos(7))));
        // A timeline event keeps its own position.
        assert_eq!(event_by_nid(conn.db(), timeline).unwrap().unwrap().stream_ordering, Some(StreamPos(3)));
    }

    #[test]
    fn a_held_outlier_is_stored_again_under_its_event_nid() {
        let conn = memory_db();
        let r = room(conn.db());
        let nid = insert_test_event(conn.db(), r, "$o", None, None);
        insert_auth_edges(conn.db(), nid, &["$create".to_owned()]).unwrap();
        insert_test_event(conn.db(), r, "$later", Some(1), None);

        assert_eq!(take_outlier(conn.db(), "$o").unwrap(), Some(nid));
        assert!(event_nid(conn.db(), "$o").unwrap().is_none());
        let again = NewEvent {
            event_id: "$o",
            room_nid: r,
            event_type: "m.room.message",
            state_key_nid: None,
            sender: "@u:x",
            origin_server_ts: 1,
            depth: 1,
            stream_ordering: Some(StreamPos(2)),
            outlier: false,
            rejected: None,
            soft_failed: false,
            txn: None,
            json: "{}",
        };
        assert_eq!(insert_event_with_nid(conn.db(), Some(nid), &again).unwrap(), nid);
        assert!(!event_by_id(conn.db(), "$o").unwrap().unwrap().outlier);
        // Timeline events are not taken.
        assert_eq!(take_outlier(conn.db(), "$later").unwrap(), None);
    }

    #[test]
    fn an_event_is_found_by_id_and_by_nid() {
        let conn = memory_db();
        let r = room(conn.db());
        let skn = state_groups::state_key_nid(conn.db(), "m.room.topic", "").unwrap();
        let nid = insert_event(
            conn.db(),
            &NewEvent {
                event_id: "$a",
                room_nid: r,
                event_type: "m.room.topic",
                state_key_nid: Some(skn),
                sender: "@u:x",
                origin_server_ts: 42,
                depth: 7,
                stream_ordering: Some(StreamPos(5)),
                outlier: false,
                rejected: Some("nope"),
                soft_failed: false,
                txn: Some(("DEV", "t1")),
                json: "{}",
            },
        )
        .unwrap();
        let row = event_by_id(conn.db(), "$a").unwrap().unwrap();
        assert_eq!(row.event_nid, nid);
        assert_eq!(row.room_nid, r);
        assert_eq!(row.event_type, "m.room.topic");
        assert_eq!(row.state_key_nid, Some(skn));
        assert_eq!((row.origin_server_ts, row.depth), (42, 7));
        assert_eq!(row.stream_ordering, Some(StreamPos(5)));
        assert!(!row.outlier);
        assert_eq!(row.rejected.as_deref(), Some("nope"));
        assert_eq!((row.txn_device.as_deref(), row.txn_id.as_deref()), (Some("DEV"), Some("t1")));
        assert_eq!(row.sg_after, None);
        assert_eq!(event_by_nid(conn.db(), nid).unwrap().unwrap().event_id, "$a");
        assert_eq!(event_nid(conn.db(), "$a").unwrap(), Some(nid));
        assert_eq!(event_id_of(conn.db(), nid).unwrap().as_deref(), Some("$a"));
        assert_eq!(json_of(conn.db(), nid).unwrap().as_deref(), Some("{}"));
        assert_eq!(
            state_entry_by_id(conn.db(), "$a").unwrap(),
            Some((nid, Some(skn), "m.room.topic".into(), "{}".into()))
        );
        assert!(event_by_id(conn.db(), "$b").unwrap().is_none());
        assert!(event_nid(conn.db(), "$b").unwrap().is_none());
        assert!(json_of(conn.db(), EventNid(nid.0 + 1)).unwrap().is_none());
    }

    #[test]
    fn redaction_targets_are_read_from_both_places_and_skip_rejected_redactions() {
        let conn = memory_db();
        let r = room(conn.db());
        let ev = |id: &'static str, stream: i64, rejected: bool| crate::store::testing::Ev {
            event_type: "m.room.redaction",
            rejected,
            ..crate::store::testing::Ev::message(id, "@a:x", stream)
        };
        crate::store::testing::event(conn.db(), r, ev("$top", 1, false));
        crate::store::testing::event(conn.db(), r, ev("$content", 2, false));
        crate::store::testing::event(conn.db(), r, ev("$rejected", 3, true));
        conn.db()
            .conn()
            .execute(r#"UPDATE events SET json = '{"redacts":"$x","content":{}}' WHERE event_id = '$top'"#, [])
            .unwrap();
        conn.db()
            .conn()
            .execute(r#"UPDATE events SET json = '{"content":{"redacts":"$y"}}' WHERE event_id = '$content'"#, [])
            .unwrap();
        let mut got = redaction_targets(conn.db(), r).unwrap();
        got.sort();
        assert_eq!(
            got,
            [("$content".to_owned(), None, Some("$y".to_owned())), ("$top".to_owned(), Some("$x".to_owned()), None)]
        );
    }

    #[test]
    fn redaction_replaces_the_json() {
        let conn = memory_db();
        let r = room(conn.db());
        let nid = insert_test_event(conn.db(), r, "$a", Some(1), None);
        set_redacted(conn.db(), nid, "$redaction", r#"{"redacted":true}"#).unwrap();
        let row = event_by_nid(conn.db(), nid).unwrap().unwrap();
        assert_eq!(row.redacted_by.as_deref(), Some("$redaction"));
        assert_eq!(row.json, r#"{"redacted":true}"#);
    }

    #[test]
    fn auth_edges_and_auth_chains() {
        let conn = memory_db();
        let r = room(conn.db());
        let create = insert_test_event(conn.db(), r, "$create", None, Some(("m.room.create", "")));
        let member = insert_test_event(conn.db(), r, "$member", None, Some(("m.room.member", "@u:x")));
        let msg = insert_test_event(conn.db(), r, "$msg", Some(1), None);
        let other = insert_test_event(conn.db(), r, "$other", Some(2), None);
        insert_auth_edges(conn.db(), member, &["$create".into()]).unwrap();
        insert_auth_edges(conn.db(), msg, &["$create".into(), "$member".into(), "$unknown".into()]).unwrap();
        // Inserting an edge twice is harmless.
        insert_auth_edges(conn.db(), msg, &["$create".into()]).unwrap();
        let mut ids = auth_event_ids(conn.db(), "$msg").unwrap();
        ids.sort();
        assert_eq!(ids, ["$create", "$member", "$unknown"]);
        assert!(auth_event_ids(conn.db(), "$create").unwrap().is_empty());
        let mut chain = auth_chain_nids(conn.db(), &[msg]).unwrap();
        chain.sort();
        assert_eq!(chain, [create, member, msg]);
        let mut chain = auth_chain_nids(conn.db(), &[member, other]).unwrap();
        chain.sort();
        assert_eq!(chain, [create, member, other]);
    }

    #[test]
    fn auth_chains_walk_every_level_once() {
        let conn = memory_db();
        let r = room(conn.db());
        let create = insert_test_event(conn.db(), r, "$create", None, Some(("m.room.create", "")));
        let pl = insert_test_event(conn.db(), r, "$pl", None, Some(("m.room.power_levels", "")));
        let invite = insert_test_event(conn.db(), r, "$invite", None, Some(("m.room.member", "@a:x")));
        let join_a = insert_test_event(conn.db(), r, "$join_a", None, Some(("m.room.member", "@a:x")));
        let join_b = insert_test_event(conn.db(), r, "$join_b", None, Some(("m.room.member", "@b:x")));
        insert_auth_edges(conn.db(), pl, &["$create".into()]).unwrap();
        insert_auth_edges(conn.db(), invite, &["$create".into(), "$pl".into()]).unwrap();
        insert_auth_edges(conn.db(), join_a, &["$create".into(), "$pl".into(), "$invite".into()]).unwrap();
        insert_auth_edges(conn.db(), join_b, &["$create".into(), "$pl".into(), "$gone".into()]).unwrap();
        // The starts first (once each, in their order), then each level; every event once.
        let chain = auth_chain_nids(conn.db(), &[join_b, join_a, join_b]).unwrap();
        assert_eq!(chain[..2], [join_b, join_a]);
        let mut rest = chain[2..].to_vec();
        rest.sort();
        assert_eq!(rest, [create, pl, invite]);
        assert_eq!(auth_chain_nids(conn.db(), &[create]).unwrap(), [create]);
        assert!(auth_chain_nids(conn.db(), &[]).unwrap().is_empty());
    }

    #[test]
    fn prev_edges_show_gaps_in_the_timeline() {
        let conn = memory_db();
        let r = room(conn.db());
        insert_test_event(conn.db(), r, "$old", Some(1), None);
        insert_test_event(conn.db(), r, "$outlier", None, None);
        let new = insert_test_event(conn.db(), r, "$new", Some(2), None);
        insert_edges(conn.db(), new, &["$old".into(), "$outlier".into(), "$unknown".into()]).unwrap();
        let mut gaps = prevs_missing_from_timeline(conn.db(), new).unwrap();
        gaps.sort();
        assert_eq!(gaps, ["$outlier", "$unknown"]);
    }

    #[test]
    fn forward_extremities_are_replaced_and_cleared() {
        let conn = memory_db();
        let r = room(conn.db());
        let a = insert_test_event(conn.db(), r, "$a", Some(1), None);
        let b = insert_test_event(conn.db(), r, "$b", Some(2), None);
        let c = insert_test_event(conn.db(), r, "$c", Some(3), None);
        replace_extremities(conn.db(), r, &[], a).unwrap();
        replace_extremities(conn.db(), r, &[], b).unwrap();
        let mut ext = forward_extremities(conn.db(), r).unwrap();
        ext.sort();
        assert_eq!(ext, [a, b]);
        replace_extremities(conn.db(), r, &[a, b], c).unwrap();
        assert_eq!(forward_extremities(conn.db(), r).unwrap(), [c]);
        clear_extremities(conn.db(), r).unwrap();
        assert!(forward_extremities(conn.db(), r).unwrap().is_empty());
    }

    #[test]
    fn state_after_events_and_at_stream_positions() {
        let conn = memory_db();
        let r = room(conn.db());
        let sg1 = state_groups::insert_sg(conn.db(), r, None, 0, false).unwrap();
        let sg2 = state_groups::insert_sg(conn.db(), r, Some(sg1), 1, false).unwrap();
        let a = insert_test_event(conn.db(), r, "$a", Some(10), None);
        let b = insert_test_event(conn.db(), r, "$b", Some(20), None);
        let c = insert_test_event(conn.db(), r, "$c", Some(30), None);
        set_sg_after(conn.db(), a, sg1).unwrap();
        assert_eq!(event_by_nid(conn.db(), a).unwrap().unwrap().sg_after, Some(sg1));
        set_sg_after_from(conn.db(), r, b, sg2).unwrap();
        assert_eq!(event_by_nid(conn.db(), a).unwrap().unwrap().sg_after, Some(sg1));
        assert_eq!(event_by_nid(conn.db(), b).unwrap().unwrap().sg_after, Some(sg2));
        assert_eq!(event_by_nid(conn.db(), c).unwrap().unwrap().sg_after, Some(sg2));
        assert_eq!(sg_at_stream(conn.db(), r, StreamPos(5)).unwrap(), None);
        assert_eq!(sg_at_stream(conn.db(), r, StreamPos(15)).unwrap(), Some(sg1));
        assert_eq!(sg_at_stream(conn.db(), r, StreamPos(20)).unwrap(), Some(sg2));
    }

    #[test]
    fn backfilled_events_go_below_the_oldest() {
        let conn = memory_db();
        let r = room(conn.db());
        assert_eq!(oldest_timeline_event(conn.db(), r).unwrap(), None);
        assert_eq!(lowest_stream_ordering(conn.db()).unwrap(), StreamPos(0));
        insert_test_event(conn.db(), r, "$live", Some(3), None);
        insert_test_event(conn.db(), r, "$live2", Some(4), None);
        assert_eq!(lowest_stream_ordering(conn.db()).unwrap(), StreamPos(0));
        let old = insert_test_event(conn.db(), r, "$old", None, None);
        set_backfilled(conn.db(), old, StreamPos(-1), Some("bad auth")).unwrap();
        let row = event_by_nid(conn.db(), old).unwrap().unwrap();
        assert!(!row.outlier);
        assert_eq!(row.stream_ordering, Some(StreamPos(-1)));
        assert_eq!(row.rejected.as_deref(), Some("bad auth"));
        assert_eq!(lowest_stream_ordering(conn.db()).unwrap(), StreamPos(-1));
        assert_eq!(oldest_timeline_event(conn.db(), r).unwrap(), Some((old, "$old".to_owned())));
    }
}
