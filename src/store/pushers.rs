//! Pushers (`/pushers`), the per-pusher notification outbox and the push evaluator's stream cursor.

use rusqlite::{params, OptionalExtension, Row};

use crate::error::Result;
use crate::store::ids::StreamPos;
use crate::store::Db;

/// One pusher as stored (`data` is its JSON object as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pusher {
    pub pusher_nid: i64,
    pub user_id: String,
    pub device_id: Option<String>,
    pub kind: String,
    pub app_id: String,
    pub pushkey: String,
    pub app_display_name: String,
    pub device_display_name: String,
    pub profile_tag: Option<String>,
    pub lang: String,
    pub data: String,
    pub pushkey_ts: i64,
}

const COLUMNS: &str = "pusher_nid, user_id, device_id, kind, app_id, pushkey, app_display_name, device_display_name,
     profile_tag, lang, data, pushkey_ts";

fn pusher(r: &Row<'_>) -> rusqlite::Result<Pusher> {
    Ok(Pusher {
        pusher_nid: r.get(0)?,
        user_id: r.get(1)?,
        device_id: r.get(2)?,
        kind: r.get(3)?,
        app_id: r.get(4)?,
        pushkey: r.get(5)?,
        app_display_name: r.get(6)?,
        device_display_name: r.get(7)?,
        profile_tag: r.get(8)?,
        lang: r.get(9)?,
        data: r.get(10)?,
        pushkey_ts: r.get(11)?,
    })
}

/// The user's pushers, oldest first.
pub fn list(conn: Db<'_>, user_id: &str) -> Result<Vec<Pusher>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM pushers WHERE user_id = ?1 ORDER BY pusher_nid"))?;
    let rows = stmt.query_map([user_id], pusher)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn get(conn: Db<'_>, pusher_nid: i64) -> Result<Option<Pusher>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM pushers WHERE pusher_nid = ?1"))?;
    Ok(stmt.query_row([pusher_nid], pusher).optional()?)
}

/// Adds or replaces the user's pusher with `(app_id, pushkey)`. Without `append`, pushers of OTHER users with the
/// same `(app_id, pushkey)` are removed (the spec's default: a push key belongs to one account at a time). A
/// replaced pusher keeps its queued notifications.
pub fn set(conn: Db<'_>, p: &Pusher, append: bool) -> Result<()> {
    if !append {
        conn.prepare_cached("DELETE FROM pushers WHERE app_id = ?1 AND pushkey = ?2 AND user_id != ?3")?
            .execute(params![p.app_id, p.pushkey, p.user_id])?;
    }
    conn.prepare_cached(
        "INSERT INTO pushers (user_id, device_id, kind, app_id, pushkey, app_display_name, device_display_name,
             profile_tag, lang, data, pushkey_ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (user_id, app_id, pushkey) DO UPDATE SET device_id = excluded.device_id, kind = excluded.kind,
             app_display_name = excluded.app_display_name, device_display_name = excluded.device_display_name,
             profile_tag = excluded.profile_tag, lang = excluded.lang, data = excluded.data,
             pushkey_ts = excluded.pushkey_ts, failures = 0, retry_at = 0",
    )?
    .execute(params![
        p.user_id,
        p.device_id,
        p.kind,
        p.app_id,
        p.pushkey,
        p.app_display_name,
        p.device_display_name,
        p.profile_tag,
        p.lang,
        p.data,
        p.pushkey_ts
    ])?;
    Ok(())
}

/// Deletes the user's pusher `(app_id, pushkey)` (with its queue); true when there was one.
pub fn delete(conn: Db<'_>, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("DELETE FROM pushers WHERE user_id = ?1 AND app_id = ?2 AND pushkey = ?3")?
        .execute(params![user_id, app_id, pushkey])?
        > 0)
}

pub fn delete_by_nid(conn: Db<'_>, pusher_nid: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM pushers WHERE pusher_nid = ?1")?.execute([pusher_nid])?;
    Ok(())
}

/// Deletes the pushers a device's tokens set (logout, device deletion, deactivation).
pub fn delete_for_device(conn: Db<'_>, user_id: &str, device_id: &str) -> Result<usize> {
    Ok(conn
        .prepare_cached("DELETE FROM pushers WHERE user_id = ?1 AND device_id = ?2")?
        .execute(params![user_id, device_id])?)
}

/// Deletes every pusher of the user except those set from `keep_device` (a password change).
pub fn delete_except_device(conn: Db<'_>, user_id: &str, keep_device: &str) -> Result<usize> {
    Ok(conn
        .prepare_cached("DELETE FROM pushers WHERE user_id = ?1 AND device_id IS NOT ?2")?
        .execute(params![user_id, keep_device])?)
}

pub fn delete_all(conn: Db<'_>, user_id: &str) -> Result<usize> {
    Ok(conn.prepare_cached("DELETE FROM pushers WHERE user_id = ?1")?.execute([user_id])?)
}

/// The local users (accounts here, not deactivated) joined to the room; `ours` is this server's name. Read through
/// the room's members of our server (`room_members_server`), not all its members: in a 100k-member room the
/// join over every member was 5 ms per event, a quarter of the resident's CPU while a joiner sent to it.
pub fn local_members(conn: Db<'_>, room_nid: crate::store::ids::RoomNid, ours: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.user_id FROM room_members m JOIN users u ON u.user_id = m.user_id
         WHERE m.room_nid = ?1 AND m.server_name = ?2 AND m.membership = 'join' AND u.deactivated = 0
         ORDER BY m.user_id",
    )?;
    let rows = stmt.query_map(rusqlite::params![room_nid, ours], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---- notifications (`GET /notifications`) ----------------------------------------------------------------------

/// An event the user's push rules said to notify about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub stream: StreamPos,
    pub event_id: String,
    pub room_nid: crate::store::ids::RoomNid,
    pub highlight: bool,
    /// The rule's actions, JSON text.
    pub actions: String,
    pub ts: i64,
}

/// Notifications kept per user (`GET /notifications` pages through these): the oldest go as new ones come, so the
/// table stays bounded on a small machine however long the server runs.
pub const NOTIFICATIONS_KEPT_PER_USER: i64 = 1000;

/// Records a notification of `user_id`, dropping their oldest beyond [`NOTIFICATIONS_KEPT_PER_USER`].
pub fn record_notification(conn: Db<'_>, user_id: &str, n: &Notification) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO notifications (user_id, stream, event_id, room_nid, highlight, actions, ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![user_id, n.stream, n.event_id, n.room_nid, n.highlight, n.actions, n.ts])?;
    conn.prepare_cached(
        "DELETE FROM notifications WHERE user_id = ?1 AND stream <= (SELECT stream FROM notifications
         WHERE user_id = ?1 ORDER BY stream DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![user_id, NOTIFICATIONS_KEPT_PER_USER])?;
    Ok(())
}

/// The user's notifications before stream position `before`, newest first (highlights only with `only_highlight`).
pub fn notifications(
    conn: Db<'_>,
    user_id: &str,
    before: StreamPos,
    only_highlight: bool,
    limit: i64,
) -> Result<Vec<Notification>> {
    let mut stmt = conn.prepare_cached(
        "SELECT stream, event_id, room_nid, highlight, actions, ts FROM notifications
         WHERE user_id = ?1 AND stream < ?2 AND (?3 = 0 OR highlight = 1) ORDER BY stream DESC LIMIT ?4",
    )?;
    let rows = stmt.query_map(params![user_id, before, only_highlight, limit], |r| {
        Ok(Notification {
            stream: r.get(0)?,
            event_id: r.get(1)?,
            room_nid: r.get(2)?,
            highlight: r.get(3)?,
            actions: r.get(4)?,
            ts: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---- the evaluator's cursor ------------------------------------------------------------------------------------

pub fn cursor(conn: Db<'_>) -> Result<StreamPos> {
    let pos: Option<i64> =
        conn.prepare_cached("SELECT stream FROM push_cursor WHERE id = 0")?.query_row([], |r| r.get(0)).optional()?;
    Ok(StreamPos(pos.unwrap_or(0)))
}

pub fn set_cursor(conn: Db<'_>, pos: StreamPos) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO push_cursor (id, stream) VALUES (0, ?1) ON CONFLICT (id) DO UPDATE SET stream = ?1",
    )?
    .execute([pos.0])?;
    Ok(())
}

/// A new timeline event after the cursor (not rejected, not soft-failed; backfilled history is numbered below 0
/// and never reaches here), or an out-of-band membership event (an outlier given a stream position: an invite
/// over federation to a room we hold no state for).
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub stream: StreamPos,
    pub event_id: String,
    pub room_nid: crate::store::ids::RoomNid,
    pub sender: String,
    pub json: String,
    pub outlier: bool,
}

/// Up to `limit` events after `after`, in stream order (those never pushed with an empty sender and JSON: rejected
/// and soft-failed events, outliers other than membership events).
pub fn events_after(conn: Db<'_>, after: StreamPos, limit: i64) -> Result<Vec<NewEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT stream_ordering, room_nid, sender, json, outlier, rejected IS NOT NULL OR soft_failed != 0, event_id,
             event_type
         FROM events WHERE stream_ordering > ?1 ORDER BY stream_ordering LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit], |r| {
        let outlier = r.get::<_, bool>(4)?;
        let skip = (outlier && r.get::<_, String>(7)? != "m.room.member") || r.get::<_, bool>(5)?;
        let e = NewEvent {
            stream: r.get(0)?,
            event_id: r.get(6)?,
            room_nid: r.get(1)?,
            sender: r.get(2)?,
            json: r.get(3)?,
            outlier,
        };
        Ok((e, skip))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (e, skip) = r?;
        // A skipped event still moves the cursor: it is returned with an empty sender and body.
        out.push(if skip { NewEvent { sender: String::new(), json: String::new(), ..e } } else { e });
    }
    Ok(out)
}

/// Whether events up to `upto` wait for the evaluator (those after its cursor): the counts in a `/sync` answer
/// going up to `upto` are complete once this is false.
pub fn unevaluated_up_to(conn: Db<'_>, upto: StreamPos) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM events WHERE stream_ordering > (SELECT stream FROM push_cursor WHERE id = 0)
             AND stream_ordering <= ?1)",
        )?
        .query_row([upto], |r| r.get(0))?)
}

// ---- the outbox ------------------------------------------------------------------------------------------------

/// One queued notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: i64,
    pub event_id: String,
    pub highlight: bool,
    pub sound: Option<String>,
}

/// Queues a notification for every pusher of `user_id`, dropping the oldest beyond `cap` per pusher.
pub fn enqueue(
    conn: Db<'_>,
    user_id: &str,
    event_id: &str,
    highlight: bool,
    sound: Option<&str>,
    cap: i64,
) -> Result<()> {
    let mut stmt = conn.prepare_cached("SELECT pusher_nid FROM pushers WHERE user_id = ?1")?;
    let nids: Vec<i64> = stmt.query_map([user_id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    let mut ins = conn
        .prepare_cached("INSERT INTO push_outbox (pusher_nid, event_id, highlight, sound) VALUES (?1, ?2, ?3, ?4)")?;
    let mut trim = conn.prepare_cached(
        "DELETE FROM push_outbox WHERE pusher_nid = ?1 AND id NOT IN
             (SELECT id FROM push_outbox WHERE pusher_nid = ?1 ORDER BY id DESC LIMIT ?2)",
    )?;
    for nid in nids {
        ins.execute(params![nid, event_id, highlight, sound])?;
        trim.execute(params![nid, cap.max(1)])?;
    }
    Ok(())
}

/// Pushers with something queued whose backoff has passed.
pub fn due(conn: Db<'_>, now: i64) -> Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.pusher_nid FROM pushers p WHERE p.retry_at <= ?1
           AND EXISTS (SELECT 1 FROM push_outbox o WHERE o.pusher_nid = p.pusher_nid)",
    )?;
    let rows = stmt.query_map([now], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The oldest queued notification of a pusher.
pub fn next_queued(conn: Db<'_>, pusher_nid: i64) -> Result<Option<Queued>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, event_id, highlight, sound FROM push_outbox WHERE pusher_nid = ?1 ORDER BY id LIMIT 1",
    )?;
    Ok(stmt
        .query_row([pusher_nid], |r| {
            Ok(Queued { id: r.get(0)?, event_id: r.get(1)?, highlight: r.get(2)?, sound: r.get(3)? })
        })
        .optional()?)
}

/// A notification was delivered (or can never be): off the queue, and the pusher's backoff reset.
pub fn delivered(conn: Db<'_>, pusher_nid: i64, id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM push_outbox WHERE id = ?1")?.execute([id])?;
    conn.prepare_cached("UPDATE pushers SET failures = 0, retry_at = 0 WHERE pusher_nid = ?1")?
        .execute([pusher_nid])?;
    Ok(())
}

/// A delivery failed: the pusher waits `base_ms * 2^failures` (at most an hour) before the next attempt.
pub fn failed(conn: Db<'_>, pusher_nid: i64, now: i64, base_ms: i64) -> Result<i64> {
    let failures: i64 = conn
        .prepare_cached("UPDATE pushers SET failures = failures + 1 WHERE pusher_nid = ?1 RETURNING failures")?
        .query_row([pusher_nid], |r| r.get(0))
        .optional()?
        .unwrap_or(1);
    let wait = base_ms.saturating_mul(1i64 << (failures - 1).clamp(0, 30)).min(3_600_000);
    conn.prepare_cached("UPDATE pushers SET retry_at = ?2 WHERE pusher_nid = ?1")?
        .execute(params![pusher_nid, now + wait])?;
    Ok(wait)
}

pub fn queued_count(conn: Db<'_>, pusher_nid: i64) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT count(*) FROM push_outbox WHERE pusher_nid = ?1")?
        .query_row([pusher_nid], |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    fn p(user: &str, device: &str, key: &str) -> Pusher {
        Pusher {
            pusher_nid: 0,
            user_id: user.into(),
            device_id: Some(device.into()),
            kind: "http".into(),
            app_id: "app".into(),
            pushkey: key.into(),
            app_display_name: "App".into(),
            device_display_name: "Phone".into(),
            profile_tag: None,
            lang: "en".into(),
            data: r#"{"url":"https://gw/_matrix/push/v1/notify"}"#.into(),
            pushkey_ts: 1,
        }
    }

    #[test]
    fn notifications_are_bounded_per_user() {
        let db = memory_db();
        let c = db.db();
        let n = |stream: i64| Notification {
            stream: StreamPos(stream),
            event_id: format!("$e{stream}"),
            room_nid: crate::store::ids::RoomNid(1),
            highlight: stream % 2 == 0,
            actions: "[]".into(),
            ts: stream,
        };
        let total = NOTIFICATIONS_KEPT_PER_USER + 5;
        for stream in 1..=total {
            record_notification(c, "@a:hs", &n(stream)).unwrap();
        }
        record_notification(c, "@b:hs", &n(1)).unwrap();
        let kept = notifications(c, "@a:hs", StreamPos(i64::MAX), false, 10_000).unwrap();
        assert_eq!(kept.len() as i64, NOTIFICATIONS_KEPT_PER_USER);
        assert_eq!((kept[0].stream.0, kept.last().unwrap().stream.0), (total, 6), "the newest are kept");
        assert_eq!(notifications(c, "@b:hs", StreamPos(i64::MAX), false, 10).unwrap().len(), 1, "per user");
    }

    #[test]
    fn set_replace_append_and_delete() {
        let db = memory_db();
        let c = db.db();
        set(c, &p("@a:hs", "D1", "k1"), false).unwrap();
        set(c, &p("@a:hs", "D1", "k1"), false).unwrap();
        assert_eq!(list(c, "@a:hs").unwrap().len(), 1, "same app and key replace");
        set(c, &p("@b:hs", "D2", "k1"), true).unwrap();
        assert_eq!(list(c, "@a:hs").unwrap().len(), 1, "append keeps the other user's");
        set(c, &p("@c:hs", "D3", "k1"), false).unwrap();
        assert!(list(c, "@a:hs").unwrap().is_empty() && list(c, "@b:hs").unwrap().is_empty());
        set(c, &p("@c:hs", "D4", "k2"), false).unwrap();
        assert_eq!(delete_except_device(c, "@c:hs", "D4").unwrap(), 1);
        assert_eq!(list(c, "@c:hs").unwrap()[0].pushkey, "k2");
        assert!(delete(c, "@c:hs", "app", "k2").unwrap());
        assert!(!delete(c, "@c:hs", "app", "k2").unwrap());
    }

    #[test]
    fn outbox_cap_backoff_and_delivery() {
        let db = memory_db();
        let c = db.db();
        set(c, &p("@a:hs", "D1", "k1"), false).unwrap();
        let nid = list(c, "@a:hs").unwrap()[0].pusher_nid;
        for i in 0..5 {
            enqueue(c, "@a:hs", &format!("$e{i}"), i == 4, None, 3).unwrap();
        }
        assert_eq!(queued_count(c, nid).unwrap(), 3);
        let first = next_queued(c, nid).unwrap().unwrap();
        assert_eq!(first.event_id, "$e2", "the oldest beyond the cap are dropped");
        assert_eq!(due(c, 0).unwrap(), vec![nid]);
        assert_eq!(failed(c, nid, 1000, 500).unwrap(), 500);
        assert_eq!(failed(c, nid, 1000, 500).unwrap(), 1000);
        assert!(due(c, 1999).unwrap().is_empty());
        assert_eq!(due(c, 2000).unwrap(), vec![nid]);
        delivered(c, nid, first.id).unwrap();
        assert_eq!(due(c, 0).unwrap(), vec![nid], "backoff reset");
        assert_eq!(next_queued(c, nid).unwrap().unwrap().event_id, "$e3");
        delete_for_device(c, "@a:hs", "D1").unwrap();
        assert!(due(c, 0).unwrap().is_empty(), "the queue goes with the pusher");
    }

    #[test]
    fn notifications_newest_first_and_highlights() {
        let db = memory_db();
        let c = db.db();
        for i in 1..=4 {
            let n = Notification {
                stream: StreamPos(i),
                event_id: format!("$e{i}"),
                room_nid: crate::store::ids::RoomNid(1),
                highlight: i == 2,
                actions: "[\"notify\"]".into(),
                ts: i,
            };
            record_notification(c, "@a:hs", &n).unwrap();
        }
        let ids = |v: Vec<Notification>| v.into_iter().map(|n| n.event_id).collect::<Vec<_>>();
        assert_eq!(ids(notifications(c, "@a:hs", StreamPos(i64::MAX), false, 2).unwrap()), ["$e4", "$e3"]);
        assert_eq!(ids(notifications(c, "@a:hs", StreamPos(3), false, 10).unwrap()), ["$e2", "$e1"]);
        assert_eq!(ids(notifications(c, "@a:hs", StreamPos(i64::MAX), true, 10).unwrap()), ["$e2"]);
        assert!(notifications(c, "@b:hs", StreamPos(i64::MAX), false, 10).unwrap().is_empty());
    }
}
