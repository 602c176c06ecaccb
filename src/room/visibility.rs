//! Who may see what: a room as a whole (may a user read it at all, and up to where) and each event in it, for
//! users (the spec's "History visibility", Synapse's `filter_events_for_client`) and for other servers (Synapse's
//! `filter_events_for_server` and `assert_host_in_room`).
//!
//! An event is judged by the history visibility *in the state at that event* and the viewer's membership *in that
//! state* (the state after the event, its `sg_after`, as Synapse keeps it), never by the room's current setting.
//! [`ClientJudge`] caches its lookups per state group, so a timeline of hundreds of events costs a few lookups per
//! distinct group (consecutive messages share one), and never loads a whole state.

use std::collections::HashMap;

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::store::events::EventRow;
use crate::store::ids::{RoomNid, StateGroup, StateKeyNid, StreamPos};
use crate::store::rooms::{self, RoomRow};
use crate::store::{events, members, state_groups, timeline, Db};

/// `m.room.history_visibility`, most open first (the order Synapse's `VISIBILITY_PRIORITY` gives them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HistoryVisibility {
    WorldReadable,
    Shared,
    Invited,
    Joined,
}

impl HistoryVisibility {
    /// An absent or unknown setting counts as `shared` (as the spec says).
    pub fn from_content(content: Option<&Value>) -> HistoryVisibility {
        match content.and_then(|c| c.get("history_visibility")).and_then(Value::as_str) {
            Some("world_readable") => HistoryVisibility::WorldReadable,
            Some("invited") => HistoryVisibility::Invited,
            Some("joined") => HistoryVisibility::Joined,
            _ => HistoryVisibility::Shared,
        }
    }
}

/// The history visibility in a state group.
pub fn history_visibility_in(conn: Db<'_>, sg: StateGroup) -> Result<HistoryVisibility> {
    let key = state_groups::find_state_key_nid(conn, "m.room.history_visibility", "")?;
    Ok(HistoryVisibility::from_content(content_in(conn, sg, key)?.as_ref()))
}

/// The content of the state event at `key` in a group (one indexed lookup and the event's JSON, no PDU parse).
fn content_in(conn: Db<'_>, sg: StateGroup, key: Option<StateKeyNid>) -> Result<Option<Value>> {
    let Some(key) = key else { return Ok(None) };
    let Some(nid) = state_groups::lookup_state(conn, sg, key)? else { return Ok(None) };
    let Some(json) = events::json_of(conn, nid)? else { return Ok(None) };
    Ok(serde_json::from_str::<Value>(&json)?.get("content").cloned())
}

/// Memberships by how much they let a user see (Synapse's `MEMBERSHIP_PRIORITY`): join first.
fn membership_rank(m: Option<&str>) -> u8 {
    match m {
        Some("join") => 0,
        Some("invite") => 1,
        Some("knock") => 2,
        Some("ban") => 4,
        _ => 3, // leave, or none
    }
}

/// Membership string from a member event's content.
fn membership_of_content(content: &Value) -> Option<String> {
    content.get("membership").and_then(Value::as_str).map(str::to_owned)
}

/// Judges events for one local user. Build one per request (or per sync pass) and feed it every event that is to
/// be shown: it caches the state lookups of each state group and the user's last join of each room.
pub struct ClientJudge<'c> {
    conn: Db<'c>,
    user_id: String,
    /// Interned keys of `m.room.history_visibility` and the user's `m.room.member` (None until first needed).
    keys: Option<(Option<StateKeyNid>, Option<StateKeyNid>)>,
    /// State group -> (history visibility, the user's membership) in it.
    at_sg: HashMap<StateGroup, (HistoryVisibility, Option<String>)>,
    /// Room -> stream position of the user's latest join event (None: never joined).
    last_join: HashMap<RoomNid, Option<i64>>,
    /// Room -> state group of its oldest timeline event with state (for backfilled events, held without).
    earliest: HashMap<RoomNid, Option<StateGroup>>,
    /// Room -> whether the user is joined now.
    joined_now: HashMap<RoomNid, bool>,
}

impl<'c> ClientJudge<'c> {
    pub fn new(conn: Db<'c>, user_id: &str) -> ClientJudge<'c> {
        ClientJudge {
            conn,
            user_id: user_id.to_owned(),
            keys: None,
            at_sg: HashMap::new(),
            last_join: HashMap::new(),
            earliest: HashMap::new(),
            joined_now: HashMap::new(),
        }
    }

    fn at(&mut self, sg: StateGroup) -> Result<(HistoryVisibility, Option<String>)> {
        if let Some(v) = self.at_sg.get(&sg) {
            return Ok(v.clone());
        }
        let (hv_key, member_key) = match self.keys {
            Some(k) => k,
            None => {
                let hv = state_groups::find_state_key_nid(self.conn, "m.room.history_visibility", "")?;
                let member = state_groups::find_state_key_nid(self.conn, "m.room.member", &self.user_id)?;
                *self.keys.insert((hv, member))
            }
        };
        let hv = HistoryVisibility::from_content(content_in(self.conn, sg, hv_key)?.as_ref());
        let m = content_in(self.conn, sg, member_key)?.and_then(|c| membership_of_content(&c));
        self.at_sg.insert(sg, (hv, m.clone()));
        Ok((hv, m))
    }

    fn last_join(&mut self, room: RoomNid) -> Result<Option<i64>> {
        if let Some(v) = self.last_join.get(&room) {
            return Ok(*v);
        }
        let pos = members::last_local_join_pos(self.conn, &self.user_id, room)?.map(|p| p.0);
        self.last_join.insert(room, pos);
        Ok(pos)
    }

    fn joined_now(&mut self, room: RoomNid) -> Result<bool> {
        if let Some(v) = self.joined_now.get(&room) {
            return Ok(*v);
        }
        let joined = members::membership_of(self.conn, room, &self.user_id)?.is_some_and(|m| m.0 == "join");
        self.joined_now.insert(room, joined);
        Ok(joined)
    }

    fn earliest_sg(&mut self, room: RoomNid) -> Result<Option<StateGroup>> {
        if let Some(v) = self.earliest.get(&room) {
            return Ok(*v);
        }
        let sg = events::earliest_timeline_sg(self.conn, room)?;
        self.earliest.insert(room, sg);
        Ok(sg)
    }

    /// The state before `row` (for the previous membership or history visibility a state event replaced).
    fn before(&mut self, row: &EventRow) -> Result<Option<(HistoryVisibility, Option<String>)>> {
        match timeline::state_before(self.conn, row.event_nid)? {
            Some(sg) => self.at(sg).map(Some),
            None => Ok(None),
        }
    }

    /// Whether the user may see `row`:
    /// 1. an outlier (an out-of-band invite, its rejection) only if it is the user's own membership; a backfilled
    ///    event (held without state) by the setting in the nearest state we know, the user not joined at it;
    /// 2. the history visibility is the one in the state at the event (for an `m.room.history_visibility` event,
    ///    the more open of the old and the new setting);
    /// 3. the user's membership is the one in the state at the event (for their own membership event, the more
    ///    "joined" of the old and the new one; their own leave or rejection after a join, invite or knock is
    ///    always theirs to see);
    /// 4. joined then: visible; `world_readable`: visible; `shared`: visible if the user is joined now (as
    ///    Synapse), or joined the room at any point at or after the event (their latest join is not older than
    ///    it); `invited`: visible if they were invited then; `joined`: not visible.
    pub fn may_see(&mut self, row: &EventRow) -> Result<bool> {
        let own_member = row.event_type == "m.room.member" && self.is_own_state_key(row)?;
        if row.outlier {
            return Ok(own_member);
        }
        let (mut hv, mut membership) = match row.sg_after {
            Some(sg) => self.at(sg)?,
            None => {
                // Backfilled history is held without state: judged by the history visibility of the nearest state
                // we know (the room's oldest event with state), with the user's membership unknown (not joined).
                let Some(sg) = self.earliest_sg(row.room_nid)? else { return Ok(own_member) };
                (self.at(sg)?.0, None)
            }
        };
        if row.event_type == "m.room.history_visibility" {
            if let Some((before, _)) = self.before(row)? {
                hv = hv.min(before);
            }
        }
        if own_member {
            let content: Value = serde_json::from_str::<Value>(&row.json)?.get("content").cloned().unwrap_or_default();
            let new = membership_of_content(&content);
            let old = self.before(row)?.and_then(|b| b.1);
            if new.as_deref() == Some("leave") && matches!(old.as_deref(), Some("join" | "invite" | "knock")) {
                return Ok(true);
            }
            membership = if membership_rank(old.as_deref()) < membership_rank(new.as_deref()) { old } else { new };
        }
        if membership.as_deref() == Some("join") {
            return Ok(true);
        }
        Ok(match hv {
            HistoryVisibility::WorldReadable => true,
            HistoryVisibility::Shared => {
                // A member now sees all shared history (as Synapse: not peeking), an event of a fork their join is
                // not an ancestor of included; a former member, what came before their last join.
                let pos = row.stream_ordering.map_or(i64::MAX, |p| p.0);
                self.joined_now(row.room_nid)? || self.last_join(row.room_nid)?.is_some_and(|j| j >= pos)
            }
            HistoryVisibility::Invited => membership.as_deref() == Some("invite"),
            HistoryVisibility::Joined => false,
        })
    }

    fn is_own_state_key(&self, row: &EventRow) -> Result<bool> {
        let Some(skn) = row.state_key_nid else { return Ok(false) };
        Ok(state_groups::state_key_of(self.conn, skn)?.1 == self.user_id)
    }

    /// The events of `rows` the user may see, in their order.
    pub fn filter(&mut self, rows: Vec<EventRow>) -> Result<Vec<EventRow>> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            if self.may_see(&r)? {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// The events of `rows` that `user_id` (a local user) may see, in their order: the one visibility rule for every
/// client read path (sync, sliding sync, `/messages`, `/context`, `/event`, relations, threads, search). Whether
/// the user may read the room at all, and up to where, is [`readable_room`]'s answer, asked first.
pub fn filter_events_for_client(conn: Db<'_>, user_id: &UserId, rows: Vec<EventRow>) -> Result<Vec<EventRow>> {
    ClientJudge::new(conn, user_id.as_str()).filter(rows)
}

// ------------------------------------------------------------------------------------------------------------
// The room as a whole

/// How far a user may read a room's timeline (each event in that range is then judged by [`ClientJudge`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Visibility {
    /// Member now, or a world-readable room: up to now.
    All,
    /// Former member (who has not forgotten the room): up to (and including) the stream position of their leave.
    UpTo(i64),
    None,
}

/// Whether and how far a user may read a room (Synapse's `check_user_in_room_or_world_readable` with
/// `allow_departed_users`, but for bans): joined users up to now; users whose membership is `leave` (they left,
/// were kicked, rejected an invite or retracted a knock) and who did not forget the room, up to their leave (what
/// they may see of it is then each event's own judgement, which gives a user never joined little or nothing);
/// anyone when the room is world-readable now (peeking, a banned user too); users banned after being joined, up to
/// the ban (the spec's "after a user has left a room, they may see any events which they were allowed to see
/// before they left"; Synapse refuses them); nobody else.
pub fn visibility(conn: Db<'_>, room: &RoomRow, user_id: &UserId) -> Result<Visibility> {
    let user_id = user_id.as_str();
    let membership = members::membership_of(conn, room.room_nid, user_id)?;
    let up_to = |nid| -> Result<Visibility> {
        let row = events::event_by_nid(conn, nid)?;
        Ok(Visibility::UpTo(row.and_then(|r| r.stream_ordering).map_or(0, |p| p.0)))
    };
    let remembered = || -> Result<bool> { Ok(!members::is_forgotten(conn, user_id, room.room_nid)?) };
    match &membership {
        Some((m, _)) if m == "join" => return Ok(Visibility::All),
        Some((m, nid)) if m == "leave" && remembered()? => return up_to(*nid),
        _ => {}
    }
    if let Some(sg) = room.current_sg {
        if history_visibility_in(conn, sg)? == HistoryVisibility::WorldReadable {
            return Ok(Visibility::All);
        }
    }
    match membership {
        Some((m, nid)) if m == "ban" && members::was_locally_joined(conn, user_id, room.room_nid)? && remembered()? => {
            up_to(nid)
        }
        _ => Ok(Visibility::None),
    }
}

/// A room id from a request to read a room, parsed at the edge: one that does not parse names no room the user is
/// in (403, as [`readable_room`] answers for a room it does not know).
pub fn parse_readable_room_id(room_id: &str) -> Result<OwnedRoomId> {
    RoomId::parse(room_id).map_err(|_| Error::forbidden("you are not in this room"))
}

/// Loads a room the user may read, or 403.
pub fn readable_room(conn: Db<'_>, room_id: &RoomId, user_id: &UserId) -> Result<(RoomRow, Visibility)> {
    let room =
        rooms::room_by_id(conn, room_id.as_str())?.ok_or_else(|| Error::forbidden("you are not in this room"))?;
    match visibility(conn, &room, user_id)? {
        Visibility::None => Err(Error::forbidden("you are not in this room")),
        v => Ok((room, v)),
    }
}

/// State group to show a user: current state for members, the state at their leave for former members.
pub fn visible_state_group(conn: Db<'_>, room: &RoomRow, vis: Visibility) -> Result<Option<StateGroup>> {
    match vis {
        Visibility::UpTo(pos) => events::sg_at_stream(conn, room.room_nid, StreamPos(pos)),
        _ => Ok(room.current_sg),
    }
}

/// The stream position a user's read is capped at: their leave for a former member, else none.
pub fn cap(vis: Visibility) -> i64 {
    match vis {
        Visibility::UpTo(p) => p,
        _ => i64::MAX,
    }
}

/// The state group for `/members?at=`: the state after the room's last event at or before `pos` (a position past
/// the present is the present), if the user may see that event (Synapse's rule); 403 otherwise, also when the room
/// has no event that early.
pub fn state_at_token(conn: Db<'_>, room: &RoomRow, user_id: &UserId, pos: i64) -> Result<StateGroup> {
    let forbidden = || Error::forbidden("you may not see the room's members at that point");
    let last = timeline::newest_first(conn, room.room_nid, StreamPos(i64::MIN), StreamPos(pos), 1)?;
    let row = last.into_iter().next().ok_or_else(forbidden)?;
    if !ClientJudge::new(conn, user_id.as_str()).may_see(&row)? {
        return Err(forbidden());
    }
    timeline::state_at(conn, room.room_nid, StreamPos(pos))?.or(row.sg_after).ok_or_else(forbidden)
}

// ------------------------------------------------------------------------------------------------------------
// Other servers

/// Whether `server` may read the room over federation (`/backfill`, `/event`, `/get_missing_events`, `/state`,
/// `/state_ids`, `/event_auth`): one of its users is joined now (Synapse's `is_host_in_room`), or it peeks it. A server whose
/// users only knocked, were invited, left or were banned may not. While our own join is partial we may not know
/// every member: then the servers the resident listed at our join count too (Synapse's
/// `get_current_hosts_in_room_or_partial_state_approximation`).
pub fn server_may_read_room(conn: Db<'_>, room: &RoomRow, server: &str) -> Result<bool> {
    if members::server_has_membership(conn, room.room_nid, server, "join")? {
        return Ok(true);
    }
    if room.partial_state {
        return Ok(rooms::partial_state_servers(conn, room.room_nid)?.iter().any(|s| s == server));
    }
    // A server peeking the room (MSC2444) fetches its missing events and backfills like a member's would.
    crate::store::peeks::is_peeking(conn, room.room_nid, server, crate::store::accounts::now_ms())
}

/// Judges events for another server (Synapse's `filter_events_for_server`): an event is visible in full unless the
/// history visibility at it is `invited` or `joined` and none of the server's users was joined (or, for `invited`,
/// invited) in the state at it; such events go out redacted. An outlier (no state) is never withheld.
pub struct ServerJudge<'c> {
    conn: Db<'c>,
    server_users: Vec<String>,
    seen: HashMap<StateGroup, bool>,
}

impl<'c> ServerJudge<'c> {
    pub fn new(conn: Db<'c>, room_nid: RoomNid, server: &str) -> Result<ServerJudge<'c>> {
        let server_users = members::users_of_server(conn, room_nid, server)?;
        Ok(ServerJudge { conn, server_users, seen: HashMap::new() })
    }

    pub fn may_see(&mut self, row: &EventRow) -> Result<bool> {
        let Some(sg) = row.sg_after.filter(|_| !row.outlier) else { return Ok(true) };
        if let Some(v) = self.seen.get(&sg) {
            return Ok(*v);
        }
        let v = self.judge(sg)?;
        self.seen.insert(sg, v);
        Ok(v)
    }

    fn judge(&self, sg: StateGroup) -> Result<bool> {
        let invited_too = match history_visibility_in(self.conn, sg)? {
            HistoryVisibility::Joined => false,
            HistoryVisibility::Invited => true,
            _ => return Ok(true),
        };
        for user in &self.server_users {
            let key = state_groups::find_state_key_nid(self.conn, "m.room.member", user)?;
            let m = content_in(self.conn, sg, key)?.and_then(|c| membership_of_content(&c));
            match m.as_deref() {
                Some("join") => return Ok(true),
                Some("invite") if invited_too => return Ok(true),
                _ => {}
            }
        }
        Ok(false)
    }
}
