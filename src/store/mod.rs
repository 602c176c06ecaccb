//! SQLite, and only here: a reader pool (r2d2) plus ONE writer thread fed by a channel.
//!
//! Writes are closures run on the writer thread inside their own transaction; the caller gets the result only after
//! COMMIT, so anything acknowledged to a client is in the WAL (durable against a killed process). Foreground
//! (user-facing) writes always go ahead of queued background writes, and background work is expected to come in
//! short steps, so a message never waits behind a bulk insert.

pub mod account_data;
pub mod accounts;
pub mod appservice;
pub mod backup;
mod checkpoint;
pub mod device_lists;
pub mod e2ee;
pub mod events;
pub mod identity;
pub mod ids;
pub mod invite_state;
pub mod jobs;
pub mod lock;
pub mod maintenance;
pub mod media;
pub mod members;
pub mod migrate;
pub mod notary;
pub mod outbox;
pub mod peeks;
pub mod presence;
pub mod previews;
pub mod purge;
pub mod pushers;
pub mod receipts;
pub mod registration_tokens;
pub mod relations;
pub mod reports;
pub mod resync;
pub mod room_keys;
pub mod rooms;
pub mod search;
pub mod server_keys;
pub mod sliding_sync;
pub mod state_groups;
#[cfg(test)]
pub mod testing;
pub mod timeline;
pub mod txn_ids;
pub mod unread;

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};

pub type Pool = r2d2::Pool<SqliteConnectionManager>;

/// A handle on a database connection: what the store's functions take. Code outside `store/` gets one from
/// [`Store::read`] or [`Writer::db`] and passes it on, but cannot reach the connection inside (its field and the
/// methods below are private to `store/`): all SQL stays here.
#[derive(Clone, Copy)]
pub struct Db<'a>(&'a Connection);

/// Runs a read closure inside one (deferred) read transaction. Its queries see one snapshot, and the
/// connection keeps its page cache between them: SQLite discards a connection's whole cache whenever a new read
/// transaction finds the WAL changed, which while a resync writes is between nearly every two autocommit
/// queries, so a closure of many lookups (the auth phase's 200k) re-read its B-tree pages from the OS each time.
fn read_in_one_snapshot<R>(conn: &Connection, f: impl FnOnce(Db<'_>) -> Result<R>) -> Result<R> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Deferred)?;
    let result = f(Db(&tx));
    // Nothing was written: ending it either way only releases the snapshot.
    drop(tx);
    result
}

/// The connection's methods the store's functions use, forwarded.
impl<'a> Db<'a> {
    pub(in crate::store) fn execute<P: rusqlite::Params>(self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.0.execute(sql, params)
    }

    pub(in crate::store) fn query_row<T, P, F>(self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.0.query_row(sql, params, f)
    }

    pub(in crate::store) fn prepare(self, sql: &str) -> rusqlite::Result<rusqlite::Statement<'a>> {
        self.0.prepare(sql)
    }

    pub(in crate::store) fn prepare_cached(self, sql: &str) -> rusqlite::Result<rusqlite::CachedStatement<'a>> {
        self.0.prepare_cached(sql)
    }

    pub(in crate::store) fn last_insert_rowid(self) -> i64 {
        self.0.last_insert_rowid()
    }

    /// The connection itself, for what the methods above do not cover.
    pub(in crate::store) fn conn(self) -> &'a Connection {
        self.0
    }
}

/// What a write closure gets: the connection inside an open transaction (as a [`Db`]) and the stream allocator.
pub struct Writer<'a> {
    conn: Db<'a>,
    next_stream: &'a mut i64,
}

impl<'a> Writer<'a> {
    /// The handle the store's functions take, inside this write's transaction.
    pub fn db(&self) -> Db<'a> {
        self.conn
    }

    /// Sizes the writer's page cache for a bulk load of a state of `events` events we lack, from
    /// [`WRITER_CACHE_KIB`] up to [`WRITER_BULK_CACHE_KIB`] (80 bytes per state event: with its auth chain, a
    /// 100k-event state is a 160k-event load, and this is about the share of the indexes it keeps revisiting);
    /// `None` puts it back. Inserting events sorted by id still lands on pages of the `events` and auth-edge indexes
    /// all over the file, and a page that left the cache is read again before its next change: a 100k-member resync
    /// (160k events) took 7% longer and 1.6 CPU-s more with 4 MB than with 8 MB, while 8 MB at all times cost a
    /// 10k-member join 3 MB of its 52 MB peak (bench/PROFILE.md, round 6). Takes effect at once, for this connection.
    pub fn size_cache_for(&self, events: Option<usize>) -> Result<()> {
        let kib = match events {
            Some(n) => {
                (n.saturating_mul(80) / 1024).clamp(WRITER_CACHE_KIB as usize, WRITER_BULK_CACHE_KIB as usize) as u32
            }
            None => WRITER_CACHE_KIB,
        };
        self.conn.0.pragma_update(None, "cache_size", -i64::from(kib))?;
        Ok(())
    }

    /// Allocates the next position of the global stream (events, account data, receipts, to-device, devices).
    /// Visible to readers only once this write commits.
    pub fn next_stream(&mut self) -> i64 {
        *self.next_stream += 1;
        *self.next_stream
    }
}

/// Delivers a write's result to its caller; given `Some(error)` when the transaction failed to commit.
type Deliver = Box<dyn FnOnce(Option<Error>) + Send>;
/// Runs a write; returns whether it succeeded (commit) or failed (roll back), and how to deliver the result.
type WriteFn = Box<dyn FnOnce(&mut Writer<'_>) -> (bool, Deliver) + Send>;

fn make_job<R, F>(f: F) -> (WriteFn, oneshot::Receiver<Result<R>>)
where
    R: Send + 'static,
    F: FnOnce(&mut Writer<'_>) -> Result<R> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: WriteFn = Box::new(move |w| {
        let result = f(w);
        let ok = result.is_ok();
        let deliver: Deliver = Box::new(move |commit_error| {
            let _ = tx.send(match commit_error {
                Some(e) => Err(e),
                None => result,
            });
        });
        (ok, deliver)
    });
    (job, rx)
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// One permit per pooled reader, taken before a read goes to a blocking thread: waiting readers queue as cheap
    /// async tasks instead of as blocked threads contending on the pool's lock (a burst of 200 long polls waking
    /// at once otherwise made 200 threads fight over 4 connections).
    read_permits: Arc<tokio::sync::Semaphore>,
    /// Taken before a read permit by background reads (job steps, the federation sender), so they hold at most
    /// half the readers: a fan-out to 2000 servers queued 2000 reads ahead of a `send_join` answer.
    background_read_permits: Arc<tokio::sync::Semaphore>,
    foreground: std_mpsc::Sender<WriteFn>,
    background: std_mpsc::SyncSender<WriteFn>,
    wake: std_mpsc::SyncSender<()>,
    stream: watch::Receiver<i64>,
    _writer: Arc<WriterHandle>,
}

struct WriterHandle;

/// Prepared statements kept per connection. rusqlite's default (16) is far fewer than the distinct statements one
/// `/sync` runs, so they were re-parsed on every request: SQLite's parser and planner showed at the top of a
/// profile under load.
const STATEMENT_CACHE: usize = 256;

/// Page cache per pooled reader, in KiB. Pages a reader misses come from the OS's page cache (one `pread`), which is
/// shared and can be reclaimed, where a connection's own cache is private heap: with 4 MB each a 10k-member join
/// peaked at 53-57 MB, with 2 MB at 50-52 MB (bench/PROFILE.md, round 5). Since a read closure keeps its cache for
/// all its queries (one snapshot), the caches fill up where before a write in between emptied them: 2 MB each put
/// a 10k-member join at 51-54 MB, 1 MB at 48-51 MB (round 7), and a closure's lookups mostly reuse the interior
/// pages of the indexes, which 1 MB holds. The writer's is sized to its work ([`WRITER_CACHE_KIB`]).
const READER_CACHE_KIB: u32 = 1000;

/// The writer's page cache, in KiB, for everyday writes (a message, a receipt, a join): the pages they touch are
/// few. A bulk load raises it for its duration ([`Writer::size_cache_for`]).
pub const WRITER_CACHE_KIB: u32 = 4000;
/// The most a bulk load raises the writer's page cache to, in KiB.
pub const WRITER_BULK_CACHE_KIB: u32 = 8000;

/// Turns off SQLite's memory statistics before the library initialises: with them on, every allocation SQLite
/// makes takes one global mutex, which the reader threads then queue on (seen in profiles under load). Must run
/// before the first connection is opened; later it is a no-op (SQLITE_MISUSE, ignored).
fn sqlite_global_config() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config is called before sqlite3_initialize (no connection exists yet in this
        // process when Store::open first runs); SQLITE_CONFIG_MEMSTATUS takes one int argument.
        unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::os::raw::c_int);
        }
    });
}

/// The writer connection's settings. No automatic checkpoint: the WAL is copied into the database by a thread of
/// its own (`checkpoint.rs`), not inside a user's commit. `journal_size_limit` truncates the WAL back to 64 MB
/// after a bulk write.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000;
         PRAGMA cache_size=-{WRITER_CACHE_KIB}; PRAGMA temp_store=MEMORY; PRAGMA journal_size_limit=67108864;"
    ))?;
    conn.wal_hook(Some(checkpoint::wal_hook));
    Ok(())
}

impl Store {
    /// Opens (creating and migrating if needed) the database and starts the writer thread. Blocks (migrations can
    /// take long): async code calls it under `spawn_blocking` (see `server::start`).
    pub fn open(path: &Path, readers: u32) -> anyhow::Result<Store> {
        sqlite_global_config();
        let named = |e: &dyn std::fmt::Display| anyhow::anyhow!("database {} (database.path): {e}", path.display());
        if std::fs::metadata(path).is_ok_and(|m| m.permissions().readonly()) {
            return Err(named(&"the file is read-only: make it writable by the user running hearth"));
        }
        let mut conn = Connection::open(path).map_err(|e| named(&e))?;
        configure(&conn).map_err(|e| named(&e))?;
        migrate::migrate(&mut conn).map_err(|e| named(&e))?;
        check_writable(&conn).map_err(|e| named(&e))?;
        let start_stream = current_max_stream(&conn)?;
        let checkpoints = checkpoint::start(path).map_err(|e| named(&e))?;

        let manager = SqliteConnectionManager::file(path)
            .with_flags(rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_init(|c| {
                c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
                c.execute_batch(&format!(
                    "PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000; PRAGMA cache_size=-{READER_CACHE_KIB};"
                ))?;
                // `rarray(?)` lets one query take a whole list of ids (auth chains of big states).
                rusqlite::vtab::array::load_module(c)
            });
        let pool =
            r2d2::Pool::builder().max_size(readers).connection_timeout(Duration::from_secs(30)).build(manager)?;

        let (fg_tx, fg_rx) = std_mpsc::channel::<WriteFn>();
        let (bg_tx, bg_rx) = std_mpsc::sync_channel::<WriteFn>(64);
        let (wake_tx, wake_rx) = std_mpsc::sync_channel::<()>(1);
        let (stream_tx, stream_rx) = watch::channel(start_stream);
        std::thread::Builder::new()
            .name("hearth-writer".into())
            .spawn(move || writer_loop(conn, fg_rx, bg_rx, wake_rx, stream_tx, start_stream, checkpoints))?;

        Ok(Store {
            pool,
            read_permits: Arc::new(tokio::sync::Semaphore::new(readers as usize)),
            background_read_permits: Arc::new(tokio::sync::Semaphore::new((readers as usize / 2).max(1))),
            foreground: fg_tx,
            background: bg_tx,
            wake: wake_tx,
            stream: stream_rx,
            _writer: Arc::new(WriterHandle),
        })
    }

    /// Runs `f` on a pooled read connection on a blocking thread.
    pub async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(Db<'_>) -> Result<R> + Send + 'static,
    {
        let job = self.reader_job(f).await?;
        tokio::task::spawn_blocking(job).await.map_err(|e| Error::internal(format!("reader task failed: {e}")))?
    }

    /// `f` on a pooled reader connection, as a job for a blocking thread, once a read permit is held (the permit
    /// goes when the connection is back in the pool).
    async fn reader_job<R, F>(&self, f: F) -> Result<impl FnOnce() -> Result<R> + Send + 'static>
    where
        R: Send + 'static,
        F: FnOnce(Db<'_>) -> Result<R> + Send + 'static,
    {
        let pool = self.pool.clone();
        let permit = self.read_permits.clone().acquire_owned().await.map_err(|e| Error::internal(e.to_string()))?;
        Ok(move || {
            let result = pool.get().map_err(Error::from).and_then(|conn| read_in_one_snapshot(&conn, f));
            drop(permit);
            result
        })
    }

    /// Like [`Store::read`] for background work: at most half the readers at a time, so user-facing reads always
    /// find a connection soon.
    pub async fn read_background<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(Db<'_>) -> Result<R> + Send + 'static,
    {
        let _turn =
            self.background_read_permits.clone().acquire_owned().await.map_err(|e| Error::internal(e.to_string()))?;
        let job = self.reader_job(f).await?;
        // On a low-priority thread: a resync's reads (auth checks of 100k events) yield the CPU to users' requests.
        crate::lowprio::run(job).await.map_err(|e| Error::internal(format!("background reader task failed: {e}")))?
    }

    /// Runs `f` inside a write transaction on the writer thread (user-facing priority).
    pub async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Writer<'_>) -> Result<R> + Send + 'static,
    {
        let (job, rx) = make_job(f);
        self.foreground.send(job).map_err(|_| Error::internal("writer thread is gone"))?;
        let _ = self.wake.try_send(());
        rx.await.map_err(|_| Error::internal("write was dropped (transaction failed to commit)"))?
    }

    /// Like [`Store::write`] but queued behind all foreground writes (job-queue steps, bulk imports).
    pub async fn write_background<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Writer<'_>) -> Result<R> + Send + 'static,
    {
        let (job, rx) = make_job(f);
        let bg = self.background.clone();
        tokio::task::spawn_blocking(move || bg.send(job))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|_| Error::internal("writer thread is gone"))?;
        let _ = self.wake.try_send(());
        rx.await.map_err(|_| Error::internal("write was dropped (transaction failed to commit)"))?
    }

    /// The highest committed stream position; changes wake long-polling `/sync`.
    pub fn stream_watch(&self) -> watch::Receiver<i64> {
        self.stream.clone()
    }

    pub fn current_stream(&self) -> i64 {
        *self.stream.borrow()
    }

    /// Checkpoints the WAL back into the database file and truncates it (after bulk work: the WAL of a 100k-event
    /// resync would otherwise stay gigabytes long). Runs on its own connection; waits for the writer if busy.
    pub async fn checkpoint(&self, path: std::path::PathBuf) -> Result<()> {
        tokio::task::spawn_blocking(move || -> Result<()> {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(Duration::from_secs(30))?;
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))?
    }

    /// Online backup to `dest` (consistent snapshot while the server runs).
    pub async fn backup(&self, dest: std::path::PathBuf) -> Result<()> {
        self.read(move |conn| {
            conn.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
            Ok(())
        })
        .await
    }
}

/// A connection of its own on the database file, outside the reader pool and the writer thread: for start-up
/// (loading or creating the server's identity) and the command-line tools (`hearth jobs`, key rotation), which run
/// before or beside a server. Writes through it make their own transactions (see `identity`).
pub struct DirectDb(Connection);

impl DirectDb {
    /// Opens the database read-write (it must exist: [`Store::open`] creates and migrates it; this never creates
    /// one), waiting up to 10 s for a busy writer.
    pub fn open(path: &Path) -> Result<DirectDb> {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch("PRAGMA foreign_keys=ON;")?;
        Ok(DirectDb(conn))
    }

    /// For the management commands, beside a running server or not: the database must exist and have this
    /// binary's schema (they never create or migrate one), else the error says where they looked and what to do.
    /// `key` names where the path came from (e.g. "database.path in ./hearth.toml").
    pub fn open_existing(path: &Path, key: &str) -> anyhow::Result<DirectDb> {
        anyhow::ensure!(
            path.is_file(),
            "no database at {} ({key}): start the server once to create it, or point -c / HEARTH_DATABASE__PATH at \
             the configuration the server uses",
            path.display()
        );
        let direct =
            DirectDb::open(path).map_err(|e| anyhow::anyhow!("cannot open the database {}: {e}", path.display()))?;
        let version: i64 = direct.0.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        anyhow::ensure!(
            version == migrate::SCHEMA_VERSION,
            "the database {} has schema version {version}, this hearth expects {}: start this version of the server \
             once (it migrates the database), then run the command again",
            path.display(),
            migrate::SCHEMA_VERSION
        );
        Ok(direct)
    }

    /// Runs `f` in its own short `BEGIN IMMEDIATE` transaction (waiting for a running server's writer up to the
    /// busy timeout); commits when it returns `Ok`. No stream positions here: those belong to the server's writer.
    pub fn transaction<R>(&mut self, f: impl FnOnce(Db<'_>) -> Result<R>) -> Result<R> {
        let tx = self.0.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let r = f(Db(&tx))?;
        tx.commit()?;
        Ok(r)
    }

    /// Opens the database read-only (works while the server runs: WAL readers do not block it), waiting up to 5 s
    /// for a busy writer.
    pub fn open_read_only(path: &Path) -> Result<DirectDb> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(DirectDb(conn))
    }

    /// The handle the store's functions take.
    pub fn db(&self) -> Db<'_> {
        Db(&self.0)
    }
}

/// A database we cannot write (a folder where the `-wal` file cannot be made, a read-only mount) opens fine and
/// then fails every write: refuse it at start instead of serving 500s. (A read-only file is refused before.)
fn check_writable(conn: &Connection) -> anyhow::Result<()> {
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_start_ts', ?1)", [accounts::now_ms()])
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot write to it ({e}): the file and its folder must be writable by the user running hearth"
            )
        })?;
    Ok(())
}

fn current_max_stream(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT max(
            (SELECT coalesce(max(stream_ordering), 0) FROM events),
            (SELECT coalesce(max(stream_ordering), 0) FROM account_data),
            (SELECT coalesce(max(stream_ordering), 0) FROM receipts),
            (SELECT coalesce(max(stream_ordering), 0) FROM to_device),
            (SELECT coalesce(max(stream_ordering), 0) FROM device_list_stream),
            (SELECT coalesce(max(stream_ordering), 0) FROM local_membership_stream),
            (SELECT coalesce(max(stream_ordering), 0) FROM presence))",
        [],
        |r| r.get(0),
    )
}

fn writer_loop(
    mut conn: Connection,
    fg: std_mpsc::Receiver<WriteFn>,
    bg: std_mpsc::Receiver<WriteFn>,
    wake: std_mpsc::Receiver<()>,
    stream_tx: watch::Sender<i64>,
    mut committed_stream: i64,
    checkpoints: checkpoint::Nudge,
) {
    let mut fg_open = true;
    loop {
        // Foreground first; then one background job; otherwise sleep until something arrives.
        let job = match fg.try_recv() {
            Ok(job) => Some(job),
            Err(std_mpsc::TryRecvError::Disconnected) => {
                fg_open = false;
                None
            }
            Err(std_mpsc::TryRecvError::Empty) => None,
        };
        let job = match job {
            Some(job) => job,
            None => match bg.try_recv() {
                Ok(job) => job,
                Err(std_mpsc::TryRecvError::Disconnected) if !fg_open => return,
                Err(_) => {
                    if !fg_open {
                        return;
                    }
                    // Waiting on `wake` with a timeout also notices a dropped Store.
                    match wake.recv_timeout(Duration::from_millis(500)) {
                        Ok(()) | Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                            // All senders gone: drain what's left then stop.
                            while let Ok(job) = fg.try_recv() {
                                run_one(&mut conn, job, &mut committed_stream, &stream_tx, &checkpoints);
                            }
                            return;
                        }
                    }
                }
            },
        };
        run_one(&mut conn, job, &mut committed_stream, &stream_tx, &checkpoints);
    }
}

fn run_one(
    conn: &mut Connection,
    job: WriteFn,
    committed_stream: &mut i64,
    stream_tx: &watch::Sender<i64>,
    checkpoints: &checkpoint::Nudge,
) {
    let mut next_stream = *committed_stream;
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "could not begin write transaction");
            return; // dropping the job drops its reply sender: the caller sees an error
        }
    };
    let mut w = Writer { conn: Db(&tx), next_stream: &mut next_stream };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut w)));
    let (ok, deliver) = match outcome {
        Ok(x) => x,
        Err(_) => {
            tracing::error!("write closure panicked; rolled back");
            let _ = tx.rollback();
            return;
        }
    };
    if !ok {
        // The write failed part-way: nothing of it may stay.
        if let Err(e) = tx.rollback() {
            tracing::error!(error = %e, "rollback failed");
        }
        deliver(None);
        return;
    }
    match tx.commit() {
        Ok(()) => {
            checkpoints.after_commit();
            if next_stream != *committed_stream {
                *committed_stream = next_stream;
                stream_tx.send_replace(next_stream);
            }
            deliver(None);
        }
        Err(e) => {
            tracing::error!(error = %e, "commit failed");
            deliver(Some(Error::from(e)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes the cache for `events` in a write, then reads back the cache's size in KiB.
    fn sized_for(mem: &mut testing::MemDb, events: Option<usize>) -> i64 {
        let mut stream = 0;
        testing::write(mem, &mut stream, |w| w.size_cache_for(events)).unwrap();
        -mem.db().query_row("PRAGMA cache_size", [], |r| r.get::<_, i64>(0)).unwrap()
    }

    #[test]
    fn the_writer_cache_grows_with_a_bulk_load_up_to_its_cap_and_goes_back() {
        let mut mem = testing::memory_db();
        assert_eq!(sized_for(&mut mem, Some(100_000)), 7812, "80 bytes per event of a 100k-event state");
        assert_eq!(sized_for(&mut mem, None), i64::from(WRITER_CACHE_KIB), "back to the everyday size");
        assert_eq!(sized_for(&mut mem, Some(10_000)), i64::from(WRITER_CACHE_KIB), "a small load needs no more");
        assert_eq!(sized_for(&mut mem, Some(10_000_000)), i64::from(WRITER_BULK_CACHE_KIB), "capped");
    }
}
