//! One server per database: a server holds an exclusive `flock` on `<database>.lock` (with its pid inside) for as
//! long as it runs. The kernel drops the lock when the process ends, however it ends, so a stale file never blocks
//! a start. The command-line tools take no lock (they work beside a running server); they ask [`holder`] whether
//! one runs.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file of a database.
pub fn lock_path(database: &Path) -> PathBuf {
    let mut p = database.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// The held lock; dropping it removes the file and releases the lock.
#[derive(Debug)]
pub struct DbLock {
    /// Held open for the lock's lifetime (the lock goes with the descriptor).
    _file: File,
    path: PathBuf,
}

impl DbLock {
    /// Takes the database's lock, or fails naming the other server's pid and the lock file.
    pub fn acquire(database: &Path) -> anyhow::Result<DbLock> {
        use std::os::unix::fs::MetadataExt;
        let path = lock_path(database);
        let mut file = loop {
            let mut file =
                std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(
                    |e| anyhow::anyhow!("cannot create the lock file {} (database.path): {e}", path.display()),
                )?;
            if !try_flock(&file, libc::LOCK_EX) {
                let pid = read_pid(&mut file).map(|p| format!("pid {p}")).unwrap_or_else(|| "pid unknown".into());
                anyhow::bail!(
                    "the database {} is in use by another hearth server ({pid}, lock file {}): stop that server \
                     first, or give this one its own `database.path`",
                    database.display(),
                    path.display()
                );
            }
            // A server that stopped just now removed the file we locked: lock the one at the path instead.
            if std::fs::metadata(&path).is_ok_and(|m| m.ino() == file.metadata().map(|f| f.ino()).unwrap_or(0)) {
                break file;
            }
        };
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(DbLock { _file: file, path })
    }
}

impl Drop for DbLock {
    fn drop(&mut self) {
        // Still holding the lock: nobody else can be using the file.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid of the server holding the database's lock, if one runs.
pub fn holder(database: &Path) -> Option<u32> {
    let mut file = File::open(lock_path(database)).ok()?;
    if try_flock(&file, libc::LOCK_SH) {
        // Nobody holds it (a file left by a killed server); our shared lock goes with `file`.
        return None;
    }
    Some(read_pid(&mut file).unwrap_or(0))
}

fn try_flock(file: &File, kind: libc::c_int) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own; LOCK_NB makes it return at once.
    unsafe { libc::flock(file.as_raw_fd(), kind | libc::LOCK_NB) == 0 }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("h.db");
        assert_eq!(holder(&db), None);
        let lock = DbLock::acquire(&db).unwrap();
        assert_eq!(holder(&db), Some(std::process::id()));
        let err = DbLock::acquire(&db).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("h.db.lock"), "{err}");
        drop(lock);
        assert!(!lock_path(&db).exists(), "the lock file goes with the lock");
        assert_eq!(holder(&db), None);
        // A file left behind by a killed server does not block.
        std::fs::write(lock_path(&db), "12345\n").unwrap();
        assert_eq!(holder(&db), None);
        let _again = DbLock::acquire(&db).unwrap();
    }
}
