//! Purging a room nobody here is in any more (`hearth room purge`): its events, state groups, membership and
//! per-room rows go; the `rooms` row stays (without state, as a room known by id only), so ids interned elsewhere
//! never point at a reused number. The events and state groups go in batches, each its own short transaction, so a
//! running server's writes never wait long behind a purge.

use rusqlite::params;

use crate::error::Result;
use crate::store::ids::RoomNid;
use crate::store::Db;

/// Local users still in the room (joined, invited or knocking), which make a purge wrong.
pub fn local_members(conn: Db<'_>, room_nid: RoomNid, server: &str) -> Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(
        "SELECT user_id, membership FROM room_members
         WHERE room_nid = ?1 AND server_name = ?2 AND membership IN ('join', 'invite', 'knock') ORDER BY user_id",
    )?;
    let rows = stmt.query_map(params![room_nid, server], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// PDUs of the room still queued for other servers (a purge waits until they went out).
pub fn queued_pdus(conn: Db<'_>, room_nid: RoomNid) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT count(*) FROM outbox o JOIN events e ON e.event_id = o.payload WHERE o.kind = 'pdu' AND e.room_nid = ?1",
        [room_nid],
        |r| r.get(0),
    )?)
}

/// The first step: the room loses its current state and every per-room row that is not an event or a state
/// group (membership, extremities, receipts, invites, aliases, jobs, the local membership stream).
pub fn forget_room_state(conn: Db<'_>, room_nid: RoomNid, room_id: &str) -> Result<()> {
    for sql in [
        "DELETE FROM room_members WHERE room_nid = ?1",
        "DELETE FROM forward_extremities WHERE room_nid = ?1",
        "DELETE FROM receipts WHERE room_nid = ?1",
        "DELETE FROM invite_state WHERE room_nid = ?1",
        "DELETE FROM forgotten_rooms WHERE room_nid = ?1",
        "DELETE FROM partial_state_servers WHERE room_nid = ?1",
        "DELETE FROM resync_state WHERE room_nid = ?1",
        "DELETE FROM jobs WHERE room_nid = ?1",
        "DELETE FROM local_membership_stream WHERE room_nid = ?1",
        "DELETE FROM peeks_in WHERE room_nid = ?1",
        "DELETE FROM peeks_out WHERE room_nid = ?1",
        "DELETE FROM local_peeks WHERE room_nid = ?1",
        "UPDATE rooms SET current_sg = NULL, partial_state = 0, published = 0, joined_members = 0,
         invited_members = 0 WHERE room_nid = ?1",
    ] {
        conn.execute(sql, [room_nid])?;
    }
    conn.execute("DELETE FROM room_aliases WHERE room_id = ?1", [room_id])?;
    Ok(())
}

/// Deletes up to `limit` of the room's state groups (newest first: a delta's parent is older than it) with their
/// entries; returns how many went.
pub fn delete_state_groups(conn: Db<'_>, room_nid: RoomNid, limit: i64) -> Result<usize> {
    const BATCH: &str = "SELECT sg FROM state_groups WHERE room_nid = ?1 ORDER BY sg DESC LIMIT ?2";
    conn.execute(&format!("DELETE FROM state_group_entries WHERE sg IN ({BATCH})"), params![room_nid, limit])?;
    Ok(conn.execute(&format!("DELETE FROM state_groups WHERE sg IN ({BATCH})"), params![room_nid, limit])?)
}

/// Deletes up to `limit` of the room's events with their edges and index rows; returns how many went.
pub fn delete_events(conn: Db<'_>, room_nid: RoomNid, limit: i64) -> Result<usize> {
    const BATCH: &str = "SELECT event_nid FROM events WHERE room_nid = ?1 ORDER BY event_nid LIMIT ?2";
    for table in ["event_edges", "event_auth", "event_relations"] {
        conn.execute(&format!("DELETE FROM {table} WHERE event_nid IN ({BATCH})"), params![room_nid, limit])?;
    }
    conn.execute(&format!("DELETE FROM event_search WHERE rowid IN ({BATCH})"), params![room_nid, limit])?;
    Ok(conn.execute(&format!("DELETE FROM events WHERE event_nid IN ({BATCH})"), params![room_nid, limit])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, memory_db};

    fn count(db: Db<'_>, sql: &str) -> i64 {
        db.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_room_is_purged_in_batches_and_other_rooms_stay() {
        let conn = memory_db();
        let db = conn.db();
        let (a, b) = (testing::room(db, "!a:x"), testing::room(db, "!b:x"));
        for (room, n) in [(a, 0), (b, 100)] {
            let mut parent: Option<i64> = None;
            for i in 0..5 {
                let nid = n + i + 1;
                db.execute(
                    "INSERT INTO events (event_nid, event_id, room_nid, event_type, sender, origin_server_ts, depth, json)
                     VALUES (?1, ?2, ?3, 'm.room.message', '@u:x', 0, ?1, '{}')",
                    params![nid, format!("$e{nid}"), room],
                )
                .unwrap();
                db.execute("INSERT INTO event_edges (event_nid, prev_event_id) VALUES (?1, 'p')", [nid]).unwrap();
                db.execute("INSERT INTO event_search (rowid, key, value) VALUES (?1, 'content.body', 'hi')", [nid])
                    .unwrap();
                db.execute(
                    "INSERT INTO state_groups (sg, room_nid, delta_of) VALUES (?1, ?2, ?3)",
                    params![nid, room, parent],
                )
                .unwrap();
                db.execute("INSERT INTO state_group_entries (sg, state_key_nid, event_nid) VALUES (?1, 1, ?1)", [nid])
                    .unwrap();
                parent = Some(nid);
            }
            db.execute(
                "INSERT INTO room_members (room_nid, user_id, membership, event_nid, server_name)
                 VALUES (?1, '@u:here', 'leave', 1, 'here')",
                [room],
            )
            .unwrap();
        }
        db.execute("INSERT INTO room_aliases (alias, room_id, creator) VALUES ('#a:x', '!a:x', '@u:x')", []).unwrap();
        db.execute("INSERT INTO outbox (destination, kind, payload) VALUES ('there', 'pdu', '$e3')", []).unwrap();
        assert_eq!(queued_pdus(db, a).unwrap(), 1);
        assert_eq!(queued_pdus(db, b).unwrap(), 0);
        assert!(local_members(db, a, "here").unwrap().is_empty(), "left members do not count");

        forget_room_state(db, a, "!a:x").unwrap();
        while delete_state_groups(db, a, 2).unwrap() > 0 {}
        while delete_events(db, a, 2).unwrap() > 0 {}

        assert_eq!(count(db, "SELECT count(*) FROM events"), 5);
        assert_eq!(count(db, "SELECT count(*) FROM event_edges"), 5);
        assert_eq!(count(db, "SELECT count(*) FROM event_search"), 5);
        assert_eq!(count(db, "SELECT count(*) FROM state_groups"), 5);
        assert_eq!(count(db, "SELECT count(*) FROM state_group_entries"), 5);
        assert_eq!(count(db, "SELECT count(*) FROM room_members"), 1);
        assert_eq!(count(db, "SELECT count(*) FROM room_aliases"), 0);
        assert_eq!(count(db, "SELECT count(*) FROM rooms"), 2, "the room's row stays");
    }
}
