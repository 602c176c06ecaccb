//! Reads of the `events` table along a room's live timeline (stream order), for `/sync`, `/messages`, `/context`
//! and notification counts. Events enter the timeline with a positive `stream_ordering`; rejected and
//! soft-failed events are never shown; outliers have no position and so never appear here.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::events::{event_row, EventRow, EVENT_COLS};
use crate::store::ids::{EventNid, RoomNid, StateGroup, StreamPos};
use crate::store::Db;

/// The room's state after its last timeline event at or before `pos` (None before the room's first event).
pub fn state_at(conn: Db<'_>, room: RoomNid, pos: StreamPos) -> Result<Option<StateGroup>> {
    Ok(conn
        .prepare_cached(
            "SELECT sg_after FROM events WHERE room_nid = ?1 AND stream_ordering <= ?2 AND stream_ordering IS NOT NULL
             AND sg_after IS NOT NULL ORDER BY stream_ordering DESC LIMIT 1",
        )?
        .query_row(params![room, pos], |r| r.get(0))
        .optional()?)
}

/// The newest `limit` shown events in (`after`, `upto`], newest first.
pub fn newest_first(
    conn: Db<'_>,
    room: RoomNid,
    after: StreamPos,
    upto: StreamPos,
    limit: i64,
) -> Result<Vec<EventRow>> {
    shown_window(conn, room, after, upto, limit, "DESC")
}

/// The oldest `limit` shown events in (`after`, `upto`], oldest first.
pub fn oldest_first(
    conn: Db<'_>,
    room: RoomNid,
    after: StreamPos,
    upto: StreamPos,
    limit: i64,
) -> Result<Vec<EventRow>> {
    shown_window(conn, room, after, upto, limit, "ASC")
}

/// Shown events in (`after`, `upto`], at most `limit`, in stream order `ASC` or `DESC`.
fn shown_window(
    conn: Db<'_>,
    room: RoomNid,
    after: StreamPos,
    upto: StreamPos,
    limit: i64,
    order: &'static str,
) -> Result<Vec<EventRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM events WHERE room_nid = ?1 AND stream_ordering > ?2 AND stream_ordering <= ?3
         AND rejected IS NULL AND soft_failed = 0 ORDER BY stream_ordering {order} LIMIT ?4"
    ))?;
    let rows = stmt.query_map(params![room, after, upto, limit], event_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A place in a room's topological order: (depth, stream position) of an event, the order `/messages` and
/// `/context` page in (the DAG's depth first, the stream position breaking ties, as Synapse's topological tokens).
/// Backfilled history gets stream positions below 0 whatever its depth, so only depth puts it in its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopoPos {
    pub depth: i64,
    pub stream: i64,
}

impl TopoPos {
    pub const MIN: TopoPos = TopoPos { depth: i64::MIN, stream: i64::MIN };
    pub const MAX: TopoPos = TopoPos { depth: i64::MAX, stream: i64::MAX };
}

/// Which events a topological page may hold: places in (`after`, `upto`] and stream positions in
/// (`stream_after`, `stream_upto`]. A `/sync` token bounds a page by stream position alone (as Synapse: events that
/// arrived after it are left out whatever their depth), a `/messages` token by place, a former member's leave by
/// stream position.
#[derive(Clone, Copy, Debug)]
pub struct TopoRange {
    pub after: TopoPos,
    pub upto: TopoPos,
    pub stream_after: i64,
    pub stream_upto: i64,
}

impl TopoRange {
    pub const ALL: TopoRange =
        TopoRange { after: TopoPos::MIN, upto: TopoPos::MAX, stream_after: i64::MIN, stream_upto: i64::MAX };
}

/// The newest `limit` shown events in `range`, newest first in topological order. One range scan of
/// `events_room_topo`.
pub fn topo_newest_first(conn: Db<'_>, room: RoomNid, range: TopoRange, limit: i64) -> Result<Vec<EventRow>> {
    topo_window(conn, room, range, limit, "DESC")
}

/// The oldest `limit` shown events in `range`, oldest first in topological order.
pub fn topo_oldest_first(conn: Db<'_>, room: RoomNid, range: TopoRange, limit: i64) -> Result<Vec<EventRow>> {
    topo_window(conn, room, range, limit, "ASC")
}

fn topo_window(conn: Db<'_>, room: RoomNid, r: TopoRange, limit: i64, order: &'static str) -> Result<Vec<EventRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM events WHERE room_nid = ?1 AND stream_ordering IS NOT NULL
         AND (depth, stream_ordering) > (?2, ?3) AND (depth, stream_ordering) <= (?4, ?5)
         AND stream_ordering > ?6 AND stream_ordering <= ?7
         AND rejected IS NULL AND soft_failed = 0 ORDER BY depth {order}, stream_ordering {order} LIMIT ?8"
    ))?;
    let rows = stmt.query_map(
        params![room, r.after.depth, r.after.stream, r.upto.depth, r.upto.stream, r.stream_after, r.stream_upto, limit],
        event_row,
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Of `events` (timeline events of one room), those with a prev event missing from our timeline: where our
/// history has a gap before them (our join into a room that began elsewhere, a backfill frontier, an event that
/// came with unknown prev events), with the prev events we lack. Indexed lookups per event, no room scan.
pub fn gaps_before(conn: Db<'_>, events: &[EventNid]) -> Result<Vec<(EventNid, Vec<String>)>> {
    let mut out = Vec::new();
    for &nid in events {
        let missing = crate::store::events::prevs_missing_from_timeline(conn, nid)?;
        if !missing.is_empty() {
            out.push((nid, missing));
        }
    }
    Ok(out)
}

/// Shown timeline events at or after `ts` (`forward`, oldest first) or at or before it (newest first), ordered by
/// `origin_server_ts` then topologically (depth, then stream position), skipping `offset`: the candidates of
/// `/timestamp_to_event`.
pub fn by_timestamp(
    conn: Db<'_>,
    room: RoomNid,
    ts: i64,
    forward: bool,
    offset: i64,
    limit: i64,
) -> Result<Vec<EventRow>> {
    let (cmp, order) = if forward { (">=", "ASC") } else { ("<=", "DESC") };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM events WHERE room_nid = ?1 AND origin_server_ts {cmp} ?2
         AND stream_ordering IS NOT NULL AND outlier = 0 AND rejected IS NULL AND soft_failed = 0
         ORDER BY origin_server_ts {order}, depth {order}, stream_ordering {order} LIMIT ?3 OFFSET ?4"
    ))?;
    let rows = stmt.query_map(params![room, ts, limit, offset], event_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The state before an event: the state after one of its `prev_events` that we hold with state (the state a
/// state event replaced, for `prev_content`).
pub fn state_before(conn: Db<'_>, event: EventNid) -> Result<Option<StateGroup>> {
    Ok(conn
        .prepare_cached(
            "SELECT e.sg_after FROM event_edges x JOIN events e ON e.event_id = x.prev_event_id
             WHERE x.event_nid = ?1 AND e.sg_after IS NOT NULL LIMIT 1",
        )?
        .query_row([event], |r| r.get(0))
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, memory_db, Ev};

    fn ids(rows: &[EventRow]) -> Vec<&str> {
        rows.iter().map(|r| r.event_id.as_str()).collect()
    }

    /// `$1`..`$6` at positions 1..6 in one room; `$3` rejected, `$4` soft-failed; an outlier and another room's
    /// event beside them.
    fn timeline(conn: Db<'_>) -> RoomNid {
        let room = testing::room(conn, "!r:x");
        let other = testing::room(conn, "!other:x");
        for (i, id) in ["$1", "$2", "$3", "$4", "$5", "$6"].into_iter().enumerate() {
            let sender = if i % 2 == 0 { "@a:x" } else { "@b:x" };
            let mut e = Ev::message(id, sender, i as i64 + 1);
            e.rejected = id == "$3";
            e.soft_failed = id == "$4";
            testing::event(conn, room, e);
        }
        testing::event(conn, room, Ev { stream: None, ..Ev::message("$outlier", "@a:x", 0) });
        testing::event(conn, other, Ev::message("$elsewhere", "@a:x", 7));
        room
    }

    #[test]
    fn pages_skip_hidden_events_and_honour_bounds_order_and_limit() {
        let conn = memory_db();
        let room = timeline(conn.db());
        let (p, max) = (StreamPos, StreamPos(i64::MAX));
        assert_eq!(ids(&newest_first(conn.db(), room, p(0), max, 10).unwrap()), ["$6", "$5", "$2", "$1"]);
        assert_eq!(ids(&oldest_first(conn.db(), room, p(0), max, 10).unwrap()), ["$1", "$2", "$5", "$6"]);
        assert_eq!(ids(&newest_first(conn.db(), room, p(1), p(5), 10).unwrap()), ["$5", "$2"], "(after, upto]");
        assert_eq!(ids(&oldest_first(conn.db(), room, p(1), p(5), 10).unwrap()), ["$2", "$5"]);
        assert_eq!(ids(&newest_first(conn.db(), room, p(0), max, 2).unwrap()), ["$6", "$5"]);
        assert_eq!(ids(&oldest_first(conn.db(), room, p(0), max, 1).unwrap()), ["$1"]);
        assert!(newest_first(conn.db(), room, p(6), max, 10).unwrap().is_empty());
        assert!(newest_first(conn.db(), RoomNid(999), p(0), max, 10).unwrap().is_empty());
    }

    /// Positions and depths disagree (backfill stores what it fetches below 0, in the order it arrives): pages
    /// follow depth, the stream position breaking ties; bounds are places in that order; `cap` bounds the stream.
    #[test]
    fn topological_pages_follow_depth_then_stream() {
        let conn = memory_db();
        let room = timeline(conn.db());
        // (id, depth, stream): $b1 and $b2 backfilled (negative positions) but deeper than $1; $5 and $6 forked.
        for (id, depth, stream) in [("$1", 1, 1), ("$2", 4, 2), ("$5", 5, 5), ("$6", 5, 6), ("$outlier", 9, -99)] {
            let stream = (id != "$outlier").then_some(stream);
            conn.db()
                .execute(
                    "UPDATE events SET depth = ?2, stream_ordering = ?3 WHERE event_id = ?1",
                    params![id, depth, stream],
                )
                .unwrap();
        }
        for (id, depth, stream) in [("$b1", 2, -1), ("$b2", 3, -2)] {
            testing::event(conn.db(), room, Ev::message(id, "@a:x", stream));
            conn.db().execute("UPDATE events SET depth = ?2 WHERE event_id = ?1", params![id, depth]).unwrap();
        }
        let (min, max) = (TopoPos::MIN, TopoPos::MAX);
        let t = |depth, stream| TopoPos { depth, stream };
        let range = |after, upto, stream_upto| TopoRange { after, upto, stream_upto, ..TopoRange::ALL };
        let back = |after, upto, cap, limit| {
            ids(&topo_newest_first(conn.db(), room, range(after, upto, cap), limit).unwrap()).join(",")
        };
        let fwd = |after, upto, cap, limit| {
            ids(&topo_oldest_first(conn.db(), room, range(after, upto, cap), limit).unwrap()).join(",")
        };
        assert_eq!(back(min, max, i64::MAX, 10), "$6,$5,$2,$b2,$b1,$1");
        assert_eq!(fwd(min, max, i64::MAX, 10), "$1,$b1,$b2,$2,$5,$6");
        assert_eq!(back(min, t(5, 5), i64::MAX, 2), "$5,$2", "at or before the place");
        assert_eq!(back(min, t(5, 4), i64::MAX, 2), "$2,$b2", "just before $5");
        assert_eq!(fwd(t(3, -2), max, i64::MAX, 2), "$2,$5", "after the place");
        assert_eq!(back(t(2, -1), max, i64::MAX, 10), "$6,$5,$2,$b2", "down to `after`, exclusive");
        assert_eq!(back(min, max, 2, 10), "$2,$b2,$b1,$1", "stream positions up to the cap");
        let since = |stream_after| TopoRange { stream_after, ..TopoRange::ALL };
        assert_eq!(
            ids(&topo_oldest_first(conn.db(), room, since(1), 10).unwrap()).join(","),
            "$2,$5,$6",
            "after a position"
        );
    }

    /// The page reads are one range scan of the topological index, never a sort of the room.
    #[test]
    fn topological_pages_scan_the_index() {
        let conn = memory_db();
        for order in ["DESC", "ASC"] {
            let plan: Vec<String> = conn
                .db()
                .prepare(&format!(
                    "EXPLAIN QUERY PLAN SELECT {EVENT_COLS} FROM events WHERE room_nid = ?1 AND stream_ordering IS NOT NULL
                     AND (depth, stream_ordering) > (?2, ?3) AND (depth, stream_ordering) <= (?4, ?5)
                     AND stream_ordering > ?6 AND stream_ordering <= ?7 AND rejected IS NULL AND soft_failed = 0
                     ORDER BY depth {order}, stream_ordering {order} LIMIT ?8"
                ))
                .unwrap()
                .query_map(params![1, 0, 0, 9, 9, 0, 9, 10], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let plan = plan.join("; ");
            assert!(plan.contains("USING INDEX events_room_topo (room_nid=? AND (depth,stream_ordering)>"), "{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
    }

    #[test]
    fn gaps_are_events_with_prev_events_missing_from_the_timeline() {
        let conn = memory_db();
        timeline(conn.db());
        let nid = |id| crate::store::events::event_nid(conn.db(), id).unwrap().unwrap();
        testing::edge(conn.db(), nid("$2"), "$1");
        testing::edge(conn.db(), nid("$5"), "$2");
        testing::edge(conn.db(), nid("$5"), "$outlier");
        testing::edge(conn.db(), nid("$6"), "$unknown");
        let gaps = gaps_before(conn.db(), &[nid("$1"), nid("$2"), nid("$5"), nid("$6")]).unwrap();
        assert_eq!(gaps, vec![(nid("$5"), vec!["$outlier".to_owned()]), (nid("$6"), vec!["$unknown".to_owned()])]);
    }

    #[test]
    fn by_timestamp_orders_by_time_then_topology_and_skips_hidden_events() {
        let conn = memory_db();
        let room = timeline(conn.db());
        // $1 and $2 at 100 (depths 1, 2), $5 and $6 at 200 (depths 5, 6); $3/$4 hidden; the outlier at 150.
        for (id, ts, depth) in [("$1", 100, 1), ("$2", 100, 2), ("$5", 200, 5), ("$6", 200, 6), ("$outlier", 150, 9)] {
            conn.db()
                .execute(
                    "UPDATE events SET origin_server_ts = ?2, depth = ?3 WHERE event_id = ?1",
                    params![id, ts, depth],
                )
                .unwrap();
        }
        let at = |ts, fwd, off, lim| ids(&by_timestamp(conn.db(), room, ts, fwd, off, lim).unwrap()).join(",");
        assert_eq!(at(100, true, 0, 10), "$1,$2,$5,$6");
        assert_eq!(at(101, true, 0, 10), "$5,$6");
        assert_eq!(at(200, false, 0, 10), "$6,$5,$2,$1");
        assert_eq!(at(199, false, 0, 1), "$2", "same time: the topologically latest first");
        assert_eq!(at(199, false, 1, 1), "$1");
        assert_eq!(at(201, true, 0, 10), "");
        assert_eq!(at(99, false, 0, 10), "");
    }

    #[test]
    fn state_at_takes_the_last_event_with_state_up_to_the_position() {
        let conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        let (g1, g2) = (testing::state_group(conn.db(), room), testing::state_group(conn.db(), room));
        assert_eq!(state_at(conn.db(), room, StreamPos(10)).unwrap(), None);
        testing::event(conn.db(), room, Ev { sg_after: Some(g1), ..Ev::message("$1", "@a:x", 1) });
        testing::event(conn.db(), room, Ev::message("$2", "@a:x", 2)); // no state recorded
        testing::event(conn.db(), room, Ev { sg_after: Some(g2), ..Ev::message("$3", "@a:x", 3) });
        testing::event(conn.db(), room, Ev { sg_after: Some(g2), stream: None, ..Ev::message("$o", "@a:x", 0) });
        assert_eq!(state_at(conn.db(), room, StreamPos(0)).unwrap(), None);
        assert_eq!(state_at(conn.db(), room, StreamPos(2)).unwrap(), Some(g1));
        assert_eq!(state_at(conn.db(), room, StreamPos(3)).unwrap(), Some(g2));
        assert_eq!(state_at(conn.db(), room, StreamPos(99)).unwrap(), Some(g2));
    }

    #[test]
    fn state_before_follows_a_prev_event_with_state() {
        let conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        let g = testing::state_group(conn.db(), room);
        testing::event(conn.db(), room, Ev { sg_after: Some(g), ..Ev::message("$prev", "@a:x", 1) });
        testing::event(conn.db(), room, Ev::message("$nostate", "@a:x", 2));
        let first = testing::event(conn.db(), room, Ev::message("$first", "@a:x", 3));
        let second = testing::event(conn.db(), room, Ev::message("$second", "@a:x", 4));
        assert_eq!(state_before(conn.db(), first).unwrap(), None, "no edges");
        testing::edge(conn.db(), first, "$nostate");
        testing::edge(conn.db(), first, "$unknown");
        assert_eq!(state_before(conn.db(), first).unwrap(), None, "no prev event with state");
        testing::edge(conn.db(), second, "$prev");
        assert_eq!(state_before(conn.db(), second).unwrap(), Some(g));
    }
}
