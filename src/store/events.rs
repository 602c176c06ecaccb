//! Rooms, events, state groups and the materialised membership table.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;

#[derive(Clone, Debug)]
pub struct RoomRow {
    pub room_nid: i64,
    pub room_id: String,
    pub version: String,
    pub current_sg: Option<i64>,
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

pub fn room_by_id(conn: &Connection, room_id: &str) -> Result<Option<RoomRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {ROOM_COLS} FROM rooms WHERE room_id = ?1"))?
        .query_row([room_id], room_row)
        .optional()?)
}

pub fn room_by_nid(conn: &Connection, room_nid: i64) -> Result<Option<RoomRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {ROOM_COLS} FROM rooms WHERE room_nid = ?1"))?
        .query_row([room_nid], room_row)
        .optional()?)
}

pub fn insert_room(conn: &Connection, room_id: &str, version: &str) -> Result<i64> {
    conn.execute("INSERT INTO rooms (room_id, room_version) VALUES (?1, ?2)", params![room_id, version])?;
    Ok(conn.last_insert_rowid())
}

pub fn set_current_sg(conn: &Connection, room_nid: i64, sg: i64) -> Result<()> {
    conn.execute("UPDATE rooms SET current_sg = ?2 WHERE room_nid = ?1", params![room_nid, sg])?;
    Ok(())
}

/// Interns `(type, state_key)`.
pub fn state_key_nid(conn: &Connection, event_type: &str, state_key: &str) -> Result<i64> {
    if let Some(nid) = find_state_key_nid(conn, event_type, state_key)? {
        return Ok(nid);
    }
    conn.prepare_cached("INSERT INTO state_keys (event_type, state_key) VALUES (?1, ?2)")?
        .execute(params![event_type, state_key])?;
    Ok(conn.last_insert_rowid())
}

pub fn find_state_key_nid(conn: &Connection, event_type: &str, state_key: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT state_key_nid FROM state_keys WHERE event_type = ?1 AND state_key = ?2")?
        .query_row(params![event_type, state_key], |r| r.get(0))
        .optional()?)
}

pub fn state_key_of(conn: &Connection, nid: i64) -> Result<(String, String)> {
    Ok(conn
        .prepare_cached("SELECT event_type, state_key FROM state_keys WHERE state_key_nid = ?1")?
        .query_row([nid], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

#[derive(Clone, Debug)]
pub struct EventRow {
    pub event_nid: i64,
    pub event_id: String,
    pub room_nid: i64,
    pub event_type: String,
    pub state_key_nid: Option<i64>,
    pub sender: String,
    pub origin_server_ts: i64,
    pub depth: i64,
    pub stream_ordering: Option<i64>,
    pub outlier: bool,
    pub rejected: Option<String>,
    pub redacted_by: Option<String>,
    pub sg_after: Option<i64>,
    pub txn_device: Option<String>,
    pub txn_id: Option<String>,
    pub json: String,
}

pub const EVENT_COLS: &str = "event_nid, event_id, room_nid, event_type, state_key_nid, sender, origin_server_ts, \
     depth, stream_ordering, outlier, rejected, redacted_by, sg_after, txn_device, txn_id, json";

pub fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        event_nid: r.get(0)?,
        event_id: r.get(1)?,
        room_nid: r.get(2)?,
        event_type: r.get(3)?,
        state_key_nid: r.get(4)?,
        sender: r.get(5)?,
        origin_server_ts: r.get(6)?,
        depth: r.get(7)?,
        stream_ordering: r.get(8)?,
        outlier: r.get(9)?,
        rejected: r.get(10)?,
        redacted_by: r.get(11)?,
        sg_after: r.get(12)?,
        txn_device: r.get(13)?,
        txn_id: r.get(14)?,
        json: r.get(15)?,
    })
}

pub fn event_by_id(conn: &Connection, event_id: &str) -> Result<Option<EventRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {EVENT_COLS} FROM events WHERE event_id = ?1"))?
        .query_row([event_id], event_row)
        .optional()?)
}

pub fn event_by_nid(conn: &Connection, nid: i64) -> Result<Option<EventRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {EVENT_COLS} FROM events WHERE event_nid = ?1"))?
        .query_row([nid], event_row)
        .optional()?)
}

pub fn event_nid(conn: &Connection, event_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT event_nid FROM events WHERE event_id = ?1")?
        .query_row([event_id], |r| r.get(0))
        .optional()?)
}

pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub room_nid: i64,
    pub event_type: &'a str,
    pub state_key_nid: Option<i64>,
    pub sender: &'a str,
    pub origin_server_ts: i64,
    pub depth: i64,
    pub stream_ordering: Option<i64>,
    pub outlier: bool,
    pub rejected: Option<&'a str>,
    pub soft_failed: bool,
    pub txn: Option<(&'a str, &'a str)>,
    pub json: &'a str,
}

pub fn insert_event(conn: &Connection, e: &NewEvent<'_>) -> Result<i64> {
    conn.prepare_cached(
        "INSERT INTO events (event_id, room_nid, event_type, state_key_nid, sender, origin_server_ts, depth,
            stream_ordering, outlier, rejected, soft_failed, txn_device, txn_id, json)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        e.event_id,
        e.room_nid,
        e.event_type,
        e.state_key_nid,
        e.sender,
        e.origin_server_ts,
        e.depth,
        e.stream_ordering,
        e.outlier,
        e.rejected,
        e.soft_failed,
        e.txn.map(|t| t.0),
        e.txn.map(|t| t.1),
        e.json,
    ])?;
    Ok(conn.last_insert_rowid())
}

pub fn set_sg_after(conn: &Connection, event_nid: i64, sg: i64) -> Result<()> {
    conn.prepare_cached("UPDATE events SET sg_after = ?2 WHERE event_nid = ?1")?.execute(params![event_nid, sg])?;
    Ok(())
}

pub fn insert_auth_edges(conn: &Connection, event_nid: i64, auth: &[String]) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("INSERT OR IGNORE INTO event_auth (event_nid, auth_event_id) VALUES (?1, ?2)")?;
    for a in auth {
        stmt.execute(params![event_nid, a])?;
    }
    Ok(())
}

/// The auth event ids of an event, from the edge table.
pub fn auth_event_ids(conn: &Connection, event_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT a.auth_event_id FROM event_auth a JOIN events e ON e.event_nid = a.event_nid WHERE e.event_id = ?1",
    )?;
    let rows = stmt.query_map([event_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn insert_edges(conn: &Connection, event_nid: i64, prevs: &[String]) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("INSERT OR IGNORE INTO event_edges (event_nid, prev_event_id) VALUES (?1, ?2)")?;
    for p in prevs {
        stmt.execute(params![event_nid, p])?;
    }
    Ok(())
}

pub fn forward_extremities(conn: &Connection, room_nid: i64) -> Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached("SELECT event_nid FROM forward_extremities WHERE room_nid = ?1")?;
    let rows = stmt.query_map([room_nid], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn replace_extremities(conn: &Connection, room_nid: i64, remove: &[i64], add: i64) -> Result<()> {
    let mut del = conn.prepare_cached("DELETE FROM forward_extremities WHERE room_nid = ?1 AND event_nid = ?2")?;
    for nid in remove {
        del.execute(params![room_nid, nid])?;
    }
    conn.prepare_cached("INSERT OR IGNORE INTO forward_extremities (room_nid, event_nid) VALUES (?1, ?2)")?
        .execute(params![room_nid, add])?;
    Ok(())
}

pub fn set_redacted(conn: &Connection, event_nid: i64, redacted_by: &str, json: &str) -> Result<()> {
    conn.execute(
        "UPDATE events SET redacted_by = ?2, json = ?3 WHERE event_nid = ?1",
        params![event_nid, redacted_by, json],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// State groups

/// Longest delta chain before a group is written as a full snapshot.
pub const MAX_SG_DEPTH: i64 = 64;

pub fn sg_depth(conn: &Connection, sg: i64) -> Result<i64> {
    Ok(conn.prepare_cached("SELECT depth FROM state_groups WHERE sg = ?1")?.query_row([sg], |r| r.get(0))?)
}

pub fn insert_sg(conn: &Connection, room_nid: i64, delta_of: Option<i64>, depth: i64, partial: bool) -> Result<i64> {
    conn.prepare_cached("INSERT INTO state_groups (room_nid, delta_of, depth, partial) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![room_nid, delta_of, depth, partial])?;
    Ok(conn.last_insert_rowid())
}

pub fn insert_sg_entries(conn: &Connection, sg: i64, entries: &[(i64, Option<i64>)]) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO state_group_entries (sg, state_key_nid, event_nid) VALUES (?1, ?2, ?3)",
    )?;
    for (key, ev) in entries {
        stmt.execute(params![sg, key, ev])?;
    }
    Ok(())
}

const CHAIN: &str = "WITH RECURSIVE chain(sg, d) AS (
        SELECT ?1, 0
        UNION ALL
        SELECT g.delta_of, c.d + 1 FROM state_groups g JOIN chain c ON g.sg = c.sg WHERE g.delta_of IS NOT NULL)";

/// The full state of a group: state_key_nid -> event_nid.
pub fn load_state(conn: &Connection, sg: i64) -> Result<HashMap<i64, i64>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{CHAIN} SELECT e.state_key_nid, e.event_nid, c.d FROM state_group_entries e JOIN chain c ON e.sg = c.sg
         ORDER BY c.d DESC"
    ))?;
    let mut state = HashMap::new();
    // Deepest ancestor first, so nearer groups overwrite.
    let mut rows = stmt.query([sg])?;
    while let Some(r) = rows.next()? {
        let key: i64 = r.get(0)?;
        match r.get::<_, Option<i64>>(1)? {
            Some(ev) => state.insert(key, ev),
            None => state.remove(&key),
        };
    }
    Ok(state)
}

/// One entry of a group's state.
pub fn lookup_state(conn: &Connection, sg: i64, state_key_nid: i64) -> Result<Option<i64>> {
    let row: Option<Option<i64>> = conn
        .prepare_cached(&format!(
            "{CHAIN} SELECT e.event_nid FROM state_group_entries e JOIN chain c ON e.sg = c.sg
             WHERE e.state_key_nid = ?2 ORDER BY c.d LIMIT 1"
        ))?
        .query_row(params![sg, state_key_nid], |r| r.get(0))
        .optional()?;
    Ok(row.flatten())
}

/// State entries of a group whose type is `event_type` (e.g. all memberships at an event).
pub fn load_state_of_type(conn: &Connection, sg: i64, event_type: &str) -> Result<HashMap<String, i64>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{CHAIN} SELECT k.state_key, e.event_nid FROM state_group_entries e JOIN chain c ON e.sg = c.sg
         JOIN state_keys k ON k.state_key_nid = e.state_key_nid WHERE k.event_type = ?2 ORDER BY c.d DESC"
    ))?;
    let mut out = HashMap::new();
    let mut rows = stmt.query(params![sg, event_type])?;
    while let Some(r) = rows.next()? {
        let key: String = r.get(0)?;
        match r.get::<_, Option<i64>>(1)? {
            Some(ev) => out.insert(key, ev),
            None => out.remove(&key),
        };
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------
// Materialised membership

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

/// A group's state as (event_nid, event_id), optionally without one event type (e.g. members), in one query.
pub fn state_event_ids(conn: &Connection, sg: i64, exclude_type: Option<&str>) -> Result<Vec<(i64, String)>> {
    // Without the members, a big room's state is a few dozen entries among 100k: when the other types have few
    // state keys (they are shared by all rooms), look each up in each group of the chain instead of scanning the
    // whole state (0.2 ms against 20 ms at 100k members).
    let seek = match exclude_type {
        Some(t) => {
            let others: i64 = conn
                .prepare_cached("SELECT count(*) FROM state_keys WHERE event_type < ?1 OR event_type > ?1")?
                .query_row([t], |r| r.get(0))?;
            others <= 2000
        }
        None => false,
    };
    let mut stmt = if seek {
        // CROSS JOIN fixes the order: groups, then the other types' keys, then one primary-key seek per pair.
        conn.prepare_cached(&format!(
            "{CHAIN} SELECT e.state_key_nid, e.event_nid, ev.event_id FROM chain c
             CROSS JOIN state_keys k CROSS JOIN state_group_entries e ON e.sg = c.sg AND e.state_key_nid = k.state_key_nid
             LEFT JOIN events ev ON ev.event_nid = e.event_nid
             WHERE (k.event_type < ?2 OR k.event_type > ?2) ORDER BY c.d DESC"
        ))?
    } else {
        conn.prepare_cached(&format!(
            "{CHAIN} SELECT e.state_key_nid, e.event_nid, ev.event_id FROM state_group_entries e JOIN chain c ON e.sg = c.sg
             JOIN state_keys k ON k.state_key_nid = e.state_key_nid LEFT JOIN events ev ON ev.event_nid = e.event_nid
             WHERE k.event_type != ?2 ORDER BY c.d DESC"
        ))?
    };
    let mut map: HashMap<i64, Option<(i64, String)>> = HashMap::new();
    let mut rows = stmt.query(params![sg, exclude_type.unwrap_or("")])?;
    while let Some(r) = rows.next()? {
        let skn: i64 = r.get(0)?;
        let nid: Option<i64> = r.get(1)?;
        let id: Option<String> = r.get(2)?;
        map.insert(skn, nid.zip(id));
    }
    Ok(map.into_values().flatten().collect())
}

/// The auth chain (event nids) of the given events, walked in SQL over the auth-edge table; includes the starts.
/// Needs the `rarray` module (loaded on pooled readers).
pub fn auth_chain_nids(conn: &Connection, start: &[i64]) -> Result<Vec<i64>> {
    let values: std::rc::Rc<Vec<rusqlite::types::Value>> =
        std::rc::Rc::new(start.iter().map(|n| rusqlite::types::Value::Integer(*n)).collect());
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE chain(nid) AS (
            SELECT value FROM rarray(?1)
            UNION
            SELECT e2.event_nid FROM chain JOIN event_auth a ON a.event_nid = chain.nid JOIN events e2 ON e2.event_id = a.auth_event_id)
         SELECT nid FROM chain",
    )?;
    let rows = stmt.query_map([values], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Stored JSON of events by nid.
pub fn json_of(conn: &Connection, nid: i64) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT json FROM events WHERE event_nid = ?1")?
        .query_row([nid], |r| r.get(0))
        .optional()?)
}
