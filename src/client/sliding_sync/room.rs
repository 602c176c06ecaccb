//! One room of a sliding sync answer: its timeline (the same reads and history visibility as `/sync`), the state
//! the client asked for (`required_state` with `*`, `$LAZY`, `$ME`), name, avatar, heroes, counts and recency.

use std::collections::{BTreeSet, HashSet};

use serde_json::{json, Value};

use crate::client::format;
use crate::client::sliding_sync::lists::Candidate;
use crate::client::sliding_sync::request::{remembered_state, Effective};
use crate::client::sync::{lazy_members, timeline_window};
use crate::error::Result;
use crate::http::Auth;
use crate::store::events::{self, EventRow};
use crate::store::ids::{EventNid, StateGroup, StreamPos};
use crate::store::members::MemberProfile;
use crate::store::{members, receipts, sliding_sync, state_groups, timeline, Db};

/// How many heroes a nameless room is sent with.
const HEROES: i64 = 5;

/// What a room's answer needs besides the room.
pub struct RoomCtx<'a> {
    pub c: Db<'a>,
    pub auth: &'a Auth,
    pub ignored: &'a HashSet<String>,
    /// The stream position the answer goes up to.
    pub upto: i64,
    /// The connection's previous position (events after it are "live").
    pub conn_since: Option<i64>,
}

/// A room's answer, the timeline event ids it carries (receipts of a room new to the connection are limited to
/// those), and the config the connection remembers the room as sent with.
pub struct Built {
    pub body: Value,
    pub timeline_ids: HashSet<String>,
    pub remembered: Effective,
}

/// How the connection last sent a room (that is not sent afresh now): up to which stream position, with which
/// config (what it remembers of it: [`Built::remembered`]).
pub struct Prev<'a> {
    pub s: i64,
    pub config: &'a Effective,
}

/// A joined (or just left) room. `prev`: how the connection last sent it, None to send it afresh (`initial`).
/// None when nothing changed since then (no new event, no read receipt of the user's own) and the config asks for
/// nothing more than before. A config asking for more (Synapse's per-connection room config) sends the room at
/// once: a larger `timeline_limit` the whole latest timeline again (`unstable_expanded_timeline`), `required_state`
/// entries newly asked for their current state; entries asked for before only what changed.
pub fn joined(
    ctx: &RoomCtx<'_>,
    cand: &Candidate,
    config: &Effective,
    prev: Option<Prev<'_>>,
) -> Result<Option<Built>> {
    let (c, auth, room) = (ctx.c, ctx.auth, &cand.room);
    let me = auth.user_id.as_str();
    let since = prev.as_ref().map(|p| p.s);
    let expanded = prev.as_ref().is_some_and(|p| config.timeline_limit > p.config.timeline_limit);
    let more_state = prev.as_ref().is_some_and(|p| !p.config.covers_state(config));
    // A room we are in (or peek: MSC2753) is shown live; a room we left up to our leave.
    let live = cand.membership == "join" || cand.membership == super::lists::PEEK;
    let upto = if live {
        ctx.upto
    } else {
        sliding_sync::latest_membership_pos(c, me, room.room_nid)?.unwrap_or(ctx.upto).min(ctx.upto)
    };
    if let (Some(s), false) = (since, expanded || more_state) {
        let (after, to) = (StreamPos(s), StreamPos(upto));
        // Something on the timeline, or the user's own read receipt moved (its counts changed).
        let read = || -> Result<bool> {
            Ok(receipts::changed_since(c, room.room_nid, after, to, me)?.iter().any(|r| r.user_id == me))
        };
        if !sliding_sync::has_events_in(c, room.room_nid, after, to)? && !read()? {
            return Ok(None);
        }
    }
    let limit = config.timeline_limit as usize;
    let tw = timeline_window(c, auth, room, limit, if expanded { None } else { since }, upto)?;
    let rows: Vec<EventRow> = tw.rows.into_iter().filter(|r| !ctx.ignored.contains(&r.sender)).collect();
    let device = Some((me, auth.device_id.as_str()));
    let timeline =
        rows.iter().map(|r| format::event(c, r, &room.room_id, device, false)).collect::<Result<Vec<_>>>()?;
    let timeline_ids: HashSet<String> = rows.iter().map(|r| r.event_id.clone()).collect();
    let num_live =
        ctx.conn_since.map_or(0, |cs| rows.iter().filter(|r| r.stream_ordering.is_some_and(|p| p.0 > cs)).count());

    // The room's state as the user may see it: current for a member; at the leave for a former member; none of it
    // for a user never joined (a rejected invite, a retracted knock), as `/sync`'s `leave` section.
    let state_of_member = live;
    let sg = if state_of_member {
        room.current_sg
    } else if members::was_locally_joined(c, me, room.room_nid)? {
        timeline::state_at(c, room.room_nid, StreamPos(upto))?
    } else {
        None
    };
    let members_then = match sg {
        Some(sg) if !state_of_member => Some(members_in(c, sg)?),
        _ => None,
    };
    let mut body = json!({
        "bump_stamp": cand.bump_stamp,
        "limited": tw.limited,
        "prev_batch": tw.prev_batch,
        "num_live": num_live,
    });
    if since.is_none() {
        body["initial"] = json!(true);
    }
    if cand.membership == super::lists::PEEK {
        // Not a joined room: say so, under MSC2753's unstable prefix (sliding sync itself has no peeking).
        body["org.matrix.msc2753.peeking"] = json!(true);
    }
    if expanded {
        body["unstable_expanded_timeline"] = json!(true);
    }
    let mut remembered = config.clone();
    if let Some(sg) = sg {
        let state = required_state(ctx, cand, sg, config, &rows, prev.as_ref(), more_state)?;
        if !state.is_empty() {
            body["required_state"] = json!(state);
        }
        name_avatar_heroes(c, cand, sg, me, members_then.as_deref(), &mut body)?;
        if let Some(p) = &prev {
            remembered.required_state = remembered_state(&p.config.required_state, &config.required_state, |t, k| {
                unchanged_since(c, sg, t, if k == "$ME" { me } else { k }, p.s)
            })?;
        }
    }
    if let Some(p) = &prev {
        // A smaller limit is remembered only when this answer was cut by it (the client then lacks the events
        // before, and a larger limit later must send them); otherwise it holds at least the previous limit's.
        let smaller = tw.limited && config.timeline_limit < p.config.timeline_limit;
        if !expanded && !smaller {
            remembered.timeline_limit = p.config.timeline_limit;
        }
    }
    // The member counts the user may see: current for a member, at the leave for a former member.
    let counts = match &members_then {
        _ if state_of_member => Some(members::member_counts(c, room.room_nid)?),
        Some(m) => {
            let count = |x: &str| m.iter().filter(|p| p.1 == x).count() as i64;
            Some((count("join"), count("invite")))
        }
        None => None,
    };
    if let Some((joined, invited)) = counts {
        body["joined_count"] = json!(joined);
        body["invited_count"] = json!(invited);
    }
    if !timeline.is_empty() {
        body["timeline"] = json!(timeline);
    }
    let (unread, _) = crate::client::notifications::unread_counts(c, room, me, false)?;
    body["notification_count"] = unread["notification_count"].clone();
    body["highlight_count"] = unread["highlight_count"].clone();
    if cand.is_dm {
        body["is_dm"] = json!(true);
    }
    Ok(Some(Built { body, timeline_ids, remembered }))
}

/// Whether the room's current state entry (`event_type`, `state_key`) is unchanged since stream position `s` (also
/// when there is none; state learnt without a position, by a resync, counts as changed).
fn unchanged_since(c: Db<'_>, sg: StateGroup, event_type: &str, state_key: &str, s: i64) -> Result<bool> {
    let Some(skn) = state_groups::find_state_key_nid(c, event_type, state_key)? else { return Ok(true) };
    let Some(nid) = state_groups::lookup_state(c, sg, skn)? else { return Ok(true) };
    Ok(events::event_by_nid(c, nid)?.is_none_or(|row| row.stream_ordering.is_some_and(|p| p.0 <= s)))
}

/// An invited or knocked room: its stripped state (`invite_state`, as Synapse names it for both).
pub fn stripped(cand: &Candidate, initial: bool) -> Value {
    let mut body = json!({
        "bump_stamp": cand.bump_stamp,
        "notification_count": 0,
        "highlight_count": 0,
        "invite_state": cand.stripped.clone().unwrap_or_default(),
    });
    if initial {
        body["initial"] = json!(true);
    }
    if cand.is_dm {
        body["is_dm"] = json!(true);
    }
    body
}

/// The members in a state group: (profile, membership), by user id.
fn members_in(c: Db<'_>, sg: StateGroup) -> Result<Vec<(MemberProfile, String)>> {
    let mut out = Vec::new();
    for (user_id, nid) in state_groups::load_state_of_type(c, sg, "m.room.member")? {
        let Some(row) = events::event_by_nid(c, nid)? else { continue };
        let v: Value = serde_json::from_str(&row.json)?;
        let field = |k: &str| v["content"][k].as_str().map(str::to_owned);
        let membership = field("membership").unwrap_or_else(|| "leave".into());
        out.push((
            MemberProfile { user_id, displayname: field("displayname"), avatar_url: field("avatar_url") },
            membership,
        ));
    }
    out.sort_by(|a, b| a.0.user_id.cmp(&b.0.user_id));
    Ok(out)
}

/// The heroes of a room the user left, from the members at their leave (as [`sliding_sync::hero_profiles`] picks
/// them from the current ones).
fn heroes_then(members: &[(MemberProfile, String)], me: &str) -> Vec<MemberProfile> {
    let others = || members.iter().filter(|m| m.0.user_id != me);
    let mut heroes: Vec<MemberProfile> =
        others().filter(|m| m.1 == "join" || m.1 == "invite").take(HEROES as usize).map(|m| m.0.clone()).collect();
    if heroes.is_empty() {
        heroes = others().take(HEROES as usize).map(|m| m.0.clone()).collect();
    }
    heroes
}

/// `name` (the `m.room.name`, when set), `avatar` (the `m.room.avatar` url) and, for a room without a name,
/// `heroes` (with their display names and avatars), as Synapse computes them. `members_then`: the members at a
/// former member's leave (None: the current members).
fn name_avatar_heroes(
    c: Db<'_>,
    cand: &Candidate,
    sg: StateGroup,
    me: &str,
    members_then: Option<&[(MemberProfile, String)]>,
    body: &mut Value,
) -> Result<()> {
    let name = crate::room::state_content(c, sg, "m.room.name", "")?
        .and_then(|v| v["name"].as_str().map(str::to_owned))
        .filter(|n| !n.is_empty());
    match name {
        Some(name) => body["name"] = json!(name),
        None => {
            let profiles = match members_then {
                Some(m) => heroes_then(m, me),
                None => sliding_sync::hero_profiles(c, cand.room.room_nid, me, HEROES)?,
            };
            let heroes: Vec<Value> = profiles
                .into_iter()
                .map(|h| {
                    let mut v = json!({"user_id": h.user_id});
                    if let Some(d) = h.displayname {
                        v["displayname"] = json!(d);
                    }
                    if let Some(a) = h.avatar_url {
                        v["avatar_url"] = json!(a);
                    }
                    v
                })
                .collect();
            if !heroes.is_empty() {
                body["heroes"] = json!(heroes);
            }
        }
    }
    if let Some(url) =
        crate::room::state_content(c, sg, "m.room.avatar", "")?.and_then(|v| v["url"].as_str().map(str::to_owned))
    {
        if !url.is_empty() {
            body["avatar"] = json!(url);
        }
    }
    Ok(())
}

/// The state events the room config asks for, in the state the user may see (`sg`): `[type, key]` pairs where `*` is any
/// type or key, `$ME` the user, and `["m.room.member", "$LAZY"]` the members of the timeline's senders (in a
/// partial-state room taken from what we hold, as `/sync`'s lazy loading does). When the room was sent before
/// (`prev`), only what changed after that, plus what the previous config did not ask for (`more`: the config
/// asks for something new) and the lazy members of the new timeline. Events also on the timeline are sent here
/// too (as Synapse): clients read the room's state from `required_state` only.
fn required_state(
    ctx: &RoomCtx<'_>,
    cand: &Candidate,
    sg: StateGroup,
    config: &Effective,
    timeline: &[EventRow],
    prev: Option<&Prev<'_>>,
    more: bool,
) -> Result<Vec<Value>> {
    let (c, me) = (ctx.c, ctx.auth.user_id.as_str());
    let mut nids: BTreeSet<EventNid> = BTreeSet::new();
    let mut lazy = false;
    let mut all: Option<Vec<EventNid>> = None;
    let mut load_all = |c: Db<'_>| -> Result<Vec<EventNid>> {
        if all.is_none() {
            all = Some(state_groups::state_event_ids(c, sg, None)?.into_iter().map(|x| x.0).collect());
        }
        Ok(all.clone().unwrap_or_default())
    };
    for (t, k) in &config.required_state {
        let key = if k == "$ME" { me } else { k.as_str() };
        match (t.as_str(), key) {
            ("m.room.member", "$LAZY") => lazy = true,
            (_, "$LAZY") => {}
            ("*", "*") => nids.extend(load_all(c)?),
            ("*", key) => {
                for nid in load_all(c)? {
                    let Some(row) = events::event_by_nid(c, nid)? else { continue };
                    if state_groups::state_key_of(c, row.state_key_nid.unwrap_or_default())?.1 == key {
                        nids.insert(nid);
                    }
                }
            }
            (t, "*") => nids.extend(state_groups::load_state_of_type(c, sg, t)?.into_values()),
            (t, key) => {
                if let Some(skn) = state_groups::find_state_key_nid(c, t, key)? {
                    nids.extend(state_groups::lookup_state(c, sg, skn)?);
                }
            }
        }
    }
    // The state is the room's current state, whether or not an event of it is also on the timeline: clients
    // (matrix-rust-sdk) read state from `required_state` only.
    let mut out = Vec::new();
    for nid in nids {
        let Some(row) = events::event_by_nid(c, nid)? else { continue };
        // Sent before: only the state that changed since (an outlier, state learnt by a resync, has no position:
        // the room is sent afresh when its resync ends), and what the previous config did not ask for.
        let send = match prev {
            None => true,
            Some(p) if row.stream_ordering.is_some_and(|pos| pos.0 > p.s) => true,
            Some(p) if more => {
                let (t, k) = state_groups::state_key_of(c, row.state_key_nid.unwrap_or_default())?;
                !p.config.wants(&t, &k, me)
            }
            Some(_) => false,
        };
        if send {
            out.push(format::state_only(&row, &cand.room.room_id, false));
        }
    }
    if lazy {
        let already: HashSet<String> = out.iter().filter_map(|e| e["event_id"].as_str().map(str::to_owned)).collect();
        for row in lazy_members(c, ctx.auth, &cand.room, timeline, Some(sg), false)? {
            if !already.contains(&row.event_id) {
                out.push(format::state_only(&row, &cand.room.room_id, false));
            }
        }
    }
    Ok(out)
}
