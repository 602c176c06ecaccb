//! Room aliases and the local room directory.

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;

pub fn alias_target(conn: &Connection, alias: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT room_id FROM room_aliases WHERE alias = ?1")?
        .query_row([alias], |r| r.get(0))
        .optional()?)
}

pub fn alias_creator(conn: &Connection, alias: &str) -> Result<Option<(String, String)>> {
    Ok(conn
        .prepare_cached("SELECT room_id, creator FROM room_aliases WHERE alias = ?1")?
        .query_row([alias], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

pub fn insert_alias(conn: &Connection, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
    Ok(conn.execute(
        "INSERT OR IGNORE INTO room_aliases (alias, room_id, creator) VALUES (?1, ?2, ?3)",
        params![alias, room_id, creator],
    )? == 1)
}

pub fn delete_alias(conn: &Connection, alias: &str) -> Result<bool> {
    Ok(conn.execute("DELETE FROM room_aliases WHERE alias = ?1", [alias])? == 1)
}

pub fn aliases_of(conn: &Connection, room_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT alias FROM room_aliases WHERE room_id = ?1 ORDER BY alias")?;
    let rows = stmt.query_map([room_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn set_published(conn: &Connection, room_id: &str, published: bool) -> Result<()> {
    conn.execute("UPDATE rooms SET published = ?2 WHERE room_id = ?1", params![room_id, published])?;
    Ok(())
}

pub fn is_published(conn: &Connection, room_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT published FROM rooms WHERE room_id = ?1")?
        .query_row([room_id], |r| r.get(0))
        .optional()?
        .unwrap_or(false))
}

/// Published rooms, most members first: (room_nid, room_id, joined_members).
pub fn published_rooms(conn: &Connection) -> Result<Vec<(i64, String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_nid, room_id, joined_members FROM rooms WHERE published = 1 ORDER BY joined_members DESC, room_id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Rooms still in partial state (a lazy join's member list being fetched): `(room_id, joined members known so far)`.
pub fn partial_state_rooms(conn: &Connection) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT room_id, joined_members FROM rooms WHERE partial_state = 1")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Tests of the alias and directory functions above (other helpers' tests of room rows live beside theirs).
#[cfg(test)]
mod directory_tests {
    use super::*;
    use crate::store::fixtures;
    use crate::store::testing::memory_db;

    #[test]
    fn aliases_belong_to_their_creator_and_list_in_order() {
        let conn = memory_db();
        assert_eq!(alias_target(&conn, "#a:x").unwrap(), None);
        assert!(insert_alias(&conn, "#b:x", "!r:x", "@u:x").unwrap());
        assert!(insert_alias(&conn, "#a:x", "!r:x", "@v:x").unwrap());
        assert!(!insert_alias(&conn, "#a:x", "!other:x", "@w:x").unwrap(), "taken");
        assert_eq!(alias_target(&conn, "#a:x").unwrap().as_deref(), Some("!r:x"));
        assert_eq!(alias_creator(&conn, "#a:x").unwrap(), Some(("!r:x".into(), "@v:x".into())));
        assert_eq!(aliases_of(&conn, "!r:x").unwrap(), ["#a:x", "#b:x"]);
        assert!(delete_alias(&conn, "#a:x").unwrap());
        assert!(!delete_alias(&conn, "#a:x").unwrap());
        assert_eq!(aliases_of(&conn, "!r:x").unwrap(), ["#b:x"]);
    }

    #[test]
    fn published_and_partial_rooms() {
        let conn = memory_db();
        let (a, b) = (fixtures::room(&conn, "!a:x"), fixtures::room(&conn, "!b:x"));
        assert!(!is_published(&conn, "!a:x").unwrap());
        assert!(!is_published(&conn, "!unknown:x").unwrap());
        set_published(&conn, "!a:x", true).unwrap();
        set_published(&conn, "!b:x", true).unwrap();
        conn.execute("UPDATE rooms SET joined_members = 3 WHERE room_nid = ?1", [b]).unwrap();
        assert!(is_published(&conn, "!a:x").unwrap());
        let listed: Vec<String> = published_rooms(&conn).unwrap().into_iter().map(|r| r.1).collect();
        assert_eq!(listed, ["!b:x", "!a:x"], "most members first");
        set_published(&conn, "!b:x", false).unwrap();
        assert_eq!(published_rooms(&conn).unwrap().len(), 1);

        assert!(partial_state_rooms(&conn).unwrap().is_empty());
        fixtures::set_partial(&conn, a, 42);
        assert_eq!(partial_state_rooms(&conn).unwrap(), [("!a:x".to_owned(), 42)]);
    }
}
