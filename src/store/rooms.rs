//! Rooms (their rows, current state group and partial-state flag), room aliases and the local room directory.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::{RoomNid, StateGroup};
use crate::store::Db;

pub fn alias_target(conn: Db<'_>, alias: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT room_id FROM room_aliases WHERE alias = ?1")?
        .query_row([alias], |r| r.get(0))
        .optional()?)
}

pub fn alias_creator(conn: Db<'_>, alias: &str) -> Result<Option<(String, String)>> {
    Ok(conn
        .prepare_cached("SELECT room_id, creator FROM room_aliases WHERE alias = ?1")?
        .query_row([alias], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

pub fn insert_alias(conn: Db<'_>, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
    Ok(conn.execute(
        "INSERT OR IGNORE INTO room_aliases (alias, room_id, creator) VALUES (?1, ?2, ?3)",
        params![alias, room_id, creator],
    )? == 1)
}

pub fn delete_alias(conn: Db<'_>, alias: &str) -> Result<bool> {
    Ok(conn.execute("DELETE FROM room_aliases WHERE alias = ?1", [alias])? == 1)
}

pub fn aliases_of(conn: Db<'_>, room_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT alias FROM room_aliases WHERE room_id = ?1 ORDER BY alias")?;
    let rows = stmt.query_map([room_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn set_published(conn: Db<'_>, room_id: &str, published: bool) -> Result<()> {
    conn.execute("UPDATE rooms SET published = ?2 WHERE room_id = ?1", params![room_id, published])?;
    Ok(())
}

pub fn is_published(conn: Db<'_>, room_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT published FROM rooms WHERE room_id = ?1")?
        .query_row([room_id], |r| r.get(0))
        .optional()?
        .unwrap_or(false))
}

/// Published rooms, most members first: (room_nid, room_id, joined_members).
pub fn published_rooms(conn: Db<'_>) -> Result<Vec<(i64, String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_nid, room_id, joined_members FROM rooms WHERE published = 1 ORDER BY joined_members DESC, room_id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---------------------------------------------------------------------------------------------------------------
// Room rows

#[derive(Clone, Debug)]
pub struct RoomRow {
    pub room_nid: RoomNid,
    pub room_id: String,
    pub version: String,
    pub current_sg: Option<StateGroup>,
    pub partial_state: bool,
}

const ROOM_COLS: &str = "room_nid, room_id, room_version, current_sg, partial_state";

fn room_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RoomRow> {
    Ok(RoomRow {
        room_nid: r.get(0)?,
        room_id: r.get(1)?,
        version: r.get(2)?,
        current_sg: r.get(3)?,
        partial_state: r.get(4)?,
    })
}

pub fn room_by_id(conn: Db<'_>, room_id: &str) -> Result<Option<RoomRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {ROOM_COLS} FROM rooms WHERE room_id = ?1"))?
        .query_row([room_id], room_row)
        .optional()?)
}

pub fn room_by_nid(conn: Db<'_>, room_nid: RoomNid) -> Result<Option<RoomRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {ROOM_COLS} FROM rooms WHERE room_nid = ?1"))?
        .query_row([room_nid], room_row)
        .optional()?)
}

pub fn insert_room(conn: Db<'_>, room_id: &str, version: &str) -> Result<RoomNid> {
    conn.execute("INSERT INTO rooms (room_id, room_version) VALUES (?1, ?2)", params![room_id, version])?;
    Ok(RoomNid(conn.last_insert_rowid()))
}

pub fn set_current_sg(conn: Db<'_>, room_nid: RoomNid, sg: StateGroup) -> Result<()> {
    conn.execute("UPDATE rooms SET current_sg = ?2 WHERE room_nid = ?1", params![room_nid, sg])?;
    Ok(())
}

/// The servers send_join named as in a room still partial (its member list is incomplete).
pub fn partial_state_servers(conn: Db<'_>, room_nid: RoomNid) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT server_name FROM partial_state_servers WHERE room_nid = ?1")?;
    let rows = stmt.query_map([room_nid], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod room_row_tests {
    use super::*;
    use crate::store::state_groups;
    use crate::store::testing::memory_db;

    #[test]
    fn a_room_is_found_by_id_and_by_nid() {
        let conn = memory_db();
        let nid = insert_room(conn.db(), "!a:x", "12").unwrap();
        let r = room_by_id(conn.db(), "!a:x").unwrap().unwrap();
        assert_eq!(r.room_nid, nid);
        assert_eq!(r.room_id, "!a:x");
        assert_eq!(r.version, "12");
        assert_eq!(r.current_sg, None);
        assert!(!r.partial_state);
        assert_eq!(room_by_nid(conn.db(), nid).unwrap().unwrap().room_id, "!a:x");
        assert!(room_by_id(conn.db(), "!b:x").unwrap().is_none());
        assert!(room_by_nid(conn.db(), RoomNid(nid.0 + 1)).unwrap().is_none());
        // Room ids are unique.
        assert!(insert_room(conn.db(), "!a:x", "11").is_err());
        assert_ne!(insert_room(conn.db(), "!b:x", "11").unwrap(), nid);
    }

    #[test]
    fn the_current_state_group_is_set() {
        let conn = memory_db();
        let nid = insert_room(conn.db(), "!a:x", "12").unwrap();
        let sg = state_groups::insert_sg(conn.db(), nid, None, 0, false).unwrap();
        set_current_sg(conn.db(), nid, sg).unwrap();
        assert_eq!(room_by_nid(conn.db(), nid).unwrap().unwrap().current_sg, Some(sg));
    }

    #[test]
    fn partial_state_servers_are_listed_per_room() {
        let conn = memory_db();
        let a = insert_room(conn.db(), "!a:x", "12").unwrap();
        let b = insert_room(conn.db(), "!b:x", "12").unwrap();
        for (room, server) in [(a, "one.example"), (a, "two.example"), (b, "three.example")] {
            conn.db()
                .execute(
                    "INSERT INTO partial_state_servers (room_nid, server_name) VALUES (?1, ?2)",
                    params![room, server],
                )
                .unwrap();
        }
        let mut servers = partial_state_servers(conn.db(), a).unwrap();
        servers.sort();
        assert_eq!(servers, ["one.example", "two.example"]);
        assert_eq!(partial_state_servers(conn.db(), b).unwrap(), ["three.example"]);
    }
}

/// Rooms still in partial state (a lazy join's member list being fetched): `(room_id, joined members known so far)`.
pub fn partial_state_rooms(conn: Db<'_>) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT room_id, joined_members FROM rooms WHERE partial_state = 1")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A room as `hearth room list` shows it: its row, joined members (all, and of `server`), whether it is blocked.
#[derive(Clone, Debug)]
pub struct RoomListing {
    pub room: RoomRow,
    pub joined: i64,
    pub local_joined: i64,
    pub blocked: bool,
}

/// Every room we hold a row for, most members first; `server` counts the local members.
pub fn list_rooms(conn: Db<'_>, server: &str) -> Result<Vec<RoomListing>> {
    let mut stmt = conn.prepare(
        "SELECT r.room_nid, r.room_id, r.room_version, r.current_sg, r.partial_state, r.joined_members,
                (SELECT count(*) FROM room_members m WHERE m.room_nid = r.room_nid AND m.membership = 'join'
                 AND m.server_name = ?1),
                EXISTS (SELECT 1 FROM blocked_rooms b WHERE b.room_id = r.room_id)
         FROM rooms r ORDER BY r.joined_members DESC, r.room_id",
    )?;
    let rows = stmt.query_map([server], |r| {
        Ok(RoomListing { room: room_row(r)?, joined: r.get(5)?, local_joined: r.get(6)?, blocked: r.get(7)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Blocks (`true`) or unblocks a room by id; returns whether that changed anything.
pub fn set_blocked(conn: Db<'_>, room_id: &str, blocked: bool, now: i64) -> Result<bool> {
    let n = if blocked {
        conn.execute(
            "INSERT OR IGNORE INTO blocked_rooms (room_id, blocked_ts) VALUES (?1, ?2)",
            params![room_id, now],
        )?
    } else {
        conn.execute("DELETE FROM blocked_rooms WHERE room_id = ?1", [room_id])?
    };
    Ok(n == 1)
}

/// Whether an admin blocked the room.
pub fn is_blocked(conn: Db<'_>, room_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM blocked_rooms WHERE room_id = ?1)")?
        .query_row([room_id], |r| r.get(0))?)
}

/// Blocked rooms that we hold no row for (never seen, or purged and forgotten), for `hearth room list`.
pub fn blocked_unknown_rooms(conn: Db<'_>) -> Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT b.room_id FROM blocked_rooms b WHERE NOT EXISTS (SELECT 1 FROM rooms r WHERE r.room_id = b.room_id)
         ORDER BY b.room_id",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod admin_tests {
    use super::*;
    use crate::store::testing::{self, memory_db};

    #[test]
    fn rooms_are_listed_with_local_members_and_blocks() {
        let conn = memory_db();
        let db = conn.db();
        let a = testing::room(db, "!a:x");
        testing::room(db, "!b:x");
        for (user, server) in [("@u:here", "here"), ("@v:there", "there")] {
            db.execute(
                "INSERT INTO room_members (room_nid, user_id, membership, event_nid, server_name)
                 VALUES (?1, ?2, 'join', 1, ?3)",
                params![a, user, server],
            )
            .unwrap();
        }
        db.execute("UPDATE rooms SET joined_members = 2 WHERE room_nid = ?1", [a]).unwrap();
        assert!(set_blocked(db, "!b:x", true, 5).unwrap());
        assert!(!set_blocked(db, "!b:x", true, 6).unwrap(), "already blocked");
        assert!(set_blocked(db, "!never:x", true, 6).unwrap());
        let rooms = list_rooms(db, "here").unwrap();
        let got: Vec<_> =
            rooms.iter().map(|r| (r.room.room_id.as_str(), r.joined, r.local_joined, r.blocked)).collect();
        assert_eq!(got, [("!a:x", 2, 1, false), ("!b:x", 0, 0, true)]);
        assert!(is_blocked(db, "!never:x").unwrap());
        assert_eq!(blocked_unknown_rooms(db).unwrap(), ["!never:x"]);
        assert!(set_blocked(db, "!b:x", false, 7).unwrap());
        assert!(!is_blocked(db, "!b:x").unwrap());
        assert!(!set_blocked(db, "!b:x", false, 7).unwrap());
    }
}

/// Tests of the alias and directory functions above (other helpers' tests of room rows live beside theirs).
#[cfg(test)]
mod directory_tests {
    use super::*;
    use crate::store::testing::{self, memory_db};

    #[test]
    fn aliases_belong_to_their_creator_and_list_in_order() {
        let conn = memory_db();
        assert_eq!(alias_target(conn.db(), "#a:x").unwrap(), None);
        assert!(insert_alias(conn.db(), "#b:x", "!r:x", "@u:x").unwrap());
        assert!(insert_alias(conn.db(), "#a:x", "!r:x", "@v:x").unwrap());
        assert!(!insert_alias(conn.db(), "#a:x", "!other:x", "@w:x").unwrap(), "taken");
        assert_eq!(alias_target(conn.db(), "#a:x").unwrap().as_deref(), Some("!r:x"));
        assert_eq!(alias_creator(conn.db(), "#a:x").unwrap(), Some(("!r:x".into(), "@v:x".into())));
        assert_eq!(aliases_of(conn.db(), "!r:x").unwrap(), ["#a:x", "#b:x"]);
        assert!(delete_alias(conn.db(), "#a:x").unwrap());
        assert!(!delete_alias(conn.db(), "#a:x").unwrap());
        assert_eq!(aliases_of(conn.db(), "!r:x").unwrap(), ["#b:x"]);
    }

    #[test]
    fn published_and_partial_rooms() {
        let conn = memory_db();
        let (a, b) = (testing::room(conn.db(), "!a:x"), testing::room(conn.db(), "!b:x"));
        assert!(!is_published(conn.db(), "!a:x").unwrap());
        assert!(!is_published(conn.db(), "!unknown:x").unwrap());
        set_published(conn.db(), "!a:x", true).unwrap();
        set_published(conn.db(), "!b:x", true).unwrap();
        conn.db().execute("UPDATE rooms SET joined_members = 3 WHERE room_nid = ?1", [b]).unwrap();
        assert!(is_published(conn.db(), "!a:x").unwrap());
        let listed: Vec<String> = published_rooms(conn.db()).unwrap().into_iter().map(|r| r.1).collect();
        assert_eq!(listed, ["!b:x", "!a:x"], "most members first");
        set_published(conn.db(), "!b:x", false).unwrap();
        assert_eq!(published_rooms(conn.db()).unwrap().len(), 1);

        assert!(partial_state_rooms(conn.db()).unwrap().is_empty());
        testing::set_partial(conn.db(), a, 42);
        assert_eq!(partial_state_rooms(conn.db()).unwrap(), [("!a:x".to_owned(), 42)]);
    }
}
