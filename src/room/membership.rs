//! Membership changes and who may see what.

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::room::append::{append_local_or_invite, Appended, LocalEvent, LocalOutcome};
use crate::room::Identity;
use crate::store::ids::{EventNid, StateGroup, StreamPos};
use crate::store::rooms::{self, RoomRow};
use crate::store::{accounts, events, members, Db, Writer};

/// Writes `target`'s membership (join/leave/invite/ban) as `sender`, with ruma's auth deciding if it is allowed.
/// An invite of a remote user comes back unstored, for the invitee's server to countersign.
#[allow(clippy::too_many_arguments)]
pub fn set_membership(
    w: &mut Writer<'_>,
    identity: &Identity,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    membership: &str,
    reason: Option<&str>,
    extra: Option<Value>,
) -> Result<LocalOutcome> {
    let room = rooms::room_by_id(w.db(), room_id.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
    let mut content = json!({"membership": membership});
    if let Some(r) = reason {
        content["reason"] = json!(r);
    }
    if membership == "join" || membership == "invite" {
        // Profile of the target for local users; remote profiles are filled by their own server on join.
        if let Some(u) = accounts::get_user(w.db(), target.as_str())? {
            if let Some(d) = u.displayname {
                content["displayname"] = json!(d);
            }
            if let Some(a) = u.avatar_url {
                content["avatar_url"] = json!(a);
            }
        }
    }
    if let (Some(Value::Object(extra)), Some(obj)) = (extra, content.as_object_mut()) {
        for (k, v) in extra {
            obj.entry(k).or_insert(v);
        }
    }
    let current = members::membership_of(w.db(), room.room_nid, target.as_str())?.map(|m| m.0);
    // Idempotent no-ops that auth would reject or that would spam the timeline.
    if membership == "join" && current.as_deref() == Some("join") && sender == target {
        let nid = members::membership_of(w.db(), room.room_nid, target.as_str())?.map_or(EventNid(0), |m| m.1);
        let row = events::event_by_nid(w.db(), nid)?.ok_or_else(|| Error::internal("member event missing"))?;
        let stream = row.stream_ordering.unwrap_or(StreamPos(0));
        return Ok(LocalOutcome::Appended(Appended { event_id: row.event_id, event_nid: nid, stream }));
    }
    if membership == "leave" && sender == target && current.as_deref() == Some("leave") {
        // Leaving again after one's own leave is a no-op answering with that leave (as in Synapse).
        let nid = members::membership_of(w.db(), room.room_nid, target.as_str())?.map_or(EventNid(0), |m| m.1);
        let row = events::event_by_nid(w.db(), nid)?.ok_or_else(|| Error::internal("member event missing"))?;
        if row.sender == target.as_str() {
            let stream = row.stream_ordering.unwrap_or(StreamPos(0));
            return Ok(LocalOutcome::Appended(Appended { event_id: row.event_id, event_nid: nid, stream }));
        }
    }
    if membership == "leave" && sender == target && !matches!(current.as_deref(), Some("join" | "invite" | "knock")) {
        return Err(Error::forbidden("you are not in this room"));
    }
    append_local_or_invite(
        w,
        identity,
        room_id,
        sender,
        LocalEvent::state("m.room.member", target.as_str(), content),
        None,
    )
}

/// How far a user may read a room's timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Visibility {
    /// Member now (or world-readable): everything.
    All,
    /// Former member: up to (and including) the stream position of their leave.
    UpTo(i64),
    None,
}

pub fn visibility(conn: Db<'_>, room: &RoomRow, user_id: &UserId) -> Result<Visibility> {
    let user_id = user_id.as_str();
    match members::membership_of(conn, room.room_nid, user_id)? {
        Some((m, _)) if m == "join" => return Ok(Visibility::All),
        Some((m, nid))
            if (m == "leave" || m == "ban") && members::was_locally_joined(conn, user_id, room.room_nid)? =>
        {
            let row = events::event_by_nid(conn, nid)?;
            return Ok(Visibility::UpTo(row.and_then(|r| r.stream_ordering).map_or(0, |p| p.0)));
        }
        _ => {}
    }
    if let Some(sg) = room.current_sg {
        let hv = crate::room::state_content(conn, sg, "m.room.history_visibility", "")?;
        if hv.as_ref().and_then(|v| v.get("history_visibility")).and_then(Value::as_str) == Some("world_readable") {
            return Ok(Visibility::All);
        }
    }
    Ok(Visibility::None)
}

/// A room id from a request to read a room, parsed at the edge: one that does not parse names no room the user is
/// in (403, as [`readable_room`] answers for a room it does not know).
pub fn parse_readable_room_id(room_id: &str) -> Result<OwnedRoomId> {
    RoomId::parse(room_id).map_err(|_| Error::forbidden("you are not in this room"))
}

/// Loads a room the user may read, or 403/404.
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

/// The first stream position a user may read in a room, from the room's history visibility (taken from the
/// current state): `shared`/`world_readable` everything, `invited` from their first invite or join, `joined` from
/// their first join. Applied to `/messages`, `/context`, `/event` and the sync timeline.
pub fn visible_from(conn: Db<'_>, room: &RoomRow, user_id: &UserId) -> Result<i64> {
    let user_id = user_id.as_str();
    let Some(sg) = room.current_sg else { return Ok(i64::MIN) };
    let hv = crate::room::state_content(conn, sg, "m.room.history_visibility", "")?
        .and_then(|v| v.get("history_visibility").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "shared".into());
    let memberships: &[&str] = match hv.as_str() {
        "joined" => &["join"],
        "invited" => &["invite", "join"],
        _ => return Ok(i64::MIN),
    };
    let mut first: Option<i64> = None;
    for m in memberships {
        let pos = members::first_local_membership_pos(conn, user_id, room.room_nid, m)?.map(|p| p.0);
        first = match (first, pos) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    // Never a member under these rules: nothing is visible (the caller has already checked membership).
    Ok(first.unwrap_or(i64::MAX))
}
