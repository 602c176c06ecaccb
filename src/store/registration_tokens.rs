//! Registration tokens (`registration_tokens`): made by `hearth token create`, accepted by registration's
//! `m.login.registration_token` stage while they have uses left and have not expired.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::Db;

/// One token with its use count.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRow {
    pub token: String,
    /// None: unlimited.
    pub uses_allowed: Option<i64>,
    /// Accounts registered with it so far.
    pub completed: i64,
    /// Milliseconds since the epoch; None: never expires.
    pub expiry_ts: Option<i64>,
    pub created_ts: i64,
}

impl TokenRow {
    /// Whether registration accepts it at `now`.
    pub fn valid_at(&self, now: i64) -> bool {
        self.uses_allowed.is_none_or(|n| self.completed < n) && self.expiry_ts.is_none_or(|t| t > now)
    }
}

/// Adds a token; false when it exists already.
pub fn create(conn: Db<'_>, token: &str, uses_allowed: Option<i64>, expiry_ts: Option<i64>, now: i64) -> Result<bool> {
    Ok(conn.execute(
        "INSERT OR IGNORE INTO registration_tokens (token, uses_allowed, expiry_ts, created_ts) VALUES (?1, ?2, ?3, ?4)",
        params![token, uses_allowed, expiry_ts, now],
    )? == 1)
}

/// Every token, oldest first.
pub fn list(conn: Db<'_>) -> Result<Vec<TokenRow>> {
    let mut stmt = conn.prepare(
        "SELECT token, uses_allowed, completed, expiry_ts, created_ts FROM registration_tokens
         ORDER BY created_ts, token",
    )?;
    let rows = stmt.query_map([], token_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        token: r.get(0)?,
        uses_allowed: r.get(1)?,
        completed: r.get(2)?,
        expiry_ts: r.get(3)?,
        created_ts: r.get(4)?,
    })
}

pub fn get(conn: Db<'_>, token: &str) -> Result<Option<TokenRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT token, uses_allowed, completed, expiry_ts, created_ts FROM registration_tokens WHERE token = ?1",
        )?
        .query_row([token], token_row)
        .optional()?)
}

/// Whether any token exists (then registration asks for one).
pub fn any(conn: Db<'_>) -> Result<bool> {
    Ok(conn.query_row("SELECT EXISTS (SELECT 1 FROM registration_tokens)", [], |r| r.get(0))?)
}

/// Deletes a token; false when there was none.
pub fn revoke(conn: Db<'_>, token: &str) -> Result<bool> {
    Ok(conn.execute("DELETE FROM registration_tokens WHERE token = ?1", [token])? == 1)
}

/// Counts one registration against the token, if it is still valid at `now`; false otherwise (used up, expired or
/// revoked meanwhile). Runs in the registration's write, so two registrations cannot both take the last use.
pub fn consume(conn: Db<'_>, token: &str, now: i64) -> Result<bool> {
    Ok(conn.execute(
        "UPDATE registration_tokens SET completed = completed + 1
         WHERE token = ?1 AND (uses_allowed IS NULL OR completed < uses_allowed) AND (expiry_ts IS NULL OR expiry_ts > ?2)",
        params![token, now],
    )? == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn tokens_are_used_up_expire_and_are_revoked() {
        let conn = memory_db();
        let db = conn.db();
        assert!(!any(db).unwrap());
        assert!(create(db, "once", Some(1), None, 10).unwrap());
        assert!(!create(db, "once", None, None, 11).unwrap(), "exists");
        assert!(create(db, "later", None, Some(1000), 12).unwrap());
        assert!(any(db).unwrap());
        assert_eq!(list(db).unwrap().iter().map(|t| t.token.as_str()).collect::<Vec<_>>(), ["once", "later"]);

        assert!(get(db, "once").unwrap().unwrap().valid_at(500));
        assert!(consume(db, "once", 500).unwrap());
        assert!(!consume(db, "once", 500).unwrap(), "one use only");
        let t = get(db, "once").unwrap().unwrap();
        assert_eq!(t.completed, 1);
        assert!(!t.valid_at(500));

        assert!(get(db, "later").unwrap().unwrap().valid_at(999));
        assert!(!get(db, "later").unwrap().unwrap().valid_at(1000));
        assert!(!consume(db, "later", 1000).unwrap(), "expired");
        assert!(consume(db, "later", 999).unwrap());
        assert!(consume(db, "later", 999).unwrap(), "unlimited uses");

        assert!(revoke(db, "later").unwrap());
        assert!(!revoke(db, "later").unwrap());
        assert!(!consume(db, "later", 0).unwrap());
        assert!(get(db, "missing").unwrap().is_none());
    }
}
