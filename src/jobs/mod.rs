//! The persistent, throttled, single-threaded background job queue.
//!
//! Jobs live in the `jobs` table with a resumable `cursor`; one worker runs one step at a time, sized to about
//! `jobs.step_ms`, then sleeps so it is busy at most `jobs.duty_cycle` of the time. A kill -9 loses at most the
//! step in flight (its write transaction never committed) and the job resumes from its cursor on restart.

pub mod resync;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use tokio::sync::Notify;

use crate::error::Result;
use crate::http::AppState;
use crate::store::accounts::now_ms;

/// Handle to wake the worker (new job, or a user waiting on one).
#[derive(Clone, Default)]
pub struct Jobs {
    notify: Arc<Notify>,
}

impl Jobs {
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

pub fn enqueue(conn: &Connection, kind: &str, room_nid: Option<i64>, priority: i64, cursor: &Value) -> Result<()> {
    conn.execute(
        "INSERT INTO jobs (kind, room_nid, priority, cursor, created_ts) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (kind, room_nid) DO UPDATE SET cursor = ?4, attempts = 0, next_run_at = 0, done_units = 0, total_units = NULL",
        params![kind, room_nid, priority, cursor.to_string(), now_ms()],
    )?;
    Ok(())
}

/// Moves a room's jobs to the front (a user is waiting on them).
pub fn bump(conn: &Connection, room_nid: i64) -> Result<()> {
    conn.execute(
        "UPDATE jobs SET priority = priority + 100, next_run_at = 0 WHERE room_nid = ?1 AND priority < 100",
        [room_nid],
    )?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub job_id: i64,
    pub kind: String,
    pub room_nid: Option<i64>,
    pub cursor: Value,
    pub attempts: i64,
}

fn next_due(conn: &Connection) -> Result<Option<JobRow>> {
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
                cursor: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or(Value::Null),
                attempts: r.get(4)?,
            })
        })
        .optional()?)
}

/// Progress of every job, for `hearth jobs` and the admin endpoint.
pub fn progress(conn: &Connection) -> Result<Vec<Value>> {
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

/// What one step of a job did.
pub enum Step {
    /// More to do; the cursor was saved by the step.
    More,
    Done,
}

/// The worker loop: one job step at a time, duty-cycled.
pub async fn run_worker(s: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    // Stagger resumption after a restart so startup stays responsive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let duty = s.config.jobs.duty_cycle;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let job = match s.store.read_background(next_due).await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "job queue unreadable");
                None
            }
        };
        let Some(job) = job else {
            tokio::select! {
                _ = s.jobs.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        };
        let started = Instant::now();
        let result = match job.kind.as_str() {
            "resync" => resync::step(&s, &job).await,
            other => {
                tracing::error!(kind = other, "unknown job kind; dropping");
                Ok(Step::Done)
            }
        };
        let took = started.elapsed();
        match result {
            Ok(Step::Done) => {
                let id = job.job_id;
                let _ = s
                    .store
                    .write_background(move |w| Ok(w.conn.execute("DELETE FROM jobs WHERE job_id = ?1", [id])?))
                    .await;
                // A finished job usually wrote a lot: fold the WAL back into the database.
                if let Err(e) = s.store.checkpoint(s.config.database.path.clone()).await {
                    tracing::info!(error = %e, "checkpoint after job failed");
                }
            }
            Ok(Step::More) => {}
            Err(e) => {
                let (id, attempts) = (job.job_id, job.attempts + 1);
                let delay = (1000i64 << attempts.min(10)).min(600_000);
                tracing::warn!(kind = %job.kind, attempts, error = %e, retry_in_ms = delay, "job step failed");
                let msg = e.to_string();
                let _ = s
                    .store
                    .write_background(move |w| {
                        Ok(w.conn.execute(
                            "UPDATE jobs SET attempts = ?2, next_run_at = ?3, last_error = ?4 WHERE job_id = ?1",
                            params![id, attempts, now_ms() + delay, msg],
                        )?)
                    })
                    .await;
            }
        }
        // Duty cycle: after working `took`, rest long enough that work is at most `duty` of wall time —
        // unless no client request is waiting, then keep going at full speed.
        let users_active = s.busy.load(std::sync::atomic::Ordering::Relaxed) > 0;
        let rest =
            if users_active { took.mul_f64((1.0 - duty) / duty).min(Duration::from_secs(5)) } else { Duration::ZERO };
        if !rest.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(rest) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
