//! Membership reads for the client API: member lists and profiles from `room_members`, a local user's membership
//! changes from `local_membership_stream`, the stripped state of remote invites (`invite_state`) and rooms a user
//! forgot (`forgotten_rooms`). The room core writes these tables as room state changes (only forgetting is
//! written here).

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;
use crate::store::ids::{EventNid, RoomNid, StreamPos};

/// A member with the profile of their membership event (or, in the user directory, of their account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberProfile {
    pub user_id: String,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// `user_id`'s membership changes in the window (`after`, `upto`], oldest first: `(room, membership)`.
pub fn changes_of(
    conn: &Connection,
    user_id: &str,
    after: StreamPos,
    upto: StreamPos,
) -> Result<Vec<(RoomNid, String)>> {
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
pub fn heroes(conn: &Connection, room: RoomNid, user_id: &str) -> Result<Vec<String>> {
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
pub fn members(conn: &Connection, room: RoomNid) -> Result<Vec<(String, String, EventNid)>> {
    let mut stmt =
        conn.prepare_cached("SELECT user_id, membership, event_nid FROM room_members WHERE room_nid = ?1")?;
    let rows = stmt.query_map([room], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The joined members of a room with their room profiles.
pub fn joined_profiles(conn: &Connection, room: RoomNid) -> Result<Vec<MemberProfile>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, displayname, avatar_url FROM room_members WHERE room_nid = ?1 AND membership = 'join'",
    )?;
    let rows = stmt.query_map([room], |r| {
        Ok(MemberProfile { user_id: r.get(0)?, displayname: r.get(1)?, avatar_url: r.get(2)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A member's display name in a room (None when not a member or no name set).
pub fn displayname(conn: &Connection, room: RoomNid, user_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT displayname FROM room_members WHERE room_nid = ?1 AND user_id = ?2")?
        .query_row(params![room, user_id], |r| r.get(0))
        .optional()?
        .flatten())
}

/// The user directory: users joined to a room `requester` is joined to or to a published room, `requester` aside,
/// whose user id or display name contains `term` (lower case), by user id, at most `limit`. Local users' profiles
/// come from their accounts (deactivated accounts give none), others' from their membership events.
pub fn search_users(conn: &Connection, requester: &str, term: &str, limit: i64) -> Result<Vec<MemberProfile>> {
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

/// The stripped state (a JSON array) that came with `user_id`'s invite over federation, if any.
pub fn invite_state(conn: &Connection, room: RoomNid, user_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT events FROM invite_state WHERE room_nid = ?1 AND user_id = ?2")?
        .query_row(params![room, user_id], |r| r.get(0))
        .optional()?)
}

/// Records that `user_id` forgot a room they left (idempotent).
pub fn forget(conn: &Connection, user_id: &str, room: RoomNid) -> Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO forgotten_rooms (user_id, room_nid) VALUES (?1, ?2)")?
        .execute(params![user_id, room])?;
    Ok(())
}

pub fn is_forgotten(conn: &Connection, user_id: &str, room: RoomNid) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM forgotten_rooms WHERE user_id = ?1 AND room_nid = ?2")?
        .exists(params![user_id, room])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures;
    use crate::store::testing::memory_db;

    #[test]
    fn changes_of_is_per_user_windowed_and_in_stream_order() {
        let conn = memory_db();
        let (r1, r2) = (fixtures::room(&conn, "!1:x"), fixtures::room(&conn, "!2:x"));
        fixtures::local_membership(&conn, StreamPos(3), "@a:x", r1, "invite");
        fixtures::local_membership(&conn, StreamPos(5), "@a:x", r1, "join");
        fixtures::local_membership(&conn, StreamPos(6), "@b:x", r2, "join");
        fixtures::local_membership(&conn, StreamPos(8), "@a:x", r2, "leave");
        let got = changes_of(&conn, "@a:x", StreamPos(0), StreamPos(10)).unwrap();
        assert_eq!(got, [(r1, "invite".into()), (r1, "join".into()), (r2, "leave".into())]);
        assert_eq!(changes_of(&conn, "@a:x", StreamPos(3), StreamPos(5)).unwrap(), [(r1, "join".into())]);
        assert!(changes_of(&conn, "@a:x", StreamPos(8), StreamPos(10)).unwrap().is_empty());
    }

    #[test]
    fn heroes_prefer_current_members_and_fall_back_to_former_ones() {
        let conn = memory_db();
        let room = fixtures::room(&conn, "!r:x");
        assert!(heroes(&conn, room, "@me:x").unwrap().is_empty());
        fixtures::member(&conn, room, "@me:x", "join", None);
        fixtures::member(&conn, room, "@gone:x", "leave", None);
        fixtures::member(&conn, room, "@banned:x", "ban", None);
        assert_eq!(heroes(&conn, room, "@me:x").unwrap(), ["@banned:x", "@gone:x"], "everyone else left");
        for u in ["@g:x", "@f:x", "@e:x", "@d:x", "@c:x", "@b:x"] {
            fixtures::member(&conn, room, u, if u == "@c:x" { "invite" } else { "join" }, None);
        }
        assert_eq!(heroes(&conn, room, "@me:x").unwrap(), ["@b:x", "@c:x", "@d:x", "@e:x", "@f:x"], "five, by id");
    }

    #[test]
    fn member_lists_and_profiles() {
        let conn = memory_db();
        let room = fixtures::room(&conn, "!r:x");
        fixtures::member(&conn, room, "@a:x", "join", Some("Alice"));
        fixtures::member(&conn, room, "@b:x", "invite", None);
        fixtures::member(&conn, room, "@c:x", "join", None);
        let mut all: Vec<(String, String)> = members(&conn, room).unwrap().into_iter().map(|m| (m.0, m.1)).collect();
        all.sort();
        assert_eq!(
            all,
            [("@a:x".into(), "join".into()), ("@b:x".into(), "invite".into()), ("@c:x".into(), "join".into())]
        );
        let mut joined = joined_profiles(&conn, room).unwrap();
        joined.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        assert_eq!(
            joined,
            [
                MemberProfile { user_id: "@a:x".into(), displayname: Some("Alice".into()), avatar_url: None },
                MemberProfile { user_id: "@c:x".into(), displayname: None, avatar_url: None },
            ]
        );
        assert_eq!(displayname(&conn, room, "@a:x").unwrap().as_deref(), Some("Alice"));
        assert_eq!(displayname(&conn, room, "@c:x").unwrap(), None);
        assert_eq!(displayname(&conn, room, "@nobody:x").unwrap(), None);
    }

    #[test]
    fn user_directory_sees_shared_and_published_rooms_only() {
        let conn = memory_db();
        let (shared, public, private) =
            (fixtures::room(&conn, "!s:x"), fixtures::room(&conn, "!p:x"), fixtures::room(&conn, "!q:x"));
        fixtures::publish(&conn, public);
        fixtures::member(&conn, shared, "@me:x", "join", None);
        fixtures::member(&conn, shared, "@bob:x", "join", Some("Bobby (room name)"));
        fixtures::member(&conn, shared, "@invited:x", "invite", None);
        fixtures::member(&conn, public, "@carol:y", "join", Some("Carol"));
        fixtures::member(&conn, private, "@dave:x", "join", Some("Bob's friend"));
        fixtures::user(&conn, "@bob:x", Some("Robert"), false);
        let names = |term: &str, limit: i64| -> Vec<(String, Option<String>)> {
            search_users(&conn, "@me:x", term, limit).unwrap().into_iter().map(|p| (p.user_id, p.displayname)).collect()
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
    fn forgetting_and_invite_state() {
        let conn = memory_db();
        let room = fixtures::room(&conn, "!r:x");
        assert!(!is_forgotten(&conn, "@a:x", room).unwrap());
        forget(&conn, "@a:x", room).unwrap();
        forget(&conn, "@a:x", room).unwrap();
        assert!(is_forgotten(&conn, "@a:x", room).unwrap());
        assert!(!is_forgotten(&conn, "@b:x", room).unwrap());

        assert_eq!(invite_state(&conn, room, "@a:x").unwrap(), None);
        conn.execute("INSERT INTO invite_state (room_nid, user_id, events) VALUES (?1, '@a:x', '[]')", [room]).unwrap();
        assert_eq!(invite_state(&conn, room, "@a:x").unwrap().as_deref(), Some("[]"));
        assert_eq!(invite_state(&conn, room, "@b:x").unwrap(), None);
    }
}
