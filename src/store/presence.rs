//! Presence (`presence`): one row per user, local or remote (no row = offline, never seen). A change that clients
//! should hear about takes a position of the global stream; activity timestamps alone are stored without one.
//! Who sees whose presence: users sharing a joined room (and each user their own).

use rusqlite::{params, OptionalExtension, Row};

use crate::error::Result;
use crate::store::ids::StreamPos;
use crate::store::{Db, Writer};

/// A user's stored presence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceRow {
    pub user_id: String,
    /// `online`, `unavailable` or `offline`.
    pub state: String,
    pub status_msg: Option<String>,
    /// Milliseconds since the epoch; 0 = never.
    pub last_active_ts: i64,
    pub last_sync_ts: i64,
    /// Local users: when their presence last went to other servers; remote users: when we last heard of it.
    pub last_federation_ts: i64,
    pub currently_active: bool,
    pub stream: StreamPos,
}

impl PresenceRow {
    /// The state of a user never seen.
    pub fn offline(user_id: &str) -> PresenceRow {
        PresenceRow {
            user_id: user_id.to_owned(),
            state: "offline".into(),
            status_msg: None,
            last_active_ts: 0,
            last_sync_ts: 0,
            last_federation_ts: 0,
            currently_active: false,
            stream: StreamPos(0),
        }
    }
}

const COLUMNS: &str = "p.user_id, p.state, p.status_msg, p.last_active_ts, p.last_sync_ts, p.last_federation_ts, \
                       p.currently_active, p.stream_ordering";

fn row(r: &Row<'_>) -> rusqlite::Result<PresenceRow> {
    Ok(PresenceRow {
        user_id: r.get(0)?,
        state: r.get(1)?,
        status_msg: r.get(2)?,
        last_active_ts: r.get(3)?,
        last_sync_ts: r.get(4)?,
        last_federation_ts: r.get(5)?,
        currently_active: r.get(6)?,
        stream: StreamPos(r.get(7)?),
    })
}

fn rows(conn: Db<'_>, sql: &str, p: impl rusqlite::Params) -> Result<Vec<PresenceRow>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let out = stmt.query_map(p, row)?.collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

pub fn get(conn: Db<'_>, user_id: &str) -> Result<Option<PresenceRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM presence p WHERE p.user_id = ?1"))?
        .query_row([user_id], row)
        .optional()?)
}

/// Stores `p`. With `notify` it takes a new stream position (returned), so the next `/sync` of everyone who may
/// see it carries it; without, it keeps its position (timestamps that no client needs to hear about).
pub fn put(w: &mut Writer<'_>, p: &PresenceRow, notify: bool) -> Result<StreamPos> {
    let pos = if notify {
        StreamPos(w.next_stream())
    } else {
        get(w.db(), &p.user_id)?.map(|old| old.stream).unwrap_or(p.stream)
    };
    w.db()
        .prepare_cached(
            "INSERT INTO presence (user_id, state, status_msg, last_active_ts, last_sync_ts, last_federation_ts,
                                   currently_active, stream_ordering) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (user_id) DO UPDATE SET state = ?2, status_msg = ?3, last_active_ts = ?4,
             last_sync_ts = ?5, last_federation_ts = ?6, currently_active = ?7, stream_ordering = ?8",
        )?
        .execute(params![
            p.user_id,
            p.state,
            p.status_msg,
            p.last_active_ts,
            p.last_sync_ts,
            p.last_federation_ts,
            p.currently_active,
            pos
        ])?;
    Ok(pos)
}

/// Every row not offline (what the timeout pass looks at).
pub fn not_offline(conn: Db<'_>) -> Result<Vec<PresenceRow>> {
    rows(conn, &format!("SELECT {COLUMNS} FROM presence p WHERE p.state != 'offline'"), [])
}

/// Forgets offline remote users last heard of before `before` (offline is what a missing row says anyway): keeps
/// the table bounded by the users who were around lately. Returns how many rows went.
pub fn prune_remote_offline(conn: Db<'_>, our_server: &str, before: i64) -> Result<usize> {
    // The user id's server is what follows the first ':'.
    Ok(conn
        .prepare_cached(
            "DELETE FROM presence WHERE state = 'offline' AND last_federation_ts < ?2
             AND substr(user_id, instr(user_id, ':') + 1) != ?1",
        )?
        .execute(params![our_server, before])?)
}

/// The visibility rule: `user_id` itself, or someone sharing a joined room with it (`?1` is the viewer).
const VISIBLE: &str = "(p.user_id = ?1 OR EXISTS (
    SELECT 1 FROM room_members o JOIN room_members me ON me.room_nid = o.room_nid
    WHERE o.user_id = p.user_id AND o.membership = 'join' AND me.user_id = ?1 AND me.membership = 'join'))";

/// Whether `viewer` may see `user_id`'s presence (themselves, or a joined room in common).
pub fn visible_to(conn: Db<'_>, viewer: &str, user_id: &str) -> Result<bool> {
    if viewer == user_id {
        return Ok(true);
    }
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM room_members o JOIN room_members me ON me.room_nid = o.room_nid
             WHERE o.user_id = ?2 AND o.membership = 'join' AND me.user_id = ?1 AND me.membership = 'join' LIMIT 1",
        )?
        .exists(params![viewer, user_id])?)
}

/// What an initial sync shows: the presence of everyone `viewer` may see who is not offline.
pub fn visible_not_offline(conn: Db<'_>, viewer: &str) -> Result<Vec<PresenceRow>> {
    rows(conn, &format!("SELECT {COLUMNS} FROM presence p WHERE p.state != 'offline' AND {VISIBLE}"), [viewer])
}

/// Presence changes in the window (`after`, `upto`] that `viewer` may see.
pub fn visible_changes(conn: Db<'_>, viewer: &str, after: StreamPos, upto: StreamPos) -> Result<Vec<PresenceRow>> {
    rows(
        conn,
        &format!(
            "SELECT {COLUMNS} FROM presence p WHERE p.stream_ordering > ?2 AND p.stream_ordering <= ?3 AND {VISIBLE}"
        ),
        params![viewer, after, upto],
    )
}

/// The presence of users new to `viewer` in the window (`after`, `upto`]: those who joined one of its rooms, and the
/// members of rooms it joined. Only users with a stored presence (the rest are offline, which clients assume).
pub fn of_new_members(conn: Db<'_>, viewer: &str, after: StreamPos, upto: StreamPos) -> Result<Vec<PresenceRow>> {
    rows(
        conn,
        &format!(
            "SELECT {COLUMNS} FROM presence p WHERE p.user_id != ?1 AND p.user_id IN (
                 SELECT k.state_key FROM events e
                 JOIN state_keys k ON k.state_key_nid = e.state_key_nid
                 JOIN room_members me ON me.room_nid = e.room_nid AND me.user_id = ?1 AND me.membership = 'join'
                 JOIN room_members j ON j.room_nid = e.room_nid AND j.user_id = k.state_key AND j.membership = 'join'
                 WHERE e.event_type = 'm.room.member' AND e.stream_ordering > ?2 AND e.stream_ordering <= ?3
                 UNION
                 SELECT m.user_id FROM local_membership_stream s
                 JOIN room_members m ON m.room_nid = s.room_nid AND m.membership = 'join'
                 WHERE s.user_id = ?1 AND s.membership = 'join' AND s.stream_ordering > ?2 AND s.stream_ordering <= ?3)"
        ),
        params![viewer, after, upto],
    )
}

/// Other servers with a member joined to a room `user_id` is joined to (where its presence goes), sorted.
pub fn servers_sharing_rooms(conn: Db<'_>, user_id: &str, our_server: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT o.server_name FROM room_members me
         JOIN room_members o ON o.room_nid = me.room_nid AND o.membership = 'join'
         WHERE me.user_id = ?1 AND me.membership = 'join' AND o.server_name != ?2 ORDER BY 1",
    )?;
    let out = stmt.query_map(params![user_id, our_server], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Whether remote `user_id` is joined to a room one of our users is joined to (else its presence concerns no one).
pub fn shares_room_with_local(conn: Db<'_>, user_id: &str, our_server: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM room_members o JOIN room_members me ON me.room_nid = o.room_nid
             WHERE o.user_id = ?1 AND o.membership = 'join' AND me.server_name = ?2 AND me.membership = 'join'
             LIMIT 1",
        )?
        .exists(params![user_id, our_server])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ids::EventNid;
    use crate::store::members::{upsert_member, MemberUpdate};
    use crate::store::testing::{memory_db, room, write};

    fn join(conn: Db<'_>, room_nid: crate::store::ids::RoomNid, user: &str) {
        let m = MemberUpdate {
            room_nid,
            user_id: user,
            membership: "join",
            event_nid: EventNid(1),
            displayname: None,
            avatar_url: None,
        };
        upsert_member(conn, &m).unwrap();
    }

    fn online(user: &str) -> PresenceRow {
        PresenceRow { state: "online".into(), last_active_ts: 5, ..PresenceRow::offline(user) }
    }

    #[test]
    fn notifying_writes_move_the_row_in_the_stream_and_quiet_ones_keep_it() {
        let mut conn = memory_db();
        let mut stream = 0;
        let p1 = write(&mut conn, &mut stream, |w| put(w, &online("@a:x"), true)).unwrap();
        let quiet = PresenceRow { last_active_ts: 9, ..online("@a:x") };
        let p2 = write(&mut conn, &mut stream, |w| put(w, &quiet, false)).unwrap();
        assert_eq!(p1, p2, "a quiet write keeps the stream position");
        let got = get(conn.db(), "@a:x").unwrap().unwrap();
        assert_eq!((got.last_active_ts, got.stream), (9, p1));
        let p3 = write(&mut conn, &mut stream, |w| put(w, &quiet, true)).unwrap();
        assert!(p3 > p1);
        assert_eq!(not_offline(conn.db()).unwrap().len(), 1);
    }

    #[test]
    fn visibility_follows_shared_joined_rooms() {
        let mut conn = memory_db();
        let r = room(conn.db(), "!r:x");
        join(conn.db(), r, "@a:x");
        join(conn.db(), r, "@b:y");
        let mut stream = 0;
        for u in ["@a:x", "@b:y", "@stranger:z"] {
            write(&mut conn, &mut stream, |w| put(w, &online(u), true)).unwrap();
        }
        let seen = |v: Vec<PresenceRow>| v.into_iter().map(|p| p.user_id).collect::<Vec<_>>();
        let mut all = seen(visible_not_offline(conn.db(), "@a:x").unwrap());
        all.sort();
        assert_eq!(all, ["@a:x", "@b:y"]);
        assert!(visible_to(conn.db(), "@a:x", "@b:y").unwrap());
        assert!(!visible_to(conn.db(), "@a:x", "@stranger:z").unwrap());
        assert_eq!(seen(visible_changes(conn.db(), "@a:x", StreamPos(1), StreamPos(stream)).unwrap()), ["@b:y"]);
        assert_eq!(servers_sharing_rooms(conn.db(), "@a:x", "x").unwrap(), ["y"]);
        assert!(shares_room_with_local(conn.db(), "@b:y", "x").unwrap());
        assert!(!shares_room_with_local(conn.db(), "@stranger:z", "x").unwrap());
    }

    #[test]
    fn offline_remote_users_long_unheard_of_are_forgotten() {
        let mut conn = memory_db();
        let mut stream = 0;
        for (u, ts) in [("@old:y", 10), ("@new:y", 1000), ("@local:x", 10)] {
            let p = PresenceRow { last_federation_ts: ts, ..PresenceRow::offline(u) };
            write(&mut conn, &mut stream, |w| put(w, &p, true)).unwrap();
        }
        assert_eq!(prune_remote_offline(conn.db(), "x", 500).unwrap(), 1);
        assert!(get(conn.db(), "@old:y").unwrap().is_none());
        assert!(get(conn.db(), "@new:y").unwrap().is_some());
        assert!(get(conn.db(), "@local:x").unwrap().is_some());
    }
}
