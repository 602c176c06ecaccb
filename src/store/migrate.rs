//! Schema creation and migration, driven by `PRAGMA user_version`.

use rusqlite::Connection;

/// The whole schema; `schema.sql` at the repository top is the single source of truth.
const SCHEMA: &str = include_str!("../../schema.sql");

/// Version written by `SCHEMA`. Later changes add `(version, sql)` steps to `MIGRATIONS` and bump this.
pub const SCHEMA_VERSION: i64 = 19;

/// Steps from version N-1 to N, for N > 1.
const MIGRATIONS: &[(i64, &str)] = &[
    (2, MEDIA_V2),
    (3, CATCH_UP_V3),
    (4, REFRESH_TOKENS_V4),
    (5, REMOTE_DEVICES_V5),
    (6, PRESENCE_V6),
    (7, RELATIONS_SEARCH_V7),
    (9, MEDIA_AUTHENTICATED_V9),
    (10, ADMIN_V10),
    (11, SLIDING_SYNC_V11),
    (12, PUSHERS_V12),
    (13, APPSERVICES_V13),
    (14, REPORTS_OPENID_PREVIEWS_V14),
    (15, UNREAD_V15),
    (17, PEEKS_V17),
    (18, TOPOLOGICAL_V18),
    (19, AUTH_CHILDREN_V19),
];

/// 17: peeking over federation (MSC2444) and local peeks (MSC2753).
const PEEKS_V17: &str = "
CREATE TABLE IF NOT EXISTS peeks_in (
    room_nid INTEGER NOT NULL, server_name TEXT NOT NULL, peek_id TEXT NOT NULL, expires_ts INTEGER NOT NULL,
    PRIMARY KEY (room_nid, server_name, peek_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS peeks_in_server ON peeks_in(server_name);
CREATE TABLE IF NOT EXISTS peeks_out (
    room_nid INTEGER PRIMARY KEY, server_name TEXT NOT NULL, peek_id TEXT NOT NULL, renew_ts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS local_peeks (
    user_id TEXT NOT NULL, room_nid INTEGER NOT NULL, stream INTEGER NOT NULL, PRIMARY KEY (user_id, room_nid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS local_peeks_room ON local_peeks(room_nid);
";

/// 18: timeline events in topological order (depth, then stream position), which `/messages` and `/context` page
/// in.
/// 19: auth edges by the event cited, for state resolution: whether an event is in the auth chain of the state
/// both sides of a fork share is found by walking down from it (`events::auth_children`), not by walking up the
/// auth chains of every member of the room.
const AUTH_CHILDREN_V19: &str = "CREATE INDEX IF NOT EXISTS event_auth_by_auth ON event_auth(auth_event_id);";

const TOPOLOGICAL_V18: &str = "
CREATE INDEX IF NOT EXISTS events_room_topo ON events(room_nid, depth, stream_ordering) WHERE stream_ordering IS NOT NULL;
";

/// 9: which media the legacy unauthenticated endpoints no longer serve (`media.freeze_legacy`). Media stored
/// before stays reachable through them.
const MEDIA_AUTHENTICATED_V9: &str = "ALTER TABLE media ADD COLUMN authenticated INTEGER NOT NULL DEFAULT 0;";

/// 10: registration tokens and blocked rooms (the admin CLI).
const ADMIN_V10: &str = "
CREATE TABLE IF NOT EXISTS registration_tokens (
    token TEXT PRIMARY KEY, uses_allowed INTEGER, completed INTEGER NOT NULL DEFAULT 0, expiry_ts INTEGER,
    created_ts INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocked_rooms (room_id TEXT PRIMARY KEY, blocked_ts INTEGER NOT NULL) WITHOUT ROWID;
";

/// 14: content reports, OpenID tokens, the link preview cache, and events by timestamp (`/timestamp_to_event`).
const REPORTS_OPENID_PREVIEWS_V14: &str = "
CREATE INDEX IF NOT EXISTS events_room_ts ON events(room_nid, origin_server_ts);
CREATE TABLE IF NOT EXISTS reports (
    report_id INTEGER PRIMARY KEY, received_ts INTEGER NOT NULL, reporter TEXT NOT NULL, kind TEXT NOT NULL,
    room_id TEXT, event_id TEXT, target_user TEXT, reason TEXT, score INTEGER
);
CREATE TABLE IF NOT EXISTS openid_tokens (
    token TEXT PRIMARY KEY, user_id TEXT NOT NULL, expires_ts INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS url_previews (url TEXT PRIMARY KEY, og TEXT NOT NULL, expires_ts INTEGER NOT NULL) WITHOUT ROWID;
";

/// 12: pushers, their outbox, the notifications `/notifications` lists and the push evaluator's position in the event stream (starting at the latest
/// event: history stored before the upgrade is never pushed).
const PUSHERS_V12: &str = "
CREATE TABLE IF NOT EXISTS pushers (
    pusher_nid INTEGER PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT, kind TEXT NOT NULL, app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL, app_display_name TEXT NOT NULL, device_display_name TEXT NOT NULL, profile_tag TEXT,
    lang TEXT NOT NULL, data TEXT NOT NULL, pushkey_ts INTEGER NOT NULL, failures INTEGER NOT NULL DEFAULT 0,
    retry_at INTEGER NOT NULL DEFAULT 0, UNIQUE (user_id, app_id, pushkey)
);
CREATE INDEX IF NOT EXISTS pushers_key ON pushers(app_id, pushkey);
CREATE TABLE IF NOT EXISTS push_outbox (
    id INTEGER PRIMARY KEY, pusher_nid INTEGER NOT NULL REFERENCES pushers(pusher_nid) ON DELETE CASCADE,
    event_id TEXT NOT NULL, highlight INTEGER NOT NULL, sound TEXT
);
CREATE INDEX IF NOT EXISTS push_outbox_pusher ON push_outbox(pusher_nid, id);
CREATE TABLE IF NOT EXISTS notifications (
    user_id TEXT NOT NULL, stream INTEGER NOT NULL, event_id TEXT NOT NULL, room_nid INTEGER NOT NULL,
    highlight INTEGER NOT NULL, actions TEXT NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY (user_id, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS push_cursor (id INTEGER PRIMARY KEY CHECK (id = 0), stream INTEGER NOT NULL);
INSERT OR IGNORE INTO push_cursor (id, stream) SELECT 0, coalesce(max(stream_ordering), 0) FROM events;
";

/// 13: application services: positions in the event stream, transactions waiting to be sent, published rooms.
const APPSERVICES_V13: &str = "
CREATE TABLE IF NOT EXISTS appservice_state (
    appservice_id TEXT PRIMARY KEY, stream INTEGER NOT NULL, last_txn_id INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0, retry_at INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS appservice_txns (
    appservice_id TEXT NOT NULL, txn_id INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (appservice_id, txn_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS appservice_room_list (
    appservice_id TEXT NOT NULL, network_id TEXT NOT NULL, room_id TEXT NOT NULL,
    PRIMARY KEY (appservice_id, network_id, room_id)
) WITHOUT ROWID;
";

/// 15: unread notification counts by room and thread, kept apart from the (capped) `notifications` list. Events
/// evaluated before the upgrade are not counted: counts start at zero and grow with new events.
const UNREAD_V15: &str = "
CREATE TABLE IF NOT EXISTS unread_notifications (
    user_id TEXT NOT NULL, room_nid INTEGER NOT NULL, stream INTEGER NOT NULL, thread_id TEXT NOT NULL,
    highlight INTEGER NOT NULL, PRIMARY KEY (user_id, room_nid, stream)
) WITHOUT ROWID;
";

/// 11: simplified sliding sync (MSC4186): connections and their positions.
const SLIDING_SYNC_V11: &str = "
CREATE TABLE IF NOT EXISTS sliding_sync_connections (
    conn_nid INTEGER PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT NOT NULL, conn_id TEXT NOT NULL,
    last_used_ts INTEGER NOT NULL, UNIQUE (user_id, device_id, conn_id)
);
CREATE INDEX IF NOT EXISTS sliding_sync_connections_used ON sliding_sync_connections(last_used_ts);
CREATE TABLE IF NOT EXISTS sliding_sync_positions (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    conn_nid INTEGER NOT NULL REFERENCES sliding_sync_connections(conn_nid) ON DELETE CASCADE,
    stream INTEGER NOT NULL, typing INTEGER NOT NULL, sent TEXT NOT NULL, created_ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sliding_sync_positions_conn ON sliding_sync_positions(conn_nid);
";

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

/// 7: the relations table and the full-text search index, filled from the events already stored (timeline events
/// and outliers alike, as new events are; redacted ones have lost their content and are left out).
const RELATIONS_SEARCH_V7: &str = r#"
CREATE TABLE IF NOT EXISTS event_relations (
    event_nid INTEGER PRIMARY KEY, room_nid INTEGER NOT NULL, relates_to TEXT NOT NULL, rel_type TEXT NOT NULL,
    agg_key TEXT
);
CREATE INDEX IF NOT EXISTS event_relations_parent ON event_relations(relates_to, rel_type);
CREATE VIRTUAL TABLE IF NOT EXISTS event_search USING fts5(key UNINDEXED, value, tokenize = 'porter unicode61');
INSERT OR REPLACE INTO event_relations (event_nid, room_nid, relates_to, rel_type, agg_key)
    SELECT event_nid, room_nid, json_extract(json, '$.content."m.relates_to".event_id'),
           json_extract(json, '$.content."m.relates_to".rel_type'), json_extract(json, '$.content."m.relates_to".key')
    FROM events
    WHERE redacted_by IS NULL AND instr(json, 'm.relates_to') > 0
      AND json_type(json, '$.content."m.relates_to".event_id') = 'text'
      AND json_type(json, '$.content."m.relates_to".rel_type') = 'text';
INSERT INTO event_search (rowid, key, value)
    SELECT event_nid, k.key, json_extract(json, k.path) FROM events
    JOIN (SELECT 'm.room.message' AS t, 'content.body' AS key, '$.content.body' AS path
          UNION ALL SELECT 'm.room.name', 'content.name', '$.content.name'
          UNION ALL SELECT 'm.room.topic', 'content.topic', '$.content.topic') k ON k.t = events.event_type
    WHERE redacted_by IS NULL AND json_type(json, k.path) = 'text';
"#;

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
             DROP TABLE sliding_sync_positions; DROP TABLE sliding_sync_connections;
             DROP TABLE destinations; DROP TABLE reports; DROP TABLE openid_tokens; DROP TABLE url_previews;
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
            "event_relations",
            "event_search",
            "sliding_sync_connections",
            "sliding_sync_positions",
            "appservice_state",
            "appservice_txns",
            "appservice_room_list",
            "reports",
            "openid_tokens",
            "url_previews",
        ] {
            assert_eq!(columns(&old, table), columns(&fresh, table), "table {table}");
            assert!(!columns(&fresh, table).is_empty(), "table {table} exists");
        }
    }

    /// Events stored before version 7 get their relations and searchable text indexed by the migration.
    #[test]
    fn version_7_indexes_the_events_already_stored() {
        let mut old = Connection::open_in_memory().unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.execute_batch(
            r#"DROP TABLE event_relations; DROP TABLE event_search; ALTER TABLE media DROP COLUMN authenticated;
            PRAGMA user_version = 4;
            INSERT INTO rooms (room_nid, room_id, room_version) VALUES (1, '!r:x', '10');
            INSERT INTO events (event_nid, event_id, room_nid, event_type, sender, origin_server_ts, depth, json) VALUES
              (1, '$root', 1, 'm.room.message', '@a:x', 0, 1, '{"content":{"body":"hello world"}}'),
              (2, '$reply', 1, 'm.room.message', '@a:x', 0, 2,
                 '{"content":{"body":"a reply","m.relates_to":{"rel_type":"m.thread","event_id":"$root"}}}'),
              (3, '$name', 1, 'm.room.name', '@a:x', 0, 3, '{"content":{"name":"Hello room"}}'),
              (4, '$gone', 1, 'm.room.message', '@a:x', 0, 4, '{"content":{}}'),
              (5, '$member', 1, 'm.room.member', '@a:x', 0, 5, '{"content":{"membership":"join"}}');"#,
        )
        .unwrap();
        migrate(&mut old).unwrap();
        let relations: Vec<(i64, String, String)> = old
            .prepare("SELECT event_nid, relates_to, rel_type FROM event_relations")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(relations, [(2, "$root".to_owned(), "m.thread".to_owned())]);
        let found: Vec<(i64, String)> = old
            .prepare("SELECT rowid, key FROM event_search WHERE event_search MATCH 'hello' ORDER BY rowid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(found, [(1, "content.body".to_owned()), (3, "content.name".to_owned())]);
    }

    /// Media stored before version 9 stays reachable through the legacy endpoints: the migration marks none of it
    /// as authenticated-only.
    #[test]
    fn version_9_keeps_older_media_on_the_legacy_endpoints() {
        let mut old = Connection::open_in_memory().unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.execute_batch(
            "ALTER TABLE media DROP COLUMN authenticated; PRAGMA user_version = 7;
             INSERT INTO media (origin, media_id, created_ts, size) VALUES ('hs', 'old', 1, 3);",
        )
        .unwrap();
        migrate(&mut old).unwrap();
        let flag: i64 =
            old.query_row("SELECT authenticated FROM media WHERE media_id = 'old'", [], |r| r.get(0)).unwrap();
        assert_eq!(flag, 0);
        assert_eq!(old.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).unwrap(), SCHEMA_VERSION);
    }
}
