//! The link preview cache (`url_previews`): the Open Graph answer of `/preview_url` per URL, until it expires.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::Db;

/// The cached answer for `url` (JSON text), if one has not expired at `now`.
pub fn get(conn: Db<'_>, url: &str, now: i64) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT og FROM url_previews WHERE url = ?1 AND expires_ts > ?2")?
        .query_row(params![url, now], |r| r.get(0))
        .optional()?)
}

/// Caches the answer for `url` until `expires_ts`; answers expired at `now` are dropped on the way.
pub fn put(conn: Db<'_>, url: &str, og: &str, expires_ts: i64, now: i64) -> Result<()> {
    conn.execute("DELETE FROM url_previews WHERE expires_ts <= ?1", [now])?;
    conn.execute(
        "INSERT OR REPLACE INTO url_previews (url, og, expires_ts) VALUES (?1, ?2, ?3)",
        params![url, og, expires_ts],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn previews_are_cached_until_they_expire() {
        let conn = memory_db();
        let db = conn.db();
        assert_eq!(get(db, "https://a.example/", 0).unwrap(), None);
        put(db, "https://a.example/", r#"{"og:title":"A"}"#, 100, 0).unwrap();
        assert_eq!(get(db, "https://a.example/", 99).unwrap().as_deref(), Some(r#"{"og:title":"A"}"#));
        assert_eq!(get(db, "https://a.example/", 100).unwrap(), None);
        put(db, "https://a.example/", r#"{"og:title":"B"}"#, 300, 200).unwrap();
        assert_eq!(get(db, "https://a.example/", 250).unwrap().as_deref(), Some(r#"{"og:title":"B"}"#));
    }
}
