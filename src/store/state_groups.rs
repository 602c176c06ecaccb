//! State: interned (type, state_key) pairs, state groups (roots and delta chains) and lookups in them.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;

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
