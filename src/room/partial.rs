//! The partial-state lifecycle's domain steps (MSC3902), synchronous and free of network: each runs inside one
//! read or write against the store. The network side (which server to ask, `/state_ids`, fetching and verifying
//! events) is `crate::federation::resync`; the job queue runs it step by step and sizes its batches.
//!
//! ```text
//!  send_join answered ──► begin ──► [Ids] ──► [Fetch] ──► [Auth] ──► [Fill] ──► [Finish] ──► complete room
//!                                     ▲          │ none of the listed events can be had from anyone
//!                                     └──────────┘ (distrust the source of /state_ids, ask another)
//! ```
//!
//! - [`begin`]: the join on top of the answer's state (one root group, marked partial when members were
//!   omitted), the room flagged partial, its servers recorded and the resync job queued with a [`ResyncCursor`].
//! - [`check_state_ids`]: a `/state_ids` answer must list every non-member state event the resident gave at join.
//! - [`judge`] / [`reject`]: fetched state events against their own auth events.
//! - [`fill_chunk`]: the partial base group filled in place, `room_members` brought up to date.
//! - [`complete`]: events received while partial re-authorised, flags cleared, fresh joins for local members,
//!   device list updates for servers learned from the full state.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::room::append::{apply_membership_over, authorize, persist, Outcome};
use crate::room::remote::{authorize_by_own_auth_events, authorize_partial, AuthCache};
use crate::room::{pdu_from_row, state, version, Identity, Pdu};
use crate::store::events::{self, EventRow};
use crate::store::ids::{EventNid, RoomNid, StateGroup, StateKeyNid, StreamPos};
use crate::store::members;
use crate::store::resync as rs;
use crate::store::rooms::{self, RoomRow};
use crate::store::state_groups;
use crate::store::{Db, Writer};

/// The job kind that resyncs a partial room.
pub const RESYNC_JOB: &str = "resync";

// ------------------------------------------------------------------------------------------------------------
// The cursor

/// Where a room's resync stands (the job's cursor). The field names are those of the untyped cursor it replaced,
/// so a resync in progress across an upgrade reads on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncCursor {
    /// Our join event: the state is asked for at it.
    pub join_event: String,
    /// The partial base group (the state at our join), filled in place by the fill phase.
    pub sg: StateGroup,
    /// The join's prev event: residents (Synapse, Complement) answer `/state_ids` and `/state` for events they
    /// know, so the state is asked for at it (and the prev event added when it is state). Set by the ids phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// The server we joined through, asked first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The servers the resident said are in the room, asked in rotation after `via`.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Servers whose `/state_ids` listed events nobody could supply: asked last-resort only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distrust: Vec<String>,
    /// When the current phase began (ms), for the log line at its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_at: Option<i64>,
    #[serde(flatten)]
    pub phase: Phase,
}

/// The resync's phases, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum Phase {
    /// Ask for `/state_ids` at our join.
    Ids,
    /// Fetch what the listed state lacks, from `source` (the server that listed it): through `/state` when
    /// `use_state`, else single events.
    Fetch {
        #[serde(default)]
        source: String,
        #[serde(default)]
        use_state: bool,
    },
    /// Judge the listed state events after event number `at` (in number order, [`rs::auth_order`]); `done`
    /// judged so far. (A cursor of an older version, which walked the ids in id order, starts the phase over:
    /// judging an event again gives the same outcome.)
    Auth {
        #[serde(default, rename = "auth_at", skip_serializing_if = "Option::is_none")]
        at: Option<EventNid>,
        #[serde(default, rename = "authed")]
        done: i64,
    },
    /// Fill the base group with the listed state, in state key order ([`rs::fill_order`]), past `at` (the last
    /// event filled); `done` rows so far. (A cursor of an older version, which walked the ids in id order, starts
    /// the fill over: filling again what is filled changes nothing.)
    Fill {
        #[serde(default, rename = "fill_at", skip_serializing_if = "Option::is_none")]
        at: Option<rs::FillKey>,
        #[serde(default, rename = "filled")]
        done: i64,
    },
    /// One write completes the room.
    Finish,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Ids => "ids",
            Phase::Fetch { use_state: true, .. } => "fetch-state",
            Phase::Fetch { .. } => "fetch-events",
            Phase::Auth { .. } => "auth",
            Phase::Fill { .. } => "fill",
            Phase::Finish => "finish",
        }
    }
}

impl ResyncCursor {
    /// The cursor of a resync that starts now.
    pub fn start(join_event: &str, sg: StateGroup, via: &str, servers: &[String]) -> ResyncCursor {
        ResyncCursor {
            join_event: join_event.to_owned(),
            sg,
            prev: None,
            via: Some(via.to_owned()),
            servers: servers.to_vec(),
            distrust: Vec::new(),
            phase_at: None,
            phase: Phase::Ids,
        }
    }

    /// Reads a stored cursor, including the untyped ones of earlier versions (no `phase` key meant `ids`). A
    /// phase whose fields cannot be read restarts at `ids`, which is always safe (every phase is idempotent).
    pub fn parse(text: &str) -> Result<ResyncCursor> {
        let mut v: Value =
            serde_json::from_str(text).map_err(|e| Error::internal(format!("resync cursor unreadable: {e}")))?;
        let obj = v.as_object_mut().ok_or_else(|| Error::internal("resync cursor is not an object"))?;
        obj.entry("phase").or_insert_with(|| Value::from("ids"));
        match serde_json::from_value::<ResyncCursor>(v.clone()) {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::warn!(error = %e, "resync cursor's phase unreadable; restarting at ids");
                if let Some(o) = v.as_object_mut() {
                    o.insert("phase".into(), Value::from("ids"));
                }
                serde_json::from_value(v).map_err(|e| Error::internal(format!("resync cursor unreadable: {e}")))
            }
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// Moves to `next`, logging how long the phase that ends took (wall time, across restarts).
    pub fn enter(&mut self, room_id: &str, next: Phase) {
        let now = crate::store::accounts::now_ms();
        if let Some(since) = self.phase_at {
            tracing::info!(
                room_id,
                phase = self.phase.name(),
                ms = now - since,
                next = next.name(),
                "resync: phase done"
            );
        }
        self.phase = next;
        self.phase_at = Some(now);
    }

    /// The servers to ask, in order: `via`, then the others; distrusted ones only if nobody else is left.
    pub fn servers(&self) -> Vec<String> {
        // A set for the duplicates: a big room lists thousands of servers, and this runs every job step (the
        // quadratic `contains` was 2% of a 100k-member resync's CPU).
        let mut seen: HashSet<&str> = HashSet::with_capacity(self.servers.len() + 1);
        let mut out: Vec<String> = Vec::with_capacity(self.servers.len() + 1);
        for s in self.via.iter().chain(&self.servers) {
            if seen.insert(s.as_str()) {
                out.push(s.clone());
            }
        }
        if out.iter().any(|x| !self.distrust.contains(x)) {
            out.retain(|x| !self.distrust.contains(x));
        }
        out
    }

    /// Whether a server other than `source` that is not distrusted is left to ask.
    pub fn untried_besides(&self, source: &str) -> bool {
        let mut all: Vec<&String> = self.via.iter().collect();
        all.extend(&self.servers);
        all.into_iter().any(|x| x != source && !self.distrust.iter().any(|d| d == x))
    }
}

// ------------------------------------------------------------------------------------------------------------
// Begin

/// A verified `send_join` answer whose events are stored (as outliers): what [`begin`] makes a room of.
pub struct JoinedState<'a> {
    pub room_id: &'a str,
    pub room_version: &'a str,
    /// Members were omitted: the room starts partial and a resync is queued.
    pub partial: bool,
    pub join: &'a Pdu,
    pub state_ids: &'a [String],
    pub via: &'a str,
    pub servers_in_room: &'a [String],
}

/// Persists our join on top of the answer's state: one root group (marked partial when members were omitted),
/// the room flagged partial, its servers recorded and the resync job queued. One transaction.
pub fn begin(w: &mut Writer<'_>, identity: &Identity, j: &JoinedState<'_>) -> Result<()> {
    let conn = w.db();
    let rules = version::rules(j.room_version)?;
    let room_nid = match rooms::room_by_id(conn, j.room_id)? {
        Some(r) => r.room_nid,
        None => rooms::insert_room(conn, j.room_id, j.room_version)?,
    };
    rs::set_room_partial(conn, room_nid, j.partial)?;
    let room = rooms::room_by_nid(conn, room_nid)?.ok_or_else(|| Error::internal("room vanished"))?;
    // The state events were stored as outliers while the answer was read.
    let mut map = HashMap::new();
    for id in j.state_ids {
        if let Some(row) = events::event_by_id(conn, id)? {
            if let (Some(skn), true) = (row.state_key_nid, row.room_nid == room_nid) {
                map.insert(skn, row.event_nid);
            }
        }
    }
    let sg = state::write_full(conn, room_nid, &map)?;
    if j.partial {
        rs::set_group_partial(conn, sg, true)?;
    }
    let ok =
        if j.partial { authorize_partial(conn, &rules, j.join, sg) } else { authorize(conn, &rules, j.join, Some(sg)) };
    ok.map_err(|e| Error::forbidden(format!("our join does not pass auth against the room state: {e}")))?;
    // Forget any previous extremities (we were not following the room).
    events::clear_extremities(conn, room_nid)?;
    persist(w, identity, &room, &rules, j.join, Some(sg), Outcome::Accepted, None)?;
    if let [prev] = j.join.prev_events.as_slice() {
        // The state after the join's one prev event (held as an outlier) is the state we were given: later events
        // citing it, and the join's own prev_content (an invite's is_direct, say), look it up there.
        rs::set_outlier_state(w.db(), room_nid, prev.as_str(), sg)?;
    }
    if j.partial {
        let servers = j.servers_in_room.iter().map(String::as_str).chain(std::iter::once(j.via));
        rs::add_partial_servers(w.db(), room_nid, servers)?;
        let cursor = ResyncCursor::start(j.join.event_id.as_str(), sg, j.via, j.servers_in_room);
        crate::store::jobs::enqueue(w.db(), RESYNC_JOB, Some(room_nid), 10, &cursor.to_json())?;
    }
    Ok(())
}

/// A verified peek answer (MSC2444) whose state events are stored as outliers: what [`begin_peek`] makes a room of.
pub struct PeekedState<'a> {
    pub room_id: &'a str,
    pub room_version: &'a str,
    /// The resident's latest event (its state is the answer's state), shown as the start of the timeline.
    pub latest: Option<&'a Pdu>,
    pub state_ids: &'a [String],
}

/// Makes a peeked room of a peek answer: one root group of the given state, marked partial (the members were
/// omitted), the room flagged partial so that no other server is ever answered from it, and the resident's latest
/// event on top (the room's only extremity, so the events the resident sends next build on it). No member of ours,
/// no resync (a peek needs no member list), no servers recorded: nothing makes us look like a server in the room.
/// A room whose state we already hold is left as it is. One transaction.
pub fn begin_peek(w: &mut Writer<'_>, identity: &Identity, p: &PeekedState<'_>) -> Result<()> {
    let conn = w.db();
    let rules = version::rules(p.room_version)?;
    let room_nid = match rooms::room_by_id(conn, p.room_id)? {
        Some(r) if r.current_sg.is_some() => return Ok(()),
        Some(r) => r.room_nid,
        None => rooms::insert_room(conn, p.room_id, p.room_version)?,
    };
    rs::set_room_partial(conn, room_nid, true)?;
    let room = rooms::room_by_nid(conn, room_nid)?.ok_or_else(|| Error::internal("room vanished"))?;
    let mut map = HashMap::new();
    for id in p.state_ids {
        if let Some(row) = events::event_by_id(conn, id)? {
            if let (Some(skn), true) = (row.state_key_nid, row.room_nid == room_nid) {
                map.insert(skn, row.event_nid);
            }
        }
    }
    let sg = state::write_full(conn, room_nid, &map)?;
    rs::set_group_partial(conn, sg, true)?;
    events::clear_extremities(conn, room_nid)?;
    match p.latest {
        // The latest event is judged by the resident's word (it is in the state we were given, or sent after it):
        // its auth events were checked with the rest of the answer.
        Some(latest) => {
            persist(w, identity, &room, &rules, latest, Some(sg), Outcome::Accepted, None)?;
        }
        None => rooms::set_current_sg(conn, room_nid, sg)?,
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// Ids and auth

/// The first non-member state event of group `sg` (what the resident sent at join) that `listed` (a
/// `/state_ids` answer) lacks: a resident that disagrees with its own answer is lying or broken.
pub fn check_state_ids(conn: Db<'_>, sg: StateGroup, listed: &[String]) -> Result<Option<String>> {
    let listed: HashSet<&str> = listed.iter().map(String::as_str).collect();
    for nid in state_groups::load_state(conn, sg)?.values() {
        if let Some(r) = events::event_by_nid(conn, *nid)? {
            if r.event_type != "m.room.member" && !listed.contains(r.event_id.as_str()) {
                return Ok(Some(r.event_id));
            }
        }
    }
    Ok(None)
}

/// The first prev event of our join `join_event` (stored): the event residents are asked the state at.
pub fn join_prev_event(conn: Db<'_>, join_event: &str) -> Result<String> {
    let row = events::event_by_id(conn, join_event)?.ok_or_else(|| Error::internal("join event missing"))?;
    let v: Value = serde_json::from_str(&row.json)?;
    v["prev_events"][0].as_str().map(str::to_owned).ok_or_else(|| Error::internal("join event without prev events"))
}

/// Those of the stored events `nids` that their own auth events do not allow, with the reason. Already rejected
/// ones are skipped; one whose auth events we lack stays unjudged (our missing data is no proof against it).
/// Events and their auth events are read [`JUDGE_READS`] at a time, each group in one query.
pub fn judge(conn: Db<'_>, room: &RoomRow, nids: &[EventNid]) -> Result<Vec<(String, String)>> {
    let rules = version::rules(&room.version)?;
    let mut out = Vec::new();
    for chunk in nids.chunks(JUDGE_READS) {
        // A cache per read: what a chunk's events share is the room's few auth events (read again per chunk, three
        // rows); their earlier memberships are cited once each, and kept for the whole step they were ~4 MB per
        // thread at 10k members, the auth phase's share of the resync's peak memory.
        // The events are only checked, so only their fields are read (not their whole JSON).
        let cache = AuthCache::fields_only();
        // The join's prev event is listed too; when it is no state event it is no part of the state.
        let pdus: Vec<Pdu> = events::events_by_nids(conn, chunk)?
            .iter()
            .map(|row| crate::room::pdu_from_row_by(row, &rules, Pdu::from_stored_fields))
            .collect::<Result<Vec<Pdu>>>()?
            .into_iter()
            .filter(|p| !p.rejected && p.state_key.is_some())
            .collect();
        cache.preload(conn, &rules, pdus.iter().flat_map(|p| p.auth_events.iter().map(|a| a.as_str())))?;
        for pdu in &pdus {
            if let Some(lacking) = pdu.auth_events.iter().find(|a| cache.load(conn, &rules, a.as_str()).is_none()) {
                tracing::info!(event_id = %pdu.event_id, %lacking, "resync: state event not auth-checked: an auth event is unavailable");
                continue;
            }
            if let Err(reason) = authorize_by_own_auth_events(conn, &rules, room, pdu, &cache) {
                out.push((pdu.event_id.to_string(), reason));
            }
        }
    }
    Ok(out)
}

/// Events [`judge`] reads in one query (and then their auth events in another): a bound on the parsed events
/// held at once.
const JUDGE_READS: usize = 256;

/// Marks the events [`judge`] found forbidden as rejected (they stay out of the state).
pub fn reject(conn: Db<'_>, rejected: &[(String, String)]) -> Result<()> {
    for (id, reason) in rejected {
        rs::set_rejected(conn, id, reason)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// Fill

/// One fill step: adds the fetched state events `nids` (the next of [`rs::fill_order`]) to the partial base group
/// (descendant groups are deltas over it, so they see it too) and brings `room_members` up to date for their keys.
/// What the resident sent at join time stays authoritative for the keys we already hold, except that the join's
/// prev event `prev`, when it is state, replaces the entry of its key: the state was asked for before it (as
/// Synapse answers), so it is the newer state. Returns where the fill stands after them (None when none of them
/// is still there to fill) and the rows handled.
pub fn fill_chunk(
    w: &mut Writer<'_>,
    identity: &Identity,
    room: RoomNid,
    sg: StateGroup,
    prev: Option<&str>,
    nids: &[EventNid],
) -> Result<(Option<rs::FillKey>, usize)> {
    let rows = rs::fetched_state_of(w.db(), nids)?;
    let Some(last) = rows.last().map(|r| (r.event_type.clone(), r.state_key.clone(), r.event_nid.0)) else {
        return Ok((None, 0));
    };
    let (newest, rest): (Vec<&rs::FetchedState>, Vec<&rs::FetchedState>) =
        rows.iter().partition(|r| Some(r.event_id.as_str()) == prev);
    let entries: Vec<(StateKeyNid, EventNid)> = rest.iter().map(|r| (r.state_key_nid, r.event_nid)).collect();
    rs::add_group_entries_if_absent(w.db(), sg, &entries)?;
    for r in newest {
        rs::set_group_entry(w.db(), sg, r.state_key_nid, r.event_nid)?;
    }
    if let Some(current) = rooms::room_by_nid(w.db(), room)?.and_then(|r| r.current_sg) {
        for r in rows.iter().filter(|r| r.event_type == "m.room.member") {
            let fetched = r.member.clone().map(|content| (r.event_nid, content));
            refresh_membership(w, identity, room, current, (&r.state_key, r.state_key_nid), fetched)?;
        }
    }
    Ok((Some(last), rows.len()))
}

/// Brings `user`'s `room_members` row in line with the current state group `current`. `fetched` is the member
/// event just fetched for the key with its content, which spares reading that content again when the current
/// state still holds it. Returns whether a join of theirs ended by it (the event that ended it is older than the
/// correction).
fn refresh_membership(
    w: &mut Writer<'_>,
    identity: &Identity,
    room: RoomNid,
    current: StateGroup,
    (user, skn): (&str, StateKeyNid),
    fetched: Option<(EventNid, members::MemberContent)>,
) -> Result<bool> {
    if let Some(nid) = state_groups::lookup_state(w.db(), current, skn)? {
        let now = members::membership_of(w.db(), room, user)?;
        if now.as_ref().map(|m| m.1) != Some(nid) {
            let content = match fetched {
                Some((fetched_nid, content)) if fetched_nid == nid => content,
                _ => members::stored_member_content(w.db(), nid)?,
            };
            let c = apply_membership_over(w, identity, room, user, (nid, content), now.map(|m| m.0))?;
            return Ok(c.was_joined && !c.joined);
        }
    }
    Ok(false)
}

// ------------------------------------------------------------------------------------------------------------
// Complete

/// Completes the room (one transaction): the base group and the room lose their partial flags, the events
/// received while partial are re-authorised against the complete state, memberships touched since the join are
/// re-read, servers learned from the full state get the device list updates they missed, and local members get
/// a fresh "join" in the membership stream (eager `/sync` then delivers the room with full state). Returns the
/// joined member count.
pub fn complete(
    w: &mut Writer<'_>,
    identity: &Identity,
    room: RoomNid,
    sg: StateGroup,
    join_event: &str,
) -> Result<i64> {
    let conn = w.db();
    rs::set_group_partial(conn, sg, false)?;
    rs::set_room_partial(conn, room, false)?;
    let flipped = reauthorise_since_join(conn, room, join_event)?;
    if flipped > 0 {
        tracing::info!(room_nid = %room, flipped, "resync: events received while partial changed auth outcome");
    }
    let row = rooms::room_by_nid(conn, room)?.ok_or_else(|| Error::internal("room vanished"))?;
    let current = row.current_sg.ok_or_else(|| Error::internal("room without current state"))?;
    let since = events::event_by_id(conn, join_event)?.and_then(|r| r.stream_ordering).unwrap_or(StreamPos(0));
    for (user, skn) in rs::members_touched_since(conn, room, since)? {
        // A member we wrongly believed joined: their device list entry tells our members sharing the room no
        // more that they left (`device_lists.left`); their cached list went with their join.
        if refresh_membership(w, identity, room, current, (&user, skn), None)? && !identity.is_local_user(&user) {
            crate::store::e2ee::device_list_changed(w, &user)?;
        }
    }
    let told = announce_devices_to_new_servers(w.db(), identity, room, since, sg)?;
    if told > 0 {
        tracing::info!(room_nid = %room, told, "resync: device list updates sent to servers learned from the full state");
    }
    let conn = w.db();
    rs::clear_partial_servers(conn, room)?;
    rs::clear_state_ids(conn, room)?;
    let (joined, _) = members::member_counts(conn, room)?;
    let locals: Vec<(String, EventNid)> =
        rs::joined_members(conn, room)?.into_iter().filter(|(u, _)| identity.is_local_user(u)).collect();
    for (user, nid) in locals {
        let pos = StreamPos(w.next_stream());
        members::record_local_membership(w.db(), pos, &user, room, "join", nid)?;
    }
    Ok(joined)
}

/// While partial, local users' device list changes went to the servers in `servers_in_room` only. Servers that the
/// full state shows in the room but that were not on that list missed them (MSC3902): each gets an update for every
/// device of each local member whose device list changed since the join. Returns the EDUs queued. Runs before the
/// room's `partial_state_servers` rows are dropped. Servers joined in the full state at our join (`base_sg`, now
/// filled) and the servers of members whose membership changed since count too, even if they have left since:
/// they may have been in the room when the updates went out (Synapse's `handle_room_un_partial_stated`).
fn announce_devices_to_new_servers(
    conn: Db<'_>,
    identity: &Identity,
    room: RoomNid,
    since: StreamPos,
    base_sg: StateGroup,
) -> Result<usize> {
    let ours = identity.server_name.as_str();
    // Usually no local member's devices changed during the resync: then there is nothing to announce, and the
    // servers of the whole member list (a read of every member event) need not be worked out.
    let changes = rs::device_changes_since(conn, room, since, ours)?;
    if changes.is_empty() {
        return Ok(0);
    }
    let mut new_servers = rs::servers_missed_while_partial(conn, room, ours)?;
    let listed: HashSet<String> = members::servers_in_room(conn, room)?.into_iter().collect();
    // As Synapse: also the servers of every member whose membership changed since the join (one may have joined
    // and been kicked, wrongly, while we were partial, and left since: they were in the room when updates went out).
    let touched = rs::members_touched_since(conn, room, since)?;
    let touched_servers = touched.iter().filter_map(|(user, _)| user.split_once(':').map(|x| x.1.to_owned()));
    for server in joined_servers_in_state(conn, base_sg)?.into_iter().chain(touched_servers) {
        if server != ours && !listed.contains(&server) && !new_servers.contains(&server) {
            new_servers.push(server);
        }
    }
    if new_servers.is_empty() {
        return Ok(0);
    }
    let mut queued = 0;
    for (user, pos) in changes {
        for device in crate::store::accounts::list_devices(conn, &user)? {
            let edu = crate::store::e2ee::device_update_edu(conn, &user, &device.device_id, pos.0)?.to_string();
            for server in &new_servers {
                crate::store::outbox::enqueue_edu(conn, server, &edu)?;
                queued += 1;
            }
        }
    }
    Ok(queued)
}

/// Servers with a joined member in state group `sg`.
fn joined_servers_in_state(conn: Db<'_>, sg: StateGroup) -> Result<HashSet<String>> {
    let mut servers = HashSet::new();
    for (user, nid) in state_groups::load_state_of_type(conn, sg, "m.room.member")? {
        let Some(row) = events::event_by_nid(conn, nid)? else { continue };
        let v: Value = serde_json::from_str(&row.json)?;
        if v["content"]["membership"] == "join" {
            if let Some((_, server)) = user.split_once(':') {
                servers.insert(server.to_owned());
            }
        }
    }
    Ok(servers)
}

/// Keeps the forward extremities right when an event's auth outcome flipped: a newly accepted event without
/// accepted children becomes an extremity in place of its prev events (rejected events never became one, so its
/// state would otherwise never reach the current state); a newly rejected one stops being one, and its prev
/// events without other accepted children take its place.
fn fix_extremities(conn: Db<'_>, room: RoomNid, row: &EventRow, pdu: &Pdu, accepted: bool) -> Result<()> {
    let nid = row.event_nid;
    if accepted {
        if !rs::has_accepted_child(conn, room, &row.event_id, nid)? {
            let prev_nids: Vec<EventNid> =
                pdu.prev_events.iter().filter_map(|p| events::event_nid(conn, p.as_str()).ok().flatten()).collect();
            events::replace_extremities(conn, room, &prev_nids, row.event_nid)?;
        }
        return Ok(());
    }
    rs::remove_extremity(conn, room, nid)?;
    for p in &pdu.prev_events {
        let Some(prev) = events::event_by_id(conn, p.as_str())? else { continue };
        if prev.rejected.is_none() && !prev.outlier && !rs::has_accepted_child(conn, room, p.as_str(), nid)? {
            rs::add_extremity(conn, room, prev.event_nid)?;
        }
    }
    Ok(())
}

/// Replays the events received while the room was partial, in stream order, against the now complete state:
/// re-authorises each (rejections may flip both ways), rebuilds their state groups and the current state.
/// Returns how many events changed outcome. Bounded by the events since the join (usually few).
fn reauthorise_since_join(conn: Db<'_>, room: RoomNid, join_event: &str) -> Result<usize> {
    let row = rooms::room_by_nid(conn, room)?.ok_or_else(|| Error::internal("room vanished"))?;
    let rules = version::rules(&row.version)?;
    let Some(join) = events::event_by_id(conn, join_event)? else { return Ok(0) };
    let since = join.stream_ordering.unwrap_or(StreamPos(i64::MAX));
    let mut flipped = 0;
    for ev in rs::timeline_since(conn, room, since)? {
        let pdu = pdu_from_row(conn, &ev)?;
        let mut groups = Vec::new();
        for p in &pdu.prev_events {
            if let Some(g) = events::event_by_id(conn, p.as_str())?.and_then(|prev| prev.sg_after) {
                groups.push(g);
            }
        }
        if groups.is_empty() {
            continue;
        }
        let sg_before = state::resolve_groups(conn, room, &row.version, &groups)?;
        let verdict = authorize(conn, &rules, &pdu, Some(sg_before)).err();
        let changed = verdict.is_some() != ev.rejected.is_some();
        flipped += usize::from(changed);
        let sg_after = match (ev.state_key_nid, &verdict) {
            (Some(skn), None) => state::new_group(conn, room, Some(sg_before), &[(skn, Some(ev.event_nid))])?,
            _ => sg_before,
        };
        rs::set_outcome(conn, ev.event_nid, verdict.as_deref(), sg_after)?;
        if changed {
            fix_extremities(conn, room, &ev, &pdu, verdict.is_none())?;
        }
    }
    // Current state from the forward extremities' (possibly new) groups. An extremity rejected just now still
    // counts: its group is now the state before it, without it (skipping it would keep the stale current state).
    let mut groups = Vec::new();
    for nid in events::forward_extremities(conn, room)? {
        if let Some(g) = events::event_by_nid(conn, nid)?.and_then(|r| r.sg_after) {
            groups.push(g);
        }
    }
    if !groups.is_empty() {
        let current = state::resolve_groups(conn, room, &row.version, &groups)?;
        rooms::set_current_sg(conn, room, current)?;
    }
    Ok(flipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::append::{append_local, build_pdu, reference, LocalEvent};
    use crate::room::create::{create_room, CreateRoom};
    use crate::room::remote::persist_outlier;
    use crate::store::testing::{memory_db, write, MemDb};
    use serde_json::json;
    use std::sync::Arc;

    fn uid(u: &str) -> ruma::OwnedUserId {
        ruma::UserId::parse(u).unwrap()
    }

    fn rid(r: &str) -> ruma::OwnedRoomId {
        ruma::RoomId::parse(r).unwrap()
    }

    /// A public room created by local `@a:test`, then flagged partial with its current group as the base group.
    struct Fixture {
        conn: MemDb,
        stream: i64,
        identity: Arc<Identity>,
        room: RoomRow,
        sg: StateGroup,
    }

    fn partial_room() -> Fixture {
        let mut conn = memory_db();
        let identity = Identity::load_or_create(conn.db(), "test").unwrap();
        let mut stream = 0;
        let req = CreateRoom { preset: Some("public_chat".into()), ..CreateRoom::new(uid("@a:test")) };
        let (room_id, _) = write(&mut conn, &mut stream, |w| create_room(w, &identity, req)).unwrap();
        let room = rooms::room_by_id(conn.db(), &room_id).unwrap().unwrap();
        // The base group of a partial room is a root holding the whole (partial) state, as `begin` writes it.
        let full = state_groups::load_state(conn.db(), room.current_sg.unwrap()).unwrap();
        let sg = state::write_full(conn.db(), room.room_nid, &full).unwrap();
        rooms::set_current_sg(conn.db(), room.room_nid, sg).unwrap();
        rs::set_room_partial(conn.db(), room.room_nid, true).unwrap();
        rs::set_group_partial(conn.db(), sg, true).unwrap();
        let room = rooms::room_by_nid(conn.db(), room.room_nid).unwrap().unwrap();
        Fixture { conn, stream, identity, room, sg }
    }

    impl Fixture {
        fn nid(&self) -> RoomNid {
            self.room.room_nid
        }

        /// The reference of the current state event `(kind, key)`.
        fn state_ref(&self, kind: &str, key: &str) -> (ruma::OwnedEventId, String) {
            let skn = state_groups::find_state_key_nid(self.conn.db(), kind, key).unwrap().unwrap();
            let nid = state_groups::lookup_state(self.conn.db(), self.sg, skn).unwrap().unwrap();
            let (id, sha, _) = reference(self.conn.db(), nid).unwrap();
            (id, sha)
        }

        /// A remote state event (as the resident would list it), stored as an outlier; returns its id.
        fn remote_state(&self, sender: &str, ev: LocalEvent, auth: &[(&str, &str)]) -> String {
            let rules = version::rules(&self.room.version).unwrap();
            // From v12 the create event is not cited (its id is the room's).
            let skip_create = rules.authorization.room_create_event_id_as_room_id;
            let auth: Vec<_> = auth
                .iter()
                .filter(|(k, _)| !(skip_create && *k == "m.room.create"))
                .map(|(k, s)| self.state_ref(k, s))
                .collect();
            let create_ref = [self.state_ref("m.room.create", "")];
            let room_id = rid(&self.room.room_id);
            let pdu =
                build_pdu(&self.identity, &rules, Some(&room_id), &uid(sender), &ev, &create_ref, &auth, 5).unwrap();
            persist_outlier(self.conn.db(), &self.room, &pdu).unwrap();
            pdu.event_id.to_string()
        }

        fn join_of(&self, user: &str) -> String {
            let auth = [("m.room.create", ""), ("m.room.join_rules", ""), ("m.room.power_levels", "")];
            let ev = LocalEvent::state("m.room.member", user, json!({"membership": "join"}));
            self.remote_state(user, ev, &auth)
        }
    }

    #[test]
    fn check_state_ids_wants_every_non_member_event_held() {
        let f = partial_room();
        let state = state_groups::state_event_ids(f.conn.db(), f.sg, Some("m.room.member")).unwrap();
        let mut listed: Vec<String> = state.into_iter().map(|(_, id)| id).collect();
        assert_eq!(check_state_ids(f.conn.db(), f.sg, &listed).unwrap(), None, "members need not be listed");
        let dropped = listed.pop().unwrap();
        assert_eq!(check_state_ids(f.conn.db(), f.sg, &listed).unwrap(), Some(dropped));
    }

    #[test]
    fn begin_makes_a_partial_room_and_queues_its_resync() {
        let mut f = partial_room();
        let rules = version::rules(&f.room.version).unwrap();
        let skip_create = rules.authorization.room_create_event_id_as_room_id;
        let keys = [("m.room.create", ""), ("m.room.join_rules", ""), ("m.room.power_levels", "")];
        let auth: Vec<_> = keys
            .iter()
            .filter(|(k, _)| !(skip_create && *k == "m.room.create"))
            .map(|(k, s)| f.state_ref(k, s))
            .collect();
        let last = *events::forward_extremities(f.conn.db(), f.room.room_nid).unwrap().first().unwrap();
        let (prev, sha, depth) = reference(f.conn.db(), last).unwrap();
        let ev = LocalEvent::state("m.room.member", "@b:test", json!({"membership": "join"}));
        let join = build_pdu(
            &f.identity,
            &rules,
            Some(&rid(&f.room.room_id)),
            &uid("@b:test"),
            &ev,
            &[(prev, sha)],
            &auth,
            depth + 1,
        )
        .unwrap();
        let state_ids: Vec<String> = state_groups::state_event_ids(f.conn.db(), f.sg, Some("m.room.member"))
            .unwrap()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let servers = vec!["other".to_owned()];
        let (identity, room_id, version) = (f.identity.clone(), f.room.room_id.clone(), f.room.version.clone());
        let joined = JoinedState {
            room_id: &room_id,
            room_version: &version,
            partial: true,
            join: &join,
            state_ids: &state_ids,
            via: "resident",
            servers_in_room: &servers,
        };
        write(&mut f.conn, &mut f.stream, |w| begin(w, &identity, &joined)).unwrap();

        let room = rooms::room_by_nid(f.conn.db(), f.room.room_nid).unwrap().unwrap();
        assert!(room.partial_state);
        assert_eq!(members::membership_of(f.conn.db(), room.room_nid, "@b:test").unwrap().unwrap().0, "join");
        let job = crate::store::jobs::next_due(f.conn.db()).unwrap().expect("resync queued");
        assert_eq!((job.kind.as_str(), job.room_nid), (RESYNC_JOB, Some(f.nid())));
        let cursor = ResyncCursor::parse(&job.cursor).unwrap();
        assert_eq!((cursor.join_event.as_str(), &cursor.phase), (join.event_id.as_str(), &Phase::Ids));
        assert_eq!(cursor.servers(), ["resident", "other"]);
        assert_eq!(rs::servers_missed_while_partial(f.conn.db(), f.nid(), "test").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn cursor_round_trip_and_old_format() {
        let mut c = ResyncCursor::start("$join", StateGroup(7), "via.example", &["a".into(), "b".into()]);
        assert_eq!(ResyncCursor::parse(&c.to_json()).unwrap(), c);
        for phase in [
            Phase::Fetch { source: "a".into(), use_state: true },
            Phase::Auth { at: Some(EventNid(3)), done: 3 },
            Phase::Auth { at: None, done: 0 },
            Phase::Fill { at: Some(("m.room.member".into(), "@y:x".into(), 4)), done: 9 },
            Phase::Finish,
        ] {
            c.enter("!r:x", phase);
            assert_eq!(ResyncCursor::parse(&c.to_json()).unwrap(), c);
        }
        // The cursor a join queued before this version: no phase at all.
        let old = r#"{"join_event":"$j","via":"v","servers":["v","w"],"sg":12}"#;
        let c = ResyncCursor::parse(old).unwrap();
        assert_eq!((c.phase.clone(), c.sg, c.servers()), (Phase::Ids, StateGroup(12), vec!["v".into(), "w".into()]));
        // An old cursor in the middle of each phase, with the keys it used then.
        let old = r#"{"join_event":"$j","via":"v","servers":[],"sg":12,"phase":"fetch","phase_at":5,
                      "source":"v","use_state":false,"batch":200,"distrust":["w"]}"#;
        let c = ResyncCursor::parse(old).unwrap();
        assert_eq!(c.phase, Phase::Fetch { source: "v".into(), use_state: false });
        assert_eq!((c.distrust.clone(), c.phase_at), (vec!["w".to_owned()], Some(5)));
        // An auth position of the versions that walked the ids in id order: the phase starts over (idempotent).
        let old = r#"{"join_event":"$j","sg":1,"phase":"auth","auth_after":"$k","authed":1000}"#;
        assert_eq!(ResyncCursor::parse(old).unwrap().phase, Phase::Auth { at: None, done: 1000 });
        // A fill position of the versions that walked the ids in id order: the fill starts over (idempotent).
        let old = r#"{"join_event":"$j","sg":1,"phase":"fill","fill_after":"$k","filled":2000,"authed":5}"#;
        assert_eq!(ResyncCursor::parse(old).unwrap().phase, Phase::Fill { at: None, done: 2000 });
        let old = r#"{"join_event":"$j","sg":1,"phase":"finish","fill_after":"$k"}"#;
        assert_eq!(ResyncCursor::parse(old).unwrap().phase, Phase::Finish);
        // A phase that cannot be read restarts at ids.
        let odd = r#"{"join_event":"$j","sg":1,"phase":"teleport"}"#;
        assert_eq!(ResyncCursor::parse(odd).unwrap().phase, Phase::Ids);
        assert!(ResyncCursor::parse("[]").is_err());
    }

    #[test]
    fn servers_rotate_and_distrust() {
        let mut c = ResyncCursor::start("$j", StateGroup(1), "v", &["w".into(), "v".into(), "x".into()]);
        assert_eq!(c.servers(), ["v", "w", "x"]);
        c.distrust = vec!["v".into()];
        assert_eq!(c.servers(), ["w", "x"]);
        assert!(c.untried_besides("w"));
        c.distrust = vec!["v".into(), "w".into(), "x".into()];
        assert_eq!(c.servers(), ["v", "w", "x"], "all distrusted: ask them anyway");
        assert!(!c.untried_besides("w"));
    }

    #[test]
    fn judge_rejects_forbidden_state_and_fill_leaves_it_out() {
        let f = partial_room();
        let joined = f.join_of("@b:other");
        // @c:other is not in the room: its own auth events do not allow it to name the room.
        let name = LocalEvent::state("m.room.name", "", json!({"name": "hijacked"}));
        let forbidden = f.remote_state("@c:other", name, &[("m.room.create", ""), ("m.room.power_levels", "")]);
        let ids = vec![joined.clone(), forbidden.clone()];
        rs::record_state_ids(f.conn.db(), f.nid(), &ids).unwrap();

        let nids: Vec<EventNid> = ids.iter().map(|id| events::event_nid(f.conn.db(), id).unwrap().unwrap()).collect();
        let verdicts = judge(f.conn.db(), &f.room, &nids).unwrap();
        assert_eq!(verdicts.len(), 1, "{verdicts:?}");
        assert_eq!(verdicts[0].0, forbidden);
        reject(f.conn.db(), &verdicts).unwrap();
        assert!(events::event_by_id(f.conn.db(), &forbidden).unwrap().unwrap().rejected.is_some());
        assert!(judge(f.conn.db(), &f.room, &nids).unwrap().is_empty(), "rejected events are not judged again");

        let (identity, nid, sg) = (f.identity.clone(), f.nid(), f.sg);
        let (mut conn, mut stream) = (f.conn, f.stream);
        let order = rs::fill_order(conn.db(), nid, None).unwrap();
        let joined_nid = events::event_nid(conn.db(), &joined).unwrap().unwrap();
        assert_eq!(order, [joined_nid], "the rejected event is not in the fill's walk");
        let (last, n) = write(&mut conn, &mut stream, |w| fill_chunk(w, &identity, nid, sg, None, &order)).unwrap();
        assert_eq!((last.clone(), n), (Some(("m.room.member".into(), "@b:other".into(), joined_nid.0)), 1));
        assert!(rs::fill_order(conn.db(), nid, last.as_ref()).unwrap().is_empty(), "nothing left past it");
        let member = state_groups::find_state_key_nid(conn.db(), "m.room.member", "@b:other").unwrap().unwrap();
        assert!(state_groups::lookup_state(conn.db(), sg, member).unwrap().is_some(), "base group filled");
        let name_key = state_groups::find_state_key_nid(conn.db(), "m.room.name", "").unwrap();
        let name_now = name_key.and_then(|k| state_groups::lookup_state(conn.db(), sg, k).unwrap());
        let name_id = name_now.and_then(|n| events::event_by_nid(conn.db(), n).unwrap()).map(|r| r.event_id);
        assert_ne!(name_id.as_deref(), Some(forbidden.as_str()), "the rejected event stays out of the state");
        assert_eq!(members::membership_of(conn.db(), nid, "@b:other").unwrap().map(|m| m.0).as_deref(), Some("join"));
    }

    #[test]
    fn fill_walks_in_state_key_order_and_resumes_from_its_position() {
        let f = partial_room();
        let users = ["@d:other", "@b:other", "@e:other", "@c:other"];
        let ids: Vec<String> = users.iter().map(|u| f.join_of(u)).collect();
        rs::record_state_ids(f.conn.db(), f.nid(), &ids).unwrap();
        let (identity, nid, sg) = (f.identity.clone(), f.nid(), f.sg);
        let (mut conn, mut stream) = (f.conn, f.stream);
        let order = rs::fill_order(conn.db(), nid, None).unwrap();
        assert_eq!(order.len(), 4);
        let (at, n) = write(&mut conn, &mut stream, |w| fill_chunk(w, &identity, nid, sg, None, &order[..2])).unwrap();
        assert_eq!((at.as_ref().map(|k| k.1.as_str()), n), (Some("@c:other"), 2), "@b and @c first");
        // After a restart the walk is read again from the cursor's position: only the rest is left.
        let rest = rs::fill_order(conn.db(), nid, at.as_ref()).unwrap();
        assert_eq!(rest, order[2..]);
        assert_eq!(members::membership_of(conn.db(), nid, "@d:other").unwrap(), None, "not filled yet");
        write(&mut conn, &mut stream, |w| fill_chunk(w, &identity, nid, sg, None, &rest)).unwrap();
        for user in users {
            let m = members::membership_of(conn.db(), nid, user).unwrap().map(|m| m.0);
            assert_eq!(m.as_deref(), Some("join"), "{user}");
        }
    }

    #[test]
    fn fill_keeps_what_the_resident_sent_at_join() {
        let mut f = partial_room();
        // A second membership for @a:test listed by the resident: the base group keeps the one it has.
        let stale = f.join_of("@a:test");
        rs::record_state_ids(f.conn.db(), f.nid(), std::slice::from_ref(&stale)).unwrap();
        let (identity, nid, sg) = (f.identity.clone(), f.nid(), f.sg);
        let before = members::membership_of(f.conn.db(), nid, "@a:test").unwrap();
        let order = rs::fill_order(f.conn.db(), nid, None).unwrap();
        write(&mut f.conn, &mut f.stream, |w| fill_chunk(w, &identity, nid, sg, None, &order)).unwrap();
        assert_eq!(members::membership_of(f.conn.db(), nid, "@a:test").unwrap(), before);
    }

    #[test]
    fn fill_puts_the_joins_prev_event_in_place_of_the_entry_it_supersedes() {
        let mut f = partial_room();
        // The join's prev event is state (asked for the state before it, a resident lists the older entry): it wins.
        let prev = f.join_of("@a:test");
        rs::record_state_ids(f.conn.db(), f.nid(), std::slice::from_ref(&prev)).unwrap();
        let (identity, nid, sg) = (f.identity.clone(), f.nid(), f.sg);
        let prev_ref = prev.clone();
        let order = rs::fill_order(f.conn.db(), nid, None).unwrap();
        write(&mut f.conn, &mut f.stream, |w| fill_chunk(w, &identity, nid, sg, Some(&prev_ref), &order)).unwrap();
        let key = state_groups::find_state_key_nid(f.conn.db(), "m.room.member", "@a:test").unwrap().unwrap();
        let entry = state_groups::lookup_state(f.conn.db(), sg, key).unwrap();
        assert_eq!(entry, events::event_nid(f.conn.db(), &prev).unwrap(), "the prev event replaced the older entry");
    }

    #[test]
    fn complete_reauthorises_events_since_join_and_clears_the_flags() {
        let mut f = partial_room();
        let (identity, nid, sg, room_id) = (f.identity.clone(), f.nid(), f.sg, f.room.room_id.clone());
        let join_nid = members::membership_of(f.conn.db(), nid, "@a:test").unwrap().unwrap().1;
        let join_event = events::event_by_nid(f.conn.db(), join_nid).unwrap().unwrap().event_id;
        let msg = LocalEvent::message("m.room.message", json!({"body": "hi", "msgtype": "m.text"}));
        let sent = write(&mut f.conn, &mut f.stream, |w| {
            append_local(w, &identity, &rid(&room_id), &uid("@a:test"), msg, None)
        })
        .unwrap();
        // As if the partial state had wrongly rejected it.
        rs::set_rejected(f.conn.db(), &sent.event_id, "judged on partial state").unwrap();
        let before = f.stream;

        let joined = write(&mut f.conn, &mut f.stream, |w| complete(w, &identity, nid, sg, &join_event)).unwrap();
        assert_eq!(joined, 1);
        let row = events::event_by_id(f.conn.db(), &sent.event_id).unwrap().unwrap();
        assert!(row.rejected.is_none(), "re-authorised against the complete state");
        assert!(events::forward_extremities(f.conn.db(), nid).unwrap().contains(&row.event_nid));
        assert!(!rooms::room_by_nid(f.conn.db(), nid).unwrap().unwrap().partial_state);
        assert!(f.stream > before, "local members got a fresh join in the membership stream");
        assert_eq!(rs::listed_and_missing(f.conn.db(), nid).unwrap(), (0, 0));
    }
}
