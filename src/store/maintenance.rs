//! The database as a file: health and size gauges, integrity checks, the journal mode of a copy, WAL checkpoints,
//! and the few facts a backup summary shows (server name, row counts).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use crate::error::Result;
use crate::store::Db;

/// Whether the database answers a read (the health check).
pub fn ping(conn: Db<'_>) -> Result<()> {
    conn.prepare_cached("SELECT count(*) FROM meta")?.query_row([], |r| r.get::<_, i64>(0))?;
    Ok(())
}

/// Gauges read at scrape time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Gauges {
    pub size_bytes: i64,
    pub freelist_pages: i64,
    pub page_size: i64,
    pub outbox_depth: i64,
    pub outbox_destinations: i64,
    pub users: i64,
    pub rooms: i64,
}

fn one(conn: Db<'_>, sql: &str) -> Result<i64> {
    Ok(conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?)
}

pub fn gauges(conn: Db<'_>) -> Result<Gauges> {
    let page_size = one(conn, "PRAGMA page_size")?;
    Ok(Gauges {
        size_bytes: one(conn, "PRAGMA page_count")? * page_size,
        freelist_pages: one(conn, "PRAGMA freelist_count")?,
        page_size,
        outbox_depth: one(conn, "SELECT count(*) FROM outbox")?,
        outbox_destinations: one(conn, "SELECT count(DISTINCT destination) FROM outbox")?,
        users: one(conn, "SELECT count(*) FROM users")?,
        rooms: one(conn, "SELECT count(*) FROM rooms")?,
    })
}

/// SQLite's `quick_check`: `"ok"`, or the first problem found.
pub fn quick_check(conn: Db<'_>) -> Result<String> {
    Ok(conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?)
}

/// Switches a database (a fresh copy) to a rollback journal, so it is one self-contained file (no `-wal`/`-shm`).
pub fn use_rollback_journal(conn: Db<'_>) -> Result<()> {
    let _: String = conn.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
    Ok(())
}

/// The server name a database was created with; None when it has none recorded. Fails when the file is not a
/// Hearth database (no `meta` table).
pub fn server_name(conn: Db<'_>) -> Result<Option<String>> {
    let raw: Option<Vec<u8>> =
        conn.query_row("SELECT value FROM meta WHERE key = 'server_name'", [], |r| r.get(0)).optional()?;
    Ok(raw.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

pub fn event_count(conn: Db<'_>) -> Result<i64> {
    one(conn, "SELECT count(*) FROM events")
}

pub fn user_count(conn: Db<'_>) -> Result<i64> {
    one(conn, "SELECT count(*) FROM users")
}

/// Checkpoints the WAL of the database at `path` into the file and truncates it, on a connection of its own that
/// waits up to `busy` for the writer. Blocking.
pub fn checkpoint_file(path: &Path, busy: Duration) -> Result<()> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, memory_db};

    #[test]
    fn a_fresh_database_is_healthy_and_empty() {
        let conn = memory_db();
        ping(conn.db()).unwrap();
        assert_eq!(quick_check(conn.db()).unwrap(), "ok");
        let g = gauges(conn.db()).unwrap();
        assert!(g.page_size > 0 && g.size_bytes >= g.page_size);
        assert_eq!((g.outbox_depth, g.outbox_destinations, g.users, g.rooms), (0, 0, 0, 0));
        assert_eq!((event_count(conn.db()).unwrap(), user_count(conn.db()).unwrap()), (0, 0));
        assert_eq!(server_name(conn.db()).unwrap(), None);
    }

    #[test]
    fn counts_follow_the_rows() {
        let conn = memory_db();
        testing::user(conn.db(), "@a:x", None, false);
        testing::user(conn.db(), "@b:x", None, true);
        let room = testing::room(conn.db(), "!r:x");
        testing::event(conn.db(), room, testing::Ev::message("$1", "@a:x", 1));
        for (dest, payload) in [("a.test", "$1"), ("a.test", "$2"), ("b.test", "$1")] {
            conn.db()
                .execute(
                    "INSERT INTO outbox (destination, kind, payload) VALUES (?1, 'pdu', ?2)",
                    rusqlite::params![dest, payload],
                )
                .unwrap();
        }
        conn.db().execute("INSERT INTO meta (key, value) VALUES ('server_name', CAST('hs.test' AS BLOB))", []).unwrap();
        let g = gauges(conn.db()).unwrap();
        assert_eq!((g.outbox_depth, g.outbox_destinations, g.users, g.rooms), (3, 2, 2, 1));
        assert_eq!((event_count(conn.db()).unwrap(), user_count(conn.db()).unwrap()), (1, 2));
        assert_eq!(server_name(conn.db()).unwrap().as_deref(), Some("hs.test"));
    }

    #[test]
    fn a_file_copy_checkpoints_and_switches_journal() {
        let dir = std::env::temp_dir().join(format!("hearth-maintenance-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB);")
                .unwrap();
            checkpoint_file(&path, Duration::from_secs(1)).unwrap();
            use_rollback_journal(Db(&conn)).unwrap();
            let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
            assert_eq!(mode, "delete");
            ping(Db(&conn)).unwrap();
        }
        assert!(!dir.join("db.sqlite-wal").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_without_the_schema_is_not_a_hearth_database() {
        let conn = Connection::open_in_memory().unwrap();
        assert!(server_name(Db(&conn)).is_err());
        assert!(ping(Db(&conn)).is_err());
    }
}
