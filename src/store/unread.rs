//! Unread notification counts (`unread_notifications`, `unread_thread_notifications` in `/sync`, sliding sync's
//! room counts, the push badge): one row per event the user's push rules said to notify about and the user has not
//! read yet, by room and thread (`main` for the main timeline, else the thread root's id).
//!
//! Rows are written by the push evaluator (`client::push`) and deleted by what reads them: a read receipt
//! (`m.read` or `m.read.private`; an unthreaded one reads every thread up to its event, a threaded one only its
//! thread), the user's own event (reads its thread up to it) and leaving the room. So the table is bounded by what
//! is unread, not by a count: the counts never depend on the cap of the `notifications` list.

use rusqlite::params;

use crate::error::Result;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::Db;

/// The main timeline as a thread id (receipts use the same word).
pub const MAIN: &str = "main";

/// One thread's counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub notifications: i64,
    pub highlights: i64,
}

/// Records an unread notification, unless the user's receipts already read it (a receipt can be written between
/// the evaluation of an event and this write).
pub fn record(
    conn: Db<'_>,
    user_id: &str,
    room_nid: RoomNid,
    stream: StreamPos,
    thread_id: &str,
    highlight: bool,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO unread_notifications (user_id, room_nid, stream, thread_id, highlight)
         SELECT ?1, ?2, ?3, ?4, ?5 WHERE NOT EXISTS (
             SELECT 1 FROM receipts r JOIN events e ON e.event_id = r.event_id
             WHERE r.room_nid = ?2 AND r.user_id = ?1 AND r.receipt_type IN ('m.read', 'm.read.private')
               AND r.thread_id IN ('', ?4) AND e.stream_ordering >= ?3)",
    )?
    .execute(params![user_id, room_nid, stream, thread_id, highlight])?;
    Ok(())
}

/// Marks read everything of the user's in the room up to `upto`: in every thread (`thread_id` None: an unthreaded
/// receipt) or in one.
pub fn read_up_to(
    conn: Db<'_>,
    user_id: &str,
    room_nid: RoomNid,
    thread_id: Option<&str>,
    upto: StreamPos,
) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM unread_notifications WHERE user_id = ?1 AND room_nid = ?2 AND stream <= ?3
         AND (?4 IS NULL OR thread_id = ?4)",
    )?
    .execute(params![user_id, room_nid, upto, thread_id])?;
    Ok(())
}

/// Forgets the user's unread notifications in a room (they left it).
pub fn clear_room(conn: Db<'_>, user_id: &str, room_nid: RoomNid) -> Result<()> {
    conn.prepare_cached("DELETE FROM unread_notifications WHERE user_id = ?1 AND room_nid = ?2")?
        .execute(params![user_id, room_nid])?;
    Ok(())
}

/// The user's unread counts in a room, by thread (threads without any left out).
pub fn counts(conn: Db<'_>, user_id: &str, room_nid: RoomNid) -> Result<Vec<(String, Counts)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT thread_id, count(*), sum(highlight) FROM unread_notifications WHERE user_id = ?1 AND room_nid = ?2
         GROUP BY thread_id ORDER BY thread_id",
    )?;
    let rows = stmt.query_map(params![user_id, room_nid], |r| {
        Ok((r.get(0)?, Counts { notifications: r.get(1)?, highlights: r.get(2)? }))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// How many rooms the user is joined to hold unread notifications (the push badge).
pub fn rooms_with_unread(conn: Db<'_>, user_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT count(DISTINCT u.room_nid) FROM unread_notifications u
             JOIN room_members m ON m.room_nid = u.room_nid AND m.user_id = u.user_id AND m.membership = 'join'
             WHERE u.user_id = ?1",
        )?
        .query_row([user_id], |r| r.get(0))?)
}

/// The stream position of a timeline event (None: not held, or not in the timeline).
pub fn stream_of(conn: Db<'_>, event_id: &str) -> Result<Option<StreamPos>> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .prepare_cached("SELECT stream_ordering FROM events WHERE event_id = ?1 AND outlier = 0")?
        .query_row([event_id], |r| r.get::<_, Option<StreamPos>>(0))
        .optional()?
        .flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn receipts_read_their_thread_or_everything() {
        let db = memory_db();
        let c = db.db();
        let (room, other) = (RoomNid(1), RoomNid(2));
        for (stream, thread, hl) in [(1, MAIN, false), (2, "$t", true), (3, MAIN, true), (4, "$t", false)] {
            record(c, "@a:hs", room, StreamPos(stream), thread, hl).unwrap();
        }
        record(c, "@a:hs", other, StreamPos(5), MAIN, false).unwrap();
        record(c, "@b:hs", room, StreamPos(1), MAIN, false).unwrap();
        let n = |n, h| Counts { notifications: n, highlights: h };
        assert_eq!(counts(c, "@a:hs", room).unwrap(), vec![("$t".into(), n(2, 1)), (MAIN.into(), n(2, 1))]);
        read_up_to(c, "@a:hs", room, Some("$t"), StreamPos(2)).unwrap();
        assert_eq!(counts(c, "@a:hs", room).unwrap(), vec![("$t".into(), n(1, 0)), (MAIN.into(), n(2, 1))]);
        read_up_to(c, "@a:hs", room, None, StreamPos(3)).unwrap();
        assert_eq!(counts(c, "@a:hs", room).unwrap(), vec![("$t".into(), n(1, 0))]);
        assert_eq!(counts(c, "@b:hs", room).unwrap(), vec![(MAIN.into(), n(1, 0))], "per user");
        clear_room(c, "@a:hs", room).unwrap();
        assert!(counts(c, "@a:hs", room).unwrap().is_empty());
        assert_eq!(counts(c, "@a:hs", other).unwrap().len(), 1, "per room");
    }

    #[test]
    fn many_unread_are_all_counted() {
        let db = memory_db();
        let c = db.db();
        let total = crate::store::pushers::NOTIFICATIONS_KEPT_PER_USER + 200;
        for stream in 1..=total {
            record(c, "@a:hs", RoomNid(1), StreamPos(stream), MAIN, false).unwrap();
        }
        assert_eq!(counts(c, "@a:hs", RoomNid(1)).unwrap()[0].1.notifications, total, "no cap on counts");
    }
}
