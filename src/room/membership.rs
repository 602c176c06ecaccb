//! Membership changes (who may see what is `room::visibility`).

use ruma::{RoomId, UserId};
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
    if membership == "join" && sender == target && content.get("join_authorised_via_users_server").is_none() {
        // A restricted room: one of our members who may invite vouches for a user of an allowed room.
        if let Some(sg) = room.current_sg {
            let server = identity.server_name.as_str();
            if let Some(by) = restricted_join_authoriser(w.db(), &room, sg, target.as_str(), server)? {
                content["join_authorised_via_users_server"] = json!(by);
            }
        }
    }
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
    // A kick needs someone to kick (as in Synapse): the target must be in the room, invited, knocking or banned
    // (lifting a ban is a leave too). The auth rules alone would allow it.
    if membership == "leave"
        && sender != target
        && !matches!(current.as_deref(), Some("join" | "invite" | "knock" | "ban"))
    {
        return Err(Error::forbidden("the target user is not in the room"));
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

/// For a join the room's `restricted` (or `knock_restricted`) rule allows through `user_id`'s membership of one
/// of the allowed rooms (as this server knows it): a member of `local_server` who may invite, to be named in
/// the join's `join_authorised_via_users_server`. None when the user needs none (already joined or invited, or
/// not a restricted room), is in no allowed room, or no local member may invite.
pub fn restricted_join_authoriser(
    conn: Db<'_>,
    room: &RoomRow,
    sg: StateGroup,
    user_id: &str,
    local_server: &str,
) -> Result<Option<String>> {
    let rules = crate::room::version::rules(&room.version)?;
    if !rules.authorization.restricted_join_rule {
        return Ok(None);
    }
    let membership_at = |user: &str| -> Result<Option<String>> {
        Ok(crate::room::state_event(conn, sg, "m.room.member", user)?.and_then(|p| p.membership()))
    };
    if matches!(membership_at(user_id)?.as_deref(), Some("join" | "invite")) {
        return Ok(None);
    }
    let Some(jr) = crate::room::state_content(conn, sg, "m.room.join_rules", "")? else { return Ok(None) };
    let rule = jr.get("join_rule").and_then(Value::as_str).unwrap_or_default();
    let knock_restricted = rule == "knock_restricted" && rules.authorization.knock_restricted_join_rule;
    if rule != "restricted" && !knock_restricted {
        return Ok(None);
    }
    let mut allowed = false;
    for entry in jr.get("allow").and_then(Value::as_array).into_iter().flatten() {
        if entry.get("type").and_then(Value::as_str) != Some("m.room_membership") {
            continue;
        }
        let Some(other) = entry.get("room_id").and_then(Value::as_str) else { continue };
        if let Some(r) = rooms::room_by_id(conn, other)? {
            // What we know of a room we have left is stale: only a room we are in can vouch for its members.
            let in_it = members::joined_servers(conn, r.room_nid)?.iter().any(|s| s == local_server);
            if in_it && members::membership_of(conn, r.room_nid, user_id)?.is_some_and(|m| m.0 == "join") {
                allowed = true;
                break;
            }
        }
    }
    if !allowed {
        return Ok(None);
    }
    let power = crate::room::power::PowerLevels::load(conn, sg, &room.version)?;
    let needed = power.action("invite", 0);
    let mut best: Option<(i64, String)> = None;
    for user in members::users_of_server(conn, room.room_nid, local_server)? {
        let Ok(level) = UserId::parse(&user).map(|u| power.user(&u)) else { continue };
        if level >= needed
            && best.as_ref().is_none_or(|b| level > b.0)
            && membership_at(&user)?.as_deref() == Some("join")
        {
            best = Some((level, user));
        }
    }
    Ok(best.map(|b| b.1))
}

/// For a join into a room we are in, the servers to join through remotely (make_join/send_join), as Synapse's
/// `_should_perform_remote_join` decides: while a lazy join is partial, any user not joined already (most
/// members, perhaps a ban of this user, are not known yet: a resident with the full state must judge the join,
/// else we could show history to a banned user until the resync ends); in a restricted room whose rule no local
/// member can authorise (none may invite), the other servers whose joined members may. None when a local join
/// can be tried.
pub fn remote_authorisers(
    conn: Db<'_>,
    room: &RoomRow,
    user_id: &UserId,
    local_server: &str,
) -> Result<Option<Vec<String>>> {
    let Some(sg) = room.current_sg else { return Ok(None) };
    let rules = crate::room::version::rules(&room.version)?;
    let rule = crate::room::state_content(conn, sg, "m.room.join_rules", "")?
        .and_then(|jr| jr.get("join_rule").and_then(Value::as_str).map(str::to_owned));
    let restricted = match rule.as_deref() {
        Some("restricted") => rules.authorization.restricted_join_rule,
        Some("knock_restricted") => rules.authorization.knock_restricted_join_rule,
        _ => false,
    };
    let current = members::membership_of(conn, room.room_nid, user_id.as_str())?.map(|m| m.0);
    if room.partial_state && current.as_deref() != Some("join") {
        let mut servers = rooms::partial_state_servers(conn, room.room_nid)?;
        servers.retain(|s| s != local_server);
        return Ok(Some(servers));
    }
    if !restricted || matches!(current.as_deref(), Some("join" | "invite")) {
        return Ok(None);
    }
    let power = crate::room::power::PowerLevels::load(conn, sg, &room.version)?;
    let needed = power.action("invite", 0);
    let mut servers = Vec::new();
    for (user, membership, _) in members::members(conn, room.room_nid)? {
        if membership != "join" || UserId::parse(&user).is_ok_and(|u| power.user(&u) < needed) {
            continue;
        }
        match user.split_once(':').map(|x| x.1) {
            Some(server) if server == local_server => return Ok(None),
            Some(server) => servers.push(server.to_owned()),
            None => {}
        }
    }
    servers.sort();
    servers.dedup();
    Ok(Some(servers))
}
