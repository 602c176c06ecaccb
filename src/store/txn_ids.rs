//! Client transaction ids (`txn_ids`), so a retried request is not applied twice: event sends (`kind = 'send'`,
//! remembering the event id they produced) and to-device sends (`kind = 'to_device'`).

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::Db;

/// The event id an earlier send with this transaction key produced, if there was one.
pub fn sent_event(conn: Db<'_>, user_id: &str, device_id: &str, txn_key: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached(
            "SELECT result FROM txn_ids WHERE user_id = ?1 AND device_id = ?2 AND kind = 'send' AND txn_id = ?3",
        )?
        .query_row(params![user_id, device_id, txn_key], |r| r.get(0))
        .optional()?)
}

/// Remembers the event a send with this transaction key produced.
pub fn record_sent_event(conn: Db<'_>, user_id: &str, device_id: &str, txn_key: &str, event_id: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO txn_ids (user_id, device_id, txn_id, kind, result) VALUES (?1, ?2, ?3, 'send', ?4)",
    )?
    .execute(params![user_id, device_id, txn_key, event_id])?;
    Ok(())
}

/// Whether this device already sent to-device transaction `txn_id` (retries must not deliver twice).
pub fn to_device_txn_seen(conn: Db<'_>, user_id: &str, device_id: &str, txn_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM txn_ids WHERE user_id = ?1 AND device_id = ?2 AND kind = 'to_device' AND txn_id = ?3",
        )?
        .exists(params![user_id, device_id, txn_id])?)
}

pub fn record_to_device_txn(conn: Db<'_>, user_id: &str, device_id: &str, txn_id: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO txn_ids (user_id, device_id, txn_id, kind, result) VALUES (?1, ?2, ?3, 'to_device', '')",
    )?
    .execute(params![user_id, device_id, txn_id])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn sends_are_remembered_per_user_and_device() {
        let conn = memory_db();
        assert_eq!(sent_event(conn.db(), "@a:x", "D1", "!r:x/t1").unwrap(), None);
        record_sent_event(conn.db(), "@a:x", "D1", "!r:x/t1", "$e1").unwrap();
        assert_eq!(sent_event(conn.db(), "@a:x", "D1", "!r:x/t1").unwrap().as_deref(), Some("$e1"));
        assert_eq!(sent_event(conn.db(), "@a:x", "D2", "!r:x/t1").unwrap(), None, "another device");
        assert_eq!(sent_event(conn.db(), "@b:x", "D1", "!r:x/t1").unwrap(), None, "another user");
        assert!(record_sent_event(conn.db(), "@a:x", "D1", "!r:x/t1", "$e2").is_err(), "a key is used once");
    }

    #[test]
    fn to_device_and_send_transactions_do_not_mix() {
        let conn = memory_db();
        assert!(!to_device_txn_seen(conn.db(), "@a:x", "D1", "t1").unwrap());
        record_to_device_txn(conn.db(), "@a:x", "D1", "t1").unwrap();
        assert!(to_device_txn_seen(conn.db(), "@a:x", "D1", "t1").unwrap());
        assert!(!to_device_txn_seen(conn.db(), "@a:x", "D2", "t1").unwrap());
        assert_eq!(sent_event(conn.db(), "@a:x", "D1", "t1").unwrap(), None, "a to-device txn is not a send");
        record_sent_event(conn.db(), "@a:x", "D1", "t1", "$e").unwrap();
        assert_eq!(sent_event(conn.db(), "@a:x", "D1", "t1").unwrap().as_deref(), Some("$e"));
    }
}
