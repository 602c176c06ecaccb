//! The materialised membership of rooms (`room_members`), member counts, joined servers, the local membership
//! stream (`local_membership_stream`) and rooms a user forgot (`forgotten_rooms`). The room core writes these tables
//! as room state changes; the client API reads member lists, profiles and a local user's membership changes here
//! (only forgetting is written by the client API).

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::{EventNid, RoomNid, StreamPos};
use crate::store::Db;

pub struct MemberUpdate<'a> {
    pub room_nid: RoomNid,
    pub user_id: &'a str,
    pub membership: &'a str,
    pub event_nid: EventNid,
    pub displayname: Option<&'a str>,
    pub avatar_url: Option<&'a str>,
}

/// Writes one membership; returns the membership it replaced.
pub fn upsert_member(conn: Db<'_>, m: &MemberUpdate<'_>) -> Result<Option<String>> {
    let old: Option<String> = conn
        .prepare_cached("SELECT membership FROM room_members WHERE room_nid = ?1 AND user_id = ?2")?
        .query_row(params![m.room_nid, m.user_id], |r| r.get(0))
        .optional()?;
    replace_member(conn, m, old.as_deref())?;
    Ok(old)
}

/// Writes one membership whose current row (`old`: its membership, None without one) the caller has just read,
/// keeping the room's member counts.
pub fn replace_member(conn: Db<'_>, m: &MemberUpdate<'_>, old: Option<&str>) -> Result<()> {
    let server = m.user_id.split_once(':').map(|x| x.1).unwrap_or("");
    conn.prepare_cached(
        "INSERT INTO room_members (room_nid, user_id, membership, event_nid, server_name, displayname, avatar_url)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (room_nid, user_id) DO UPDATE SET membership = ?3, event_nid = ?4, displayname = ?6, avatar_url = ?7",
    )?
    .execute(params![m.room_nid, m.user_id, m.membership, m.event_nid, server, m.displayname, m.avatar_url])?;
    let delta = |ms: &str| -> (i64, i64) {
        match ms {
            "join" => (1, 0),
            "invite" => (0, 1),
            _ => (0, 0),
        }
    };
    let (oj, oi) = old.map(delta).unwrap_or((0, 0));
    let (nj, ni) = delta(m.membership);
    if (oj, oi) != (nj, ni) {
        conn.prepare_cached(
            "UPDATE rooms SET joined_members = joined_members + ?2, invited_members = invited_members + ?3
             WHERE room_nid = ?1",
        )?
        .execute(params![m.room_nid, nj - oj, ni - oi])?;
    }
    Ok(())
}

/// What `room_members` keeps of a member event's content: (membership, displayname, avatar_url).
pub type MemberContent = (String, Option<String>, Option<String>);

/// A member event's [`MemberContent`], each field only when it is a string (a membership that is none reads as
/// `leave`). Read by SQLite's JSON functions from the stored event, not by parsing the whole event here: a resync
/// applies 100k of these.
pub fn member_content(conn: Db<'_>, event_nid: EventNid) -> Result<Option<MemberContent>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {MEMBER_CONTENT_COLS} FROM events WHERE event_nid = ?1"))?
        .query_row([event_nid], |r| member_content_at(r, 0))
        .optional()?)
}

/// [`member_content`] of an event that must exist (a state entry or a stored membership points at it).
pub fn stored_member_content(conn: Db<'_>, event_nid: EventNid) -> Result<MemberContent> {
    member_content(conn, event_nid)?.ok_or_else(|| crate::error::Error::internal("member event missing"))
}

/// The three columns of a [`MemberContent`], read by SQLite from the `json` column of `events` in a query.
pub const MEMBER_CONTENT_COLS: &str =
    "CASE json_type(json, '$.content.membership') WHEN 'text' THEN json_extract(json, '$.content.membership') END,
     CASE json_type(json, '$.content.displayname') WHEN 'text' THEN json_extract(json, '$.content.displayname') END,
     CASE json_type(json, '$.content.avatar_url') WHEN 'text' THEN json_extract(json, '$.content.avatar_url') END";

/// The [`MemberContent`] of [`MEMBER_CONTENT_COLS`] selected from column `at` on.
pub fn member_content_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<MemberContent> {
    Ok((r.get::<_, Option<String>>(at)?.unwrap_or_else(|| "leave".into()), r.get(at + 1)?, r.get(at + 2)?))
}

pub fn membership_of(conn: Db<'_>, room_nid: RoomNid, user_id: &str) -> Result<Option<(String, EventNid)>> {
    Ok(conn
        .prepare_cached("SELECT membership, event_nid FROM room_members WHERE room_nid = ?1 AND user_id = ?2")?
        .query_row(params![room_nid, user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Whether the user has (or had) a membership in any room the server holds.
pub fn user_known(conn: Db<'_>, user_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM room_members WHERE user_id = ?1)")?
        .query_row([user_id], |r| r.get(0))?)
}

pub fn member_counts(conn: Db<'_>, room_nid: RoomNid) -> Result<(i64, i64)> {
    Ok(conn
        .prepare_cached("SELECT joined_members, invited_members FROM rooms WHERE room_nid = ?1")?
        .query_row([room_nid], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

/// Rooms in which `user_id` currently has `membership`.
pub fn rooms_with_membership(conn: Db<'_>, user_id: &str, membership: &str) -> Result<Vec<(RoomNid, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.room_nid, r.room_id FROM room_members m JOIN rooms r ON r.room_nid = m.room_nid
         WHERE m.user_id = ?1 AND m.membership = ?2",
    )?;
    let rows = stmt.query_map(params![user_id, membership], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Servers in a room: those with a joined member plus, while the room is partial, those the resident named in
/// `servers_in_room` (Synapse's "current hosts or partial-state approximation"), sorted.
pub fn servers_in_room(conn: Db<'_>, room_nid: RoomNid) -> Result<Vec<String>> {
    let mut servers = joined_servers(conn, room_nid)?;
    servers.extend(crate::store::rooms::partial_state_servers(conn, room_nid)?);
    servers.sort();
    servers.dedup();
    Ok(servers)
}

/// Servers with at least one joined member.
pub fn joined_servers(conn: Db<'_>, room_nid: RoomNid) -> Result<Vec<String>> {
    // A skip-scan over the (room_nid, server_name, membership) index: two seeks per server rather than a pass over
    // every member (a 100k-member room has ~2000 servers; this runs for every event we send to it).
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE s(name) AS (
             SELECT (SELECT min(server_name) FROM room_members WHERE room_nid = ?1)
             UNION ALL
             SELECT (SELECT min(server_name) FROM room_members WHERE room_nid = ?1 AND server_name > s.name)
             FROM s WHERE s.name IS NOT NULL
         )
         SELECT name FROM s WHERE name IS NOT NULL AND EXISTS (
             SELECT 1 FROM room_members WHERE room_nid = ?1 AND server_name = s.name AND membership = 'join')",
    )?;
    let rows = stmt.query_map([room_nid], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn record_local_membership(
    conn: Db<'_>,
    stream: StreamPos,
    user_id: &str,
    room_nid: RoomNid,
    membership: &str,
    event_nid: EventNid,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO local_membership_stream (stream_ordering, user_id, room_nid, membership, event_nid)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![stream, user_id, room_nid, membership, event_nid])?;
    Ok(())
}

/// Whether our user `user_id` was ever joined to the room (from the local membership stream).
pub fn was_locally_joined(conn: Db<'_>, user_id: &str, room_nid: RoomNid) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM local_membership_stream WHERE user_id = ?1 AND room_nid = ?2 AND membership = 'join'",
        )?
        .exists(params![user_id, room_nid])?)
}

/// The stream position of our user's latest join event in a room (for `shared` history visibility: the events
/// up to it are theirs to see).
pub fn last_local_join_pos(conn: Db<'_>, user_id: &str, room_nid: RoomNid) -> Result<Option<StreamPos>> {
    Ok(conn
        .prepare_cached(
            "SELECT max(e.stream_ordering) FROM local_membership_stream m JOIN events e ON e.event_nid = m.event_nid
             WHERE m.user_id = ?1 AND m.room_nid = ?2 AND m.membership = 'join'",
        )?
        .query_row(params![user_id, room_nid], |r| r.get(0))?)
}

/// A user (re)joined a room: it is no longer forgotten.
pub fn unforget_room(conn: Db<'_>, user_id: &str, room_nid: RoomNid) -> Result<()> {
    conn.prepare_cached("DELETE FROM forgotten_rooms WHERE user_id = ?1 AND room_nid = ?2")?
        .execute(params![user_id, room_nid])?;
    Ok(())
}

/// Whether `server` has a user with `membership` (`join`, `invite`, ...) in the room.
pub fn server_has_membership(conn: Db<'_>, room_nid: RoomNid, server: &str, membership: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM room_members WHERE room_nid = ?1 AND server_name = ?2 AND membership = ?3 LIMIT 1",
        )?
        .exists(params![room_nid, server, membership])?)
}

/// Users of `server` with any membership in the room (joined, invited, knocking, left or banned), by user id.
pub fn users_of_server(conn: Db<'_>, room_nid: RoomNid, server: &str) -> Result<Vec<String>> {
    let mut stmt = conn
        .prepare_cached("SELECT user_id FROM room_members WHERE room_nid = ?1 AND server_name = ?2 ORDER BY user_id")?;
    let rows = stmt.query_map(params![room_nid, server], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Up to `limit` joined or invited members other than `except`, by user id (a nameless room's heroes).
pub fn some_members_except(conn: Db<'_>, room_nid: RoomNid, except: &str, limit: i64) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM room_members WHERE room_nid = ?1 AND membership IN ('join','invite') AND user_id != ?2
         ORDER BY user_id LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![room_nid, except, limit], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A member with the profile of their membership event (or, in the user directory, of their account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberProfile {
    pub user_id: String,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// `user_id`'s membership changes in the window (`after`, `upto`], oldest first: `(room, membership)`.
pub fn changes_of(conn: Db<'_>, user_id: &str, after: StreamPos, upto: StreamPos) -> Result<Vec<(RoomNid, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT room_nid, membership FROM local_membership_stream WHERE user_id = ?1 AND stream_ordering > ?2
         AND stream_ordering <= ?3 ORDER BY stream_ordering",
    )?;
    let rows = stmt.query_map(params![user_id, after, upto], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// How many heroes a room summary names.
const HEROES: i64 = 5;

/// The members a nameless room is called after (`m.heroes`), `user_id` aside: the first joined or invited members
/// by user id, else (everyone left) the first former members.
pub fn heroes(conn: Db<'_>, room: RoomNid, user_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM room_members WHERE room_nid = ?1 AND user_id != ?2 AND membership IN ('join', 'invite')
         ORDER BY user_id LIMIT ?3",
    )?;
    let heroes: Vec<String> =
        stmt.query_map(params![room, user_id, HEROES], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    if !heroes.is_empty() {
        return Ok(heroes);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM room_members WHERE room_nid = ?1 AND user_id != ?2 ORDER BY user_id LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![room, user_id, HEROES], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Every current member of a room, any membership: `(user_id, membership, membership event)`.
pub fn members(conn: Db<'_>, room: RoomNid) -> Result<Vec<(String, String, EventNid)>> {
    let mut stmt =
        conn.prepare_cached("SELECT user_id, membership, event_nid FROM room_members WHERE room_nid = ?1")?;
    let rows = stmt.query_map([room], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The joined members of a room with their room profiles.
pub fn joined_profiles(conn: Db<'_>, room: RoomNid) -> Result<Vec<MemberProfile>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, displayname, avatar_url FROM room_members WHERE room_nid = ?1 AND membership = 'join'",
    )?;
    let rows = stmt.query_map([room], |r| {
        Ok(MemberProfile { user_id: r.get(0)?, displayname: r.get(1)?, avatar_url: r.get(2)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A member's display name in a room (None when not a member or no name set).
pub fn displayname(conn: Db<'_>, room: RoomNid, user_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT displayname FROM room_members WHERE room_nid = ?1 AND user_id = ?2")?
        .query_row(params![room, user_id], |r| r.get(0))
        .optional()?
        .flatten())
}

/// The user directory: users joined to a room `requester` is joined to or to a published room, `requester` aside,
/// whose user id or display name contains `term` (lower case), by user id, at most `limit`. Local users' profiles
/// come from their accounts (deactivated accounts give none), others' from their membership events.
pub fn search_users(conn: Db<'_>, requester: &str, term: &str, limit: i64) -> Result<Vec<MemberProfile>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.user_id, max(coalesce(u.displayname, m.displayname)), max(coalesce(u.avatar_url, m.avatar_url))
         FROM room_members m LEFT JOIN users u ON u.user_id = m.user_id AND u.deactivated = 0
         WHERE m.membership = 'join' AND m.user_id != ?1
           AND (m.room_nid IN (SELECT room_nid FROM room_members WHERE user_id = ?1 AND membership = 'join')
                OR m.room_nid IN (SELECT room_nid FROM rooms WHERE published = 1))
           AND (instr(lower(m.user_id), ?2) > 0 OR instr(lower(coalesce(u.displayname, m.displayname, '')), ?2) > 0)
         GROUP BY m.user_id ORDER BY m.user_id LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![requester, term, limit], |r| {
        Ok(MemberProfile { user_id: r.get(0)?, displayname: r.get(1)?, avatar_url: r.get(2)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Records that `user_id` forgot a room they left (idempotent).
pub fn forget(conn: Db<'_>, user_id: &str, room: RoomNid) -> Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO forgotten_rooms (user_id, room_nid) VALUES (?1, ?2)")?
        .execute(params![user_id, room])?;
    Ok(())
}

pub fn is_forgotten(conn: Db<'_>, user_id: &str, room: RoomNid) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM forgotten_rooms WHERE user_id = ?1 AND room_nid = ?2")?
        .exists(params![user_id, room])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::events::tests::insert_test_event;
    use crate::store::rooms;
    use crate::store::testing::{self, memory_db};

    fn set(conn: Db<'_>, room_nid: RoomNid, user_id: &str, membership: &str, event_nid: EventNid) {
        upsert_member(
            conn,
            &MemberUpdate { room_nid, user_id, membership, event_nid, displayname: Some("D"), avatar_url: None },
        )
        .unwrap();
    }

    #[test]
    fn users_of_server_lists_every_membership_of_that_server() {
        let conn = memory_db();
        let r = rooms::insert_room(conn.db(), "!r:x", "12").unwrap();
        let e = insert_test_event(conn.db(), r, "$e", Some(1), None);
        set(conn.db(), r, "@b:y", "leave", e);
        set(conn.db(), r, "@a:y", "invite", e);
        set(conn.db(), r, "@c:z", "join", e);
        assert_eq!(users_of_server(conn.db(), r, "y").unwrap(), vec!["@a:y".to_owned(), "@b:y".to_owned()]);
        assert!(users_of_server(conn.db(), r, "w").unwrap().is_empty());
    }

    #[test]
    fn counts_follow_membership_changes() {
        let conn = memory_db();
        let r = rooms::insert_room(conn.db(), "!r:x", "12").unwrap();
        let e = insert_test_event(conn.db(), r, "$e", Some(1), None);
        assert_eq!(member_counts(conn.db(), r).unwrap(), (0, 0));
        set(conn.db(), r, "@a:x", "invite", e);
        assert_eq!(member_counts(conn.db(), r).unwrap(), (0, 1));
        set(conn.db(), r, "@a:x", "join", e);
        assert_eq!(member_counts(conn.db(), r).unwrap(), (1, 0));
        set(conn.db(), r, "@b:y", "join", e);
        set(conn.db(), r, "@c:y", "ban", e);
        assert_eq!(member_counts(conn.db(), r).unwrap(), (2, 0));
        // The same membership again changes nothing.
        set(conn.db(), r, "@b:y", "join", e);
        assert_eq!(member_counts(conn.db(), r).unwrap(), (2, 0));
        set(conn.db(), r, "@b:y", "leave", e);
        assert_eq!(member_counts(conn.db(), r).unwrap(), (1, 0));
        assert_eq!(membership_of(conn.db(), r, "@a:x").unwrap(), Some(("join".to_owned(), e)));
        assert_eq!(membership_of(conn.db(), r, "@b:y").unwrap(), Some(("leave".to_owned(), e)));
        assert_eq!(membership_of(conn.db(), r, "@z:x").unwrap(), None);
    }

    #[test]
    fn rooms_of_a_user_by_membership() {
        let conn = memory_db();
        let r1 = rooms::insert_room(conn.db(), "!r1:x", "12").unwrap();
        let r2 = rooms::insert_room(conn.db(), "!r2:x", "12").unwrap();
        let e = insert_test_event(conn.db(), r1, "$e", Some(1), None);
        set(conn.db(), r1, "@a:x", "join", e);
        set(conn.db(), r2, "@a:x", "invite", e);
        assert_eq!(rooms_with_membership(conn.db(), "@a:x", "join").unwrap(), [(r1, "!r1:x".to_owned())]);
        assert_eq!(rooms_with_membership(conn.db(), "@a:x", "invite").unwrap(), [(r2, "!r2:x".to_owned())]);
        assert!(rooms_with_membership(conn.db(), "@a:x", "leave").unwrap().is_empty());
    }

    #[test]
    fn joined_servers_are_those_with_a_joined_member() {
        let conn = memory_db();
        let r = rooms::insert_room(conn.db(), "!r:x", "12").unwrap();
        let other = rooms::insert_room(conn.db(), "!o:x", "12").unwrap();
        let e = insert_test_event(conn.db(), r, "$e", Some(1), None);
        assert!(joined_servers(conn.db(), r).unwrap().is_empty());
        set(conn.db(), r, "@a:a.example", "join", e);
        set(conn.db(), r, "@b:a.example", "leave", e);
        set(conn.db(), r, "@c:c.example", "leave", e);
        set(conn.db(), r, "@d:d.example", "invite", e);
        set(conn.db(), r, "@e:e.example", "leave", e);
        set(conn.db(), r, "@f:e.example", "join", e);
        set(conn.db(), other, "@g:g.example", "join", e);
        assert_eq!(joined_servers(conn.db(), r).unwrap(), ["a.example", "e.example"]);
        // Only a joined member makes a server "in" the room (a left one does not).
        assert!(!server_has_membership(conn.db(), r, "c.example", "join").unwrap());
        assert!(server_has_membership(conn.db(), r, "e.example", "join").unwrap());
        assert!(!server_has_membership(conn.db(), r, "g.example", "join").unwrap());
        assert_eq!(some_members_except(conn.db(), r, "@a:a.example", 5).unwrap(), ["@d:d.example", "@f:e.example"]);
        assert_eq!(some_members_except(conn.db(), r, "@z:z", 1).unwrap(), ["@a:a.example"]);
    }

    #[test]
    fn the_local_membership_stream() {
        let conn = memory_db();
        let r = rooms::insert_room(conn.db(), "!r:x", "12").unwrap();
        let invite = insert_test_event(conn.db(), r, "$invite", Some(10), None);
        let join = insert_test_event(conn.db(), r, "$join", Some(20), None);
        let rejoin = insert_test_event(conn.db(), r, "$rejoin", Some(30), None);
        assert!(!was_locally_joined(conn.db(), "@a:x", r).unwrap());
        assert_eq!(last_local_join_pos(conn.db(), "@a:x", r).unwrap(), None);
        record_local_membership(conn.db(), StreamPos(11), "@a:x", r, "invite", invite).unwrap();
        assert!(!was_locally_joined(conn.db(), "@a:x", r).unwrap());
        record_local_membership(conn.db(), StreamPos(21), "@a:x", r, "join", join).unwrap();
        record_local_membership(conn.db(), StreamPos(31), "@a:x", r, "join", rejoin).unwrap();
        assert!(was_locally_joined(conn.db(), "@a:x", r).unwrap());
        assert!(!was_locally_joined(conn.db(), "@b:x", r).unwrap());
        // Positions are those of the membership events.
        assert_eq!(last_local_join_pos(conn.db(), "@a:x", r).unwrap(), Some(StreamPos(30)));
        assert_eq!(last_local_join_pos(conn.db(), "@b:x", r).unwrap(), None);
    }

    #[test]
    fn a_forgotten_room_is_remembered_on_rejoin() {
        let conn = memory_db();
        let r = rooms::insert_room(conn.db(), "!r:x", "12").unwrap();
        conn.db().execute("INSERT INTO forgotten_rooms (user_id, room_nid) VALUES ('@a:x', ?1)", [r]).unwrap();
        let forgotten = |u: &str| {
            conn.db()
                .query_row("SELECT count(*) FROM forgotten_rooms WHERE user_id = ?1", [u], |r| r.get::<_, i64>(0))
                .unwrap()
        };
        assert_eq!(forgotten("@a:x"), 1);
        unforget_room(conn.db(), "@a:x", r).unwrap();
        assert_eq!(forgotten("@a:x"), 0);
    }

    #[test]
    fn changes_of_is_per_user_windowed_and_in_stream_order() {
        let conn = memory_db();
        let (r1, r2) = (testing::room(conn.db(), "!1:x"), testing::room(conn.db(), "!2:x"));
        testing::local_membership(conn.db(), StreamPos(3), "@a:x", r1, "invite");
        testing::local_membership(conn.db(), StreamPos(5), "@a:x", r1, "join");
        testing::local_membership(conn.db(), StreamPos(6), "@b:x", r2, "join");
        testing::local_membership(conn.db(), StreamPos(8), "@a:x", r2, "leave");
        let got = changes_of(conn.db(), "@a:x", StreamPos(0), StreamPos(10)).unwrap();
        assert_eq!(got, [(r1, "invite".into()), (r1, "join".into()), (r2, "leave".into())]);
        assert_eq!(changes_of(conn.db(), "@a:x", StreamPos(3), StreamPos(5)).unwrap(), [(r1, "join".into())]);
        assert!(changes_of(conn.db(), "@a:x", StreamPos(8), StreamPos(10)).unwrap().is_empty());
    }

    #[test]
    fn heroes_prefer_current_members_and_fall_back_to_former_ones() {
        let conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        assert!(heroes(conn.db(), room, "@me:x").unwrap().is_empty());
        testing::member(conn.db(), room, "@me:x", "join", None);
        testing::member(conn.db(), room, "@gone:x", "leave", None);
        testing::member(conn.db(), room, "@banned:x", "ban", None);
        assert_eq!(heroes(conn.db(), room, "@me:x").unwrap(), ["@banned:x", "@gone:x"], "everyone else left");
        for u in ["@g:x", "@f:x", "@e:x", "@d:x", "@c:x", "@b:x"] {
            testing::member(conn.db(), room, u, if u == "@c:x" { "invite" } else { "join" }, None);
        }
        assert_eq!(heroes(conn.db(), room, "@me:x").unwrap(), ["@b:x", "@c:x", "@d:x", "@e:x", "@f:x"], "five, by id");
    }

    #[test]
    fn member_lists_and_profiles() {
        let conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        testing::member(conn.db(), room, "@a:x", "join", Some("Alice"));
        testing::member(conn.db(), room, "@b:x", "invite", None);
        testing::member(conn.db(), room, "@c:x", "join", None);
        let mut all: Vec<(String, String)> =
            members(conn.db(), room).unwrap().into_iter().map(|m| (m.0, m.1)).collect();
        all.sort();
        assert_eq!(
            all,
            [("@a:x".into(), "join".into()), ("@b:x".into(), "invite".into()), ("@c:x".into(), "join".into())]
        );
        let mut joined = joined_profiles(conn.db(), room).unwrap();
        joined.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        assert_eq!(
            joined,
            [
                MemberProfile { user_id: "@a:x".into(), displayname: Some("Alice".into()), avatar_url: None },
                MemberProfile { user_id: "@c:x".into(), displayname: None, avatar_url: None },
            ]
        );
        assert_eq!(displayname(conn.db(), room, "@a:x").unwrap().as_deref(), Some("Alice"));
        assert_eq!(displayname(conn.db(), room, "@c:x").unwrap(), None);
        assert_eq!(displayname(conn.db(), room, "@nobody:x").unwrap(), None);
    }

    #[test]
    fn user_directory_sees_shared_and_published_rooms_only() {
        let conn = memory_db();
        let (shared, public, private) =
            (testing::room(conn.db(), "!s:x"), testing::room(conn.db(), "!p:x"), testing::room(conn.db(), "!q:x"));
        testing::publish(conn.db(), public);
        testing::member(conn.db(), shared, "@me:x", "join", None);
        testing::member(conn.db(), shared, "@bob:x", "join", Some("Bobby (room name)"));
        testing::member(conn.db(), shared, "@invited:x", "invite", None);
        testing::member(conn.db(), public, "@carol:y", "join", Some("Carol"));
        testing::member(conn.db(), private, "@dave:x", "join", Some("Bob's friend"));
        testing::user(conn.db(), "@bob:x", Some("Robert"), false);
        let names = |term: &str, limit: i64| -> Vec<(String, Option<String>)> {
            search_users(conn.db(), "@me:x", term, limit)
                .unwrap()
                .into_iter()
                .map(|p| (p.user_id, p.displayname))
                .collect()
        };
        assert_eq!(names("bob", 10), [("@bob:x".to_owned(), Some("Robert".to_owned()))], "account name wins");
        assert_eq!(names("robert", 10).len(), 1);
        assert_eq!(names("carol", 10), [("@carol:y".to_owned(), Some("Carol".to_owned()))]);
        assert!(names("dave", 10).is_empty(), "private room we are not in");
        assert!(names("invited", 10).is_empty(), "only joined members");
        assert!(names("me", 10).is_empty(), "not ourselves");
        assert_eq!(names(":", 10).len(), 2);
        assert_eq!(names(":", 1), [("@bob:x".to_owned(), Some("Robert".to_owned()))], "by user id, limited");
    }

    #[test]
    fn forgetting() {
        let conn = memory_db();
        let room = testing::room(conn.db(), "!r:x");
        assert!(!is_forgotten(conn.db(), "@a:x", room).unwrap());
        forget(conn.db(), "@a:x", room).unwrap();
        forget(conn.db(), "@a:x", room).unwrap();
        assert!(is_forgotten(conn.db(), "@a:x", room).unwrap());
        assert!(!is_forgotten(conn.db(), "@b:x", room).unwrap());
    }
}
