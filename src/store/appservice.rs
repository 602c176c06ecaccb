//! Application services: each one's position in the event stream, its transactions waiting to be sent (written
//! before the first attempt, so a retry sends the same txn id and body) and its backoff; and the rooms it
//! published in its network's room directory.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::Db;

/// An application service's delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Events up to here have been put into transactions (or were of no interest).
    pub stream: StreamPos,
    pub last_txn_id: i64,
    pub failures: i64,
    /// When the next attempt may be made (ms since the epoch; 0 = now).
    pub retry_at: i64,
}

/// Starts following the stream at `start` for a service seen for the first time; a known one keeps its place.
pub fn ensure(conn: Db<'_>, id: &str, start: StreamPos) -> Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO appservice_state (appservice_id, stream) VALUES (?1, ?2)")?
        .execute(params![id, start])?;
    Ok(())
}

pub fn state(conn: Db<'_>, id: &str) -> Result<Option<State>> {
    Ok(conn
        .prepare_cached(
            "SELECT stream, last_txn_id, failures, retry_at FROM appservice_state WHERE appservice_id = ?1",
        )?
        .query_row([id], |r| {
            Ok(State { stream: StreamPos(r.get(0)?), last_txn_id: r.get(1)?, failures: r.get(2)?, retry_at: r.get(3)? })
        })
        .optional()?)
}

/// The oldest transaction waiting to be sent: (txn id, body).
pub fn next_txn(conn: Db<'_>, id: &str) -> Result<Option<(i64, String)>> {
    Ok(conn
        .prepare_cached("SELECT txn_id, body FROM appservice_txns WHERE appservice_id = ?1 ORDER BY txn_id LIMIT 1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Moves the service's position from `from` to `to` and, when `body` is given, queues it as the next transaction
/// (its id returned). Nothing happens (None) when the position is no longer `from` (someone else moved it).
pub fn advance(conn: Db<'_>, id: &str, from: StreamPos, to: StreamPos, body: Option<&str>) -> Result<Option<i64>> {
    let Some(st) = state(conn, id)? else { return Ok(None) };
    if st.stream != from {
        return Ok(None);
    }
    let txn = st.last_txn_id + i64::from(body.is_some());
    conn.prepare_cached("UPDATE appservice_state SET stream = ?2, last_txn_id = ?3 WHERE appservice_id = ?1")?
        .execute(params![id, to, txn])?;
    if let Some(b) = body {
        conn.prepare_cached("INSERT INTO appservice_txns (appservice_id, txn_id, body) VALUES (?1, ?2, ?3)")?
            .execute(params![id, txn, b])?;
    }
    Ok(Some(txn))
}

/// A transaction was accepted: it is gone, and so is the backoff.
pub fn delivered(conn: Db<'_>, id: &str, txn_id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM appservice_txns WHERE appservice_id = ?1 AND txn_id = ?2")?
        .execute(params![id, txn_id])?;
    conn.prepare_cached("UPDATE appservice_state SET failures = 0, retry_at = 0 WHERE appservice_id = ?1")?
        .execute([id])?;
    Ok(())
}

/// A send failed: the backoff grows (`base_ms` * 2^(failures-1), at most `max_ms`). Returns the wait in ms.
pub fn failed(conn: Db<'_>, id: &str, now: i64, base_ms: i64, max_ms: i64) -> Result<i64> {
    let failures = state(conn, id)?.map_or(0, |s| s.failures) + 1;
    let wait = base_ms.saturating_mul(1i64 << (failures - 1).clamp(0, 30)).min(max_ms).max(0);
    conn.prepare_cached("UPDATE appservice_state SET failures = ?2, retry_at = ?3 WHERE appservice_id = ?1")?
        .execute(params![id, failures, now + wait])?;
    Ok(wait)
}

/// Transactions waiting for the service.
pub fn queued_count(conn: Db<'_>, id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT count(*) FROM appservice_txns WHERE appservice_id = ?1")?
        .query_row([id], |r| r.get(0))?)
}

/// Publishes (or withdraws) a room in the service's network directory.
pub fn set_listed(conn: Db<'_>, id: &str, network: &str, room_id: &str, listed: bool) -> Result<()> {
    if listed {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO appservice_room_list (appservice_id, network_id, room_id) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![id, network, room_id])?;
    } else {
        conn.prepare_cached(
            "DELETE FROM appservice_room_list WHERE appservice_id = ?1 AND network_id = ?2 AND room_id = ?3",
        )?
        .execute(params![id, network, room_id])?;
    }
    Ok(())
}

/// The rooms published in a network's directory (by any service), sorted.
pub fn listed_rooms(conn: Db<'_>, network: &str) -> Result<Vec<String>> {
    let mut stmt = conn
        .prepare_cached("SELECT DISTINCT room_id FROM appservice_room_list WHERE network_id = ?1 ORDER BY room_id")?;
    let rows = stmt.query_map([network], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Rooms published in application services' network directories (one service's network, or every network when
/// None), as `rooms::published_rooms` gives the main directory: (room nid, room id, joined members), most members
/// first.
pub fn network_rooms(conn: Db<'_>, network: Option<(&str, &str)>) -> Result<Vec<(i64, String, i64)>> {
    let (svc, net) = network.unzip();
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT r.room_nid, r.room_id, r.joined_members FROM appservice_room_list l \
         JOIN rooms r ON r.room_id = l.room_id \
         WHERE ?1 IS NULL OR (l.appservice_id = ?1 AND l.network_id = ?2) \
         ORDER BY r.joined_members DESC, r.room_id",
    )?;
    let rows = stmt.query_map(params![svc, net], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---- what a transaction carries beside timeline events (MSC2409, MSC3202), by stream window ----------------------

/// Rooms where a receipt other than a private one moved in the window (`after`, `upto`].
pub fn receipt_rooms_in(conn: Db<'_>, after: StreamPos, upto: StreamPos) -> Result<Vec<RoomNid>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT room_nid FROM receipts WHERE stream_ordering > ?1 AND stream_ordering <= ?2 \
         AND receipt_type != 'm.read.private' ORDER BY room_nid",
    )?;
    let rows = stmt.query_map(params![after, upto], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Users whose presence changed (visibly: with a stream position) in the window.
pub fn presence_users_in(conn: Db<'_>, after: StreamPos, upto: StreamPos) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM presence WHERE stream_ordering > ?1 AND stream_ordering <= ?2 ORDER BY stream_ordering",
    )?;
    let rows = stmt.query_map(params![after, upto], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A to-device message queued in the window: (recipient user, device, sender, type, content JSON).
pub type QueuedToDevice = (String, String, String, String, String);

/// The to-device messages queued in the window, oldest first (still queued: a device that syncs deletes its own).
pub fn to_device_in(conn: Db<'_>, after: StreamPos, upto: StreamPos) -> Result<Vec<QueuedToDevice>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, device_id, sender, event_type, content FROM to_device \
         WHERE stream_ordering > ?1 AND stream_ordering <= ?2 ORDER BY stream_ordering",
    )?;
    let rows = stmt.query_map(params![after, upto], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Users whose device list changed in the window.
pub fn device_list_users_in(conn: Db<'_>, after: StreamPos, upto: StreamPos) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT user_id FROM device_list_stream WHERE stream_ordering > ?1 AND stream_ordering <= ?2 \
         ORDER BY user_id",
    )?;
    let rows = stmt.query_map(params![after, upto], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The users joined to a room `user_id` is joined to (`user_id` among them if joined anywhere).
pub fn joined_co_members(conn: Db<'_>, user_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT b.user_id FROM room_members a JOIN room_members b ON b.room_nid = a.room_nid \
         WHERE a.user_id = ?1 AND a.membership = 'join' AND b.membership = 'join'",
    )?;
    let rows = stmt.query_map([user_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn transactions_keep_their_id_until_delivered_and_backoff_is_capped() {
        let m = memory_db();
        let c = m.db();
        ensure(c, "irc", StreamPos(5)).unwrap();
        ensure(c, "irc", StreamPos(9)).unwrap();
        assert_eq!(state(c, "irc").unwrap().unwrap().stream, StreamPos(5), "a known service keeps its place");
        // Nothing of interest: the position moves, no transaction.
        assert_eq!(advance(c, "irc", StreamPos(5), StreamPos(7), None).unwrap(), Some(0));
        assert_eq!(advance(c, "irc", StreamPos(7), StreamPos(9), Some("{\"events\":[1]}")).unwrap(), Some(1));
        assert_eq!(advance(c, "irc", StreamPos(7), StreamPos(11), Some("x")).unwrap(), None, "moved meanwhile");
        assert_eq!(advance(c, "irc", StreamPos(9), StreamPos(12), Some("{\"events\":[2]}")).unwrap(), Some(2));
        assert_eq!(next_txn(c, "irc").unwrap().unwrap().0, 1);
        assert_eq!(failed(c, "irc", 1000, 100, 250).unwrap(), 100);
        assert_eq!(failed(c, "irc", 1000, 100, 250).unwrap(), 200);
        assert_eq!(failed(c, "irc", 1000, 100, 250).unwrap(), 250, "capped");
        assert_eq!(state(c, "irc").unwrap().unwrap().retry_at, 1250);
        assert_eq!(next_txn(c, "irc").unwrap().unwrap(), (1, "{\"events\":[1]}".to_owned()), "same id on retry");
        delivered(c, "irc", 1).unwrap();
        assert_eq!(state(c, "irc").unwrap().unwrap().failures, 0);
        assert_eq!(next_txn(c, "irc").unwrap().unwrap().0, 2);
        assert_eq!(queued_count(c, "irc").unwrap(), 1);
    }

    #[test]
    fn network_directories() {
        let m = memory_db();
        let c = m.db();
        set_listed(c, "irc", "libera", "!b:hs", true).unwrap();
        set_listed(c, "irc", "libera", "!a:hs", true).unwrap();
        set_listed(c, "irc", "oftc", "!c:hs", true).unwrap();
        set_listed(c, "irc", "libera", "!b:hs", false).unwrap();
        assert_eq!(listed_rooms(c, "libera").unwrap(), ["!a:hs"]);
    }
}
