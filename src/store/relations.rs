//! Event relations (`content.m.relates_to`): the `event_relations` index written when events are stored, and the
//! queries behind `/relations`, `/threads`, bundled aggregations and thread-aware notification counts.
//!
//! Every query returns only events that made it into the timeline (a stream position, neither rejected nor
//! soft-failed); outliers are indexed too, so an outlier that later enters the timeline is found without re-indexing.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use crate::error::Result;
use crate::store::events::{event_row, EventRow, EVENT_COLS};
use crate::store::ids::{EventNid, RoomNid, StreamPos};
use crate::store::Db;

/// `EVENT_COLS` qualified with the `e.` alias.
fn e_cols() -> String {
    EVENT_COLS.split(", ").map(|c| format!("e.{}", c.trim())).collect::<Vec<_>>().join(", ")
}

/// The timeline condition on `e` shared by every query.
const VISIBLE: &str = "e.stream_ordering IS NOT NULL AND e.outlier = 0 AND e.rejected IS NULL AND e.soft_failed = 0";

/// `(parent event id, rel_type, annotation key)` of an event's JSON content, when it relates to another event.
pub fn relation_of(content: &Value) -> Option<(&str, &str, Option<&str>)> {
    let r = content.get("m.relates_to")?;
    let parent = r.get("event_id")?.as_str()?;
    let rel_type = r.get("rel_type")?.as_str()?;
    Some((parent, rel_type, r.get("key").and_then(Value::as_str)))
}

/// Indexes the relation of a just-stored event (if its content has one).
pub(in crate::store) fn index(conn: Db<'_>, nid: EventNid, room_nid: RoomNid, event: &Value) -> Result<()> {
    let Some((parent, rel_type, key)) = event.get("content").and_then(relation_of) else { return Ok(()) };
    conn.prepare_cached(
        "INSERT OR REPLACE INTO event_relations (event_nid, room_nid, relates_to, rel_type, agg_key)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![nid, room_nid, parent, rel_type, key])?;
    Ok(())
}

/// Drops an event's relation (it was redacted, or its row is being replaced).
pub(in crate::store) fn unindex(conn: Db<'_>, nid: EventNid) -> Result<()> {
    conn.prepare_cached("DELETE FROM event_relations WHERE event_nid = ?1")?.execute([nid])?;
    Ok(())
}

/// What `/relations` asks for.
pub struct RelationsQuery<'a> {
    pub room_nid: RoomNid,
    pub parent: &'a str,
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
    /// Follow relations of relations this many levels deep (1 = direct children only).
    pub depth: i64,
    /// Stream window (`lo`, `hi`].
    pub lo: StreamPos,
    pub hi: StreamPos,
    pub backwards: bool,
    pub limit: i64,
}

/// Events relating to `q.parent` (directly or, with `depth` > 1, through other relations) in the window, newest
/// first when `backwards`, at most `limit`.
pub fn children(conn: Db<'_>, q: &RelationsQuery<'_>) -> Result<Vec<EventRow>> {
    let order = if q.backwards { "DESC" } else { "ASC" };
    let sql = format!(
        "WITH RECURSIVE rel(nid, depth) AS (
            SELECT event_nid, 1 FROM event_relations WHERE relates_to = ?1 AND room_nid = ?2
            UNION
            SELECT r.event_nid, rel.depth + 1 FROM rel JOIN events p ON p.event_nid = rel.nid
              JOIN event_relations r ON r.relates_to = p.event_id AND r.room_nid = ?2 WHERE rel.depth < ?5)
         SELECT DISTINCT {} FROM rel JOIN event_relations r ON r.event_nid = rel.nid JOIN events e ON e.event_nid = rel.nid
         WHERE {VISIBLE} AND (?3 IS NULL OR r.rel_type = ?3) AND (?4 IS NULL OR e.event_type = ?4)
           AND e.stream_ordering > ?6 AND e.stream_ordering <= ?7
         ORDER BY e.stream_ordering {order} LIMIT ?8",
        e_cols()
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(params![q.parent, q.room_nid, q.rel_type, q.event_type, q.depth, q.lo, q.hi, q.limit], event_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Counts of an event's children by relation type (timeline events only); empty for most events.
pub fn counts(conn: Db<'_>, parent: &str) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT r.rel_type, count(*) FROM event_relations r JOIN events e ON e.event_nid = r.event_nid
         WHERE r.relates_to = ?1 AND {VISIBLE} GROUP BY r.rel_type"
    ))?;
    let rows = stmt.query_map([parent], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The newest event of a thread.
pub fn latest_in_thread(conn: Db<'_>, root: &str) -> Result<Option<EventRow>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {} FROM event_relations r JOIN events e ON e.event_nid = r.event_nid
             WHERE r.relates_to = ?1 AND r.rel_type = 'm.thread' AND {VISIBLE} ORDER BY e.stream_ordering DESC LIMIT 1",
            e_cols()
        ))?
        .query_row([root], event_row)
        .optional()?)
}

/// Whether `user_id` sent an event in the thread rooted at `root`.
pub fn participated(conn: Db<'_>, root: &str, user_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM event_relations r JOIN events e ON e.event_nid = r.event_nid
             WHERE r.relates_to = ?1 AND r.rel_type = 'm.thread' AND e.sender = ?2 AND {VISIBLE})"
        ))?
        .query_row(params![root, user_id], |r| r.get(0))?)
}

/// The most recent valid edit (`m.replace`) of an event: same sender and type, the newest by `origin_server_ts`
/// (ties: the greatest event id), as the spec orders them.
pub fn latest_edit(conn: Db<'_>, original: &str, sender: &str, event_type: &str) -> Result<Option<EventRow>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {} FROM event_relations r JOIN events e ON e.event_nid = r.event_nid
             WHERE r.relates_to = ?1 AND r.rel_type = 'm.replace' AND e.sender = ?2 AND e.event_type = ?3
               AND e.state_key_nid IS NULL AND {VISIBLE}
             ORDER BY e.origin_server_ts DESC, e.event_id DESC LIMIT 1",
            e_cols()
        ))?
        .query_row(params![original, sender, event_type], event_row)
        .optional()?)
}

/// Ids of the events referencing (`m.reference`) an event, oldest first.
pub fn references(conn: Db<'_>, parent: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT e.event_id FROM event_relations r JOIN events e ON e.event_nid = r.event_nid
         WHERE r.relates_to = ?1 AND r.rel_type = 'm.reference' AND {VISIBLE} ORDER BY e.stream_ordering"
    ))?;
    let rows = stmt.query_map([parent], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The relation `(parent, rel_type)` an event was indexed with.
pub fn relation_by_id(conn: Db<'_>, event_id: &str) -> Result<Option<(String, String)>> {
    Ok(conn
        .prepare_cached(
            "SELECT r.relates_to, r.rel_type FROM events e JOIN event_relations r ON r.event_nid = e.event_nid
             WHERE e.event_id = ?1",
        )?
        .query_row([event_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// One thread of a room for `/threads`: its root and the stream position of its newest event.
pub struct ThreadRow {
    pub root: EventRow,
    pub latest: StreamPos,
}

/// Threads of a room whose newest event is below `before`, most recently active first; with `participant`, only
/// threads that user started or replied in. Roots must be timeline events of the room at or after `floor`.
pub fn threads(
    conn: Db<'_>,
    room_nid: RoomNid,
    participant: Option<&str>,
    floor: StreamPos,
    before: StreamPos,
    limit: i64,
) -> Result<Vec<ThreadRow>> {
    let sql = format!(
        "WITH t(root, latest) AS (
            SELECT r.relates_to, max(e.stream_ordering) FROM event_relations r JOIN events e ON e.event_nid = r.event_nid
            WHERE r.room_nid = ?1 AND r.rel_type = 'm.thread' AND {VISIBLE}
            GROUP BY r.relates_to)
         SELECT {}, t.latest FROM t JOIN events e ON e.event_id = t.root
         WHERE e.room_nid = ?1 AND {VISIBLE} AND e.stream_ordering >= ?3 AND t.latest < ?4
           AND (?2 IS NULL OR e.sender = ?2 OR EXISTS (SELECT 1 FROM event_relations r2 JOIN events c
                ON c.event_nid = r2.event_nid WHERE r2.relates_to = t.root AND r2.rel_type = 'm.thread' AND c.sender = ?2))
         ORDER BY t.latest DESC LIMIT ?5",
        e_cols()
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![room_nid, participant, floor, before, limit], |r| {
        Ok(ThreadRow { root: event_row(r)?, latest: r.get(16)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, memory_db, Ev};

    fn relate(conn: Db<'_>, nid: EventNid, room: RoomNid, parent: &str, rel_type: &str) {
        let v = serde_json::json!({"content": {"m.relates_to": {"event_id": parent, "rel_type": rel_type}}});
        index(conn, nid, room, &v).unwrap();
    }

    #[test]
    fn children_threads_and_edits_follow_the_index() {
        let conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        let root = testing::event(conn.db(), room, Ev::message("$root", "@a:x", 1));
        let _ = root;
        let t1 = testing::event(conn.db(), room, Ev::message("$t1", "@b:x", 2));
        let t2 = testing::event(conn.db(), room, Ev::message("$t2", "@a:x", 3));
        let edit = testing::event(conn.db(), room, Ev::message("$edit", "@a:x", 4));
        let nested = testing::event(conn.db(), room, Ev::message("$nested", "@c:x", 5));
        relate(conn.db(), t1, room, "$root", "m.thread");
        relate(conn.db(), t2, room, "$root", "m.thread");
        relate(conn.db(), edit, room, "$root", "m.replace");
        relate(conn.db(), nested, room, "$t1", "m.annotation");
        let q = |rel_type, depth, backwards| RelationsQuery {
            room_nid: room,
            parent: "$root",
            rel_type,
            event_type: None,
            depth,
            lo: StreamPos(i64::MIN),
            hi: StreamPos(i64::MAX),
            backwards,
            limit: 10,
        };
        let ids = |rows: Vec<EventRow>| rows.into_iter().map(|r| r.event_id).collect::<Vec<_>>();
        assert_eq!(ids(children(conn.db(), &q(None, 1, true)).unwrap()), ["$edit", "$t2", "$t1"]);
        assert_eq!(ids(children(conn.db(), &q(Some("m.thread"), 1, false)).unwrap()), ["$t1", "$t2"]);
        assert_eq!(ids(children(conn.db(), &q(None, 3, true)).unwrap()), ["$nested", "$edit", "$t2", "$t1"]);
        assert_eq!(latest_in_thread(conn.db(), "$root").unwrap().unwrap().event_id, "$t2");
        assert!(participated(conn.db(), "$root", "@b:x").unwrap());
        assert!(!participated(conn.db(), "$root", "@c:x").unwrap());
        assert_eq!(latest_edit(conn.db(), "$root", "@a:x", "m.room.message").unwrap().unwrap().event_id, "$edit");
        assert!(latest_edit(conn.db(), "$root", "@b:x", "m.room.message").unwrap().is_none(), "another sender");
        let t = threads(conn.db(), room, None, StreamPos(i64::MIN), StreamPos(i64::MAX), 10).unwrap();
        assert_eq!((t.len(), t[0].root.event_id.as_str(), t[0].latest), (1, "$root", StreamPos(3)));
        assert!(threads(conn.db(), room, Some("@c:x"), StreamPos(i64::MIN), StreamPos(i64::MAX), 10)
            .unwrap()
            .is_empty());
        unindex(conn.db(), t2).unwrap();
        assert_eq!(latest_in_thread(conn.db(), "$root").unwrap().unwrap().event_id, "$t1");
        assert_eq!(relation_by_id(conn.db(), "$t1").unwrap(), Some(("$root".into(), "m.thread".into())));
    }
}
