//! The persistent, throttled, single-threaded background job queue.
//!
//! Jobs live in the `jobs` table (`crate::store::jobs`) with a resumable `cursor`; one worker runs one step at a
//! time, then rests while users' requests are in flight, so it is busy at most `jobs.duty_cycle` of the time while
//! they keep coming ([`rest_while`]; no rest after a step that ran on low-priority threads:
//! [`JobKind::gives_way_by_itself`]). A kill -9 loses
//! at most the step in flight (its write transaction never committed) and the job resumes from its cursor on
//! restart.
//!
//! The queue knows no job's domain: each kind registers a [`JobKind`] (the wiring does, in `crate::server`). The
//! worker owns batch sizing: every step gets a batch size and reports the items it did, and the worker adapts the
//! size per job and unit of work so a step takes about `jobs.step_ms` ([`next_batch_size`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::error::Result;
use crate::store::accounts::now_ms;
use crate::store::ids::JobId;
use crate::store::{Db, Store};

pub use crate::store::jobs::{bump, progress, JobRow};

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

/// Queues a job of `kind` starting from `cursor` (or restarts the room's job of that kind).
pub fn enqueue(
    conn: Db<'_>,
    kind: &str,
    room_nid: Option<crate::store::ids::RoomNid>,
    priority: i64,
    cursor: &serde_json::Value,
) -> Result<()> {
    crate::store::jobs::enqueue(conn, kind, room_nid, priority, &cursor.to_string())
}

/// What one step of a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More to do (the step saved the cursor); `items` of work were done (for batch sizing).
    More {
        items: usize,
    },
    Done,
}

/// A step's future.
pub type StepFuture = Pin<Box<dyn Future<Output = Result<Step>> + Send>>;

/// One kind of job: how to run a step of it.
pub trait JobKind: Send + Sync {
    /// The unit of work the job's next step does (e.g. its phase): batch sizes are learned per job and unit, since
    /// an item of one phase may cost a hundred times an item of another.
    fn unit(&self, _job: &JobRow) -> &'static str {
        "item"
    }

    /// Whether the next step of `job` does its work on low-priority threads (reads and CPU work that the
    /// scheduler already puts behind users' requests), writing little: the worker need not rest after such a step
    /// to leave users the CPU (the default: it must).
    fn gives_way_by_itself(&self, _job: &JobRow) -> bool {
        false
    }

    /// Runs one step of `job`, doing about `batch` items of work, and saves the job's cursor.
    fn step(&self, job: JobRow, batch: usize) -> StepFuture;
}

/// The job kinds the worker runs, by the `kind` column.
#[derive(Default, Clone)]
pub struct Registry(HashMap<&'static str, Arc<dyn JobKind>>);

impl Registry {
    pub fn with(mut self, kind: &'static str, runner: Arc<dyn JobKind>) -> Registry {
        self.0.insert(kind, runner);
        self
    }
}

/// Smallest batch a step is given.
pub const MIN_BATCH: usize = 10;
/// The first batch of a job's unit of work, before any timing is known.
pub const START_BATCH: usize = 100;
/// Largest batch a step is given.
pub const MAX_BATCH: usize = 5000;

/// The next batch size after a step did `items` items of a batch of `current` in `took`, aiming at `target` per
/// step (as Synapse sizes its background updates): the size the measured time per item says fits the target. It
/// grows to that at once (a step's fixed cost makes small batches look slow per item, so the estimate errs low),
/// and shrinks at most by half per step (one step slowed by contention does not collapse it), within
/// [`MIN_BATCH`]..=[`MAX_BATCH`]. A step that did nothing leaves the size as it was.
pub fn next_batch_size(current: usize, items: usize, took: Duration, target: Duration) -> usize {
    if items == 0 {
        return current.clamp(MIN_BATCH, MAX_BATCH);
    }
    let per_item = took.as_secs_f64() / items as f64;
    let ideal = if per_item > 0.0 { target.as_secs_f64() / per_item } else { f64::MAX };
    let current = current.max(1) as f64;
    let next = ideal.max(current / 2.0);
    (next.round() as usize).clamp(MIN_BATCH, MAX_BATCH)
}

/// What the worker needs besides the job kinds.
pub struct WorkerConfig {
    pub store: Store,
    pub jobs: Jobs,
    /// Fraction of wall time the worker may be busy while users are active.
    pub duty_cycle: f64,
    /// Target length of one step.
    pub step: Duration,
    /// The database file (checkpointed after a job finishes).
    pub database_path: std::path::PathBuf,
    /// Whether client requests are in flight (then the worker rests between steps).
    pub users_active: Box<dyn Fn() -> bool + Send + Sync>,
}

/// The worker loop: one job step at a time, duty-cycled, batches sized to the target step length.
pub async fn run_worker(cfg: WorkerConfig, kinds: Registry, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    // Stagger resumption after a restart so startup stays responsive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sizes: HashMap<(JobId, &'static str), usize> = HashMap::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let job = match cfg.store.read_background(crate::store::jobs::next_due).await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "job queue unreadable");
                None
            }
        };
        let Some(job) = job else {
            tokio::select! {
                _ = cfg.jobs.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        };
        let started = Instant::now();
        let (took, may_rest) = match kinds.0.get(job.kind.as_str()) {
            Some(kind) => {
                let may_rest = !kind.gives_way_by_itself(&job);
                let key = (job.job_id, kind.unit(&job));
                let batch = *sizes.entry(key).or_insert(START_BATCH);
                let result = kind.step(job.clone(), batch).await;
                let took = started.elapsed();
                if let Ok(Step::More { items }) = result {
                    sizes.insert(key, next_batch_size(batch, items, took, cfg.step));
                }
                if matches!(result, Ok(Step::Done)) {
                    sizes.retain(|(id, _), _| *id != job.job_id);
                }
                after_step(&cfg, &job, result).await;
                (took, may_rest)
            }
            None => {
                tracing::error!(kind = %job.kind, "unknown job kind; dropping");
                after_step(&cfg, &job, Ok(Step::Done)).await;
                (started.elapsed(), false)
            }
        };
        // `rest_while` ends the rest at once when no user request is in flight.
        let rest = if may_rest { rest_after(took, cfg.duty_cycle, cfg.step) } else { Duration::ZERO };
        if !rest.is_zero() {
            tokio::select! {
                _ = rest_while(&*cfg.users_active, rest) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// How often a resting worker looks whether users' requests are still in flight.
pub const USERS_POLL: Duration = Duration::from_millis(5);

/// Rests up to `rest` while `users_active` says requests are in flight: the rest is for them, and once none is
/// left (the send that waited for the step is written, say) the work goes on. A fixed rest kept a 100k-member
/// resync's fill at half speed although the one user sending was busy a tenth of the time (bench/PROFILE.md,
/// round 4).
pub async fn rest_while(users_active: &(dyn Fn() -> bool + Send + Sync), rest: Duration) {
    let until = tokio::time::Instant::now() + rest;
    loop {
        let now = tokio::time::Instant::now();
        if now >= until || !users_active() {
            return;
        }
        tokio::time::sleep(USERS_POLL.min(until - now)).await;
    }
}

/// Duty cycle: after a step that worked `took`, rest long enough that work is at most `duty` of wall time while
/// users are active, but never more than a few target steps: the rest is there so that users' requests get the CPU
/// and the writer between steps, and one long step (a resync's whole `/state` download, which yields the writer
/// between its batches anyway) needs no longer pause than a normal one. Resting 5 s after such a step only
/// delayed the room's completion (bench/PROFILE.md).
pub fn rest_after(took: Duration, duty: f64, step: Duration) -> Duration {
    took.mul_f64((1.0 - duty) / duty).min(step * 4)
}

/// Books a step's outcome: a finished job is deleted (and the WAL checkpointed), a failed one retried later
/// with exponential backoff.
async fn after_step(cfg: &WorkerConfig, job: &JobRow, result: Result<Step>) {
    match result {
        Ok(Step::Done) => {
            let id = job.job_id;
            let _ = cfg.store.write_background(move |w| crate::store::jobs::delete(w.db(), id)).await;
            // A finished job usually wrote a lot: fold the WAL back into the database.
            if let Err(e) = cfg.store.checkpoint(cfg.database_path.clone()).await {
                tracing::info!(error = %e, "checkpoint after job failed");
            }
        }
        Ok(Step::More { .. }) => {}
        Err(e) => {
            let (id, attempts) = (job.job_id, job.attempts + 1);
            let delay = (1000i64 << attempts.min(10)).min(600_000);
            tracing::warn!(kind = %job.kind, attempts, error = %e, retry_in_ms = delay, "job step failed");
            let msg = e.to_string();
            let _ = cfg
                .store
                .write_background(move |w| {
                    crate::store::jobs::record_failure(w.db(), id, attempts, now_ms() + delay, &msg)
                })
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(50);

    #[test]
    fn batch_grows_to_what_fits_the_target() {
        // 1 ms per item: 50 fit the target.
        assert_eq!(next_batch_size(10, 10, Duration::from_millis(10), TARGET), 50);
        // Exactly on target: unchanged.
        assert_eq!(next_batch_size(50, 50, Duration::from_millis(50), TARGET), 50);
        // Fast items: grows at once, capped by MAX_BATCH.
        assert_eq!(next_batch_size(100, 100, Duration::from_millis(2), TARGET), 2500);
        assert_eq!(next_batch_size(4000, 4000, Duration::from_millis(1), TARGET), MAX_BATCH);
    }

    #[test]
    fn rest_follows_the_duty_cycle_up_to_a_few_steps() {
        let step = Duration::from_millis(100);
        assert_eq!(rest_after(Duration::from_millis(100), 0.5, step), Duration::from_millis(100));
        assert_eq!(rest_after(Duration::from_millis(100), 0.25, step), Duration::from_millis(300));
        assert_eq!(rest_after(Duration::from_secs(48), 0.5, step), Duration::from_millis(400));
        assert_eq!(rest_after(Duration::from_millis(50), 1.0, step), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_rest_ends_when_no_request_is_left() {
        let rest = Duration::from_millis(400);
        // Users busy throughout: the whole rest.
        let started = std::time::Instant::now();
        rest_while(&|| true, rest).await;
        assert!(started.elapsed() >= rest);
        // Busy for the first 30 ms only: the rest ends soon after (at the first look, give or take a loaded
        // machine's timer), well before its 400 ms.
        let started = std::time::Instant::now();
        rest_while(&move || started.elapsed() < Duration::from_millis(30), rest).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(30) && took < Duration::from_millis(300), "rested {took:?}");
        // Nobody busy: no rest.
        let started = std::time::Instant::now();
        rest_while(&|| false, rest).await;
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn batch_shrinks_when_slow_but_not_below_the_minimum() {
        // 10 ms per item: 5 fit, but one step halves at most.
        assert_eq!(next_batch_size(100, 100, Duration::from_secs(1), TARGET), 50);
        assert_eq!(next_batch_size(12, 12, Duration::from_secs(10), TARGET), MIN_BATCH);
        // A partly filled batch is timed per item done: 20 items in 50 ms → 20 fit.
        assert_eq!(next_batch_size(100, 20, Duration::from_millis(50), TARGET), 50);
    }

    #[test]
    fn a_step_that_did_nothing_keeps_the_size() {
        assert_eq!(next_batch_size(300, 0, Duration::from_secs(3), TARGET), 300);
        assert_eq!(next_batch_size(1, 0, Duration::ZERO, TARGET), MIN_BATCH);
        assert_eq!(next_batch_size(100, 10, Duration::ZERO, TARGET), MAX_BATCH);
    }
}
