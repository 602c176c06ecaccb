//! Adding events to a room: building and signing our own, authorising, and persisting any PDU with its state.
//!
//! Everything here runs on the writer thread inside one transaction, so an event and all its effects (state group,
//! extremities, current state, membership table, redaction) land together or not at all.

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::TimelineEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::{Int, RoomId, UserId};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::room::pdu::MAX_PDU_BYTES;
use crate::room::power::PowerLevels;
use crate::room::{load_pdu, state, version, Identity, Pdu};
use crate::store::events::{self, NewEvent};
use crate::store::ids::{EventNid, RoomNid, StateGroup, StateKeyNid, StreamPos};
use crate::store::rooms::{self, RoomRow};
use crate::store::{device_lists, e2ee, members, state_groups, Db, Writer};

/// An event a local user wants to send.
#[derive(Clone, Debug)]
pub struct LocalEvent {
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
    pub redacts: Option<String>,
    /// `origin_server_ts` to use instead of now (an application service's timestamp massaging, `?ts=`).
    pub ts: Option<i64>,
}

impl LocalEvent {
    pub fn state(kind: &str, state_key: &str, content: Value) -> LocalEvent {
        LocalEvent { kind: kind.into(), state_key: Some(state_key.into()), content, redacts: None, ts: None }
    }
    pub fn message(kind: &str, content: Value) -> LocalEvent {
        LocalEvent { kind: kind.into(), state_key: None, content, redacts: None, ts: None }
    }
}

#[derive(Clone, Debug)]
pub struct Appended {
    pub event_id: String,
    pub event_nid: EventNid,
    pub stream: StreamPos,
}

/// The current state event at `ev`'s type and key, when `sender` sent it with the same content: sending `ev`
/// would change nothing, so (as Synapse does) the client gets that event's id back instead of a new event.
/// Only for a joined member: anyone else gets the refusal a new event would.
pub fn unchanged_state(conn: Db<'_>, room_id: &RoomId, sender: &UserId, ev: &LocalEvent) -> Result<Option<String>> {
    let Some(key) = &ev.state_key else { return Ok(None) };
    let Some(room) = rooms::room_by_id(conn, room_id.as_str())? else { return Ok(None) };
    let Some(sg) = room.current_sg else { return Ok(None) };
    if members::membership_of(conn, room.room_nid, sender.as_str())?.is_none_or(|m| m.0 != "join") {
        return Ok(None);
    }
    let Some(current) = crate::room::state_event(conn, sg, &ev.kind, key)? else { return Ok(None) };
    Ok((!current.rejected && current.sender == sender && current.content_value() == ev.content)
        .then(|| current.event_id.to_string()))
}

pub fn to_canonical(v: Value) -> Result<CanonicalJsonValue> {
    CanonicalJsonValue::try_from(v).map_err(|e| Error::bad_json(format!("content is not canonical JSON: {e}")))
}

/// Builds, signs and hashes a PDU with the given references; returns the parsed PDU.
#[allow(clippy::too_many_arguments)]
pub fn build_pdu(
    identity: &Identity,
    rules: &RoomVersionRules,
    room_id: Option<&RoomId>,
    sender: &UserId,
    ev: &LocalEvent,
    prev: &[(ruma::OwnedEventId, String)],
    auth: &[(ruma::OwnedEventId, String)],
    depth: i64,
) -> Result<Pdu> {
    let mut obj = CanonicalJsonObject::new();
    let mut content = ev.content.clone();
    if let Some(r) = &ev.redacts {
        if version::redacts_in_content(rules) {
            if let Some(c) = content.as_object_mut() {
                c.insert("redacts".into(), Value::String(r.clone()));
            }
        }
        obj.insert("redacts".into(), CanonicalJsonValue::String(r.clone()));
    }
    obj.insert("type".into(), CanonicalJsonValue::String(ev.kind.clone()));
    obj.insert("content".into(), to_canonical(content)?);
    if let Some(k) = &ev.state_key {
        obj.insert("state_key".into(), CanonicalJsonValue::String(k.clone()));
    }
    obj.insert("sender".into(), CanonicalJsonValue::String(sender.to_string()));
    if let Some(room_id) = room_id {
        obj.insert("room_id".into(), CanonicalJsonValue::String(room_id.to_string()));
    }
    obj.insert(
        "origin_server_ts".into(),
        CanonicalJsonValue::Integer(
            Int::try_from(ev.ts.unwrap_or_else(crate::store::accounts::now_ms)).unwrap_or_default(),
        ),
    );
    obj.insert(
        "depth".into(),
        CanonicalJsonValue::Integer(Int::try_from(depth).map_err(|_| Error::internal("depth overflow"))?),
    );
    obj.insert("prev_events".into(), version::event_refs(prev, rules));
    obj.insert("auth_events".into(), version::event_refs(auth, rules));
    if matches!(rules.event_id_format, ruma::room_version_rules::EventIdFormatVersion::V1) {
        let local: String = {
            use rand::Rng;
            rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(18).map(char::from).collect()
        };
        obj.insert("event_id".into(), CanonicalJsonValue::String(format!("${local}:{}", identity.server_name)));
    }
    let size = serde_json::to_string(&obj).map(|s| s.len()).unwrap_or(usize::MAX);
    if size > MAX_PDU_BYTES - 1024 {
        return Err(Error::too_large(format!("event is {size} bytes; the limit is {MAX_PDU_BYTES} with signatures")));
    }
    ruma::signatures::hash_and_sign_event(identity.server_name.as_str(), &identity.keypair, &mut obj, &rules.redaction)
        .map_err(|e| match e {
            ruma::signatures::JsonError::PduTooLarge => Error::too_large("event exceeds 65536 bytes"),
            e => Error::internal(format!("signing failed: {e}")),
        })?;
    let event_id = version::event_id(&obj, rules).map_err(Error::internal)?;
    Pdu::from_canonical(obj, event_id, rules).map_err(Error::internal)
}

pub fn reference(conn: Db<'_>, nid: EventNid) -> Result<(ruma::OwnedEventId, String, i64)> {
    let row = events::event_by_nid(conn, nid)?.ok_or_else(|| Error::internal("missing referenced event"))?;
    let v: Value = serde_json::from_str(&row.json)?;
    let sha = v.pointer("/hashes/sha256").and_then(Value::as_str).unwrap_or_default().to_owned();
    let id = ruma::OwnedEventId::try_from(row.event_id).map_err(|e| Error::internal(e.to_string()))?;
    Ok((id, sha, row.depth))
}

/// Runs ruma's event authorisation: state-independent checks against the event's own auth events, then the
/// state-dependent rules against the state group `sg`.
pub fn authorize(
    conn: Db<'_>,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    sg: Option<StateGroup>,
) -> std::result::Result<(), String> {
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, |id| {
        load_pdu(conn, id).ok().flatten()
    })?;
    if pdu.kind == TimelineEventType::RoomCreate {
        return Ok(());
    }
    let Some(sg) = sg else { return Err("no state to authorise against".into()) };
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
        crate::room::state_event(conn, sg, &t.to_string(), k).ok().flatten()
    })
}

/// What became of an event from a local user.
pub enum LocalOutcome {
    /// Stored, and queued for the room's other servers.
    Appended(Appended),
    /// An invite of a remote user, built and authorised but not stored: the invitee's server must countersign it
    /// first (federation `/invite`), then it is stored with [`commit_built`].
    NeedsCountersign(Box<Pdu>),
}

/// Builds, authorises and persists an event from a local user on top of the room's current state. An invite of
/// a remote user here is an internal error: callers that can send one use [`append_local_or_invite`].
pub fn append_local(
    w: &mut Writer<'_>,
    identity: &Identity,
    room_id: &RoomId,
    sender: &UserId,
    ev: LocalEvent,
    txn: Option<(&str, &str)>,
) -> Result<Appended> {
    match append_local_or_invite(w, identity, room_id, sender, ev, txn)? {
        LocalOutcome::Appended(a) => Ok(a),
        LocalOutcome::NeedsCountersign(_) => Err(Error::internal("invite of a remote user needs federation")),
    }
}

/// Like [`append_local`], handing back an invite of a remote user for countersigning instead of storing it.
pub fn append_local_or_invite(
    w: &mut Writer<'_>,
    identity: &Identity,
    room_id: &RoomId,
    sender: &UserId,
    ev: LocalEvent,
    txn: Option<(&str, &str)>,
) -> Result<LocalOutcome> {
    if ev.kind == "m.room.create" && ev.state_key.is_some() {
        // A room has one create event, made with the room (an upgrade makes a new room).
        return Err(Error::bad_json("m.room.create cannot be sent into an existing room"));
    }
    let conn = w.db();
    let room = &rooms::room_by_id(conn, room_id.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
    let rules = version::rules(&room.version)?;
    let mut extremities = events::forward_extremities(conn, room.room_nid)?;
    extremities.sort_unstable();
    let mut prev = Vec::new();
    let mut depth = 0;
    for nid in extremities.iter().rev().take(10) {
        let (id, sha, d) = reference(conn, *nid)?;
        depth = depth.max(d);
        prev.push((id, sha));
    }
    let sg = room.current_sg.ok_or_else(|| Error::forbidden("room has no state"))?;
    let ev = without_stale_authorisation(conn, sg, ev)?;

    let content_raw = serde_json::value::to_raw_value(&ev.content)?;
    let auth_types = ruma::state_res::auth_types_for_event(
        &TimelineEventType::from(ev.kind.as_str()),
        sender,
        ev.state_key.as_deref(),
        &content_raw,
        &rules.authorization,
    )
    .map_err(Error::bad_json)?;
    let mut auth = Vec::new();
    for (t, k) in auth_types {
        if let Some(skn) = state_groups::find_state_key_nid(conn, &t.to_string(), &k)? {
            if let Some(nid) = state_groups::lookup_state(conn, sg, skn)? {
                let (id, sha, _) = reference(conn, nid)?;
                auth.push((id, sha));
            }
        }
    }

    let ev = with_redaction_target(ev)?;
    if let Some(target) = &ev.redacts {
        check_local_redaction(conn, room, sg, sender, target)?;
    }
    if ev.kind == "m.room.power_levels" && version::creators_privileged(&rules) {
        let creators = crate::room::power::PowerLevels::load(conn, sg, &room.version)?.creators().to_vec();
        check_no_creator_in_users(&ev.content, &creators)?;
    }

    let pdu = build_pdu(identity, &rules, Some(room_id), sender, &ev, &prev, &auth, depth + 1)?;
    authorize(conn, &rules, &pdu, Some(sg)).map_err(|e| Error::forbidden(format!("event not allowed: {e}")))?;
    if pdu.kind == TimelineEventType::RoomMember && pdu.membership().as_deref() == Some("invite") {
        if let Some(target) = &pdu.state_key {
            if !identity.is_local_user(target) {
                // The invitee's server must countersign first (federation `/invite`): hand the event back.
                return Ok(LocalOutcome::NeedsCountersign(Box::new(pdu)));
            }
        }
    }
    let appended = persist(w, identity, room, &rules, &pdu, Some(sg), Outcome::Accepted, txn)?;
    // Other servers in the room get it through the durable outbox (same transaction: never lost, never early).
    // A kicked/banned remote user's server hears about it too.
    let mut extra = Vec::new();
    if let (Some(target), true) = (&pdu.state_key, pdu.kind == TimelineEventType::RoomMember) {
        if let Some((_, server)) = target.split_once(':') {
            extra.push(server.to_owned());
        }
    }
    crate::store::outbox::enqueue_pdu(
        w.db(),
        room.room_nid,
        &appended.event_id,
        identity.server_name.as_str(),
        &extra,
    )?;
    crate::room::peek::end_if_hidden(w.db(), room.room_nid)?;
    Ok(LocalOutcome::Appended(appended))
}

/// A join of a user already joined (a profile change) needs no authorising user: its
/// `join_authorised_via_users_server` is dropped, whatever it holds (as Synapse does).
fn without_stale_authorisation(conn: Db<'_>, sg: StateGroup, mut ev: LocalEvent) -> Result<LocalEvent> {
    let (Some(target), true) = (&ev.state_key, ev.kind == "m.room.member") else { return Ok(ev) };
    if ev.content.get("membership").and_then(Value::as_str) != Some("join")
        || ev.content.get("join_authorised_via_users_server").is_none()
    {
        return Ok(ev);
    }
    if crate::room::state_event(conn, sg, "m.room.member", target)?.and_then(|p| p.membership()).as_deref()
        == Some("join")
    {
        ev.content.as_object_mut().map(|o| o.remove("join_authorised_via_users_server"));
    }
    Ok(ev)
}

/// Persists an event we built earlier (e.g. a remote-countersigned invite) on top of its prev events and sends it
/// to the room's servers.
pub fn commit_built(
    w: &mut Writer<'_>,
    identity: &Identity,
    pdu: &Pdu,
    extra_destinations: &[String],
) -> Result<Appended> {
    let r = crate::room::remote::handle_incoming(w, identity, &pdu.room_id, pdu, None)?;
    let appended = match r {
        crate::room::remote::Incoming::Stored(a, Outcome::Accepted) => a,
        crate::room::remote::Incoming::Stored(_, o) => {
            return Err(Error::forbidden(format!("event not allowed: {o:?}")))
        }
        crate::room::remote::Incoming::AlreadyKnown => return Err(Error::forbidden("event already sent")),
        crate::room::remote::Incoming::MissingPrevs(_) => {
            return Err(Error::internal("built event lost its prev events"))
        }
    };
    let room = rooms::room_by_id(w.db(), pdu.room_id.as_str())?.ok_or_else(|| Error::internal("room vanished"))?;
    crate::store::outbox::enqueue_pdu(
        w.db(),
        room.room_nid,
        &appended.event_id,
        identity.server_name.as_str(),
        extra_destinations,
    )?;
    Ok(appended)
}

/// A redaction from a local user names its target, however it was sent: `/redact` sets it, `/send` and a state
/// PUT of `m.room.redaction` carry it in `content.redacts` (as v11 puts it; older versions get it at the top level
/// too, as Synapse's MSC4169 support moves it). A redaction naming no event is refused: it could only be a no-op.
fn with_redaction_target(mut ev: LocalEvent) -> Result<LocalEvent> {
    if ev.kind != "m.room.redaction" {
        return Ok(ev);
    }
    if ev.redacts.is_none() {
        ev.redacts = match ev.content.get("redacts") {
            Some(Value::String(r)) => Some(r.clone()),
            Some(_) => return Err(Error::bad_json("content.redacts must be an event id")),
            None => return Err(Error::bad_json("a redaction must name the event it redacts (content.redacts)")),
        };
    }
    let target = ev.redacts.as_deref().unwrap_or_default();
    ruma::EventId::parse(target).map_err(|e| Error::invalid_param(format!("invalid event id {target}: {e}")))?;
    Ok(ev)
}

/// The rules a local user's redaction must pass before it is sent, whatever endpoint it came through (as Synapse
/// checks them): the target must be in this room; a user without the redact power level may redact only their
/// own events (and only events we have); the create event and server ACLs cannot be redacted.
fn check_local_redaction(conn: Db<'_>, room: &RoomRow, sg: StateGroup, sender: &UserId, target: &str) -> Result<()> {
    let row = events::event_by_id(conn, target)?.filter(|r| r.rejected.is_none());
    let row = match row {
        Some(r) if r.room_nid != room.room_nid => return Err(Error::not_found("event not found in this room")),
        Some(r) => Some(r),
        None => None,
    };
    if let Some(r) = &row {
        if r.event_type == "m.room.create" || r.event_type == "m.room.server_acl" {
            return Err(Error::forbidden(format!("{} events cannot be redacted", r.event_type)));
        }
    }
    if row.as_ref().is_some_and(|r| r.sender == sender.as_str()) {
        return Ok(());
    }
    if !PowerLevels::load(conn, sg, &room.version)?.can_redact_others(sender) {
        return match row {
            None => Err(Error::not_found("event not found in this room")),
            Some(_) => Err(Error::forbidden("you may not redact other users' events")),
        };
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Accepted,
    SoftFailed,
    Rejected(String),
}

/// Persists a PDU whose state before is the group `sg_before` and updates extremities, current state,
/// memberships and redactions.
#[allow(clippy::too_many_arguments)]
pub fn persist(
    w: &mut Writer<'_>,
    identity: &Identity,
    room: &RoomRow,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    sg_before: Option<StateGroup>,
    outcome: Outcome,
    txn: Option<(&str, &str)>,
) -> Result<Appended> {
    let stream = StreamPos(w.next_stream());
    let conn = w.db();
    let skn = match &pdu.state_key {
        Some(k) => Some(state_groups::state_key_nid(conn, &pdu.kind.to_string(), k)?),
        None => None,
    };
    let json = pdu.canonical_string();
    let rejected = match &outcome {
        Outcome::Rejected(r) => Some(r.as_str()),
        _ => None,
    };
    // An event held as an outlier (e.g. in a resync's or gap's state) takes the outlier's place and event_nid, so
    // the state groups and memberships citing it stay valid.
    let reuse = events::take_outlier(conn, pdu.event_id.as_str())?;
    let event_nid = events::insert_event_with_nid(
        conn,
        reuse,
        &NewEvent {
            event_id: pdu.event_id.as_str(),
            room_nid: room.room_nid,
            event_type: &pdu.kind.to_string(),
            state_key_nid: skn,
            sender: pdu.sender.as_str(),
            origin_server_ts: u64::from(pdu.origin_server_ts.get()) as i64,
            depth: pdu.depth,
            stream_ordering: Some(stream),
            outlier: false,
            rejected,
            soft_failed: outcome == Outcome::SoftFailed,
            txn,
            json: &json,
        },
    )?;
    let prevs: Vec<String> = pdu.prev_events.iter().map(|e| e.to_string()).collect();
    events::insert_edges(conn, event_nid, &prevs)?;
    events::insert_auth_edges(conn, event_nid, &pdu.auth_events.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;

    let sg_after = match (skn, &outcome) {
        (Some(skn), Outcome::Accepted) => state::new_group(conn, room.room_nid, sg_before, &[(skn, Some(event_nid))])?,
        _ => match sg_before {
            Some(sg) => sg,
            None => return Err(Error::internal("event without state before")),
        },
    };
    events::set_sg_after(conn, event_nid, sg_after)?;

    if outcome == Outcome::Accepted {
        let prev_nids: Vec<EventNid> = prevs.iter().filter_map(|p| events::event_nid(conn, p).ok().flatten()).collect();
        events::replace_extremities(conn, room.room_nid, &prev_nids, event_nid)?;
        update_current_state(w, identity, room, event_nid, sg_before, sg_after)?;
        if pdu.kind == TimelineEventType::RoomRedaction {
            apply_redaction(conn, room, rules, pdu)?;
        }
    }
    Ok(Appended { event_id: pdu.event_id.to_string(), event_nid, stream })
}

/// Recomputes the room's current state from its forward extremities and keeps `room_members` in step.
fn update_current_state(
    w: &mut Writer<'_>,
    identity: &Identity,
    room: &RoomRow,
    event_nid: EventNid,
    sg_before: Option<StateGroup>,
    sg_after: StateGroup,
) -> Result<()> {
    let conn = w.db();
    let extremities = events::forward_extremities(conn, room.room_nid)?;
    let new_sg = if extremities == [event_nid] {
        sg_after
    } else {
        let mut groups = Vec::new();
        for nid in &extremities {
            if let Some(row) = events::event_by_nid(conn, *nid)? {
                if let Some(g) = row.sg_after {
                    groups.push(g);
                }
            }
        }
        state::resolve_groups(conn, room.room_nid, &room.version, &groups)?
    };
    let old_sg = rooms::room_by_nid(conn, room.room_nid)?.and_then(|r| r.current_sg);
    if old_sg == Some(new_sg) {
        return Ok(());
    }
    rooms::set_current_sg(conn, room.room_nid, new_sg)?;
    // Membership changes between the old and new current state (the old members are read only when the state
    // moved some other way than by this event: reading them costs a pass over every member of a big room).
    let changed: Vec<(String, EventNid)> = if new_sg == sg_after && old_sg.is_some() && old_sg == sg_before {
        // Common case: only this event may have changed membership.
        match events::event_by_nid(conn, event_nid)? {
            Some(row) if row.event_type == "m.room.member" => {
                let (_, key) = state_groups::state_key_of(conn, row.state_key_nid.unwrap_or(StateKeyNid(0)))?;
                vec![(key, event_nid)]
            }
            _ => vec![],
        }
    } else {
        match old_sg {
            // Only the entries the two states differ in (a resolved fork moves a few among 100k members).
            Some(old) => {
                let mut changed = Vec::new();
                for (skn, values) in state_groups::differing_entries(conn, &[old, new_sg])? {
                    if let Some(nid) = values[1] {
                        let (event_type, key) = state_groups::state_key_of(conn, skn)?;
                        if event_type == "m.room.member" {
                            changed.push((key, nid));
                        }
                    }
                }
                changed
            }
            None => state_groups::load_state_of_type(conn, new_sg, "m.room.member")?.into_iter().collect(),
        }
    };
    let mut joined_locals = Vec::new();
    for (user_id, nid) in changed {
        let c = apply_membership(w, identity, room.room_nid, &user_id, nid)?;
        if c.local && c.joined && !c.was_joined {
            joined_locals.push(user_id);
        }
    }
    // The servers of a room one of our users joined learn of their devices (spec: "when that user joins a room
    // which contains servers which are not already receiving updates"). Not for a lazy join: its server list is
    // a guess until the resync, which tells the servers it learns about (`partial::complete`), as MSC3902 asks.
    if !room.partial_state {
        for user_id in joined_locals {
            e2ee::announce_devices_to_room(w.db(), identity.server_name.as_str(), &user_id, room.room_nid)?;
        }
    }
    Ok(())
}

/// What [`apply_membership`] changed.
#[derive(Debug, Clone, Copy)]
pub struct MembershipChange {
    /// The user is one of ours.
    pub local: bool,
    pub was_joined: bool,
    pub joined: bool,
}

/// Writes one membership into `room_members` (and the local membership stream for our users). A join that ends
/// may end the tracking of remote users' device lists (`store::device_lists`).
pub fn apply_membership(
    w: &mut Writer<'_>,
    identity: &Identity,
    room_nid: RoomNid,
    user_id: &str,
    event_nid: EventNid,
) -> Result<MembershipChange> {
    let old = members::membership_of(w.db(), room_nid, user_id)?.map(|(m, _)| m);
    let content = members::stored_member_content(w.db(), event_nid)?;
    apply_membership_over(w, identity, room_nid, user_id, (event_nid, content), old)
}

/// [`apply_membership`] for a caller that has just read the user's current membership `old` in the room and the
/// member event's content.
pub fn apply_membership_over(
    w: &mut Writer<'_>,
    identity: &Identity,
    room_nid: RoomNid,
    user_id: &str,
    (event_nid, (membership, displayname, avatar_url)): (EventNid, members::MemberContent),
    old: Option<String>,
) -> Result<MembershipChange> {
    members::replace_member(
        w.db(),
        &members::MemberUpdate {
            room_nid,
            user_id,
            membership: &membership,
            event_nid,
            displayname: displayname.as_deref(),
            avatar_url: avatar_url.as_deref(),
        },
        old.as_deref(),
    )?;
    let local = identity.is_local_user(user_id);
    let was_joined = old.as_deref() == Some("join");
    if was_joined && membership != "join" {
        let ours = identity.server_name.as_str();
        if local {
            device_lists::untrack_unshared_in_room(w.db(), ours, room_nid)?;
        } else {
            device_lists::untrack_if_unshared(w.db(), ours, user_id)?;
        }
    }
    if local {
        let stream = StreamPos(w.next_stream());
        members::record_local_membership(w.db(), stream, user_id, room_nid, &membership, event_nid)?;
        if membership == "join" {
            members::unforget_room(w.db(), user_id, room_nid)?;
        }
    }
    if local && !was_joined && membership == "join" {
        crate::room::upgrade::carry_over_user_state(w, user_id, room_nid)?;
    }
    Ok(MembershipChange { local, was_joined, joined: membership == "join" })
}

/// Applies an accepted redaction to its target, if we have it and the redaction may take effect. Every redaction
/// takes effect here (local sends of any kind, federation, backfill), so the rule is the same for all: the spec's
/// "Redactions" (room versions 3+: the redaction is accepted into the DAG whoever sent it, but applied only when
/// its sender had the redact power level, judged on the redaction's own auth events as Synapse does, or is of the
/// target's sender's server; v1-2 authorisation already refused anything else). Create events are never redacted
/// (as Synapse).
fn apply_redaction(conn: Db<'_>, room: &RoomRow, rules: &RoomVersionRules, redaction: &Pdu) -> Result<()> {
    let Some(target_id) = &redaction.redacts else { return Ok(()) };
    let Some(target) = events::event_by_id(conn, target_id.as_str())? else { return Ok(()) };
    if target.room_nid != room.room_nid || target.redacted_by.is_some() || target.event_type == "m.room.create" {
        return Ok(());
    }
    let same_server = target.sender.split_once(':').map(|x| x.1) == Some(redaction.sender.server_name().as_str());
    if !same_server
        && !PowerLevels::of_auth_events(conn, redaction, &room.version)?.can_redact_others(&redaction.sender)
    {
        tracing::debug!(redaction = %redaction.event_id, target = %target_id, "redaction not applied: no power");
        return Ok(());
    }
    let obj: CanonicalJsonObject = serde_json::from_str(&target.json)?;
    let redacted = ruma::canonical_json::redact(obj, &rules.redaction, None)
        .map_err(|e| Error::internal(format!("redaction failed: {e}")))?;
    events::set_redacted(conn, target.event_nid, redaction.event_id.as_str(), &serde_json::to_string(&redacted)?)?;
    Ok(())
}

/// Redactions in a batch of backfilled history, which does not go through [`persist`]: stored newest first, a
/// redaction comes before the event it redacts. Once the batch is stored, each redaction in it that was not
/// rejected is applied, and so is any redaction stored before whose target the batch brought.
pub fn apply_backfilled_redactions(
    conn: Db<'_>,
    room: &RoomRow,
    rules: &RoomVersionRules,
    batch: &[String],
) -> Result<()> {
    let batch: std::collections::HashSet<&str> = batch.iter().map(String::as_str).collect();
    for (id, top, in_content) in events::redaction_targets(conn, room.room_nid)? {
        let named = [top.as_deref(), in_content.as_deref()];
        if !batch.contains(id.as_str()) && !named.iter().flatten().any(|t| batch.contains(t)) {
            continue;
        }
        if let Some(redaction) = crate::room::load_pdu_with(conn, &id, rules)? {
            apply_redaction(conn, room, rules, &redaction)?;
        }
    }
    Ok(())
}

/// Room versions that privilege their creators (MSC4289, v12) give them unlimited power: a power levels event
/// naming one in `users` is refused by auth; the client learns why with a 400 (as Synapse answers).
pub fn check_no_creator_in_users(pl_content: &Value, creators: &[String]) -> Result<()> {
    let users = pl_content.get("users").and_then(Value::as_object);
    match creators.iter().find(|c| users.is_some_and(|u| u.contains_key(c.as_str()))) {
        Some(c) => Err(Error::bad_json(format!(
            "{c} created the room and has unlimited power in this room version; it cannot be given a power level"
        ))),
        None => Ok(()),
    }
}
