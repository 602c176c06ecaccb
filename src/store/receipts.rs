//! Read receipts (public `m.read` and private `m.read.private`), one row per (room, type, user, thread).

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::{Db, Writer};

pub struct NewReceipt<'a> {
    pub room_nid: i64,
    pub receipt_type: &'a str,
    pub user_id: &'a str,
    /// `""` for an unthreaded receipt.
    pub thread_id: &'a str,
    pub event_id: &'a str,
    pub ts: i64,
}

/// The event a user's receipt currently points at.
pub fn current(
    conn: Db<'_>,
    room_nid: i64,
    receipt_type: &str,
    user_id: &str,
    thread_id: &str,
) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached(
            "SELECT event_id FROM receipts WHERE room_nid = ?1 AND receipt_type = ?2 AND user_id = ?3 AND thread_id = ?4",
        )?
        .query_row(params![room_nid, receipt_type, user_id, thread_id], |r| r.get(0))
        .optional()?)
}

/// Stores a receipt unless it would move the user's marker backwards (clients race; a receipt for an older event
/// must not undo a newer one). Returns whether anything was written.
pub fn upsert(w: &mut Writer<'_>, r: &NewReceipt<'_>) -> Result<bool> {
    if let Some(old) = current(w.db(), r.room_nid, r.receipt_type, r.user_id, r.thread_id)? {
        if old == r.event_id {
            return Ok(false);
        }
        let pos = |id: &str| -> Result<Option<i64>> {
            Ok(w.db()
                .prepare_cached("SELECT stream_ordering FROM events WHERE event_id = ?1")?
                .query_row([id], |row| row.get::<_, Option<i64>>(0))
                .optional()?
                .flatten())
        };
        if let (Some(old_pos), Some(new_pos)) = (pos(&old)?, pos(r.event_id)?) {
            if new_pos < old_pos {
                return Ok(false);
            }
        }
    }
    set(w, r)?;
    Ok(true)
}

/// Stores a receipt as given, at a new stream position, whatever the user's marker was (a remote server's
/// receipts: its own users' markers are its business).
pub fn set(w: &mut Writer<'_>, r: &NewReceipt<'_>) -> Result<()> {
    let stream = w.next_stream();
    w.db()
        .prepare_cached(
            "INSERT INTO receipts (room_nid, receipt_type, user_id, thread_id, event_id, ts, stream_ordering)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (room_nid, receipt_type, user_id, thread_id) DO UPDATE SET event_id = excluded.event_id,
             ts = excluded.ts, stream_ordering = excluded.stream_ordering",
        )?
        .execute(params![r.room_nid, r.receipt_type, r.user_id, r.thread_id, r.event_id, r.ts, stream])?;
    if matches!(r.receipt_type, "m.read" | "m.read.private") {
        // What the receipt reads is no longer unread: its thread up to the event, or every thread (unthreaded).
        if let Some(upto) = crate::store::unread::stream_of(w.db(), r.event_id)? {
            let thread = (!r.thread_id.is_empty()).then_some(r.thread_id);
            crate::store::unread::read_up_to(w.db(), r.user_id, RoomNid(r.room_nid), thread, upto)?;
        }
    }
    Ok(())
}

/// One receipt as `/sync` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptRow {
    pub receipt_type: String,
    pub user_id: String,
    /// `""` for an unthreaded receipt.
    pub thread_id: String,
    pub event_id: String,
    pub ts: i64,
}

/// Receipts in a room that moved in the window (`after`, `upto`]; private ones (`m.read.private`) only when they
/// are `viewer`'s own.
pub fn changed_since(
    conn: Db<'_>,
    room_nid: RoomNid,
    after: StreamPos,
    upto: StreamPos,
    viewer: &str,
) -> Result<Vec<ReceiptRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT receipt_type, user_id, thread_id, event_id, ts FROM receipts WHERE room_nid = ?1
         AND stream_ordering > ?2 AND stream_ordering <= ?3 AND (receipt_type != 'm.read.private' OR user_id = ?4)",
    )?;
    let rows = stmt.query_map(params![room_nid, after, upto, viewer], |r| {
        Ok(ReceiptRow {
            receipt_type: r.get(0)?,
            user_id: r.get(1)?,
            thread_id: r.get(2)?,
            event_id: r.get(3)?,
            ts: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The stream position of the newest event a user's read receipts (public or private, any thread) point at in a
/// room: everything up to it counts as read. None without a receipt on a timeline event.
pub fn read_up_to(conn: Db<'_>, room_nid: RoomNid, user_id: &str) -> Result<Option<StreamPos>> {
    Ok(conn
        .prepare_cached(
            "SELECT max(e.stream_ordering) FROM receipts r JOIN events e ON e.event_id = r.event_id
             WHERE r.room_nid = ?1 AND r.user_id = ?2 AND r.receipt_type IN ('m.read', 'm.read.private')",
        )?
        .query_row(params![room_nid, user_id], |r| r.get(0))?)
}

/// The stream positions a user's read receipts (public or private) point at in a room, by thread: `""` for the
/// unthreaded receipt (everything up to it is read in every thread), `"main"` or a thread root's id for threaded
/// ones. Receipts on events we do not hold in the timeline are left out.
pub fn read_positions(
    conn: Db<'_>,
    room_nid: RoomNid,
    user_id: &str,
) -> Result<std::collections::HashMap<String, StreamPos>> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.thread_id, max(e.stream_ordering) FROM receipts r JOIN events e ON e.event_id = r.event_id
         WHERE r.room_nid = ?1 AND r.user_id = ?2 AND r.receipt_type IN ('m.read', 'm.read.private')
           AND e.stream_ordering IS NOT NULL
         GROUP BY r.thread_id",
    )?;
    let rows = stmt.query_map(params![room_nid, user_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, memory_db, write, Ev};

    fn receipt<'a>(room: RoomNid, receipt_type: &'a str, user_id: &'a str, event_id: &'a str) -> NewReceipt<'a> {
        NewReceipt { room_nid: room.0, receipt_type, user_id, thread_id: "", event_id, ts: 1 }
    }

    #[test]
    fn upsert_never_moves_a_marker_backwards() {
        let mut conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        for (id, pos) in [("$1", 1), ("$2", 2)] {
            testing::event(conn.db(), room, Ev::message(id, "@b:x", pos));
        }
        let mut stream = 10;
        let mut put = |conn: &mut testing::MemDb, event_id: &str| {
            write(conn, &mut stream, |w| upsert(w, &receipt(room, "m.read", "@a:x", event_id))).unwrap()
        };
        assert!(put(&mut conn, "$2"));
        assert!(!put(&mut conn, "$2"), "same event");
        assert!(!put(&mut conn, "$1"), "older event");
        assert_eq!(current(conn.db(), room.0, "m.read", "@a:x", "").unwrap().as_deref(), Some("$2"));
        assert!(put(&mut conn, "$unknown"), "an event we do not hold cannot be ordered: taken");
        assert_eq!(current(conn.db(), room.0, "m.read", "@a:x", "thread").unwrap(), None, "threads are apart");
    }

    #[test]
    fn changed_since_hides_other_users_private_receipts() {
        let conn = memory_db();
        let (room, other) = (testing::room(conn.db(), "!r:x"), testing::room(conn.db(), "!o:x"));
        testing::receipt(conn.db(), room, "m.read", "@a:x", "$1", 1);
        testing::receipt(conn.db(), room, "m.read.private", "@a:x", "$2", 2);
        testing::receipt(conn.db(), room, "m.read.private", "@b:x", "$2", 3);
        testing::receipt(conn.db(), other, "m.read", "@a:x", "$9", 4);
        let seen = |viewer: &str, after: i64, upto: i64| -> Vec<(String, String)> {
            let mut v: Vec<_> = changed_since(conn.db(), room, StreamPos(after), StreamPos(upto), viewer)
                .unwrap()
                .into_iter()
                .map(|r| (r.receipt_type, r.user_id))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            seen("@a:x", 0, 10),
            [("m.read".into(), "@a:x".into()), ("m.read.private".into(), "@a:x".into())],
            "own private receipt, not @b's"
        );
        assert_eq!(seen("@c:x", 0, 10), [("m.read".to_owned(), "@a:x".to_owned())]);
        assert_eq!(seen("@b:x", 1, 3), [("m.read.private".to_owned(), "@b:x".to_owned())], "(after, upto]");
        let row = changed_since(conn.db(), room, StreamPos(0), StreamPos(1), "@c:x").unwrap().pop().unwrap();
        assert_eq!(
            row,
            ReceiptRow {
                receipt_type: "m.read".into(),
                user_id: "@a:x".into(),
                thread_id: "".into(),
                event_id: "$1".into(),
                ts: 7
            }
        );
    }

    #[test]
    fn read_up_to_takes_the_newest_public_or_private_receipt_on_a_timeline_event() {
        let conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        for (id, pos) in [("$1", 1), ("$2", 2), ("$3", 3)] {
            testing::event(conn.db(), room, Ev::message(id, "@b:x", pos));
        }
        assert_eq!(read_up_to(conn.db(), room, "@a:x").unwrap(), None);
        testing::receipt(conn.db(), room, "m.read", "@a:x", "$1", 10);
        testing::receipt(conn.db(), room, "m.read.private", "@a:x", "$2", 11);
        testing::receipt(conn.db(), room, "m.fully_read", "@a:x", "$3", 12);
        assert_eq!(read_up_to(conn.db(), room, "@a:x").unwrap(), Some(StreamPos(2)), "other receipt types ignored");
        testing::receipt(conn.db(), room, "m.read", "@c:x", "$unknown", 13);
        assert_eq!(read_up_to(conn.db(), room, "@c:x").unwrap(), None, "an event we do not hold");
    }

    #[test]
    fn read_positions_are_kept_apart_by_thread() {
        let mut conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        for (id, pos) in [("$1", 1), ("$2", 2), ("$3", 3)] {
            testing::event(conn.db(), room, Ev::message(id, "@b:x", pos));
        }
        let mut stream = 10;
        for (t, thread, ev) in [("m.read", "", "$1"), ("m.read.private", "", "$2"), ("m.read", "$1", "$3")] {
            let r = NewReceipt { thread_id: thread, ..receipt(room, t, "@a:x", ev) };
            write(&mut conn, &mut stream, |w| upsert(w, &r)).unwrap();
        }
        let got = read_positions(conn.db(), room, "@a:x").unwrap();
        assert_eq!(got.get(""), Some(&StreamPos(2)));
        assert_eq!(got.get("$1"), Some(&StreamPos(3)));
        assert_eq!(got.len(), 2);
    }
}
