//! Events: their rows and JSON, prev and auth edges, forward extremities, redactions.

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;

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
