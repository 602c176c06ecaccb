//! `hearth backup FILE` and `hearth restore FILE`: consistent copies of the live database.
//!
//! A backup is taken with SQLite's online backup API in one step, inside one read transaction: in WAL mode that
//! sees a single committed snapshot and does not block the running server's writer. The copy is checked
//! (SQLite's quick check), switched to a self-contained rollback-journal file (no `-wal` beside it), written under a
//! temporary name with mode 0600 (it holds password hashes, access tokens and the server's signing key) and only
//! then renamed to `FILE`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags};

use crate::store::{maintenance, Db};

/// What a finished backup or restore reports.
#[derive(Debug)]
pub struct Summary {
    pub path: PathBuf,
    pub bytes: u64,
    pub server_name: Option<String>,
    pub events: i64,
    pub users: i64,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

/// Copies the database at `src` (possibly in use by a running server) to `dest` as a consistent snapshot.
/// Refuses to overwrite `dest` unless `force`.
pub fn backup(src: &Path, dest: &Path, force: bool) -> anyhow::Result<Summary> {
    anyhow::ensure!(src.exists(), "database {} does not exist", src.display());
    anyhow::ensure!(force || !dest.exists(), "{} already exists (pass --force to overwrite it)", dest.display());
    // Read-write without create: a reader of a WAL database may need to create the -shm file; nothing is written.
    let source = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("opening {}", src.display()))?;
    source.busy_timeout(Duration::from_secs(30))?;
    copy_into(&source, dest)
}

/// Writes a consistent copy of `source` to `dest` (via `dest.partial`, mode 0600), checks it and renames it.
fn copy_into(source: &Connection, dest: &Path) -> anyhow::Result<Summary> {
    let partial = with_suffix(dest, ".partial");
    let _ = std::fs::remove_file(&partial);
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        opts.open(&partial).with_context(|| format!("creating {}", partial.display()))?;
    }
    let result = (|| -> anyhow::Result<()> {
        let mut dst = Connection::open(&partial)?;
        {
            let backup = rusqlite::backup::Backup::new(source, &mut dst)?;
            // All pages in one step: one read transaction, one snapshot. Busy/locked only happen while another
            // connection holds an exclusive lock (never in WAL mode for long): retry for a while.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                match backup.step(-1)? {
                    rusqlite::backup::StepResult::Done => break,
                    _ if std::time::Instant::now() > deadline => anyhow::bail!("the database stayed locked for 60 s"),
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        // A single self-contained file: no -wal/-shm beside the backup.
        maintenance::use_rollback_journal(Db(&dst))?;
        let check = maintenance::quick_check(Db(&dst))?;
        anyhow::ensure!(check == "ok", "the copy failed its integrity check: {check}");
        dst.close().map_err(|(_, e)| e)?;
        std::fs::File::open(&partial)?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, dest).with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    describe(dest)
}

/// Opens `path` read-only, checks it is a Hearth database and counts what it holds.
pub fn describe(path: &Path) -> anyhow::Result<Summary> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let server_name =
        maintenance::server_name(Db(&conn)).with_context(|| format!("{} is not a Hearth database", path.display()))?;
    Ok(Summary {
        path: path.to_owned(),
        bytes: std::fs::metadata(path)?.len(),
        server_name,
        events: maintenance::event_count(Db(&conn))?,
        users: maintenance::user_count(Db(&conn))?,
    })
}

/// Puts the backup `from` in place as the database `to`. The server must be stopped. An existing database (with its
/// `-wal`/`-shm`) is moved aside to `<to>.before-restore-<unix time>` when `force`, else the restore is refused.
/// `expected_server_name` (the configuration's) must match the backup's.
pub fn restore(from: &Path, to: &Path, expected_server_name: &str, force: bool) -> anyhow::Result<Summary> {
    let info = describe(from)?;
    {
        let conn = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let check = maintenance::quick_check(Db(&conn))?;
        anyhow::ensure!(check == "ok", "{} failed its integrity check: {check}", from.display());
    }
    if let Some(name) = &info.server_name {
        anyhow::ensure!(
            name == expected_server_name,
            "the backup belongs to server_name `{name}`, but the configuration says `{expected_server_name}`"
        );
    }
    if to.exists() {
        anyhow::ensure!(force, "{} already exists; stop the server and pass --force to move it aside", to.display());
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let aside = with_suffix(to, &format!(".before-restore-{stamp}"));
        for suffix in ["", "-wal", "-shm"] {
            let (a, b) = (with_suffix(to, suffix), with_suffix(&aside, suffix));
            if a.exists() {
                std::fs::rename(&a, &b).with_context(|| format!("moving {} aside", a.display()))?;
            }
        }
        eprintln!("moved the old database aside to {}", aside.display());
    }
    let source = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let summary = copy_into(&source, to)?;
    // Restored as root into a folder owned by the service user: hand the file to that user.
    #[cfg(unix)]
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(d), Ok(f)) = (std::fs::metadata(dir), std::fs::metadata(to)) {
            if (d.uid(), d.gid()) != (f.uid(), f.gid()) {
                let _ = std::os::unix::fs::chown(to, Some(d.uid()), Some(d.gid()));
            }
        }
    }
    Ok(summary)
}
