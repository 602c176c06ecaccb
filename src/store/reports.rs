//! Content reports (`reports`): what users reported to the server's operators (an event, a room or a user), listed
//! by `hearth report list`; and OpenID tokens (`openid_tokens`), which let another server learn who a user is.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::Db;

/// What a report is about.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Event { room_id: String, event_id: String },
    Room { room_id: String },
    User { user_id: String },
}

/// One stored report.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportRow {
    pub report_id: i64,
    pub received_ts: i64,
    pub reporter: String,
    pub target: Target,
    pub reason: Option<String>,
    pub score: Option<i64>,
}

/// Stores a report; returns its id.
pub fn add(
    conn: Db<'_>,
    reporter: &str,
    target: &Target,
    reason: Option<&str>,
    score: Option<i64>,
    now: i64,
) -> Result<i64> {
    let (kind, room, event, user) = match target {
        Target::Event { room_id, event_id } => ("event", Some(room_id), Some(event_id), None),
        Target::Room { room_id } => ("room", Some(room_id), None, None),
        Target::User { user_id } => ("user", None, None, Some(user_id)),
    };
    conn.execute(
        "INSERT INTO reports (received_ts, reporter, kind, room_id, event_id, target_user, reason, score)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![now, reporter, kind, room, event, user, reason, score],
    )?;
    Ok(conn.last_insert_rowid())
}

/// The newest `limit` reports, newest first.
pub fn list(conn: Db<'_>, limit: i64) -> Result<Vec<ReportRow>> {
    let mut stmt = conn.prepare(
        "SELECT report_id, received_ts, reporter, kind, room_id, event_id, target_user, reason, score FROM reports
         ORDER BY report_id DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit], |r| {
        let kind: String = r.get(3)?;
        let room_id: Option<String> = r.get(4)?;
        let target = match kind.as_str() {
            "event" => Target::Event {
                room_id: room_id.unwrap_or_default(),
                event_id: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
            },
            "room" => Target::Room { room_id: room_id.unwrap_or_default() },
            _ => Target::User { user_id: r.get::<_, Option<String>>(6)?.unwrap_or_default() },
        };
        Ok(ReportRow {
            report_id: r.get(0)?,
            received_ts: r.get(1)?,
            reporter: r.get(2)?,
            target,
            reason: r.get(7)?,
            score: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Stores an OpenID token for `user_id`, valid until `expires_ts`; tokens expired at `now` are dropped on the way.
pub fn add_openid_token(conn: Db<'_>, token: &str, user_id: &str, expires_ts: i64, now: i64) -> Result<()> {
    conn.execute("DELETE FROM openid_tokens WHERE expires_ts <= ?1", [now])?;
    conn.execute(
        "INSERT INTO openid_tokens (token, user_id, expires_ts) VALUES (?1, ?2, ?3)",
        params![token, user_id, expires_ts],
    )?;
    Ok(())
}

/// The user an OpenID token names, if it exists and has not expired at `now`.
pub fn openid_user(conn: Db<'_>, token: &str, now: i64) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT user_id FROM openid_tokens WHERE token = ?1 AND expires_ts > ?2")?
        .query_row(params![token, now], |r| r.get(0))
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    #[test]
    fn reports_are_stored_and_listed_newest_first() {
        let conn = memory_db();
        let db = conn.db();
        let ev = Target::Event { room_id: "!r:x".into(), event_id: "$e".into() };
        add(db, "@a:x", &ev, Some("spam"), Some(-100), 10).unwrap();
        add(db, "@b:x", &Target::Room { room_id: "!r:x".into() }, Some(""), None, 11).unwrap();
        add(db, "@c:x", &Target::User { user_id: "@d:y".into() }, None, None, 12).unwrap();
        let all = list(db, 10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].target, Target::User { user_id: "@d:y".into() });
        assert_eq!(all[0].reason, None);
        assert_eq!(all[1].target, Target::Room { room_id: "!r:x".into() });
        assert_eq!((all[2].reporter.as_str(), &all[2].target, all[2].score), ("@a:x", &ev, Some(-100)));
        assert_eq!(list(db, 1).unwrap().len(), 1);
    }

    #[test]
    fn openid_tokens_expire() {
        let conn = memory_db();
        let db = conn.db();
        add_openid_token(db, "t1", "@a:x", 100, 0).unwrap();
        assert_eq!(openid_user(db, "t1", 99).unwrap().as_deref(), Some("@a:x"));
        assert_eq!(openid_user(db, "t1", 100).unwrap(), None);
        assert_eq!(openid_user(db, "nope", 0).unwrap(), None);
        add_openid_token(db, "t2", "@b:x", 300, 200).unwrap();
        assert_eq!(openid_user(db, "t1", 0).unwrap(), None, "expired tokens are dropped");
    }
}
