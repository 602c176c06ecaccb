//! Simplified sliding sync (MSC4186): the per-connection state (connections and their positions, bounded per device
//! and expired when unused) and the reads the room list needs (bump stamps, heroes with their profiles).

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::members::MemberProfile;
use crate::store::Db;

/// At most this many connections per device: opening another drops the least recently used.
pub const MAX_CONNECTIONS_PER_DEVICE: i64 = 10;
/// A connection unused for this long is dropped (its positions answer `M_UNKNOWN_POS`).
pub const CONNECTION_EXPIRY_MS: i64 = 7 * 24 * 3600 * 1000;

/// A stored position of a connection.
#[derive(Clone, Debug)]
pub struct Position {
    pub pos: i64,
    pub conn_nid: i64,
    pub stream: i64,
    pub typing: i64,
    /// JSON: what the connection has been sent up to this position.
    pub sent: String,
}

/// The connection `(user, device, conn_id)`, if it is still kept.
pub fn connection(conn: Db<'_>, user_id: &str, device_id: &str, conn_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT conn_nid FROM sliding_sync_connections WHERE user_id = ?1 AND device_id = ?2 AND conn_id = ?3",
        )?
        .query_row(params![user_id, device_id, conn_id], |r| r.get(0))
        .optional()?)
}

/// Position `pos` of connection `conn_nid`, if it is still kept.
pub fn position(conn: Db<'_>, conn_nid: i64, pos: i64) -> Result<Option<Position>> {
    Ok(conn
        .prepare_cached(
            "SELECT pos, conn_nid, stream, typing, sent FROM sliding_sync_positions WHERE pos = ?1 AND conn_nid = ?2",
        )?
        .query_row(params![pos, conn_nid], |r| {
            Ok(Position { pos: r.get(0)?, conn_nid: r.get(1)?, stream: r.get(2)?, typing: r.get(3)?, sent: r.get(4)? })
        })
        .optional()?)
}

/// Starts connection `(user, device, conn_id)` afresh (a request without a position): any earlier state of it goes,
/// as do connections unused past the expiry and, past the per-device cap, the device's least recently used ones.
pub fn open_connection(conn: Db<'_>, user_id: &str, device_id: &str, conn_id: &str, now_ms: i64) -> Result<i64> {
    conn.prepare_cached("DELETE FROM sliding_sync_connections WHERE last_used_ts < ?1")?
        .execute([now_ms - CONNECTION_EXPIRY_MS])?;
    conn.prepare_cached("DELETE FROM sliding_sync_connections WHERE user_id = ?1 AND device_id = ?2 AND conn_id = ?3")?
        .execute(params![user_id, device_id, conn_id])?;
    conn.prepare_cached(
        "DELETE FROM sliding_sync_connections WHERE conn_nid IN (SELECT conn_nid FROM sliding_sync_connections
         WHERE user_id = ?1 AND device_id = ?2 ORDER BY last_used_ts DESC, conn_nid DESC LIMIT -1 OFFSET ?3)",
    )?
    .execute(params![user_id, device_id, MAX_CONNECTIONS_PER_DEVICE - 1])?;
    conn.prepare_cached(
        "INSERT INTO sliding_sync_connections (user_id, device_id, conn_id, last_used_ts) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![user_id, device_id, conn_id, now_ms])?;
    Ok(conn.last_insert_rowid())
}

/// Records a new position of `conn_nid` after `from` (the position the request continued from, kept so that a
/// retried request still works); the connection's positions before `from` go.
pub fn add_position(
    conn: Db<'_>,
    conn_nid: i64,
    from: Option<i64>,
    stream: i64,
    typing: i64,
    sent: &str,
    now_ms: i64,
) -> Result<i64> {
    if let Some(from) = from {
        conn.prepare_cached("DELETE FROM sliding_sync_positions WHERE conn_nid = ?1 AND pos < ?2")?
            .execute(params![conn_nid, from])?;
    }
    conn.prepare_cached("UPDATE sliding_sync_connections SET last_used_ts = ?2 WHERE conn_nid = ?1")?
        .execute(params![conn_nid, now_ms])?;
    conn.prepare_cached(
        "INSERT INTO sliding_sync_positions (conn_nid, stream, typing, sent, created_ts) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![conn_nid, stream, typing, sent, now_ms])?;
    Ok(conn.last_insert_rowid())
}

/// Moves position `pos` on to (`stream`, `typing`) in place: an answer that carried nothing new leaves the
/// client where it was, so the same position now stands for the later point.
pub fn advance_position(conn: Db<'_>, pos: i64, stream: i64, typing: i64, now_ms: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE sliding_sync_positions SET stream = max(stream, ?2), typing = max(typing, ?3) WHERE pos = ?1",
    )?
    .execute(params![pos, stream, typing])?;
    conn.prepare_cached(
        "UPDATE sliding_sync_connections SET last_used_ts = ?2
         WHERE conn_nid = (SELECT conn_nid FROM sliding_sync_positions WHERE pos = ?1)",
    )?
    .execute(params![pos, now_ms])?;
    Ok(())
}

/// The stream position of the room's newest event (up to `upto`) of a type that bumps it up the list (as Synapse's
/// `DEFAULT_BUMP_EVENT_TYPES`: messages, encrypted events, the create event, stickers, call invites, polls, beacons).
pub fn bump_stamp(conn: Db<'_>, room: RoomNid, upto: StreamPos) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT stream_ordering FROM events WHERE room_nid = ?1 AND stream_ordering IS NOT NULL
             AND stream_ordering > 0 AND stream_ordering <= ?2 AND rejected IS NULL AND soft_failed = 0
             AND event_type IN ('m.room.create', 'm.room.message', 'm.room.encrypted', 'm.sticker', 'm.call.invite',
                                'm.poll.start', 'm.beacon_info')
             ORDER BY stream_ordering DESC LIMIT 1",
        )?
        .query_row(params![room, upto], |r| r.get(0))
        .optional()?)
}

/// Whether the room has a timeline event in (`after`, `upto`].
pub fn has_events_in(conn: Db<'_>, room: RoomNid, after: StreamPos, upto: StreamPos) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM events WHERE room_nid = ?1 AND stream_ordering > ?2 AND stream_ordering <= ?3
             AND rejected IS NULL AND soft_failed = 0 LIMIT 1",
        )?
        .query_row(params![room, after, upto], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The stream position of `user_id`'s latest membership change in the room (invites over federation included,
/// whose events are outliers without a timeline position).
pub fn latest_membership_pos(conn: Db<'_>, user_id: &str, room: RoomNid) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT max(stream_ordering) FROM local_membership_stream WHERE user_id = ?1 AND room_nid = ?2",
        )?
        .query_row(params![user_id, room], |r| r.get(0))?)
}

/// The room's heroes (the members it is called after when it has no name) with their room profiles: the first
/// joined or invited members by user id other than `user_id`, else the first former members.
pub fn hero_profiles(conn: Db<'_>, room: RoomNid, user_id: &str, limit: i64) -> Result<Vec<MemberProfile>> {
    let read = |sql: &str| -> Result<Vec<MemberProfile>> {
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params![room, user_id, limit], |r| {
            Ok(MemberProfile { user_id: r.get(0)?, displayname: r.get(1)?, avatar_url: r.get(2)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    };
    let heroes = read(
        "SELECT user_id, displayname, avatar_url FROM room_members WHERE room_nid = ?1 AND user_id != ?2
         AND membership IN ('join', 'invite') ORDER BY user_id LIMIT ?3",
    )?;
    if !heroes.is_empty() {
        return Ok(heroes);
    }
    read(
        "SELECT user_id, displayname, avatar_url FROM room_members WHERE room_nid = ?1 AND user_id != ?2
         ORDER BY user_id LIMIT ?3",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, memory_db, Ev};

    #[test]
    fn positions_continue_and_old_ones_go() {
        let conn = memory_db();
        let c = conn.db();
        let conn_nid = open_connection(c, "@a:x", "D", "main", 1000).unwrap();
        assert_eq!(connection(c, "@a:x", "D", "main").unwrap(), Some(conn_nid));
        let p1 = add_position(c, conn_nid, None, 5, 0, "{}", 1000).unwrap();
        let p2 = add_position(c, conn_nid, Some(p1), 7, 1, "{\"a\":1}", 1001).unwrap();
        assert!(position(c, conn_nid, p1).unwrap().is_some(), "the position continued from stays for a retry");
        let p3 = add_position(c, conn_nid, Some(p2), 9, 1, "{}", 1002).unwrap();
        assert!(position(c, conn_nid, p1).unwrap().is_none(), "older positions go");
        assert_eq!(position(c, conn_nid, p2).unwrap().unwrap().sent, "{\"a\":1}");
        advance_position(c, p3, 12, 2, 1003).unwrap();
        let p = position(c, conn_nid, p3).unwrap().unwrap();
        assert_eq!((p.stream, p.typing), (12, 2));
        assert!(position(c, conn_nid + 1, p3).unwrap().is_none(), "a position belongs to its connection");
        // Reopening the connection drops its state.
        let again = open_connection(c, "@a:x", "D", "main", 2000).unwrap();
        assert!(position(c, again, p3).unwrap().is_none());
        assert!(position(c, conn_nid, p3).unwrap().is_none());
    }

    #[test]
    fn connections_are_capped_per_device_and_expire() {
        let conn = memory_db();
        let c = conn.db();
        let first = open_connection(c, "@a:x", "D", "c0", 1000).unwrap();
        for i in 1..MAX_CONNECTIONS_PER_DEVICE + 2 {
            open_connection(c, "@a:x", "D", &format!("c{i}"), 1000 + i).unwrap();
        }
        assert_eq!(connection(c, "@a:x", "D", "c0").unwrap(), None, "the least recently used went");
        assert_eq!(connection(c, "@a:x", "D", "c1").unwrap(), None);
        assert!(connection(c, "@a:x", "D", "c2").unwrap().is_some());
        let _ = first;
        assert!(connection(c, "@a:x", "D", &format!("c{}", MAX_CONNECTIONS_PER_DEVICE + 1)).unwrap().is_some());
        let other = open_connection(c, "@b:x", "E", "main", 1000).unwrap();
        open_connection(c, "@c:x", "F", "main", 1000 + CONNECTION_EXPIRY_MS + 1).unwrap();
        assert_eq!(connection(c, "@b:x", "E", "main").unwrap(), None, "unused past the expiry");
        let _ = other;
    }

    #[test]
    fn bump_stamp_is_the_newest_bumping_event() {
        let conn = memory_db();
        let c = conn.db();
        let room = testing::room(c, "!r:x");
        testing::event(c, room, Ev::message("$1", "@a:x", 3));
        testing::event(c, room, Ev { event_type: "m.reaction", ..Ev::message("$2", "@a:x", 5) });
        assert_eq!(bump_stamp(c, room, StreamPos(10)).unwrap(), Some(3));
        testing::event(c, room, Ev::message("$3", "@a:x", 8));
        assert_eq!(bump_stamp(c, room, StreamPos(7)).unwrap(), Some(3), "nothing past `upto`");
        assert_eq!(bump_stamp(c, room, StreamPos(10)).unwrap(), Some(8));
        assert!(has_events_in(c, room, StreamPos(4), StreamPos(5)).unwrap());
        assert!(!has_events_in(c, room, StreamPos(8), StreamPos(10)).unwrap());
    }
}
