//! `invite_state`: the stripped room state that came with an invite to a room we are not in (shown in `/sync`'s
//! `invite` section until the user joins, rejects or leaves).

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::RoomNid;
use crate::store::Db;

/// Keeps the stripped state (`events`, a JSON array) of `user_id`'s invite to `room`, replacing an earlier one.
pub fn set(conn: Db<'_>, room: RoomNid, user_id: &str, events: &str) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO invite_state (room_nid, user_id, events) VALUES (?1, ?2, ?3)")?
        .execute(params![room, user_id, events])?;
    Ok(())
}

/// Forgets `user_id`'s invite to `room` (it was rejected or left).
pub fn remove(conn: Db<'_>, room: RoomNid, user_id: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM invite_state WHERE room_nid = ?1 AND user_id = ?2")?
        .execute(params![room, user_id])?;
    Ok(())
}

/// The stripped state (a JSON array) that came with `user_id`'s invite over federation, if any.
pub fn get(conn: Db<'_>, room: RoomNid, user_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT events FROM invite_state WHERE room_nid = ?1 AND user_id = ?2")?
        .query_row(params![room, user_id], |r| r.get(0))
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    fn stored(conn: Db<'_>, room: RoomNid, user_id: &str) -> Option<String> {
        conn.query_row(
            "SELECT events FROM invite_state WHERE room_nid = ?1 AND user_id = ?2",
            params![room, user_id],
            |r| r.get(0),
        )
        .ok()
    }

    #[test]
    fn set_replaces_and_remove_forgets() {
        let conn = memory_db();
        let room = crate::store::rooms::insert_room(conn.db(), "!r:b.example", "10").unwrap();
        set(conn.db(), room, "@a:a.example", "[1]").unwrap();
        set(conn.db(), room, "@a:a.example", "[2]").unwrap();
        set(conn.db(), room, "@b:a.example", "[3]").unwrap();
        assert_eq!(stored(conn.db(), room, "@a:a.example").as_deref(), Some("[2]"));
        remove(conn.db(), room, "@a:a.example").unwrap();
        assert_eq!(stored(conn.db(), room, "@a:a.example"), None);
        assert_eq!(stored(conn.db(), room, "@b:a.example").as_deref(), Some("[3]"));
        assert_eq!(get(conn.db(), room, "@b:a.example").unwrap().as_deref(), Some("[3]"));
        assert_eq!(get(conn.db(), room, "@a:a.example").unwrap(), None);
    }
}
