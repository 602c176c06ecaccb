//! Test support for the store's unit tests (and the room core's): an in-memory database with the whole schema, a
//! way to run write functions against it without the writer thread, and fixture rows written with plain SQL so the
//! tests of one table group do not depend on the write functions of another (rooms, events, state groups and
//! members are written by the room core).

use rusqlite::{params, Connection};
use serde_json::json;

use super::ids::{EventNid, RoomNid, StateGroup, StreamPos};
use super::{Db, Writer};

/// An in-memory database for tests; [`MemDb::db`] is the handle the store's functions take.
pub struct MemDb(Connection);

impl MemDb {
    pub fn db(&self) -> Db<'_> {
        Db(&self.0)
    }
}

/// A fresh in-memory database with `schema.sql` applied and the same per-connection set-up as the real one
/// (foreign keys on, `rarray` loaded).
pub fn memory_db() -> MemDb {
    let mut conn = Connection::open_in_memory().expect("in-memory database");
    conn.execute_batch("PRAGMA foreign_keys=ON;").expect("pragmas");
    rusqlite::vtab::array::load_module(&conn).expect("rarray");
    super::migrate::migrate(&mut conn).expect("schema");
    MemDb(conn)
}

/// Runs `f` as the writer would: inside a transaction that commits when `f` returns `Ok`, with a stream allocator
/// that starts after `stream` (returned updated).
pub fn write<R>(
    mem: &mut MemDb,
    stream: &mut i64,
    f: impl FnOnce(&mut Writer<'_>) -> crate::error::Result<R>,
) -> crate::error::Result<R> {
    let tx = mem.0.transaction()?;
    let result = {
        let mut w = Writer { conn: Db(&tx), next_stream: stream };
        f(&mut w)
    };
    if result.is_ok() {
        tx.commit()?;
    }
    result
}

// Fixture rows.

pub fn room(conn: Db<'_>, room_id: &str) -> RoomNid {
    conn.execute("INSERT INTO rooms (room_id, room_version) VALUES (?1, '10')", [room_id]).expect("room");
    RoomNid(conn.last_insert_rowid())
}

pub fn publish(conn: Db<'_>, room: RoomNid) {
    conn.execute("UPDATE rooms SET published = 1 WHERE room_nid = ?1", [room]).expect("publish");
}

pub fn set_partial(conn: Db<'_>, room: RoomNid, joined: i64) {
    conn.execute("UPDATE rooms SET partial_state = 1, joined_members = ?2 WHERE room_nid = ?1", params![room, joined])
        .expect("partial");
}

/// A timeline event (or an outlier when `stream` is None) with a minimal JSON body.
pub struct Ev<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub sender: &'a str,
    pub stream: Option<i64>,
    pub sg_after: Option<StateGroup>,
    pub rejected: bool,
    pub soft_failed: bool,
}

impl<'a> Ev<'a> {
    pub fn message(id: &'a str, sender: &'a str, stream: i64) -> Ev<'a> {
        Ev {
            id,
            event_type: "m.room.message",
            sender,
            stream: Some(stream),
            sg_after: None,
            rejected: false,
            soft_failed: false,
        }
    }
}

pub fn event(conn: Db<'_>, room: RoomNid, e: Ev<'_>) -> EventNid {
    let body = json!({"event_id": e.id, "type": e.event_type, "sender": e.sender, "content": {"body": e.id}});
    conn.execute(
        "INSERT INTO events (event_id, room_nid, event_type, sender, origin_server_ts, depth, stream_ordering, outlier,
            rejected, soft_failed, sg_after, json)
         VALUES (?1, ?2, ?3, ?4, 0, 1, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            e.id,
            room,
            e.event_type,
            e.sender,
            e.stream,
            e.stream.is_none(),
            e.rejected.then_some("rejected"),
            e.soft_failed,
            e.sg_after,
            body.to_string()
        ],
    )
    .expect("event");
    EventNid(conn.last_insert_rowid())
}

pub fn edge(conn: Db<'_>, event: EventNid, prev_event_id: &str) {
    conn.execute("INSERT INTO event_edges (event_nid, prev_event_id) VALUES (?1, ?2)", params![event, prev_event_id])
        .expect("edge");
}

pub fn state_group(conn: Db<'_>, room: RoomNid) -> StateGroup {
    conn.execute("INSERT INTO state_groups (room_nid) VALUES (?1)", [room]).expect("state group");
    StateGroup(conn.last_insert_rowid())
}

/// A `room_members` row (the membership event itself is not needed by the reads under test).
pub fn member(conn: Db<'_>, room: RoomNid, user_id: &str, membership: &str, displayname: Option<&str>) {
    let server = user_id.split_once(':').map(|x| x.1).unwrap_or("");
    conn.execute(
        "INSERT INTO room_members (room_nid, user_id, membership, event_nid, server_name, displayname)
         VALUES (?1, ?2, ?3, 0, ?4, ?5)
         ON CONFLICT (room_nid, user_id) DO UPDATE SET membership = ?3, displayname = ?5",
        params![room, user_id, membership, server, displayname],
    )
    .expect("member");
}

pub fn local_membership(conn: Db<'_>, stream: StreamPos, user_id: &str, room: RoomNid, membership: &str) {
    conn.execute(
        "INSERT INTO local_membership_stream (stream_ordering, user_id, room_nid, membership, event_nid)
         VALUES (?1, ?2, ?3, ?4, 0)",
        params![stream, user_id, room, membership],
    )
    .expect("local membership");
}

pub fn user(conn: Db<'_>, user_id: &str, displayname: Option<&str>, deactivated: bool) {
    conn.execute(
        "INSERT INTO users (user_id, created_ts, displayname, deactivated) VALUES (?1, 0, ?2, ?3)",
        params![user_id, displayname, deactivated],
    )
    .expect("user");
}

pub fn receipt(conn: Db<'_>, room: RoomNid, receipt_type: &str, user_id: &str, event_id: &str, stream: i64) {
    conn.execute(
        "INSERT INTO receipts (room_nid, receipt_type, user_id, thread_id, event_id, ts, stream_ordering)
         VALUES (?1, ?2, ?3, '', ?4, 7, ?5)",
        params![room, receipt_type, user_id, event_id, stream],
    )
    .expect("receipt");
}
