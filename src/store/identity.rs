//! This server's identity, in `meta`: its name (fixed at first start) and its current signing key. Creating the
//! identity and rotating the key are each one transaction: a crash part-way leaves the database as it was.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use crate::store::server_keys;
use crate::store::Db;

/// A signing key as stored: the key pair (PKCS#8 DER) and its version (the part after `ed25519:`).
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub der: Vec<u8>,
    pub version: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("version", &self.version).finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.version)
    }
}

/// Runs `f` in one IMMEDIATE transaction on `conn` (committed when `f` succeeds), or inside the caller's
/// transaction when one is open already.
fn atomically<T, E: From<rusqlite::Error>>(conn: Db<'_>, f: impl FnOnce(Db<'_>) -> Result<T, E>) -> Result<T, E> {
    if !conn.conn().is_autocommit() {
        return f(conn);
    }
    let tx = rusqlite::Transaction::new_unchecked(conn.conn(), TransactionBehavior::Immediate)?;
    let out = f(Db(&tx))?; // an error drops `tx`: rolled back
    tx.commit()?;
    Ok(out)
}

fn meta(conn: Db<'_>, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
}

/// The current signing key, if the identity exists.
pub fn signing_key(conn: Db<'_>) -> anyhow::Result<Option<SigningKey>> {
    match (meta(conn, "signing_key")?, meta(conn, "signing_key_version")?) {
        (Some(der), Some(version)) => Ok(Some(SigningKey { der, version: String::from_utf8(version)? })),
        _ => Ok(None),
    }
}

/// The server name the database was created for.
pub fn server_name(conn: Db<'_>) -> rusqlite::Result<Option<String>> {
    Ok(meta(conn, "server_name")?.map(|n| String::from_utf8_lossy(&n).into_owned()))
}

/// The stored signing key, after checking that the database belongs to `server_name`. On first start (no key, no
/// name) both are created, the key from `new_key`, in the same transaction. A key row without its version (left by
/// a crash in versions that wrote them one by one) was never used and is replaced.
pub fn load_or_create(
    conn: Db<'_>,
    server_name: &str,
    new_key: impl FnOnce() -> SigningKey,
) -> anyhow::Result<SigningKey> {
    atomically(conn, |conn| {
        match self::server_name(conn)? {
            Some(stored) if stored != server_name => anyhow::bail!(
                "this database belongs to server_name `{stored}`, but the configuration says `{server_name}`"
            ),
            Some(_) => {}
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('server_name', ?1)", [server_name.as_bytes()])?;
            }
        }
        if let Some(key) = signing_key(conn)? {
            return Ok(key);
        }
        let key = new_key();
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('signing_key', ?1)", [&key.der])?;
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('signing_key_version', ?1)",
            [key.version.as_bytes()],
        )?;
        Ok(key)
    })
}

/// Replaces the current signing key, `retired_key_id` (whose public key is `retired_public_key`, unpadded base64),
/// with `new`, and keeps the retired one published as an old verify key expired at `now_ms`: one transaction.
/// Fails, changing nothing, when `retired_key_id` is not the current key (rotated meanwhile).
pub fn rotate(
    conn: Db<'_>,
    server_name: &str,
    retired_key_id: &str,
    retired_public_key: &str,
    new: &SigningKey,
    now_ms: i64,
) -> anyhow::Result<()> {
    atomically(conn, |conn| {
        let current = signing_key(conn)?.map(|k| k.key_id());
        anyhow::ensure!(
            current.as_deref() == Some(retired_key_id),
            "{retired_key_id} is not the current signing key (now {current:?})"
        );
        server_keys::retire_key(conn, server_name, retired_key_id, retired_public_key, now_ms)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        conn.execute("UPDATE meta SET value = ?1 WHERE key = 'signing_key'", params![new.der])?;
        conn.execute("UPDATE meta SET value = ?1 WHERE key = 'signing_key_version'", params![new.version.as_bytes()])?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    fn key(version: &str) -> SigningKey {
        SigningKey { der: format!("der-{version}").into_bytes(), version: version.into() }
    }

    #[test]
    fn first_start_creates_the_identity_and_later_starts_load_it() {
        let conn = memory_db();
        assert_eq!(signing_key(conn.db()).unwrap(), None);
        let created = load_or_create(conn.db(), "a.example", || key("one")).unwrap();
        assert_eq!(created, key("one"));
        assert_eq!(server_name(conn.db()).unwrap().as_deref(), Some("a.example"));
        let loaded = load_or_create(conn.db(), "a.example", || panic!("no new key when one exists")).unwrap();
        assert_eq!(loaded, key("one"));
        assert_eq!(loaded.key_id(), "ed25519:one");
    }

    #[test]
    fn another_server_name_is_refused_and_nothing_is_written() {
        let conn = memory_db();
        load_or_create(conn.db(), "a.example", || key("one")).unwrap();
        let e = load_or_create(conn.db(), "b.example", || key("two")).unwrap_err();
        assert!(e.to_string().contains("belongs to server_name `a.example`"), "{e}");
        assert_eq!(signing_key(conn.db()).unwrap(), Some(key("one")));

        // A database with only a name (not ours) gets no key either.
        let conn = memory_db();
        conn.db().execute("INSERT INTO meta (key, value) VALUES ('server_name', 'c.example')", []).unwrap();
        assert!(load_or_create(conn.db(), "a.example", || key("one")).is_err());
        assert_eq!(signing_key(conn.db()).unwrap(), None);
    }

    #[test]
    fn a_half_written_identity_is_completed() {
        // What a crash between the statements of older versions left: a key without its version.
        let conn = memory_db();
        conn.db().execute("INSERT INTO meta (key, value) VALUES ('signing_key', x'00')", []).unwrap();
        let k = load_or_create(conn.db(), "a.example", || key("one")).unwrap();
        assert_eq!(k, key("one"));
        assert_eq!(signing_key(conn.db()).unwrap(), Some(key("one")));
    }

    #[test]
    fn a_failed_creation_leaves_nothing() {
        let conn = memory_db();
        // The key's version row cannot be written (a trigger stands for a crash or a full disk part-way).
        conn.db()
            .conn()
            .execute_batch(
                "CREATE TRIGGER no_version BEFORE INSERT ON meta WHEN NEW.key = 'signing_key_version'
             BEGIN SELECT RAISE(ABORT, 'simulated failure'); END;",
            )
            .unwrap();
        assert!(load_or_create(conn.db(), "a.example", || key("one")).is_err());
        assert_eq!(server_name(conn.db()).unwrap(), None);
        assert_eq!(meta(conn.db(), "signing_key").unwrap(), None);
        conn.db().conn().execute_batch("DROP TRIGGER no_version").unwrap();
        assert_eq!(load_or_create(conn.db(), "a.example", || key("two")).unwrap(), key("two"));
    }

    #[test]
    fn rotation_replaces_the_key_and_keeps_the_old_one_published() {
        let conn = memory_db();
        let one = load_or_create(conn.db(), "a.example", || key("one")).unwrap();
        rotate(conn.db(), "a.example", &one.key_id(), "PUB1", &key("two"), 1234).unwrap();
        assert_eq!(load_or_create(conn.db(), "a.example", || panic!()).unwrap(), key("two"));
        let old = server_keys::expired_keys(conn.db(), "a.example").unwrap();
        assert_eq!(
            old,
            vec![server_keys::OldKey { key_id: "ed25519:one".into(), public_key: "PUB1".into(), expired_ts: 1234 }]
        );

        // Rotating a key that is no longer current changes nothing.
        assert!(rotate(conn.db(), "a.example", &one.key_id(), "PUB1", &key("three"), 5678).is_err());
        assert_eq!(signing_key(conn.db()).unwrap(), Some(key("two")));
        assert_eq!(server_keys::expired_keys(conn.db(), "a.example").unwrap().len(), 1);
    }

    #[test]
    fn a_failed_rotation_leaves_the_old_key_in_use() {
        let conn = memory_db();
        let one = load_or_create(conn.db(), "a.example", || key("one")).unwrap();
        conn.db()
            .conn()
            .execute_batch(
                "CREATE TRIGGER no_version BEFORE UPDATE ON meta WHEN NEW.key = 'signing_key_version'
             BEGIN SELECT RAISE(ABORT, 'simulated failure'); END;",
            )
            .unwrap();
        assert!(rotate(conn.db(), "a.example", &one.key_id(), "PUB1", &key("two"), 1234).is_err());
        assert_eq!(signing_key(conn.db()).unwrap(), Some(key("one")));
        assert!(server_keys::expired_keys(conn.db(), "a.example").unwrap().is_empty());
    }
}
