//! Server-side key backup (`/room_keys/*`): `room_key_backup_versions` (one row per user and version, algorithm and
//! auth data opaque to the server, an etag bumped whenever the version's keys change, soft-deleted) and
//! `room_key_backup` (the encrypted Megolm session keys stored under a version).

use rusqlite::{params, OptionalExtension};
use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::store::Db;

/// One backup version as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupVersion {
    pub algorithm: String,
    pub auth_data: Value,
    pub etag: i64,
}

/// One stored session key (`KeyBackupData`, as clients send it).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BackupKey {
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    pub session_data: Value,
}

/// The newest version of `user` that is not deleted.
pub fn latest_version(conn: Db<'_>, user: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT max(version) FROM room_key_backup_versions WHERE user_id = ?1 AND deleted = 0")?
        .query_row([user], |r| r.get(0))?)
}

/// A version of `user`, unless unknown or deleted.
pub fn version(conn: Db<'_>, user: &str, version: i64) -> Result<Option<BackupVersion>> {
    let row: Option<(String, String, i64)> = conn
        .prepare_cached(
            "SELECT algorithm, auth_data, etag FROM room_key_backup_versions
             WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
        )?
        .query_row(params![user, version], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    row.map(|(algorithm, auth_data, etag)| {
        Ok(BackupVersion { algorithm, auth_data: serde_json::from_str(&auth_data)?, etag })
    })
    .transpose()
}

/// How many keys a version holds.
pub fn key_count(conn: Db<'_>, user: &str, version: i64) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT count(*) FROM room_key_backup WHERE user_id = ?1 AND version = ?2")?
        .query_row(params![user, version], |r| r.get(0))?)
}

/// Creates the next version of `user` (one above every version ever created, deleted ones included, so a
/// version number is never reused); returns it.
pub fn create_version(conn: Db<'_>, user: &str, algorithm: &str, auth_data: &Value) -> Result<i64> {
    let next: i64 = conn
        .prepare_cached("SELECT coalesce(max(version), 0) + 1 FROM room_key_backup_versions WHERE user_id = ?1")?
        .query_row([user], |r| r.get(0))?;
    conn.prepare_cached(
        "INSERT INTO room_key_backup_versions (user_id, version, algorithm, auth_data) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![user, next, algorithm, auth_data.to_string()])?;
    Ok(next)
}

/// Replaces a version's auth data.
pub fn set_auth_data(conn: Db<'_>, user: &str, version: i64, auth_data: &Value) -> Result<()> {
    conn.prepare_cached("UPDATE room_key_backup_versions SET auth_data = ?3 WHERE user_id = ?1 AND version = ?2")?
        .execute(params![user, version, auth_data.to_string()])?;
    Ok(())
}

/// Marks a version deleted and drops its keys; false when there was no such (undeleted) version.
pub fn delete_version(conn: Db<'_>, user: &str, version: i64) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE room_key_backup_versions SET deleted = 1 WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
        )?
        .execute(params![user, version])?;
    if n == 0 {
        return Ok(false);
    }
    conn.prepare_cached("DELETE FROM room_key_backup WHERE user_id = ?1 AND version = ?2")?
        .execute(params![user, version])?;
    Ok(true)
}

/// Bumps a version's etag (its keys changed).
/// Deletes every backup version of a user with its keys (a deactivated account's).
pub fn delete_all(conn: Db<'_>, user: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM room_key_backup WHERE user_id = ?1")?.execute([user])?;
    conn.prepare_cached("DELETE FROM room_key_backup_versions WHERE user_id = ?1")?.execute([user])?;
    Ok(())
}

pub fn bump_etag(conn: Db<'_>, user: &str, version: i64) -> Result<()> {
    conn.prepare_cached("UPDATE room_key_backup_versions SET etag = etag + 1 WHERE user_id = ?1 AND version = ?2")?
        .execute(params![user, version])?;
    Ok(())
}

/// Stores one key unless the stored one is better (spec: verified beats unverified, then lower
/// `first_message_index`, then lower `forwarded_count`). Returns whether it changed anything.
pub fn put_key(conn: Db<'_>, user: &str, version: i64, room_id: &str, session_id: &str, k: &BackupKey) -> Result<bool> {
    let existing: Option<(bool, i64, i64)> = conn
        .prepare_cached(
            "SELECT is_verified, first_message_index, forwarded_count FROM room_key_backup
             WHERE user_id = ?1 AND version = ?2 AND room_id = ?3 AND session_id = ?4",
        )?
        .query_row(params![user, version, room_id, session_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((verified, fmi, fc)) = existing {
        let better = (k.is_verified && !verified)
            || (k.is_verified == verified
                && (k.first_message_index < fmi || (k.first_message_index == fmi && k.forwarded_count < fc)));
        if !better {
            return Ok(false);
        }
    }
    conn.prepare_cached(
        "INSERT OR REPLACE INTO room_key_backup
           (user_id, version, room_id, session_id, first_message_index, forwarded_count, is_verified, session_data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        user,
        version,
        room_id,
        session_id,
        k.first_message_index,
        k.forwarded_count,
        k.is_verified,
        k.session_data.to_string()
    ])?;
    Ok(true)
}

/// The keys of a version as `(room_id, session_id, key)`, all of them or those of one room or one session.
pub fn keys(
    conn: Db<'_>,
    user: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> Result<Vec<(String, String, BackupKey)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data
         FROM room_key_backup WHERE user_id = ?1 AND version = ?2 AND (?3 IS NULL OR room_id = ?3)
         AND (?4 IS NULL OR session_id = ?4)",
    )?;
    let rows = stmt.query_map(params![user, version, room_id, session_id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, bool>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (room, session, first_message_index, forwarded_count, is_verified, data) = row?;
        let key =
            BackupKey { first_message_index, forwarded_count, is_verified, session_data: serde_json::from_str(&data)? };
        out.push((room, session, key));
    }
    Ok(out)
}

/// Deletes the keys of a version (all, one room's or one session's); returns how many went.
pub fn delete_keys(
    conn: Db<'_>,
    user: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> Result<usize> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM room_key_backup WHERE user_id = ?1 AND version = ?2 AND (?3 IS NULL OR room_id = ?3)
             AND (?4 IS NULL OR session_id = ?4)",
        )?
        .execute(params![user, version, room_id, session_id])?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::testing::memory_db;

    const ALG: &str = "m.megolm_backup.v1.curve25519-aes-sha2";

    fn key(verified: bool, fmi: i64, fc: i64) -> BackupKey {
        BackupKey {
            first_message_index: fmi,
            forwarded_count: fc,
            is_verified: verified,
            session_data: json!({"fmi": fmi, "fc": fc, "v": verified}),
        }
    }

    #[test]
    fn versions_count_up_and_are_never_reused() {
        let conn = memory_db();
        assert_eq!(latest_version(conn.db(), "@a:x").unwrap(), None);
        assert_eq!(create_version(conn.db(), "@a:x", ALG, &json!({"k": 1})).unwrap(), 1);
        assert_eq!(create_version(conn.db(), "@a:x", ALG, &json!({"k": 2})).unwrap(), 2);
        assert_eq!(create_version(conn.db(), "@b:x", ALG, &json!({})).unwrap(), 1, "versions are per user");
        assert_eq!(latest_version(conn.db(), "@a:x").unwrap(), Some(2));

        assert!(delete_version(conn.db(), "@a:x", 2).unwrap());
        assert!(!delete_version(conn.db(), "@a:x", 2).unwrap(), "already deleted");
        assert!(!delete_version(conn.db(), "@a:x", 9).unwrap(), "unknown");
        assert_eq!(version(conn.db(), "@a:x", 2).unwrap(), None);
        assert_eq!(latest_version(conn.db(), "@a:x").unwrap(), Some(1));
        assert_eq!(create_version(conn.db(), "@a:x", ALG, &json!({})).unwrap(), 3, "the deleted 2 is not reused");
    }

    #[test]
    fn version_reads_back_and_auth_data_changes() {
        let conn = memory_db();
        let v = create_version(conn.db(), "@a:x", ALG, &json!({"public_key": "abc"})).unwrap();
        let got = version(conn.db(), "@a:x", v).unwrap().unwrap();
        assert_eq!(got, BackupVersion { algorithm: ALG.into(), auth_data: json!({"public_key": "abc"}), etag: 0 });
        set_auth_data(conn.db(), "@a:x", v, &json!({"public_key": "def"})).unwrap();
        bump_etag(conn.db(), "@a:x", v).unwrap();
        let got = version(conn.db(), "@a:x", v).unwrap().unwrap();
        assert_eq!((got.auth_data, got.etag), (json!({"public_key": "def"}), 1));
        assert_eq!(version(conn.db(), "@b:x", v).unwrap(), None, "another user's version is not visible");
    }

    #[test]
    fn put_key_keeps_the_better_key() {
        let conn = memory_db();
        let v = create_version(conn.db(), "@a:x", ALG, &json!({})).unwrap();
        let stored = |conn: Db<'_>| keys(conn, "@a:x", v, Some("!r:x"), Some("s")).unwrap().pop().unwrap().2;
        assert!(put_key(conn.db(), "@a:x", v, "!r:x", "s", &key(false, 5, 1)).unwrap());
        assert!(!put_key(conn.db(), "@a:x", v, "!r:x", "s", &key(false, 5, 1)).unwrap(), "same is not better");
        assert!(!put_key(conn.db(), "@a:x", v, "!r:x", "s", &key(false, 6, 0)).unwrap(), "higher index loses");
        assert!(put_key(conn.db(), "@a:x", v, "!r:x", "s", &key(false, 5, 0)).unwrap(), "fewer forwards win");
        assert_eq!(stored(conn.db()), key(false, 5, 0));
        assert!(put_key(conn.db(), "@a:x", v, "!r:x", "s", &key(true, 9, 9)).unwrap(), "verified wins");
        assert!(!put_key(conn.db(), "@a:x", v, "!r:x", "s", &key(false, 0, 0)).unwrap(), "unverified never beats it");
        assert!(put_key(conn.db(), "@a:x", v, "!r:x", "s", &key(true, 1, 9)).unwrap());
        assert_eq!(stored(conn.db()), key(true, 1, 9));
        assert_eq!(key_count(conn.db(), "@a:x", v).unwrap(), 1);
    }

    #[test]
    fn keys_and_deletes_narrow_by_room_and_session() {
        let conn = memory_db();
        let v = create_version(conn.db(), "@a:x", ALG, &json!({})).unwrap();
        for (room, session) in [("!r1:x", "s1"), ("!r1:x", "s2"), ("!r2:x", "s1")] {
            put_key(conn.db(), "@a:x", v, room, session, &key(false, 0, 0)).unwrap();
        }
        let ids = |room: Option<&str>, session: Option<&str>| -> Vec<(String, String)> {
            let mut v: Vec<_> =
                keys(conn.db(), "@a:x", v, room, session).unwrap().into_iter().map(|k| (k.0, k.1)).collect();
            v.sort();
            v
        };
        assert_eq!(ids(None, None).len(), 3);
        assert_eq!(ids(Some("!r1:x"), None), [("!r1:x".into(), "s1".into()), ("!r1:x".into(), "s2".into())]);
        assert_eq!(ids(Some("!r2:x"), Some("s1")), [("!r2:x".to_owned(), "s1".to_owned())]);
        assert!(ids(Some("!r3:x"), None).is_empty());
        assert!(keys(conn.db(), "@b:x", v, None, None).unwrap().is_empty(), "other users see nothing");

        assert_eq!(delete_keys(conn.db(), "@a:x", v, Some("!r1:x"), Some("s2")).unwrap(), 1);
        assert_eq!(delete_keys(conn.db(), "@a:x", v, Some("!r9:x"), None).unwrap(), 0);
        assert_eq!(key_count(conn.db(), "@a:x", v).unwrap(), 2);
        assert!(delete_version(conn.db(), "@a:x", v).unwrap());
        assert_eq!(key_count(conn.db(), "@a:x", v).unwrap(), 0, "deleting a version drops its keys");
    }
}
