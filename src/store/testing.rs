//! Test support for the store's unit tests (and the room core's): an in-memory database with the whole schema, and
//! a way to run write functions against it without the writer thread.

use rusqlite::Connection;

use super::Writer;

/// A fresh in-memory database with `schema.sql` applied and the same per-connection set-up as the real one
/// (foreign keys on, `rarray` loaded).
pub fn memory_db() -> Connection {
    let mut conn = Connection::open_in_memory().expect("in-memory database");
    conn.execute_batch("PRAGMA foreign_keys=ON;").expect("pragmas");
    rusqlite::vtab::array::load_module(&conn).expect("rarray");
    super::migrate::migrate(&mut conn).expect("schema");
    conn
}

/// Runs `f` as the writer would: inside a transaction that commits when `f` returns `Ok`, with a stream allocator
/// that starts after `stream` (returned updated).
pub fn write<R>(
    conn: &mut Connection,
    stream: &mut i64,
    f: impl FnOnce(&mut Writer<'_>) -> crate::error::Result<R>,
) -> crate::error::Result<R> {
    let tx = conn.transaction()?;
    let result = {
        let mut w = Writer { conn: &tx, next_stream: stream };
        f(&mut w)
    };
    if result.is_ok() {
        tx.commit()?;
    }
    result
}
