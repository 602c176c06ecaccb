//! The persistent background job queue (`jobs`): one row per job with its resumable cursor (the job's own text,
//! opaque here), its priority, its retry state and its progress counters.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use crate::error::Result;
use crate::store::accounts::now_ms;
use crate::store::ids::{JobId, RoomNid};
use crate::store::Db;

/// A due job as the worker sees it.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub job_id: JobId,
    pub kind: String,
    pub room_nid: Option<RoomNid>,
    /// The job's own resumable position (JSON text, read by its kind).
    pub cursor: String,
    pub attempts: i64,
}

/// Queues a job (or restarts the room's job of that kind from `cursor`).
pub fn enqueue(conn: Db<'_>, kind: &str, room_nid: Option<RoomNid>, priority: i64, cursor: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO jobs (kind, room_nid, priority, cursor, created_ts) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (kind, room_nid) DO UPDATE SET cursor = ?4, attempts = 0, next_run_at = 0, done_units = 0, total_units = NULL",
        params![kind, room_nid, priority, cursor, now_ms()],
    )?;
    Ok(())
}

/// Moves a room's jobs to the front (a user is waiting on them).
pub fn bump(conn: Db<'_>, room_nid: RoomNid) -> Result<()> {
    conn.execute(
        "UPDATE jobs SET priority = priority + 100, next_run_at = 0 WHERE room_nid = ?1 AND priority < 100",
        [room_nid],
    )?;
    Ok(())
}

/// The job to run next: due, highest priority first, then oldest.
pub fn next_due(conn: Db<'_>) -> Result<Option<JobRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT job_id, kind, room_nid, cursor, attempts FROM jobs WHERE next_run_at <= ?1
             ORDER BY priority DESC, job_id LIMIT 1",
        )?
        .query_row([now_ms()], |r| {
            Ok(JobRow {
                job_id: r.get(0)?,
                kind: r.get(1)?,
                room_nid: r.get(2)?,
                cursor: r.get(3)?,
                attempts: r.get(4)?,
            })
        })
        .optional()?)
}

/// Saves a job's position after a successful step (clearing its failure state); `total` is kept when `None`.
pub fn save_cursor(conn: Db<'_>, job_id: JobId, cursor: &str, done: i64, total: Option<i64>) -> Result<()> {
    conn.prepare_cached(
        "UPDATE jobs SET cursor = ?2, done_units = ?3, total_units = coalesce(?4, total_units), attempts = 0,
         last_error = NULL WHERE job_id = ?1",
    )?
    .execute(params![job_id, cursor, done, total])?;
    Ok(())
}

/// Whether a job of `kind` with exactly this cursor is still queued (a command-line tool waiting for the server's
/// worker to run what it queued).
pub fn is_queued(conn: Db<'_>, kind: &str, cursor: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE kind = ?1 AND cursor = ?2)",
        params![kind, cursor],
        |r| r.get(0),
    )?)
}

/// Removes a finished job.
pub fn delete(conn: Db<'_>, job_id: JobId) -> Result<()> {
    conn.execute("DELETE FROM jobs WHERE job_id = ?1", [job_id])?;
    Ok(())
}

/// Records a failed step: the attempt count, when to retry and why it failed.
pub fn record_failure(conn: Db<'_>, job_id: JobId, attempts: i64, next_run_at: i64, error: &str) -> Result<()> {
    conn.execute(
        "UPDATE jobs SET attempts = ?2, next_run_at = ?3, last_error = ?4 WHERE job_id = ?1",
        params![job_id, attempts, next_run_at, error],
    )?;
    Ok(())
}

/// Progress of every job, for `hearth jobs` and the admin endpoint.
pub fn progress(conn: Db<'_>) -> Result<Vec<Value>> {
    let mut stmt = conn.prepare(
        "SELECT j.kind, r.room_id, j.done_units, j.total_units, j.attempts, j.last_error, j.created_ts, j.next_run_at
         FROM jobs j LEFT JOIN rooms r ON r.room_nid = j.room_nid ORDER BY j.priority DESC, j.job_id",
    )?;
    let rows = stmt.query_map([], |r| {
        let done: i64 = r.get(2)?;
        let total: Option<i64> = r.get(3)?;
        let created: i64 = r.get(6)?;
        let elapsed_s = ((now_ms() - created) as f64 / 1000.0).max(0.001);
        let rate = done as f64 / elapsed_s;
        let eta = total.map(|t| if rate > 0.0 { ((t - done).max(0) as f64 / rate).round() } else { f64::NAN });
        Ok(serde_json::json!({
            "kind": r.get::<_, String>(0)?, "room_id": r.get::<_, Option<String>>(1)?,
            "done": done, "total": total, "attempts": r.get::<_, i64>(4)?, "last_error": r.get::<_, Option<String>>(5)?,
            "rate_per_s": (rate * 10.0).round() / 10.0, "eta_s": eta.filter(|e| e.is_finite()),
            "next_run_at": r.get::<_, i64>(7)?,
        }))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn queue_round_trip() {
        let conn = memory_db();
        assert!(next_due(conn.db()).unwrap().is_none());
        enqueue(conn.db(), "resync", None, 10, r#"{"a":1}"#).unwrap();
        enqueue(conn.db(), "other", None, 5, "{}").unwrap();
        let job = next_due(conn.db()).unwrap().expect("a due job");
        assert_eq!((job.kind.as_str(), job.cursor.as_str(), job.attempts), ("resync", r#"{"a":1}"#, 0));

        record_failure(conn.db(), job.job_id, 1, now_ms() + 60_000, "boom").unwrap();
        let next = next_due(conn.db()).unwrap().expect("the other job");
        assert_eq!(next.kind, "other");
        let p = progress(conn.db()).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0]["last_error"], "boom");
        assert!(is_queued(conn.db(), "resync", r#"{"a":1}"#).unwrap());
        assert!(!is_queued(conn.db(), "resync", r#"{"a":3}"#).unwrap());

        save_cursor(conn.db(), job.job_id, r#"{"a":2}"#, 7, Some(9)).unwrap();
        let p = progress(conn.db()).unwrap();
        assert_eq!((p[0]["done"].as_i64(), p[0]["total"].as_i64()), (Some(7), Some(9)));
        assert!(p[0]["last_error"].is_null());

        delete(conn.db(), job.job_id).unwrap();
        delete(conn.db(), next.job_id).unwrap();
        assert!(progress(conn.db()).unwrap().is_empty());
    }

    #[test]
    fn bump_moves_a_rooms_job_first() {
        let conn = memory_db();
        let room = crate::store::rooms::insert_room(conn.db(), "!r:x", "12").unwrap();
        enqueue(conn.db(), "a", None, 50, "{}").unwrap();
        enqueue(conn.db(), "resync", Some(room), 10, "{}").unwrap();
        assert_eq!(next_due(conn.db()).unwrap().unwrap().kind, "a");
        bump(conn.db(), room).unwrap();
        let job = next_due(conn.db()).unwrap().unwrap();
        assert_eq!((job.kind.as_str(), job.room_nid), ("resync", Some(room)));
    }
}
