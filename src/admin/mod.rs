//! The operator's commands (`hearth user|room|media|token|report ...`): they work on the database a server uses, while it
//! runs or not. Each change is a short transaction of its own on a connection of the command's own (SQLite WAL:
//! a running server's readers never wait; its writer waits at most one short transaction). They never create or
//! migrate a database, and never allocate stream positions (those belong to the server's writer): what needs the
//! room core (a deactivated user leaving their rooms) is queued as a job that the server's worker runs within a
//! second, or at its next start.
//!
//! `main.rs` only parses the command line and prints; the logic is here and in the store.

pub mod job;
pub mod reports;
pub mod rooms;
pub mod users;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::store::DirectDb;

/// An open database for the commands, with the server name it was created with.
pub struct Admin {
    pub db: DirectDb,
    pub path: PathBuf,
    pub server_name: String,
    pub config: Config,
}

impl Admin {
    /// Opens the configured database (it must exist). The server name is the database's own; a configured one
    /// that differs is an error (the configuration points at another server's database). `source` names the
    /// configuration file, for messages.
    pub fn open(config: &Config, source: &str) -> anyhow::Result<Admin> {
        let path = config.database.path.clone();
        let db = DirectDb::open_existing(&path, &format!("database.path in {source}"))?;
        let stored = crate::store::maintenance::server_name(db.db())?
            .ok_or_else(|| anyhow::anyhow!("the database {} records no server name", path.display()))?;
        anyhow::ensure!(
            config.server_name.is_empty() || config.server_name == stored,
            "the database {} belongs to server `{stored}`, but the configuration says server_name `{}`",
            path.display(),
            config.server_name
        );
        Ok(Admin { db, path, server_name: stored, config: config.clone() })
    }

    /// An application service's waiting transactions and failed attempts in a row (None: never started).
    pub fn appservice_queue(&self, id: &str) -> anyhow::Result<Option<(i64, i64)>> {
        use crate::store::appservice;
        let Some(state) = appservice::state(self.db.db(), id)? else { return Ok(None) };
        Ok(Some((appservice::queued_count(self.db.db(), id)?, state.failures)))
    }

    /// The pid of the server running on this database, if one runs.
    pub fn running_server(&self) -> Option<u32> {
        crate::store::lock::holder(&self.path)
    }

    /// A full local user id from `alice`, `@alice` or `@alice:our.server`; names of other servers are refused.
    pub fn user_id(&self, name: &str) -> anyhow::Result<String> {
        let bare = name.strip_prefix('@').unwrap_or(name);
        let local = match bare.split_once(':') {
            Some((local, server)) if server == self.server_name => local,
            Some((_, server)) => anyhow::bail!(
                "{name} is a user of `{server}`, not of this server (`{}`): only local users can be managed here",
                self.server_name
            ),
            None => bare,
        }
        .to_lowercase();
        crate::client::account::validate_localpart(&local, &self.server_name)
            .map_err(|e| anyhow::anyhow!("invalid user name `{name}`: {e}"))?;
        Ok(format!("@{local}:{}", self.server_name))
    }
}

/// Where a command's configuration came from and what it says, for [`Admin::open`]'s messages.
pub fn source_of(file: Option<&Path>) -> String {
    crate::config::source_name(file)
}

/// Parses `30d`, `12h`, `45m`, `90s` or `2w` (a number and one unit).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| anyhow::anyhow!("`{s}` is not a duration like 30d, 12h, 45m or 90s"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => anyhow::bail!("`{s}` is not a duration like 30d, 12h, 45m or 90s (units: s, m, h, d, w)"),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// A timestamp (ms) as `YYYY-MM-DD HH:MM UTC`.
pub fn format_ts(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86_400));
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert_eq!(parse_duration("2w").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        for bad in ["", "d", "30", "30x", "-1d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_ts(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_ts(1_796_515_200_000 + 3_600_000 * 15 + 60_000 * 7), "2026-12-06 15:07 UTC");
        assert_eq!(format_ts(951_782_400_000), "2000-02-29 00:00 UTC");
    }
}
