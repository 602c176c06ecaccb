//! The durable outbound federation queue: rows survive restarts until the destination acknowledged them.

use std::collections::HashSet;

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::RoomNid;
use crate::store::members;
use crate::store::Db;

/// Failed transactions in a row after which a destination is *catching up*: its queued PDUs are dropped and no
/// more are queued for it, so a room shared with thousands of dead servers costs one row per live server per event,
/// not one per server. When it answers again it gets, for each room it shares with us, the latest event we sent
/// since it went away, and fetches what came before with `get_missing_events`. One, as Synapse (its per-destination
/// queue starts catching up on any failed transaction): with three, a 100k-member room's 2000 dead servers each
/// got a queued row per event for their first 30 s of backoff, and the sender looked through all those queues
/// ten times a second (bench/PROFILE.md, round 4).
pub const CATCH_UP_AFTER_FAILURES: i64 = 1;

/// Queues a PDU for every other server in the room (joined members, plus the partial-state server list, plus
/// servers peeking it: MSC2444).
pub fn enqueue_pdu(
    conn: Db<'_>,
    room_nid: RoomNid,
    event_id: &str,
    our_server: &str,
    extra: &[String],
) -> Result<usize> {
    let mut dests = members::joined_servers(conn, room_nid)?;
    let mut stmt = conn.prepare_cached("SELECT server_name FROM partial_state_servers WHERE room_nid = ?1")?;
    for s in stmt.query_map([room_nid], |r| r.get::<_, String>(0))? {
        dests.push(s?);
    }
    dests.extend(extra.iter().cloned());
    dests.extend(crate::store::peeks::peeking_servers(conn, room_nid, crate::store::accounts::now_ms())?);
    dests.sort();
    dests.dedup();
    dests.retain(|d| d != our_server);
    enqueue_pdu_to(conn, event_id, &dests)
}

/// Queues a PDU for these destinations, except those catching up (they get the room's latest event on return).
pub fn enqueue_pdu_to(conn: Db<'_>, event_id: &str, destinations: &[String]) -> Result<usize> {
    let mut stmt = conn.prepare_cached("SELECT destination FROM destinations WHERE catch_up_from IS NOT NULL")?;
    let catching_up: HashSet<String> = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    let mut ins = conn.prepare_cached("INSERT INTO outbox (destination, kind, payload) VALUES (?1, 'pdu', ?2)")?;
    let mut n = 0;
    for d in destinations.iter().filter(|d| !catching_up.contains(*d) && valid_destination(d)) {
        ins.execute(params![d, event_id])?;
        n += 1;
    }
    Ok(n)
}

/// Only a server name can be a destination: anything else (say the empty server of a malformed user id) could
/// never be sent and would sit in the queue for ever, so it is dropped here, whoever asked.
fn valid_destination(destination: &str) -> bool {
    let ok = ruma::ServerName::parse(destination).is_ok();
    if !ok {
        tracing::warn!(destination, "not queueing for a destination that is not a server name");
    }
    ok
}

pub fn enqueue_edu(conn: Db<'_>, destination: &str, edu_json: &str) -> Result<()> {
    if !valid_destination(destination) {
        return Ok(());
    }
    conn.prepare_cached("INSERT INTO outbox (destination, kind, payload) VALUES (?1, 'edu', ?2)")?
        .execute(params![destination, edu_json])?;
    Ok(())
}

/// A destination that is due, with how many times in a row sending to it failed (0: none, or never tried).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub destination: String,
    pub failures: i64,
}

/// Destinations with queued items, or catching up, that are due.
pub fn due_destinations(conn: Db<'_>, now: i64) -> Result<Vec<Due>> {
    // A skip-scan over the (destination, id) index: one seek per destination, not a pass over every queued row
    // (the sender asks after every commit and at least ten times a second).
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE d(dest) AS (
             SELECT (SELECT min(destination) FROM outbox)
             UNION ALL
             SELECT (SELECT min(destination) FROM outbox WHERE destination > d.dest) FROM d WHERE d.dest IS NOT NULL
         )
         SELECT d.dest, coalesce(x.failures, 0) FROM d LEFT JOIN destinations x ON x.destination = d.dest
         WHERE d.dest IS NOT NULL AND coalesce(x.retry_at, 0) <= ?1
         UNION
         SELECT destination, failures FROM destinations WHERE catch_up_from IS NOT NULL AND retry_at <= ?1",
    )?;
    let rows = stmt.query_map([now], |r| Ok(Due { destination: r.get(0)?, failures: r.get(1)? }))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// What goes to a destination in its next transactions.
#[derive(Debug, Default)]
pub struct Batch {
    /// Outbox rows to delete once sent.
    pub ids: Vec<i64>,
    pub pdus: Vec<String>,
    pub edus: Vec<String>,
    /// Catching up: the stream position the catch-up PDUs were read at (see [`finish_catch_up`]).
    pub catch_up_to: Option<i64>,
}

/// Up to 50 PDUs and 100 EDUs for one transaction; for a destination catching up, every PDU it is owed (one per
/// room, sent 50 to a transaction) and its queued EDUs.
pub fn next_batch(conn: Db<'_>, destination: &str, our_server: &str) -> Result<Batch> {
    let mut b = Batch::default();
    let catch_up_from: Option<i64> = conn
        .prepare_cached("SELECT catch_up_from FROM destinations WHERE destination = ?1")?
        .query_row([destination], |r| r.get(0))
        .optional()?
        .flatten();
    match catch_up_from {
        Some(from) => {
            b.catch_up_to = Some(latest_event_stream(conn)?);
            b.pdus = catch_up_pdus(conn, destination, our_server, from, usize::MAX)?;
        }
        None => {
            let mut stmt = conn.prepare_cached(
                "SELECT o.id, e.json FROM outbox o JOIN events e ON e.event_id = o.payload
                 WHERE o.destination = ?1 AND o.kind = 'pdu' ORDER BY o.id LIMIT 50",
            )?;
            for r in stmt.query_map([destination], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
                let (id, json) = r?;
                b.ids.push(id);
                b.pdus.push(json);
            }
        }
    }
    let mut stmt = conn.prepare_cached(
        "SELECT id, payload FROM outbox WHERE destination = ?1 AND kind = 'edu' ORDER BY id LIMIT 100",
    )?;
    for r in stmt.query_map([destination], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
        let (id, json) = r?;
        b.ids.push(id);
        b.edus.push(json);
    }
    Ok(b)
}

fn latest_event_stream(conn: Db<'_>) -> Result<i64> {
    Ok(conn.prepare_cached("SELECT coalesce(max(stream_ordering), 0) FROM events")?.query_row([], |r| r.get(0))?)
}

/// For each room `destination` is in (joined members, or the partial-state server list), the latest event our
/// users sent there after stream position `from` (at most `limit` rooms).
fn catch_up_pdus(conn: Db<'_>, destination: &str, our_server: &str, from: i64, limit: usize) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT (SELECT e.json FROM events e
                 WHERE e.room_nid = r.room_nid AND e.stream_ordering > ?2 AND e.outlier = 0 AND e.rejected IS NULL
                   AND substr(e.sender, -length(?3)) = ?3
                 ORDER BY e.stream_ordering DESC LIMIT 1) AS json
         FROM rooms r
         WHERE (EXISTS (SELECT 1 FROM room_members m
                        WHERE m.room_nid = r.room_nid AND m.server_name = ?1 AND m.membership = 'join')
                OR EXISTS (SELECT 1 FROM partial_state_servers p WHERE p.room_nid = r.room_nid AND p.server_name = ?1))
           AND json IS NOT NULL",
    )?;
    let suffix = format!(":{our_server}");
    let rows = stmt.query_map(params![destination, from, suffix], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows.take(limit) {
        out.push(row?);
    }
    Ok(out)
}

/// After a catch-up read at stream position `to` was delivered: back to a normal queue, unless our users sent more
/// to a shared room since (then another round is due at once). Runs on the writer, which also queues new events,
/// so nothing sent in between is missed.
pub fn finish_catch_up(conn: Db<'_>, destination: &str, our_server: &str, to: i64) -> Result<()> {
    if catch_up_pdus(conn, destination, our_server, to, 1)?.is_empty() {
        record_success(conn, destination)
    } else {
        conn.prepare_cached(
            "UPDATE destinations SET failures = 0, retry_at = 0, catch_up_from = ?2 WHERE destination = ?1",
        )?
        .execute(params![destination, to])?;
        Ok(())
    }
}

pub fn delete(conn: Db<'_>, ids: &[i64]) -> Result<()> {
    let mut stmt = conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

/// Whether sends to `destination` are held back by a failure backoff (`retry_at` still ahead of `now`).
pub fn backing_off(conn: Db<'_>, destination: &str, now: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM destinations WHERE destination = ?1 AND retry_at > ?2")?
        .exists(params![destination, now])?)
}

/// `destination` is up (it just called us): its backoff ends now. Its failure count and catch-up mark stay, so a
/// destination in catch-up still catches up, at once. Returns whether a backoff was ended.
pub fn end_backoff(conn: Db<'_>, destination: &str, now: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("UPDATE destinations SET retry_at = 0 WHERE destination = ?1 AND retry_at > ?2")?
        .execute(params![destination, now])?
        > 0)
}

pub fn record_success(conn: Db<'_>, destination: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM destinations WHERE destination = ?1")?.execute([destination])?;
    Ok(())
}

/// Exponential backoff: `base_ms` times 2^failures, give or take a quarter, capped at an hour. The failure that makes
/// [`CATCH_UP_AFTER_FAILURES`] puts the destination into catch-up.
pub fn record_failure(conn: Db<'_>, destination: &str, now: i64, base_ms: u64) -> Result<i64> {
    let (failures, catching_up): (i64, bool) = conn
        .prepare_cached("SELECT failures, catch_up_from IS NOT NULL FROM destinations WHERE destination = ?1")?
        .query_row([destination], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, false));
    let failures = failures + 1;
    // Jittered (x0.75..1.25): the servers of a big room that failed together (all dead ones fail on the first
    // event) would otherwise all come due in the same instant, thousands of retries at once, which held users'
    // requests up by hundreds of ms in a 100k-member room (bench/PROFILE.md, round 4).
    let jitter = rand::random::<f64>() * 0.5 + 0.75;
    let delay = (((base_ms.max(1) as i64) << failures.min(12)) as f64 * jitter).min(3_600_000.0) as i64;
    conn.prepare_cached(
        "INSERT INTO destinations (destination, failures, retry_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (destination) DO UPDATE SET failures = ?2, retry_at = ?3",
    )?
    .execute(params![destination, failures, now + delay])?;
    if failures >= CATCH_UP_AFTER_FAILURES && !catching_up {
        // Owed from the oldest event still queued for it (or from now), then the queue goes.
        let oldest: Option<i64> = conn
            .prepare_cached(
                "SELECT min(e.stream_ordering) FROM outbox o JOIN events e ON e.event_id = o.payload
                 WHERE o.destination = ?1 AND o.kind = 'pdu'",
            )?
            .query_row([destination], |r| r.get(0))?;
        let from = match oldest {
            Some(s) => s - 1,
            None => latest_event_stream(conn)?,
        };
        conn.prepare_cached("UPDATE destinations SET catch_up_from = ?2 WHERE destination = ?1")?
            .execute(params![destination, from])?;
        conn.prepare_cached("DELETE FROM outbox WHERE destination = ?1 AND kind = 'pdu'")?.execute([destination])?;
        tracing::info!(destination, failures, "destination keeps failing: catching up when it answers again");
    }
    Ok(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn nothing_is_queued_for_a_destination_that_is_not_a_server_name() {
        let conn = memory_db();
        for bad in ["", "bad server", "x/y"] {
            enqueue_edu(conn.db(), bad, "{}").unwrap();
            assert_eq!(enqueue_pdu_to(conn.db(), "$e", &[bad.to_owned()]).unwrap(), 0);
        }
        assert!(due_destinations(conn.db(), i64::MAX).unwrap().is_empty());
        enqueue_edu(conn.db(), "good.example", "{}").unwrap();
        assert_eq!(enqueue_pdu_to(conn.db(), "$e", &["good.example:8448".to_owned()]).unwrap(), 1);
        assert_eq!(due_destinations(conn.db(), i64::MAX).unwrap().len(), 2);
    }
}
