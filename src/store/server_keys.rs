//! Servers' signing keys (`server_signing_keys`): other servers' keys as fetched and verified, and our own keys
//! retired by `hearth keys rotate` (rows with `expired_ts`).

use rusqlite::params;

use crate::error::Result;
use crate::store::Db;

/// A key that is no longer used for signing but still published (`old_verify_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldKey {
    /// `ed25519:<version>`
    pub key_id: String,
    /// Unpadded base64.
    pub public_key: String,
    pub expired_ts: i64,
}

/// The cached keys of `server_name`: `(key id, unpadded base64 public key)`, old ones included.
pub fn keys_of(conn: Db<'_>, server_name: &str) -> Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached("SELECT key_id, public_key FROM server_signing_keys WHERE server_name = ?1")?;
    let rows = stmt.query_map([server_name], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Keys of `server_name` that have expired (for our own server: the keys retired by rotation).
pub fn expired_keys(conn: Db<'_>, server_name: &str) -> Result<Vec<OldKey>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key_id, public_key, expired_ts FROM server_signing_keys WHERE server_name = ?1 AND expired_ts IS NOT NULL
         ORDER BY key_id",
    )?;
    let rows = stmt
        .query_map([server_name], |r| Ok(OldKey { key_id: r.get(0)?, public_key: r.get(1)?, expired_ts: r.get(2)? }))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Caches a verified key of another server: `valid_until_ts` only ever grows; `expired_ts` is set for keys that
/// came as `old_verify_keys`.
pub fn store_key(
    conn: Db<'_>,
    server_name: &str,
    key_id: &str,
    public_key: &str,
    valid_until_ts: i64,
    expired_ts: Option<i64>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO server_signing_keys (server_name, key_id, public_key, valid_until_ts, expired_ts)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (server_name, key_id) DO UPDATE SET valid_until_ts = max(valid_until_ts, ?4)",
    )?
    .execute(params![server_name, key_id, public_key, valid_until_ts, expired_ts])?;
    Ok(())
}

/// Records one of our keys as retired at `now_ms` (published from then on in `old_verify_keys`).
pub fn retire_key(conn: Db<'_>, server_name: &str, key_id: &str, public_key: &str, now_ms: i64) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO server_signing_keys (server_name, key_id, public_key, valid_until_ts, expired_ts)
         VALUES (?1, ?2, ?3, ?4, ?4)",
        params![server_name, key_id, public_key, now_ms],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn stored_keys_are_read_back_and_validity_only_grows() {
        let conn = memory_db();
        store_key(conn.db(), "b.example", "ed25519:a", "AAAA", 1000, None).unwrap();
        store_key(conn.db(), "b.example", "ed25519:a", "AAAA", 500, None).unwrap();
        store_key(conn.db(), "b.example", "ed25519:old", "BBBB", 300, Some(300)).unwrap();
        store_key(conn.db(), "c.example", "ed25519:c", "CCCC", 1000, None).unwrap();
        let mut keys = keys_of(conn.db(), "b.example").unwrap();
        keys.sort();
        assert_eq!(keys, vec![("ed25519:a".into(), "AAAA".into()), ("ed25519:old".into(), "BBBB".into())]);
        let until: i64 = conn
            .db()
            .query_row("SELECT valid_until_ts FROM server_signing_keys WHERE key_id = 'ed25519:a'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(until, 1000);
        let old = expired_keys(conn.db(), "b.example").unwrap();
        assert_eq!(old, vec![OldKey { key_id: "ed25519:old".into(), public_key: "BBBB".into(), expired_ts: 300 }]);
        assert!(keys_of(conn.db(), "nobody.example").unwrap().is_empty());
    }

    #[test]
    fn a_retired_key_is_expired() {
        let conn = memory_db();
        retire_key(conn.db(), "a.example", "ed25519:one", "KEY1", 42).unwrap();
        let old = expired_keys(conn.db(), "a.example").unwrap();
        assert_eq!(old, vec![OldKey { key_id: "ed25519:one".into(), public_key: "KEY1".into(), expired_ts: 42 }]);
    }
}
