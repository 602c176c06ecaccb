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
