//! Schema creation and migration, driven by `PRAGMA user_version`.

use rusqlite::Connection;

/// The whole schema; `schema.sql` at the repository top is the single source of truth.
const SCHEMA: &str = include_str!("../../schema.sql");

/// Version written by `SCHEMA`. Later changes add `(version, sql)` steps to `MIGRATIONS` and bump this.
pub const SCHEMA_VERSION: i64 = 6;

/// Steps from version N-1 to N, for N > 1.
const MIGRATIONS: &[(i64, &str)] =
    &[(2, MEDIA_V2), (3, CATCH_UP_V3), (4, REFRESH_TOKENS_V4), (5, REMOTE_DEVICES_V5), (6, PRESENCE_V6)];

/// 5: the cache of remote users' device lists.
const REMOTE_DEVICES_V5: &str = "
CREATE TABLE IF NOT EXISTS remote_device_lists (
    user_id TEXT PRIMARY KEY, stream_id INTEGER, wanted INTEGER NOT NULL DEFAULT 0, master_key TEXT,
    self_signing_key TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS remote_devices (
    user_id TEXT NOT NULL REFERENCES remote_device_lists(user_id) ON DELETE CASCADE, device_id TEXT NOT NULL,
    display_name TEXT, keys TEXT, PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
";

/// 6: presence, one row per user.
const PRESENCE_V6: &str = "
CREATE TABLE IF NOT EXISTS presence (
    user_id           TEXT PRIMARY KEY,
    state             TEXT NOT NULL,
    status_msg        TEXT,
    last_active_ts    INTEGER NOT NULL DEFAULT 0,
    last_sync_ts      INTEGER NOT NULL DEFAULT 0,
    last_federation_ts INTEGER NOT NULL DEFAULT 0,
    currently_active  INTEGER NOT NULL DEFAULT 0,
    stream_ordering   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS presence_stream ON presence(stream_ordering);
CREATE INDEX IF NOT EXISTS presence_not_offline ON presence(state) WHERE state != 'offline';
";

/// 4: refresh tokens, each tied to the access token it renews.
const REFRESH_TOKENS_V4: &str = "
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_sha256 BLOB PRIMARY KEY,
    access_sha256 BLOB NOT NULL REFERENCES access_tokens(token_sha256) ON DELETE CASCADE,
    created_ts INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refresh_tokens_access ON refresh_tokens(access_sha256);
";

/// 3: destinations that keep failing catch up with the latest event per room instead of a queue of every PDU.
const CATCH_UP_V3: &str = "ALTER TABLE destinations ADD COLUMN catch_up_from INTEGER;";

/// 2: media metadata by (origin, media_id) with files on disk (the version-1 table held blobs and was never used);
/// server-side key backup.
const MEDIA_V2: &str = "
DROP TABLE IF EXISTS media;
CREATE TABLE media (
    origin TEXT NOT NULL, media_id TEXT NOT NULL, uploader TEXT, content_type TEXT, filename TEXT, size INTEGER,
    sha256 TEXT, created_ts INTEGER NOT NULL, PRIMARY KEY (origin, media_id)
) WITHOUT ROWID;
CREATE INDEX media_by_uploader ON media(uploader) WHERE uploader IS NOT NULL;
CREATE TABLE media_thumbnails (
    origin TEXT NOT NULL, media_id TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, method TEXT NOT NULL,
    content_type TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (origin, media_id, width, height, method)
) WITHOUT ROWID;
CREATE TABLE room_key_backup_versions (
    user_id TEXT NOT NULL, version INTEGER NOT NULL, algorithm TEXT NOT NULL, auth_data TEXT NOT NULL,
    etag INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user_id, version)
) WITHOUT ROWID;
CREATE TABLE room_key_backup (
    user_id TEXT NOT NULL, version INTEGER NOT NULL, room_id TEXT NOT NULL, session_id TEXT NOT NULL,
    first_message_index INTEGER NOT NULL, forwarded_count INTEGER NOT NULL, is_verified INTEGER NOT NULL,
    session_data TEXT NOT NULL, PRIMARY KEY (user_id, version, room_id, session_id)
) WITHOUT ROWID;
";

pub fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    anyhow::ensure!(
        version <= SCHEMA_VERSION,
        "database schema version {version} is newer than this binary understands ({SCHEMA_VERSION})"
    );
    if version == 0 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        return Ok(());
    }
    for (to, sql) in MIGRATIONS.iter().filter(|(to, _)| *to > version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", to)?;
        tx.commit()?;
        tracing::info!(version = to, "migrated database schema");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(conn: &Connection, table: &str) -> Vec<(String, String, bool, bool)> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})")).unwrap();
        stmt.query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? != 0, r.get::<_, i64>(5)? != 0)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// A version-1 database (with the old, unused media blob table and no catch-up column) migrates to the same tables a fresh one has.
    #[test]
    fn version_1_migrates_to_the_fresh_schema() {
        let mut fresh = Connection::open_in_memory().unwrap();
        migrate(&mut fresh).unwrap();

        let mut old = Connection::open_in_memory().unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.execute_batch(
            "DROP TABLE media_thumbnails; DROP TABLE media; DROP TABLE room_key_backup; DROP TABLE room_key_backup_versions;
             CREATE TABLE media (media_id TEXT PRIMARY KEY, uploader TEXT NOT NULL, content_type TEXT, filename TEXT,
                                 size INTEGER NOT NULL, created_ts INTEGER NOT NULL, data BLOB NOT NULL) WITHOUT ROWID;
             DROP TABLE presence;
             DROP TABLE destinations;
             CREATE TABLE destinations (destination TEXT PRIMARY KEY, failures INTEGER NOT NULL DEFAULT 0,
                                        retry_at INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
             PRAGMA user_version = 1;",
        )
        .unwrap();
        migrate(&mut old).unwrap();
        let version: i64 = old.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        for table in [
            "media",
            "media_thumbnails",
            "room_key_backup_versions",
            "room_key_backup",
            "destinations",
            "refresh_tokens",
            "remote_device_lists",
            "remote_devices",
            "presence",
        ] {
            assert_eq!(columns(&old, table), columns(&fresh, table), "table {table}");
            assert!(!columns(&fresh, table).is_empty(), "table {table} exists");
        }
    }
}
