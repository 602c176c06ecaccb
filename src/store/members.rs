//! The materialised membership of rooms (`room_members`), member counts, joined servers and the local membership stream.

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;

pub struct MemberUpdate<'a> {
    pub room_nid: i64,
    pub user_id: &'a str,
    pub membership: &'a str,
    pub event_nid: i64,
    pub displayname: Option<&'a str>,
    pub avatar_url: Option<&'a str>,
}

pub fn upsert_member(conn: &Connection, m: &MemberUpdate<'_>) -> Result<()> {
    let old: Option<String> = conn
        .prepare_cached("SELECT membership FROM room_members WHERE room_nid = ?1 AND user_id = ?2")?
        .query_row(params![m.room_nid, m.user_id], |r| r.get(0))
        .optional()?;
    let server = m.user_id.split_once(':').map(|x| x.1).unwrap_or("");
    conn.prepare_cached(
        "INSERT INTO room_members (room_nid, user_id, membership, event_nid, server_name, displayname, avatar_url)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (room_nid, user_id) DO UPDATE SET membership = ?3, event_nid = ?4, displayname = ?6, avatar_url = ?7",
    )?
    .execute(params![m.room_nid, m.user_id, m.membership, m.event_nid, server, m.displayname, m.avatar_url])?;
    let delta = |ms: &str| -> (i64, i64) {
        match ms {
            "join" => (1, 0),
            "invite" => (0, 1),
            _ => (0, 0),
        }
    };
    let (oj, oi) = old.as_deref().map(delta).unwrap_or((0, 0));
    let (nj, ni) = delta(m.membership);
    if (oj, oi) != (nj, ni) {
        conn.prepare_cached(
            "UPDATE rooms SET joined_members = joined_members + ?2, invited_members = invited_members + ?3
             WHERE room_nid = ?1",
        )?
        .execute(params![m.room_nid, nj - oj, ni - oi])?;
    }
    Ok(())
}

pub fn membership_of(conn: &Connection, room_nid: i64, user_id: &str) -> Result<Option<(String, i64)>> {
    Ok(conn
        .prepare_cached("SELECT membership, event_nid FROM room_members WHERE room_nid = ?1 AND user_id = ?2")?
        .query_row(params![room_nid, user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

pub fn member_counts(conn: &Connection, room_nid: i64) -> Result<(i64, i64)> {
    Ok(conn
        .prepare_cached("SELECT joined_members, invited_members FROM rooms WHERE room_nid = ?1")?
        .query_row([room_nid], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

/// Rooms in which `user_id` currently has `membership`.
pub fn rooms_with_membership(conn: &Connection, user_id: &str, membership: &str) -> Result<Vec<(i64, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.room_nid, r.room_id FROM room_members m JOIN rooms r ON r.room_nid = m.room_nid
         WHERE m.user_id = ?1 AND m.membership = ?2",
    )?;
    let rows = stmt.query_map(params![user_id, membership], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Servers with at least one joined member.
pub fn joined_servers(conn: &Connection, room_nid: i64) -> Result<Vec<String>> {
    // A skip-scan over the (room_nid, server_name, membership) index: two seeks per server rather than a pass over
    // every member (a 100k-member room has ~2000 servers; this runs for every event we send to it).
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE s(name) AS (
             SELECT (SELECT min(server_name) FROM room_members WHERE room_nid = ?1)
             UNION ALL
             SELECT (SELECT min(server_name) FROM room_members WHERE room_nid = ?1 AND server_name > s.name)
             FROM s WHERE s.name IS NOT NULL
         )
         SELECT name FROM s WHERE name IS NOT NULL AND EXISTS (
             SELECT 1 FROM room_members WHERE room_nid = ?1 AND server_name = s.name AND membership = 'join')",
    )?;
    let rows = stmt.query_map([room_nid], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn record_local_membership(
    conn: &Connection,
    stream: i64,
    user_id: &str,
    room_nid: i64,
    membership: &str,
    event_nid: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO local_membership_stream (stream_ordering, user_id, room_nid, membership, event_nid)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![stream, user_id, room_nid, membership, event_nid])?;
    Ok(())
}
