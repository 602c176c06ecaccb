//! Peeks (MSC2444 over federation, MSC2753 for clients): who follows a room without being in it.
//!
//! - `peeks_in`: other servers peeking one of our rooms (resident side), until their expiry.
//! - `peeks_out`: remote rooms we follow through one of their servers (peeking side).
//! - `local_peeks`: our users peeking a room, remote or local.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::RoomNid;
use crate::store::Db;

// ------------------------------------------------------------------------------------------------------------
// Resident side

/// Whether `server` holds an unexpired peek with this id (a PUT then is a renewal).
pub fn is_peeking_with(conn: Db<'_>, room: RoomNid, server: &str, peek_id: &str, now: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM peeks_in WHERE room_nid = ?1 AND server_name = ?2 AND peek_id = ?3 AND expires_ts > ?4",
        )?
        .query_row(params![room, server, peek_id, now], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Whether `server` holds any unexpired peek of the room.
pub fn is_peeking(conn: Db<'_>, room: RoomNid, server: &str, now: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM peeks_in WHERE room_nid = ?1 AND server_name = ?2 AND expires_ts > ?3")?
        .query_row(params![room, server, now], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Unexpired peeks of `server` (all rooms) and of `room` (all servers), for the limits.
pub fn counts(conn: Db<'_>, room: RoomNid, server: &str, now: i64) -> Result<(i64, i64)> {
    let by_server = conn
        .prepare_cached("SELECT count(*) FROM peeks_in WHERE server_name = ?1 AND expires_ts > ?2")?
        .query_row(params![server, now], |r| r.get(0))?;
    let by_room = conn
        .prepare_cached("SELECT count(*) FROM peeks_in WHERE room_nid = ?1 AND expires_ts > ?2")?
        .query_row(params![room, now], |r| r.get(0))?;
    Ok((by_server, by_room))
}

/// Starts or renews a peek until `expires_ts`; expired peeks of anyone are cleared on the way.
pub fn upsert_in(conn: Db<'_>, room: RoomNid, server: &str, peek_id: &str, expires_ts: i64, now: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM peeks_in WHERE expires_ts <= ?1")?.execute([now])?;
    conn.prepare_cached(
        "INSERT INTO peeks_in (room_nid, server_name, peek_id, expires_ts) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (room_nid, server_name, peek_id) DO UPDATE SET expires_ts = excluded.expires_ts",
    )?
    .execute(params![room, server, peek_id, expires_ts])?;
    Ok(())
}

/// Ends a peek; whether there was one.
pub fn delete_in(conn: Db<'_>, room: RoomNid, server: &str, peek_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("DELETE FROM peeks_in WHERE room_nid = ?1 AND server_name = ?2 AND peek_id = ?3")?
        .execute(params![room, server, peek_id])?
        > 0)
}

/// Ends every peek of the room (its history stopped being world-readable); how many there were.
pub fn end_all_in(conn: Db<'_>, room: RoomNid) -> Result<usize> {
    Ok(conn.prepare_cached("DELETE FROM peeks_in WHERE room_nid = ?1")?.execute([room])?)
}

/// The servers with an unexpired peek of the room: they get its new events.
pub fn peeking_servers(conn: Db<'_>, room: RoomNid, now: i64) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT DISTINCT server_name FROM peeks_in WHERE room_nid = ?1 AND expires_ts > ?2")?;
    let rows = stmt.query_map(params![room, now], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ------------------------------------------------------------------------------------------------------------
// Peeking side

/// A remote room we follow: the server peeked, the peek id, when to renew.
#[derive(Debug, Clone)]
pub struct PeekOut {
    pub room_nid: RoomNid,
    pub room_id: String,
    pub server_name: String,
    pub peek_id: String,
    pub renew_ts: i64,
}

pub fn set_out(conn: Db<'_>, room: RoomNid, server: &str, peek_id: &str, renew_ts: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO peeks_out (room_nid, server_name, peek_id, renew_ts) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (room_nid) DO UPDATE SET server_name = excluded.server_name, peek_id = excluded.peek_id,
         renew_ts = excluded.renew_ts",
    )?
    .execute(params![room, server, peek_id, renew_ts])?;
    Ok(())
}

pub fn out_of(conn: Db<'_>, room: RoomNid) -> Result<Option<PeekOut>> {
    Ok(conn
        .prepare_cached(
            "SELECT p.room_nid, r.room_id, p.server_name, p.peek_id, p.renew_ts FROM peeks_out p
             JOIN rooms r ON r.room_nid = p.room_nid WHERE p.room_nid = ?1",
        )?
        .query_row([room], out_row)
        .optional()?)
}

fn out_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PeekOut> {
    Ok(PeekOut {
        room_nid: r.get(0)?,
        room_id: r.get(1)?,
        server_name: r.get(2)?,
        peek_id: r.get(3)?,
        renew_ts: r.get(4)?,
    })
}

/// Remote peeks due for renewal (or for their end, when nobody here looks any more).
pub fn out_due(conn: Db<'_>, now: i64) -> Result<Vec<PeekOut>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.room_nid, r.room_id, p.server_name, p.peek_id, p.renew_ts FROM peeks_out p
         JOIN rooms r ON r.room_nid = p.room_nid WHERE p.renew_ts <= ?1",
    )?;
    let rows = stmt.query_map([now], out_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn delete_out(conn: Db<'_>, room: RoomNid) -> Result<bool> {
    Ok(conn.prepare_cached("DELETE FROM peeks_out WHERE room_nid = ?1")?.execute([room])? > 0)
}

pub fn add_local(conn: Db<'_>, user_id: &str, room: RoomNid, stream: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO local_peeks (user_id, room_nid, stream) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id, room_nid) DO UPDATE SET stream = excluded.stream",
    )?
    .execute(params![user_id, room, stream])?;
    Ok(())
}

pub fn delete_local(conn: Db<'_>, user_id: &str, room: RoomNid) -> Result<bool> {
    Ok(conn
        .prepare_cached("DELETE FROM local_peeks WHERE user_id = ?1 AND room_nid = ?2")?
        .execute(params![user_id, room])?
        > 0)
}

/// Local users peeking the room.
pub fn local_peekers(conn: Db<'_>, room: RoomNid) -> Result<i64> {
    Ok(conn.prepare_cached("SELECT count(*) FROM local_peeks WHERE room_nid = ?1")?.query_row([room], |r| r.get(0))?)
}

/// The local users peeking the room.
pub fn local_peek_users(conn: Db<'_>, room: RoomNid) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT user_id FROM local_peeks WHERE room_nid = ?1")?;
    let rows = stmt.query_map([room], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The rooms `user_id` peeks: (room, room id, position the peek began at).
pub fn rooms_peeked_by(conn: Db<'_>, user_id: &str) -> Result<Vec<(RoomNid, String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.room_nid, r.room_id, p.stream FROM local_peeks p JOIN rooms r ON r.room_nid = p.room_nid
         WHERE p.user_id = ?1 ORDER BY p.room_nid",
    )?;
    let rows = stmt.query_map([user_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, memory_db};

    #[test]
    fn peeks_expire_and_count_per_server_and_room() {
        let conn = memory_db();
        let db = conn.db();
        let room = testing::room(db, "!a:x");
        upsert_in(db, room, "b.test", "p1", 100, 0).unwrap();
        upsert_in(db, room, "c.test", "p1", 50, 0).unwrap();
        assert_eq!(counts(db, room, "b.test", 10).unwrap(), (1, 2));
        assert_eq!(peeking_servers(db, room, 60).unwrap(), vec!["b.test".to_owned()], "c's peek expired");
        assert!(is_peeking_with(db, room, "b.test", "p1", 60).unwrap());
        assert!(!is_peeking_with(db, room, "c.test", "p1", 60).unwrap());
        assert!(delete_in(db, room, "b.test", "p1").unwrap());
        assert!(!delete_in(db, room, "b.test", "p1").unwrap());
        upsert_in(db, room, "b.test", "p2", 200, 0).unwrap();
        assert_eq!(end_all_in(db, room).unwrap(), 2);
        assert!(peeking_servers(db, room, 0).unwrap().is_empty());
    }
}
