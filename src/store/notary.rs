//! Other servers' self-signed key responses, kept to answer notary key queries.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::Db;

/// Stores (replacing) a server's key response.
pub fn store_notary_key(conn: Db<'_>, server_name: &str, response: &str) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO notary_keys (server_name, response) VALUES (?1, ?2)")?
        .execute(params![server_name, response])?;
    Ok(())
}

/// A server's stored key response.
pub fn notary_key(conn: Db<'_>, server_name: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT response FROM notary_keys WHERE server_name = ?1")?
        .query_row([server_name], |r| r.get(0))
        .optional()?)
}
