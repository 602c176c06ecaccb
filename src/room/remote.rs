//! PDUs from other servers: checking them (hashes, signatures, auth, soft-fail) and storing them, including
//! outliers (auth chains and state we hold without placing in the timeline).

use std::collections::HashMap;
use std::sync::Arc;

use ruma::canonical_json::CanonicalJsonObject;
use ruma::events::TimelineEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::signatures::{PublicKeyMap, Verified};
use ruma::RoomId;

use crate::error::{Error, Result};
use crate::room::append::{authorize, persist, Appended, Outcome};
use crate::room::pdu::MAX_PDU_BYTES;
use crate::room::signatures::{self, DecodedKeys};
use crate::room::{load_pdu, pdu_from_row_by, state, version, Identity, ParseStored, Pdu};
use crate::store::events::{self, EventRow, NewEvent};
use crate::store::ids::{EventNid, StateGroup, StateKeyNid};
use crate::store::resync as rs;
use crate::store::rooms::{self, RoomRow};
use crate::store::{invite_state, members, state_groups, Db, Writer};

/// Parses a PDU received over federation and computes its id (no signature check yet).
pub fn parse_remote(obj: CanonicalJsonObject, rules: &RoomVersionRules) -> std::result::Result<Pdu, String> {
    parse_remote_with_id(obj, rules, None).1
}

/// [`parse_remote`], also giving the event id whenever it could be computed (to answer per PDU). `text_len` is the
/// length of the JSON text the PDU was read from, if known: it bounds the canonical size from above (canonical
/// JSON is the shortest encoding, and `unsigned` is dropped), so only a long text has its canonical size computed.
pub fn parse_remote_with_id(
    obj: CanonicalJsonObject,
    rules: &RoomVersionRules,
    text_len: Option<usize>,
) -> (Option<String>, std::result::Result<Pdu, String>) {
    let (id, parsed) = parse_remote_keeping_signed(obj, rules, text_len);
    (id, parsed.map(|(pdu, _)| pdu))
}

/// A received PDU's event id (when it could be computed) and the outcome of parsing it: the PDU, and the bytes its
/// servers signed when computing the id made them.
pub type ParsedRemote = (Option<String>, std::result::Result<(Pdu, Option<String>), String>);

/// [`parse_remote_with_id`], keeping the bytes the event's servers signed when computing its id made them (room
/// v3+), for [`verify_remote`].
pub fn parse_remote_keeping_signed(
    mut obj: CanonicalJsonObject,
    rules: &RoomVersionRules,
    text_len: Option<usize>,
) -> ParsedRemote {
    obj.remove("unsigned");
    let (event_id, signed) = match version::event_id_keeping_signed(&obj, rules) {
        Ok(id) => id,
        Err(e) => return (None, Err(e)),
    };
    let shown = Some(event_id.to_string());
    if text_len.is_none_or(|n| n > MAX_PDU_BYTES) {
        let size = serde_json::to_string(&obj).map(|s| s.len()).unwrap_or(usize::MAX);
        if size > MAX_PDU_BYTES {
            return (shown, Err(format!("PDU is {size} bytes, over the {MAX_PDU_BYTES} limit")));
        }
    }
    (shown, Pdu::from_canonical(obj, event_id, rules).map(|pdu| (pdu, signed)))
}

/// Checks signatures and the content hash. A hash mismatch keeps the event, redacted (spec). `signed`: the bytes
/// its servers signed, when parsing it made them ([`parse_remote_keeping_signed`]).
pub fn verify_remote(
    pdu: Pdu,
    signed: Option<&str>,
    rules: &RoomVersionRules,
    keys: &PublicKeyMap,
    decoded: &DecodedKeys,
) -> std::result::Result<Pdu, String> {
    match signatures::verify_event(keys, decoded, &pdu.json, rules, signed) {
        Ok(Verified::All) => Ok(pdu),
        Ok(Verified::Signatures) => {
            let redacted =
                ruma::canonical_json::redact(pdu.json.clone(), &rules.redaction, None).map_err(|e| e.to_string())?;
            let mut p = Pdu::from_canonical(redacted, pdu.event_id.clone(), rules)?;
            p.rejected = pdu.rejected;
            Ok(p)
        }
        Err(e) => Err(format!("signature check failed for {}: {e}", pdu.event_id)),
    }
}

/// An event to store as an outlier, as the writer needs it: its fields as text and its canonical JSON, made on
/// the thread that verified it. The writer then neither serialises nor frees parsed JSON trees (a tenth of a
/// resync's writer time), and a row waiting for the write holds a fraction of a parsed event's memory.
pub struct OutlierRow {
    pub event_id: String,
    room_id: String,
    event_type: String,
    state_key: Option<String>,
    sender: String,
    origin_server_ts: i64,
    depth: i64,
    auth_events: Vec<String>,
    json: String,
}

impl OutlierRow {
    /// Puts `rows` in the order they are written in: lowest depth first (an event's auth events before it).
    pub fn sort_for_writing(rows: &mut [OutlierRow]) {
        rows.sort_by_key(|r| r.depth);
    }

    pub fn of(pdu: &Pdu) -> OutlierRow {
        OutlierRow {
            event_id: pdu.event_id.to_string(),
            room_id: pdu.room_id.to_string(),
            event_type: pdu.kind.to_string(),
            state_key: pdu.state_key.clone(),
            sender: pdu.sender.to_string(),
            origin_server_ts: u64::from(pdu.origin_server_ts.get()) as i64,
            depth: pdu.depth,
            auth_events: pdu.auth_events.iter().map(|e| e.to_string()).collect(),
            json: pdu.canonical_string(),
        }
    }
}

/// Stores verified events of room `room_id` as outliers, from the start of `rows` (in [`OutlierRow::sort_for_writing`]
/// order), skipping events of other rooms and events already held (a `/state` answer and a `send_join` answer are
/// stored this way, batch by batch). With a `budget` it stops once that much time has passed (a background write
/// that must not hold the writer long), after at least one row so a caller writing until the end always gets there.
/// Returns how many rows were new and how many were taken from `rows`.
pub fn persist_outliers(
    conn: Db<'_>,
    room_id: &RoomId,
    rows: &[OutlierRow],
    budget: Option<std::time::Duration>,
) -> Result<(usize, usize)> {
    let started = std::time::Instant::now();
    let room = rooms::room_by_id(conn, room_id.as_str())?.ok_or_else(|| Error::internal("room vanished"))?;
    let (mut new, mut taken) = (0, 0);
    for r in rows {
        if taken > 0 && budget.is_some_and(|b| started.elapsed() >= b) {
            break;
        }
        taken += 1;
        if r.room_id == room_id.as_str() && events::event_nid(conn, &r.event_id)?.is_none() {
            insert_outlier(conn, &room, r)?;
            new += 1;
        }
    }
    Ok((new, taken))
}

/// Stores an event we hold only for auth/state (no timeline position, no state group). Idempotent.
pub fn persist_outlier(conn: Db<'_>, room: &RoomRow, pdu: &Pdu) -> Result<EventNid> {
    if let Some(nid) = events::event_nid(conn, pdu.event_id.as_str())? {
        return Ok(nid);
    }
    insert_outlier(conn, room, &OutlierRow::of(pdu))
}

/// [`persist_outlier`] of an event the caller knows we do not hold.
fn insert_outlier(conn: Db<'_>, room: &RoomRow, row: &OutlierRow) -> Result<EventNid> {
    let skn = match &row.state_key {
        Some(k) => Some(state_groups::state_key_nid(conn, &row.event_type, k)?),
        None => None,
    };
    let nid = events::insert_event(
        conn,
        &NewEvent {
            event_id: &row.event_id,
            room_nid: room.room_nid,
            event_type: &row.event_type,
            state_key_nid: skn,
            sender: &row.sender,
            origin_server_ts: row.origin_server_ts,
            depth: row.depth,
            stream_ordering: None,
            outlier: true,
            rejected: None,
            soft_failed: false,
            txn: None,
            json: &row.json,
        },
    )?;
    // No prev edges: those serve the timeline (backfill, gaps), which an outlier is not part of; it gets them if
    // it joins the timeline later (handle_incoming stores it again).
    events::insert_auth_edges(conn, nid, &row.auth_events)?;
    Ok(nid)
}

/// Events loaded for auth checks, kept across the checks of one batch (the create event, power levels and join
/// rules are cited by nearly every event of a room).
pub struct AuthCache {
    events: std::cell::RefCell<HashMap<String, Option<Arc<Pdu>>>>,
    /// The room's create event from its current state (v12+ events do not cite it): looked up once per batch,
    /// not once per event (that lookup was a twentieth of a resync's CPU).
    create: std::cell::OnceCell<Option<Arc<Pdu>>>,
    /// How the events are read: whole, or their fields only for callers that only check auth with them.
    parse: ParseStored,
}

impl Default for AuthCache {
    fn default() -> Self {
        AuthCache { events: Default::default(), create: Default::default(), parse: Pdu::from_stored }
    }
}

impl AuthCache {
    /// A cache whose events hold their fields only ([`Pdu::from_stored_fields`], no `json`): for checking auth
    /// with them and nothing else.
    pub fn fields_only() -> AuthCache {
        AuthCache { parse: Pdu::from_stored_fields, ..AuthCache::default() }
    }

    /// The event, from the cache or the database (None: we do not hold it). Shared, not copied: a resync checks
    /// 100k events citing the same few auth events, and copying their JSON trees was most of its allocations.
    pub fn load(&self, conn: Db<'_>, rules: &RoomVersionRules, id: &str) -> Option<Arc<Pdu>> {
        if let Some(p) = self.events.borrow().get(id) {
            return p.clone();
        }
        let row = events::event_by_id(conn, id).ok().flatten();
        let p = row.and_then(|row| pdu_from_row_by(&row, rules, self.parse).ok()).map(Arc::new);
        self.events.borrow_mut().insert(id.to_owned(), p.clone());
        p
    }

    /// Loads, in one query, those of `ids` that are not cached yet (each looked up once, as [`AuthCache::load`]
    /// would one by one).
    pub fn preload<'i>(
        &self,
        conn: Db<'_>,
        rules: &RoomVersionRules,
        ids: impl IntoIterator<Item = &'i str>,
    ) -> Result<()> {
        let wanted: Vec<&str> = {
            let known = self.events.borrow();
            let mut seen = std::collections::HashSet::new();
            ids.into_iter().filter(|id| !known.contains_key(*id) && seen.insert(*id)).collect()
        };
        if wanted.is_empty() {
            return Ok(());
        }
        // One query (on a reader: `rarray` is loaded there).
        let loaded: Vec<Result<Pdu>> =
            events::events_by_ids(conn, &wanted)?.iter().map(|row| pdu_from_row_by(row, rules, self.parse)).collect();
        let mut events = self.events.borrow_mut();
        for id in &wanted {
            events.insert((*id).to_owned(), None);
        }
        // One that cannot be read counts as not held, as in `load`.
        for p in loaded.into_iter().flatten() {
            events.insert(p.event_id.to_string(), Some(Arc::new(p)));
        }
        Ok(())
    }

    /// The create event in `room`'s current state (None: no current state, or none in it).
    fn room_create(&self, conn: Db<'_>, room: &RoomRow) -> Option<Arc<Pdu>> {
        self.create
            .get_or_init(|| {
                room.current_sg
                    .and_then(|sg| crate::room::state_event(conn, sg, "m.room.create", "").ok().flatten())
                    .map(Arc::new)
            })
            .clone()
    }
}

/// Auth of an outlier: against its own auth events only (the create event from the room state for v12+, where
/// it is not listed). A rejected auth event rejects it.
pub fn authorize_by_own_auth_events(
    conn: Db<'_>,
    rules: &RoomVersionRules,
    room: &RoomRow,
    pdu: &Pdu,
    cache: &AuthCache,
) -> std::result::Result<(), String> {
    let load = |id: &str| cache.load(conn, rules, id);
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, |id| load(id.as_str()))?;
    if pdu.kind == TimelineEventType::RoomCreate {
        return Ok(());
    }
    let by_key: HashMap<(String, String), Arc<Pdu>> = pdu
        .auth_events
        .iter()
        .filter_map(|id| load(id.as_str()))
        .filter_map(|p| p.state_key.clone().map(|k| ((p.kind.to_string(), k), p)))
        .collect();
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
        let t = t.to_string();
        by_key
            .get(&(t.clone(), k.to_owned()))
            .cloned()
            .or_else(|| (t == "m.room.create" && k.is_empty()).then(|| cache.room_create(conn, room)).flatten())
    })
}

/// What became of an incoming PDU.
#[derive(Debug)]
pub enum Incoming {
    Stored(Appended, Outcome),
    AlreadyKnown,
    /// These prev events are unknown (fetch them, or the state at them, and retry).
    MissingPrevs(Vec<String>),
}

/// The state group before an event whose prev events we all hold.
pub fn state_before(conn: Db<'_>, room: &RoomRow, pdu: &Pdu) -> Result<std::result::Result<StateGroup, Vec<String>>> {
    let mut groups = Vec::new();
    let mut missing = Vec::new();
    for p in &pdu.prev_events {
        match events::event_by_id(conn, p.as_str())? {
            // An outlier with a state group is a missing prev event whose state we learned across a gap.
            Some(EventRow { sg_after: Some(sg), .. }) => groups.push(sg),
            _ => missing.push(p.to_string()),
        }
    }
    if !missing.is_empty() {
        return Ok(Err(missing));
    }
    Ok(Ok(state::resolve_groups(conn, room.room_nid, &room.version, &groups)?))
}

/// The state before a missing prev event, as another server told it (`/state_ids`), for [`state_across_gap`].
#[derive(Clone, Debug)]
pub struct GapBranch {
    pub prev: String,
    pub state_before: Vec<String>,
}

/// The state before `pdu` when some of its prev events stay unknown: the state after each prev we hold, and for
/// each missing one the state after it (the state another server gave for before it, then the event itself),
/// resolved together. Each branch is written as a delta over the known prevs' state (or our current state) with
/// only the entries that differ, and only from events we hold and did not reject: in a partial-state room the
/// omitted memberships stay as they are, and the resync fills them like any other group's.
pub fn state_across_gap(conn: Db<'_>, room: &RoomRow, pdu: &Pdu, branches: &[GapBranch]) -> Result<StateGroup> {
    let mut groups = Vec::new();
    for p in &pdu.prev_events {
        if let Some(row) = events::event_by_id(conn, p.as_str())? {
            if let (false, Some(sg)) = (row.outlier, row.sg_after) {
                groups.push(sg);
            }
        }
    }
    let base = match groups.as_slice() {
        [] => room.current_sg.ok_or_else(|| Error::not_found("room has no state"))?,
        _ => state::resolve_groups(conn, room.room_nid, &room.version, &groups)?,
    };
    let base_state = state_groups::load_state(conn, base)?;
    for b in branches {
        let mut after: HashMap<StateKeyNid, EventNid> = HashMap::new();
        for id in b.state_before.iter().chain(std::iter::once(&b.prev)) {
            if let Some(row) = events::event_by_id(conn, id)? {
                if let (Some(skn), None, true) = (row.state_key_nid, &row.rejected, row.room_nid == room.room_nid) {
                    after.insert(skn, row.event_nid);
                }
            }
        }
        let changes: Vec<(StateKeyNid, Option<EventNid>)> =
            after.into_iter().filter(|(k, v)| base_state.get(k) != Some(v)).map(|(k, v)| (k, Some(v))).collect();
        let g = if changes.is_empty() { base } else { state::new_group(conn, room.room_nid, Some(base), &changes)? };
        // The missing event (an outlier) keeps the state after it: later events citing it, and the
        // re-authorisation at the end of a resync (which recomputes states from prev events), use it.
        rs::set_outlier_state(conn, room.room_nid, &b.prev, g)?;
        groups.push(g);
    }
    if groups.is_empty() {
        groups.push(base);
    }
    state::resolve_groups(conn, room.room_nid, &room.version, &groups)
}

/// A PDU for a room we hold no state for (a local user is only invited or knocking, or our join is under way):
/// nothing to authorise it against, so it is ignored, with one exception. The server that invited a local user
/// (or that a local user knocked on) may withdraw it: a leave or ban of that user which cites the invite or knock
/// we hold among its auth events (so it is built on our copy of it; a forged sender fails signature checks before
/// this). It replaces the invite like a rejection does. Returns whether the PDU was applied.
pub fn apply_out_of_room_membership(
    w: &mut Writer<'_>,
    identity: &Identity,
    room: &RoomRow,
    pdu: &Pdu,
) -> Result<bool> {
    let Some(target) = pdu.state_key.as_deref() else { return Ok(false) };
    if !matches!(pdu.membership().as_deref(), Some("leave" | "ban")) || !identity.is_local_user(target) {
        return Ok(false);
    }
    let Some((current, nid)) = members::membership_of(w.db(), room.room_nid, target)? else { return Ok(false) };
    if !matches!(current.as_str(), "invite" | "knock") {
        return Ok(false);
    }
    let Some(held) = events::event_by_nid(w.db(), nid)? else { return Ok(false) };
    if !pdu.auth_events.iter().any(|a| a.as_str() == held.event_id) {
        return Ok(false);
    }
    // Only whoever sent the invite withdraws it (Synapse and Complement agree: another member's kick of an
    // invitee stays unseen by the invitee's server).
    if current == "invite" && pdu.sender.as_str() != held.sender {
        return Ok(false);
    }
    let nid = persist_outlier(w.db(), room, pdu)?;
    invite_state::remove(w.db(), room.room_nid, target)?;
    crate::room::append::apply_membership(w, identity, room.room_nid, target, nid)?;
    Ok(true)
}

/// Authorises and stores a verified PDU that belongs in the room's DAG.
pub fn handle_incoming(
    w: &mut Writer<'_>,
    identity: &Identity,
    room_id: &RoomId,
    pdu: &Pdu,
    forced_state: Option<StateGroup>,
) -> Result<Incoming> {
    let conn = w.db();
    let room = rooms::room_by_id(conn, room_id.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
    let held = events::event_by_id(conn, pdu.event_id.as_str())?;
    if pdu.prev_events.is_empty() && forced_state.is_none() {
        // Only a create event has no prev events: it starts the DAG and is never placed in a timeline after the
        // fact (a get_missing_events answer reaching back to it, say).
        return match held {
            Some(_) => Ok(Incoming::AlreadyKnown),
            None => Err(Error::forbidden("an event without prev events can only be the room's create event")),
        };
    }
    if let Some(row) = held {
        if !row.outlier {
            return Ok(Incoming::AlreadyKnown);
        }
        // We held it as an outlier; now it joins the timeline (persist replaces the outlier row, keeping its nid).
    }
    let rules = version::rules(&room.version)?;
    let sg_before = match forced_state {
        Some(sg) => sg,
        None => match state_before(conn, &room, pdu)? {
            Ok(sg) => sg,
            Err(missing) => return Ok(Incoming::MissingPrevs(missing)),
        },
    };
    let outcome = check(conn, &room, &rules, pdu, sg_before)?;
    let appended = persist(w, identity, &room, &rules, pdu, Some(sg_before), outcome.clone(), None)?;
    Ok(Incoming::Stored(appended, outcome))
}

/// Auth against the event's auth events and the state before it; soft-fail against current state.
fn check(conn: Db<'_>, room: &RoomRow, rules: &RoomVersionRules, pdu: &Pdu, sg_before: StateGroup) -> Result<Outcome> {
    for a in &pdu.auth_events {
        if events::event_nid(conn, a.as_str())?.is_none() {
            return Ok(Outcome::Rejected(format!("auth event {a} unknown")));
        }
    }
    let auth_ok = if room.partial_state {
        // Partial state lacks most memberships: fall back to the event's own auth events for keys we lack
        // (MSC3902; re-checked when the resync completes).
        authorize_partial(conn, rules, pdu, sg_before)
    } else {
        authorize(conn, rules, pdu, Some(sg_before))
    };
    if let Err(reason) = auth_ok {
        return Ok(Outcome::Rejected(reason));
    }
    if !room.partial_state {
        if let Some(current) = rooms::room_by_nid(conn, room.room_nid)?.and_then(|r| r.current_sg) {
            if current != sg_before && authorize(conn, rules, pdu, Some(current)).is_err() {
                return Ok(Outcome::SoftFailed);
            }
        }
    }
    Ok(Outcome::Accepted)
}

/// Auth of an event received while the room is partial, as Synapse does it: our (partial) state before the event
/// lacks most memberships and may hold wrong ones (a kick accepted while partial), so the state the rules read is
/// our state's auth-relevant entries resolved against the event's own auth events by state resolution: a key we
/// lack comes from the auth events, a key where they differ is settled by the algorithm, not by what we hold.
/// Re-checked against the full state when the resync completes.
pub fn authorize_partial(
    conn: Db<'_>,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    sg: StateGroup,
) -> std::result::Result<(), String> {
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, |id| {
        load_pdu(conn, id).ok().flatten()
    })?;
    if pdu.kind == TimelineEventType::RoomCreate {
        return Ok(());
    }
    let state = state_for_partial_auth(conn, rules, pdu, sg).map_err(|e| e.to_string())?;
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t, k| {
        state.get(&(t.clone(), k.to_owned())).and_then(|id| load_pdu(conn, id).ok().flatten())
    })
}

/// See [`authorize_partial`]: our state's entries for the event's auth types, resolved with its auth events.
fn state_for_partial_auth(
    conn: Db<'_>,
    rules: &RoomVersionRules,
    pdu: &Pdu,
    sg: StateGroup,
) -> Result<ruma::state_res::StateMap<ruma::OwnedEventId>> {
    use ruma::events::StateEventType;
    let types = ruma::state_res::auth_types_for_event(
        &pdu.kind,
        &pdu.sender,
        pdu.state_key.as_deref(),
        &pdu.content,
        &rules.authorization,
    )
    .map_err(Error::bad_json)?;
    let create = (StateEventType::RoomCreate, String::new());
    let mut ours = ruma::state_res::StateMap::new();
    for key in types.into_iter().chain(std::iter::once(create.clone())) {
        if let Some(skn) = state_groups::find_state_key_nid(conn, &key.0.to_string(), &key.1)? {
            if let Some(row) = state_groups::lookup_state(conn, sg, skn)?.map(|n| events::event_by_nid(conn, n)) {
                if let Some(row) = row? {
                    ours.insert(
                        key,
                        ruma::OwnedEventId::try_from(row.event_id).map_err(|e| Error::internal(e.to_string()))?,
                    );
                }
            }
        }
    }
    let mut claimed = ruma::state_res::StateMap::new();
    for p in pdu.auth_events.iter().filter_map(|id| load_pdu(conn, id).ok().flatten()) {
        if let Some(k) = p.state_key.clone() {
            claimed.insert((StateEventType::from(p.kind.to_string()), k), p.event_id.clone());
        }
    }
    // The create event is not among a v12 event's auth events; both sides agree on it.
    if let Some(id) = ours.get(&create).cloned() {
        claimed.entry(create).or_insert(id);
    }
    if ours == claimed {
        return Ok(ours);
    }
    state::resolve_maps(conn, rules, &[ours, claimed])
}
