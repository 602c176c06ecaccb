//! Server-side search: the `event_search` FTS5 index (rowid = event_nid) of message bodies, room names and topics,
//! written when events are stored and cleared when they are redacted, and the query behind `POST /search`.

use rusqlite::params;
use serde_json::Value;

use crate::error::Result;
use crate::store::events::{event_row, EventRow, EVENT_COLS};
use crate::store::ids::{EventNid, RoomNid, StreamPos};
use crate::store::Db;

/// The searchable key of an event type: (`keys` name, content field).
pub fn key_of(event_type: &str) -> Option<(&'static str, &'static str)> {
    match event_type {
        "m.room.message" => Some(("content.body", "body")),
        "m.room.name" => Some(("content.name", "name")),
        "m.room.topic" => Some(("content.topic", "topic")),
        _ => None,
    }
}

/// Indexes a just-stored event's searchable field, if it has one.
pub(in crate::store) fn index(conn: Db<'_>, nid: EventNid, event_type: &str, event: &Value) -> Result<()> {
    let Some((key, field)) = key_of(event_type) else { return Ok(()) };
    let Some(text) = event.get("content").and_then(|c| c.get(field)).and_then(Value::as_str) else { return Ok(()) };
    unindex(conn, nid)?;
    conn.prepare_cached("INSERT INTO event_search (rowid, key, value) VALUES (?1, ?2, ?3)")?
        .execute(params![nid, key, text])?;
    Ok(())
}

/// Drops an event from the index (redacted, or its row is being replaced).
pub(in crate::store) fn unindex(conn: Db<'_>, nid: EventNid) -> Result<()> {
    conn.prepare_cached("DELETE FROM event_search WHERE rowid = ?1")?.execute([nid])?;
    Ok(())
}

/// A search term as an FTS5 query: every word must match, each as a prefix (`"hello"* "wor"*`); None when the
/// term has no word at all. Quoting every word keeps FTS5's query syntax out of users' hands.
pub fn fts_query(term: &str) -> Option<String> {
    let words: Vec<String> = term
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| format!("\"{}\"*", w.to_lowercase()))
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

/// What `POST /search` asks of the index.
pub struct SearchQuery<'a> {
    /// FTS5 query from [`fts_query`].
    pub fts: &'a str,
    /// Rooms to search with the first stream position the searcher may see in each.
    pub rooms: &'a [(RoomNid, i64)],
    /// `content.body` etc.
    pub keys: &'a [String],
    pub senders: Option<&'a [String]>,
    pub not_senders: &'a [String],
    /// Most recent first (keyset below `before`) instead of best match first (`offset`).
    pub recent: bool,
    pub before: Option<StreamPos>,
    pub offset: i64,
    pub limit: i64,
}

fn conditions() -> &'static str {
    "FROM event_search JOIN events e ON e.event_nid = event_search.rowid
     JOIN json_each(?2) j ON e.room_nid = json_extract(j.value, '$[0]')
       AND e.stream_ordering >= json_extract(j.value, '$[1]')
     WHERE event_search MATCH ?1 AND event_search.key IN (SELECT value FROM json_each(?3))
       AND (?4 IS NULL OR e.sender IN (SELECT value FROM json_each(?4)))
       AND e.sender NOT IN (SELECT value FROM json_each(?5))
       AND e.stream_ordering IS NOT NULL AND e.outlier = 0 AND e.rejected IS NULL AND e.soft_failed = 0
       AND e.redacted_by IS NULL"
}

fn json_args(q: &SearchQuery<'_>) -> Result<(String, String, Option<String>, String)> {
    let rooms: Vec<(i64, i64)> = q.rooms.iter().map(|(r, f)| (r.0, *f)).collect();
    Ok((
        serde_json::to_string(&rooms)?,
        serde_json::to_string(q.keys)?,
        q.senders.map(serde_json::to_string).transpose()?,
        serde_json::to_string(q.not_senders)?,
    ))
}

/// Matching events (with their rank, higher is better) for one page, and how many match in all.
pub fn search(conn: Db<'_>, q: &SearchQuery<'_>) -> Result<(Vec<(EventRow, f64)>, i64)> {
    let (rooms, keys, senders, not_senders) = json_args(q)?;
    let count: i64 = conn
        .prepare_cached(&format!("SELECT count(*) {}", conditions()))?
        .query_row(params![q.fts, rooms, keys, senders, not_senders], |r| r.get(0))?;
    let cols = EVENT_COLS.split(", ").map(|c| format!("e.{}", c.trim())).collect::<Vec<_>>().join(", ");
    let order = if q.recent {
        "AND e.stream_ordering < ?6 ORDER BY e.stream_ordering DESC LIMIT ?7 OFFSET ?8"
    } else {
        "AND ?6 IS NOT NULL ORDER BY event_search.rank, e.stream_ordering DESC LIMIT ?7 OFFSET ?8"
    };
    let sql = format!("SELECT {cols}, -event_search.rank {} {order}", conditions());
    let before = q.before.map_or(i64::MAX, |p| p.0);
    let offset = if q.recent { 0 } else { q.offset };
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![q.fts, rooms, keys, senders, not_senders, before, q.limit, offset], |r| {
        Ok((event_row(r)?, r.get::<_, f64>(16)?))
    })?;
    Ok((rows.collect::<rusqlite::Result<_>>()?, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, memory_db, Ev};
    use serde_json::json;

    #[test]
    fn search_finds_words_in_the_rooms_given_from_their_floor_and_forgets_redacted_events() {
        let conn = memory_db();
        let (room, other) = (testing::room(conn.db(), "!r:x"), testing::room(conn.db(), "!o:x"));
        let mut nids = Vec::new();
        for (id, r, pos, body) in [
            ("$1", room, 1, "hello, world"),
            ("$2", room, 2, "Hello again"),
            ("$3", other, 3, "hello elsewhere"),
            ("$4", room, 4, "goodbye"),
        ] {
            let nid = testing::event(conn.db(), r, Ev::message(id, "@a:x", pos));
            index(conn.db(), nid, "m.room.message", &json!({"content": {"body": body}})).unwrap();
            nids.push(nid);
        }
        let keys = vec!["content.body".to_owned()];
        let run = |rooms: &[(RoomNid, i64)], term: &str, recent: bool| {
            let fts = fts_query(term).unwrap();
            let q = SearchQuery {
                fts: &fts,
                rooms,
                keys: &keys,
                senders: None,
                not_senders: &[],
                recent,
                before: None,
                offset: 0,
                limit: 10,
            };
            let (rows, count) = search(conn.db(), &q).unwrap();
            (rows.into_iter().map(|(r, _)| r.event_id).collect::<Vec<_>>(), count)
        };
        assert_eq!(run(&[(room, i64::MIN)], "hello", true), (vec!["$2".to_owned(), "$1".to_owned()], 2));
        assert_eq!(run(&[(room, 2)], "HELLO", true).0, ["$2"], "nothing before the floor");
        assert_eq!(run(&[(room, i64::MIN), (other, i64::MIN)], "hel", false).1, 3, "prefixes match");
        assert_eq!(run(&[(room, i64::MIN)], "hello world", true).0, ["$1"], "every word must match");
        unindex(conn.db(), nids[0]).unwrap();
        assert_eq!(run(&[(room, i64::MIN)], "hello", true).0, ["$2"]);
        assert_eq!(fts_query(" \"* ,"), None);
        assert_eq!(fts_query("a\"b OR c").unwrap(), r#""a"* "b"* "or"* "c"*"#);
    }
}
