//! Per-user account data (global and per-room). Every write takes a new position of the global stream so the
//! next incremental /sync picks the row up.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use crate::error::Result;
use crate::store::ids::StreamPos;
use crate::store::{Db, Writer};

/// The stored content of one account data type; `room_id` is `""` for global data.
pub fn get(conn: Db<'_>, user_id: &str, room_id: &str, data_type: &str) -> Result<Option<Value>> {
    let raw: Option<String> = conn
        .prepare_cached("SELECT content FROM account_data WHERE user_id = ?1 AND room_id = ?2 AND data_type = ?3")?
        .query_row(params![user_id, room_id, data_type], |r| r.get(0))
        .optional()?;
    Ok(raw.map(|s| serde_json::from_str(&s)).transpose()?)
}

/// Replaces one account data type; returns the stream position it was written at.
pub fn set(w: &mut Writer<'_>, user_id: &str, room_id: &str, data_type: &str, content: &Value) -> Result<i64> {
    let pos = w.next_stream();
    w.db()
        .prepare_cached(
            "INSERT INTO account_data (user_id, room_id, data_type, content, stream_ordering) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (user_id, room_id, data_type) DO UPDATE SET content = excluded.content,
             stream_ordering = excluded.stream_ordering",
        )?
        .execute(params![user_id, room_id, data_type, content.to_string(), pos])?;
    Ok(pos)
}

/// Deletes all of a user's account data, global and per room (a deactivated account's).
pub fn delete_all(conn: Db<'_>, user_id: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM account_data WHERE user_id = ?1")?.execute([user_id])?;
    Ok(())
}

/// The account data of one scope (`room_id` `""` for global) written in the window (`after`, `upto`], oldest
/// write first: `(type, content)`.
pub fn changed_since(
    conn: Db<'_>,
    user_id: &str,
    room_id: &str,
    after: StreamPos,
    upto: StreamPos,
) -> Result<Vec<(String, Value)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT data_type, content FROM account_data WHERE user_id = ?1 AND room_id = ?2 AND stream_ordering > ?3
         AND stream_ordering <= ?4 ORDER BY stream_ordering",
    )?;
    let rows = stmt
        .query_map(params![user_id, room_id, after, upto], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for r in rows {
        let (data_type, content) = r?;
        out.push((data_type, serde_json::from_str(&content)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::testing::{memory_db, write};

    #[test]
    fn set_then_get_replaces_and_moves_the_row_in_the_stream() {
        let mut conn = memory_db();
        let mut stream = 0;
        assert_eq!(get(conn.db(), "@a:x", "", "m.t").unwrap(), None);
        let p1 = write(&mut conn, &mut stream, |w| set(w, "@a:x", "", "m.t", &json!({"v": 1}))).unwrap();
        let p2 = write(&mut conn, &mut stream, |w| set(w, "@a:x", "", "m.t", &json!({"v": 2}))).unwrap();
        assert!(p2 > p1);
        assert_eq!(get(conn.db(), "@a:x", "", "m.t").unwrap(), Some(json!({"v": 2})));
        assert_eq!(get(conn.db(), "@a:x", "!r:x", "m.t").unwrap(), None, "global and room data are apart");
        let all = changed_since(conn.db(), "@a:x", "", StreamPos(0), StreamPos(stream)).unwrap();
        assert_eq!(all, [("m.t".to_owned(), json!({"v": 2}))], "one row per type, at its last write");
        assert!(changed_since(conn.db(), "@a:x", "", StreamPos(p2), StreamPos(stream)).unwrap().is_empty());
    }

    #[test]
    fn changed_since_is_ordered_scoped_and_windowed() {
        let mut conn = memory_db();
        let mut stream = 0;
        write(&mut conn, &mut stream, |w| {
            set(w, "@a:x", "", "m.b", &json!({}))?; // 1
            set(w, "@a:x", "!r:x", "m.room", &json!({"r": true}))?; // 2
            set(w, "@b:x", "", "m.other_user", &json!({}))?; // 3
            set(w, "@a:x", "", "m.a", &json!({"a": 1}))?; // 4
            set(w, "@a:x", "", "m.c", &json!({})) // 5
        })
        .unwrap();
        let types = |room: &str, after: i64, upto: i64| -> Vec<String> {
            changed_since(conn.db(), "@a:x", room, StreamPos(after), StreamPos(upto))
                .unwrap()
                .into_iter()
                .map(|x| x.0)
                .collect()
        };
        assert_eq!(types("", 0, 5), ["m.b", "m.a", "m.c"], "in stream order, not by name");
        assert_eq!(types("", 1, 4), ["m.a"], "after is exclusive, upto inclusive");
        assert_eq!(types("!r:x", 0, 5), ["m.room"]);
        assert!(types("!other:x", 0, 5).is_empty());
    }
}
