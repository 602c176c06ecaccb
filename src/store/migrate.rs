//! Schema creation and migration, driven by `PRAGMA user_version`.

use rusqlite::Connection;

/// The whole schema; `schema.sql` at the repository top is the single source of truth.
const SCHEMA: &str = include_str!("../../schema.sql");

/// Version written by `SCHEMA`. Later changes add `(version, sql)` steps to `MIGRATIONS` and bump this.
pub const SCHEMA_VERSION: i64 = 1;

/// Steps from version N-1 to N, for N > 1 (none yet).
const MIGRATIONS: &[(i64, &str)] = &[];

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
