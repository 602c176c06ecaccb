//! Per-user account data (global and per-room). Every write takes a new position of the global stream so the
//! next incremental /sync picks the row up.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::error::Result;
use crate::store::Writer;

/// The stored content of one account data type; `room_id` is `""` for global data.
pub fn get(conn: &Connection, user_id: &str, room_id: &str, data_type: &str) -> Result<Option<Value>> {
    let raw: Option<String> = conn
        .prepare_cached("SELECT content FROM account_data WHERE user_id = ?1 AND room_id = ?2 AND data_type = ?3")?
        .query_row(params![user_id, room_id, data_type], |r| r.get(0))
        .optional()?;
    Ok(raw.map(|s| serde_json::from_str(&s)).transpose()?)
}

/// Replaces one account data type; returns the stream position it was written at.
pub fn set(w: &mut Writer<'_>, user_id: &str, room_id: &str, data_type: &str, content: &Value) -> Result<i64> {
    let pos = w.next_stream();
    w.conn
        .prepare_cached(
            "INSERT INTO account_data (user_id, room_id, data_type, content, stream_ordering) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (user_id, room_id, data_type) DO UPDATE SET content = excluded.content,
             stream_ordering = excluded.stream_ordering",
        )?
        .execute(params![user_id, room_id, data_type, content.to_string(), pos])?;
    Ok(pos)
}
