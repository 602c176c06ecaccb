//! Read receipts (public `m.read` and private `m.read.private`), one row per (room, type, user, thread).

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;
use crate::store::Writer;

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
    conn: &Connection,
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
    if let Some(old) = current(w.conn, r.room_nid, r.receipt_type, r.user_id, r.thread_id)? {
        if old == r.event_id {
            return Ok(false);
        }
        let pos = |id: &str| -> Result<Option<i64>> {
            Ok(w.conn
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
    let stream = w.next_stream();
    w.conn
        .prepare_cached(
            "INSERT INTO receipts (room_nid, receipt_type, user_id, thread_id, event_id, ts, stream_ordering)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (room_nid, receipt_type, user_id, thread_id) DO UPDATE SET event_id = excluded.event_id,
             ts = excluded.ts, stream_ordering = excluded.stream_ordering",
        )?
        .execute(params![r.room_nid, r.receipt_type, r.user_id, r.thread_id, r.event_id, r.ts, stream])?;
    Ok(true)
}

/// Stores a receipt as given, at a new stream position, whatever the user's marker was (a remote server's
/// receipts: its own users' markers are its business).
pub fn set(w: &mut Writer<'_>, r: &NewReceipt<'_>) -> Result<()> {
    let stream = w.next_stream();
    w.conn
        .prepare_cached(
            "INSERT INTO receipts (room_nid, receipt_type, user_id, thread_id, event_id, ts, stream_ordering)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (room_nid, receipt_type, user_id, thread_id) DO UPDATE SET event_id = excluded.event_id,
             ts = excluded.ts, stream_ordering = excluded.stream_ordering",
        )?
        .execute(params![r.room_nid, r.receipt_type, r.user_id, r.thread_id, r.event_id, r.ts, stream])?;
    Ok(())
}
