//! The durable outbound federation queue: rows survive restarts until the destination acknowledged them.

use rusqlite::{params, Connection};

use crate::error::Result;
use crate::store::events;

/// PDUs kept queued for a destination that keeps failing.
const MAX_QUEUED_FOR_FAILING: i64 = 50;

/// A failing destination's queue is trimmed on about one enqueued PDU in this many.
const TRIM_EVERY: u64 = 16;

/// Whether enqueueing `event_id` for `destination` is one of the trimming turns (a hash of both).
fn trim_turn(destination: &str, event_id: &str) -> bool {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (destination, event_id).hash(&mut h);
    h.finish() % TRIM_EVERY == 0
}

/// Queues a PDU for every other server in the room (joined members, plus the partial-state server list).
pub fn enqueue_pdu(
    conn: &Connection,
    room_nid: i64,
    event_id: &str,
    our_server: &str,
    extra: &[String],
) -> Result<usize> {
    let mut dests = events::joined_servers(conn, room_nid)?;
    let mut stmt = conn.prepare_cached("SELECT server_name FROM partial_state_servers WHERE room_nid = ?1")?;
    for s in stmt.query_map([room_nid], |r| r.get::<_, String>(0))? {
        dests.push(s?);
    }
    dests.extend(extra.iter().cloned());
    dests.sort();
    dests.dedup();
    let mut n = 0;
    let mut ins = conn.prepare_cached("INSERT INTO outbox (destination, kind, payload) VALUES (?1, 'pdu', ?2)")?;
    let mut failures = conn.prepare_cached("SELECT failures FROM destinations WHERE destination = ?1")?;
    let mut trim = conn.prepare_cached(
        "DELETE FROM outbox WHERE destination = ?1 AND kind = 'pdu' AND id <= (
            SELECT id FROM outbox WHERE destination = ?1 AND kind = 'pdu' ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )?;
    for d in dests.iter().filter(|d| d.as_str() != our_server) {
        ins.execute(params![d, event_id])?;
        n += 1;
        // A server that has been failing for a while gets only the most recent PDUs when it returns (it fetches
        // the gap with get_missing_events, as it would from any server): its queue must not grow without bound.
        // Trimmed on about one PDU in TRIM_EVERY (chosen by a hash, so every destination gets its turn), which
        // keeps such a queue near MAX_QUEUED_FOR_FAILING without a delete per server per event.
        if trim_turn(d, event_id) && failures.query_row([d], |r| r.get::<_, i64>(0)).unwrap_or(0) >= 3 {
            trim.execute(params![d, MAX_QUEUED_FOR_FAILING])?;
        }
    }
    Ok(n)
}

pub fn enqueue_edu(conn: &Connection, destination: &str, edu_json: &str) -> Result<()> {
    conn.prepare_cached("INSERT INTO outbox (destination, kind, payload) VALUES (?1, 'edu', ?2)")?
        .execute(params![destination, edu_json])?;
    Ok(())
}

/// Destinations with queued items that are due.
pub fn due_destinations(conn: &Connection, now: i64) -> Result<Vec<String>> {
    // A skip-scan over the (destination, id) index: one seek per destination, not a pass over every queued row
    // (the sender asks ten times a second, and a fan-out to a big room queues thousands of rows).
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE d(dest) AS (
             SELECT (SELECT min(destination) FROM outbox)
             UNION ALL
             SELECT (SELECT min(destination) FROM outbox WHERE destination > d.dest) FROM d WHERE d.dest IS NOT NULL
         )
         SELECT d.dest FROM d LEFT JOIN destinations x ON x.destination = d.dest
         WHERE d.dest IS NOT NULL AND coalesce(x.retry_at, 0) <= ?1",
    )?;
    let rows = stmt.query_map([now], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Up to 50 PDUs and 100 EDUs for one transaction: (row ids, pdu json, edu json).
pub fn next_batch(conn: &Connection, destination: &str) -> Result<(Vec<i64>, Vec<String>, Vec<String>)> {
    let mut ids = Vec::new();
    let mut pdus = Vec::new();
    let mut edus = Vec::new();
    let mut stmt = conn.prepare_cached(
        "SELECT o.id, e.json FROM outbox o JOIN events e ON e.event_id = o.payload
         WHERE o.destination = ?1 AND o.kind = 'pdu' ORDER BY o.id LIMIT 50",
    )?;
    for r in stmt.query_map([destination], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
        let (id, json) = r?;
        ids.push(id);
        pdus.push(json);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT id, payload FROM outbox WHERE destination = ?1 AND kind = 'edu' ORDER BY id LIMIT 100",
    )?;
    for r in stmt.query_map([destination], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
        let (id, json) = r?;
        ids.push(id);
        edus.push(json);
    }
    Ok((ids, pdus, edus))
}

pub fn delete(conn: &Connection, ids: &[i64]) -> Result<()> {
    let mut stmt = conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

pub fn record_success(conn: &Connection, destination: &str) -> Result<()> {
    conn.execute("DELETE FROM destinations WHERE destination = ?1", [destination])?;
    Ok(())
}

/// Exponential backoff: 2^failures seconds, capped at an hour.
pub fn record_failure(conn: &Connection, destination: &str, now: i64) -> Result<i64> {
    let failures: i64 = conn
        .query_row("SELECT failures FROM destinations WHERE destination = ?1", [destination], |r| r.get(0))
        .unwrap_or(0)
        + 1;
    let delay = (1000i64 << failures.min(12)).min(3_600_000);
    conn.execute(
        "INSERT INTO destinations (destination, failures, retry_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (destination) DO UPDATE SET failures = ?2, retry_at = ?3",
        params![destination, failures, now + delay],
    )?;
    Ok(delay)
}
