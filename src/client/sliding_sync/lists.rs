//! The rooms a sliding sync can list: the user's joined, invited and knocked rooms (and rooms left since the
//! connection's position, so the client learns of the leave), with what the filters and the ordering need.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::client::sliding_sync::request::Filters;
use crate::error::Result;
use crate::room::stripped::stripped_state;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::{account_data, members, rooms, sliding_sync, state_groups, Db};

/// A room the user can see in the lists.
pub struct Candidate {
    pub room: rooms::RoomRow,
    pub membership: String,
    /// Recency: the stream position of the newest event that bumps the room (messages, encrypted, create, ...), or
    /// of the user's latest membership change where there is none (or they are not joined), as Synapse.
    pub bump_stamp: i64,
    pub is_dm: bool,
    pub encrypted: bool,
    /// `m.room.create`'s `type` (None for a plain room).
    pub room_type: Option<String>,
    /// Stripped state (invites and knocks).
    pub stripped: Option<Vec<Value>>,
}

/// The user's DM rooms: those in their `m.direct` account data.
pub fn direct_rooms(c: Db<'_>, user_id: &str) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    if let Some(Value::Object(direct)) = account_data::get(c, user_id, "", "m.direct")? {
        for rooms in direct.values() {
            out.extend(rooms.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned));
        }
    }
    Ok(out)
}

/// Every room the lists may show, up to stream position `upto`. `changed` holds the user's membership changes
/// since the connection's position (rooms left or banned from there are listed once more).
pub fn candidates(
    c: Db<'_>,
    user_id: &str,
    upto: i64,
    changed: &HashMap<RoomNid, String>,
    ignored: &HashSet<String>,
) -> Result<Vec<Candidate>> {
    let direct = direct_rooms(c, user_id)?;
    let mut out = Vec::new();
    for membership in ["join", "invite", "knock", "leave", "ban"] {
        for (room_nid, _) in members::rooms_with_membership(c, user_id, membership)? {
            let gone = membership == "leave" || membership == "ban";
            if gone && changed.get(&room_nid).is_none_or(|m| m != membership) {
                continue;
            }
            let Some(room) = rooms::room_by_nid(c, room_nid)? else { continue };
            let mut cand = describe(c, room, membership, user_id, upto, &direct)?;
            if membership == "invite" {
                // Invites from ignored users are not shown.
                let stripped = cand.stripped.as_deref().unwrap_or_default();
                let inviter = stripped
                    .iter()
                    .find(|e| e["type"] == "m.room.member" && e["state_key"] == user_id)
                    .and_then(|e| e["sender"].as_str());
                if inviter.is_some_and(|s| ignored.contains(s)) {
                    continue;
                }
                cand.is_dm |= stripped.iter().any(|e| {
                    e["type"] == "m.room.member" && e["state_key"] == user_id && e["content"]["is_direct"] == true
                });
            }
            out.push(cand);
        }
    }
    Ok(out)
}

/// A room the user peeks (MSC2753), shown when a `room_subscriptions` entry names it and its history is still
/// world-readable; never part of a list (the user is not in it). `None` when it is not (or no longer) peekable.
pub fn peeked(c: Db<'_>, user_id: &str, room_id: &str, upto: i64) -> Result<Option<Candidate>> {
    let Some(room) = rooms::room_by_id(c, room_id)? else { return Ok(None) };
    if !crate::store::peeks::rooms_peeked_by(c, user_id)?.iter().any(|(nid, _, _)| *nid == room.room_nid) {
        return Ok(None);
    }
    let user = ruma::UserId::parse(user_id).map_err(|_| crate::error::Error::invalid_param("user id"))?;
    if crate::room::visibility::visibility(c, &room, &user)? != crate::room::visibility::Visibility::All {
        return Ok(None);
    }
    let mut cand = describe(c, room, PEEK, user_id, upto, &HashSet::new())?;
    // Recency of a peeked room: its newest message, as for a joined one (the user has no membership in it).
    cand.bump_stamp = sliding_sync::bump_stamp(c, cand.room.room_nid, StreamPos(upto))?.unwrap_or(0);
    Ok(Some(cand))
}

/// The `membership` of a candidate the user peeks.
pub const PEEK: &str = "peek";

fn describe(
    c: Db<'_>,
    room: rooms::RoomRow,
    membership: &str,
    user_id: &str,
    upto: i64,
    direct: &HashSet<String>,
) -> Result<Candidate> {
    let membership_pos = sliding_sync::latest_membership_pos(c, user_id, room.room_nid)?.unwrap_or(0);
    let stripped =
        if membership == "invite" || membership == "knock" { Some(stripped_state(c, &room, user_id)?) } else { None };
    let (encrypted, room_type) = match (&stripped, room.current_sg) {
        (Some(st), _) => {
            let of = |t: &str| st.iter().find(|e| e["type"] == t);
            let room_type = of("m.room.create").and_then(|e| e["content"]["type"].as_str()).map(str::to_owned);
            (of("m.room.encryption").is_some(), room_type)
        }
        (None, Some(sg)) => {
            let encrypted = crate::room::state_content(c, sg, "m.room.encryption", "")?.is_some();
            let create = crate::room::state_content(c, sg, "m.room.create", "")?;
            (encrypted, create.and_then(|v| v["type"].as_str().map(str::to_owned)))
        }
        (None, None) => (false, None),
    };
    let bump_stamp = if membership == "join" {
        sliding_sync::bump_stamp(c, room.room_nid, StreamPos(upto))?.unwrap_or(membership_pos)
    } else {
        membership_pos
    };
    let is_dm = direct.contains(&room.room_id);
    Ok(Candidate { room, membership: membership.to_owned(), bump_stamp, is_dm, encrypted, room_type, stripped })
}

/// The children of the given spaces (`m.space.child` with a `via`), for the `spaces` filter.
pub fn space_children(c: Db<'_>, spaces: &[String]) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for space in spaces {
        let Some(sg) = rooms::room_by_id(c, space)?.and_then(|r| r.current_sg) else { continue };
        for (child, nid) in state_groups::load_state_of_type(c, sg, "m.space.child")? {
            let Some(row) = crate::store::events::event_by_nid(c, nid)? else { continue };
            let content: Value = serde_json::from_str::<Value>(&row.json)?["content"].clone();
            if content["via"].as_array().is_some_and(|v| !v.is_empty()) {
                out.insert(child);
            }
        }
    }
    Ok(out)
}

/// The user's tags of each candidate room (the keys of its `m.tag` room account data), for the `tags` filters.
pub fn room_tags(c: Db<'_>, user_id: &str, cands: &[Candidate]) -> Result<HashMap<String, HashSet<String>>> {
    let mut out = HashMap::new();
    for cand in cands {
        if let Some(Value::Object(tags)) =
            account_data::get(c, user_id, &cand.room.room_id, "m.tag")?.and_then(|v| v.get("tags").cloned())
        {
            out.insert(cand.room.room_id.clone(), tags.keys().cloned().collect());
        }
    }
    Ok(out)
}

/// Whether a room passes a list's filters (`children`: the `spaces` filter's rooms, when it has one; `tags`: the
/// rooms' tags, read when a filter uses them).
pub fn passes(
    cand: &Candidate,
    f: &Filters,
    children: Option<&HashSet<String>>,
    tags: &HashMap<String, HashSet<String>>,
) -> bool {
    if f.is_dm.is_some_and(|want| want != cand.is_dm)
        || f.is_encrypted.is_some_and(|want| want != cand.encrypted)
        || f.is_invite.is_some_and(|want| want != (cand.membership == "invite"))
    {
        return false;
    }
    if let Some(types) = &f.room_types {
        if !types.contains(&cand.room_type) {
            return false;
        }
    }
    if f.not_room_types.contains(&cand.room_type) {
        return false;
    }
    if f.uses_tags() {
        let has = tags.get(&cand.room.room_id);
        let any_of = |names: &[String]| has.is_some_and(|h| names.iter().any(|n| h.contains(n)));
        if f.tags.as_deref().is_some_and(|want| !any_of(want)) || f.not_tags.as_deref().is_some_and(any_of) {
            return false;
        }
    }
    children.is_none_or(|ch| ch.contains(&cand.room.room_id))
}

/// A list's rooms in order: most recently bumped first (ties by room id).
pub fn sorted(cands: &[Candidate], keep: impl Fn(&Candidate) -> bool) -> Vec<&Candidate> {
    let mut out: Vec<&Candidate> = cands.iter().filter(|c| keep(c)).collect();
    out.sort_by(|a, b| b.bump_stamp.cmp(&a.bump_stamp).then_with(|| a.room.room_id.cmp(&b.room.room_id)));
    out
}
