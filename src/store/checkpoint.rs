//! WAL checkpoints on a thread of their own, so the one writer never stops to copy the log into the database.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold, on the committing connection:
//! for us the writer thread, where every user's write queues. In a 100k-member resync each one copied 32 MB of
//! pages and held the writer for 60-120 ms, every half second or so (bench/PROFILE.md, round 5): the slowest sends
//! of the fetch phase were the ones queued behind a checkpoint. Here the writer's commits only note how long the
//! log has grown ([`wal_hook`]); past [`CHECKPOINT_AT_PAGES`] the checkpointer thread, with a connection of its
//! own, runs a PASSIVE checkpoint, which neither waits for nor blocks the writer and readers. Should it fall behind
//! (or a long read keep the log's start in use), the writer checkpoints itself past [`WRITER_CHECKPOINTS_AT_PAGES`],
//! as SQLite would.

use std::cell::Cell;
use std::os::raw::c_int;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::{Duration, Instant};

use rusqlite::hooks::Wal;
use rusqlite::Connection;

/// Pages in the WAL after which the checkpointer is asked to run (32 MB of 4 KiB pages). Large on purpose: a bulk
/// write rewrites the same index pages commit after commit and a checkpoint copies each distinct page once, so
/// rarer checkpoints copy less in all (SQLite's default of 1000 cost a resync 9.5% of its CPU, this 5.8%).
const CHECKPOINT_AT_PAGES: c_int = 8000;
/// Pages after which the writer checkpoints itself, as SQLite's own automatic checkpoint does (128 MB).
const WRITER_CHECKPOINTS_AT_PAGES: c_int = 32000;
/// The least time between two of the checkpointer's runs, so a log that cannot be reset (a reader still uses its
/// start) is not checkpointed after every commit. Short, because whatever the last run left uncopied is what the
/// writer copies itself, inside a commit, once the log passes [`WRITER_CHECKPOINTS_AT_PAGES`]: at 100 ms, user
/// sends of a 100k-member resync over 60 ms were 5-7 a run (p99 68-115 ms), at 25 ms 1-3 (p99 56-94 ms), for a
/// CPU cost within the noise (bench/PROFILE.md, round 8).
const MIN_GAP: Duration = Duration::from_millis(25);

thread_local! {
    /// The WAL's length in pages after the last commit on this thread's connection (the writer's).
    static WAL_PAGES: Cell<c_int> = const { Cell::new(0) };
}

/// The writer connection's WAL hook (replaces SQLite's automatic checkpoint): called after each commit with the
/// log's length in pages. Never fails: the commit has happened, and an error here would be reported as its own.
pub(super) fn wal_hook(wal: &Wal, pages: c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    if pages >= WRITER_CHECKPOINTS_AT_PAGES {
        if let Err(e) = wal.checkpoint() {
            tracing::debug!(error = %e, pages, "writer's own checkpoint did not run");
        }
    }
    Ok(())
}

/// The writer's side: asks the checkpointer to run once the log is long enough.
pub(super) struct Nudge(SyncSender<()>);

impl Nudge {
    /// Called on the writer thread after a commit.
    pub(super) fn after_commit(&self) {
        let pages = WAL_PAGES.with(|p| p.replace(0));
        if pages >= CHECKPOINT_AT_PAGES {
            // Full means a run is already due: nothing to add.
            let _ = self.0.try_send(());
        }
    }
}

/// Starts the checkpointer on database `path` (already in WAL mode). It ends when the [`Nudge`] is dropped (the
/// writer stopped).
pub(super) fn start(path: &Path) -> anyhow::Result<Nudge> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new().name("hearth-checkpoint".into()).spawn(move || run(conn, rx))?;
    Ok(Nudge(tx))
}

fn run(conn: Connection, nudges: Receiver<()>) {
    while nudges.recv().is_ok() {
        let started = Instant::now();
        let result =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
        match result {
            Ok((log, copied)) => {
                tracing::debug!(log, copied, ms = started.elapsed().as_millis() as u64, "WAL checkpoint")
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
        std::thread::sleep(MIN_GAP);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::store::Store;

    /// Writes that grow the log past the checkpointer's threshold, and far short of the one where the writer
    /// checkpoints itself, end up in the database file without any further write: the checkpointer copied them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_log_is_checkpointed_by_the_checkpointer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Store::open(&path, 1).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        // 40 MB of blobs in 4 MB commits: about 10k pages of log.
        for _ in 0..10 {
            store
                .write(|w| {
                    let conn = w.db().conn();
                    conn.execute_batch("CREATE TABLE IF NOT EXISTS filler (b BLOB)")?;
                    for _ in 0..64 {
                        conn.execute("INSERT INTO filler (b) VALUES (zeroblob(65536))", [])?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&path).unwrap().len() < before + (30 << 20) {
            assert!(Instant::now() < deadline, "the log was not checkpointed into the database file");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
