//! `GET /sync`: initial, incremental and long-polling, with filters and lazy-loaded members.
//!
//! A token is `s{stream}_{typing}`: the global stream position (events, account data, receipts, to-device,
//! device lists, local membership changes and presence share one counter) and the typing serial.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::format;
use crate::error::{Error, Result};
use crate::http::{qs, AppState, Auth, Query, SentMembers};
use crate::room::stripped::stripped_state;
use crate::room::typing::TypingView;
use crate::store::ids::{EventNid, RoomNid, StateGroup, StreamPos};
use crate::store::{account_data, accounts, e2ee, events, members, receipts, rooms, state_groups, timeline, Db};

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Token {
    pub stream: i64,
    pub typing: u64,
}

impl Token {
    pub fn render(&self) -> String {
        format!("s{}_{}", self.stream, self.typing)
    }
}

/// Parses `s{stream}[_{typing}]` (also plain numbers). A topological token of `/messages` (`t{depth}_{stream}`,
/// which the spec lets clients give `/relations`) reads as its stream position.
pub fn parse_token(t: &str) -> Result<Token> {
    if let Some((_, stream)) = t.strip_prefix('t').and_then(|b| b.split_once('_')) {
        let stream = stream.parse().map_err(|_| Error::invalid_param(format!("invalid token `{t}`")))?;
        return Ok(Token { stream, typing: 0 });
    }
    let body = t.strip_prefix('s').unwrap_or(t);
    let mut parts = body.split('_');
    let bad = || Error::invalid_param(format!("invalid token `{t}`"));
    let stream: i64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let typing: u64 = match parts.next() {
        Some(p) => p.parse().map_err(|_| bad())?,
        None => 0,
    };
    Ok(Token { stream, typing })
}

/// The parts of a filter that Hearth applies.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub timeline_limit: Option<usize>,
    pub timeline: EventFilter,
    pub state: EventFilter,
    pub lazy_load_members: bool,
    pub include_redundant_members: bool,
    pub include_leave: bool,
    pub rooms: Option<HashSet<String>>,
    pub not_rooms: HashSet<String>,
    pub account_data: EventFilter,
    pub room_account_data: EventFilter,
    pub ephemeral: EventFilter,
    pub presence: EventFilter,
    /// `room.timeline.unread_thread_notifications`: notification counts per thread.
    pub unread_thread_notifications: bool,
}

#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<HashSet<String>>,
    pub not_senders: HashSet<String>,
    pub limit: Option<usize>,
    /// `contains_url` (room event filters): only events whose content has a `url` (true), or only those without.
    pub contains_url: Option<bool>,
}

fn type_matches(pattern: &str, t: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => t.starts_with(prefix),
        None => pattern == t,
    }
}

impl EventFilter {
    fn parse(v: Option<&Value>) -> Result<EventFilter> {
        let Some(v) = v else { return Ok(EventFilter::default()) };
        if !v.is_object() {
            return Err(Error::bad_json("filter sections must be objects"));
        }
        let strs = |k: &str| -> Result<Option<Vec<String>>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_str().map(str::to_owned).ok_or_else(|| Error::bad_json(format!("`{k}` must be strings")))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some),
                Some(_) => Err(Error::bad_json(format!("`{k}` must be an array"))),
            }
        };
        let limit = match v.get("limit") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                Some(n.as_u64().ok_or_else(|| Error::bad_json("limit must be a positive integer"))? as usize)
            }
            Some(_) => return Err(Error::bad_json("limit must be an integer")),
        };
        Ok(EventFilter {
            types: strs("types")?,
            not_types: strs("not_types")?.unwrap_or_default(),
            senders: strs("senders")?.map(|v| v.into_iter().collect()),
            not_senders: strs("not_senders")?.unwrap_or_default().into_iter().collect(),
            limit,
            contains_url: v.get("contains_url").and_then(Value::as_bool),
        })
    }

    pub fn allows(&self, event_type: &str, sender: &str) -> bool {
        if self.not_types.iter().any(|p| type_matches(p, event_type)) || self.not_senders.contains(sender) {
            return false;
        }
        if let Some(types) = &self.types {
            if !types.iter().any(|p| type_matches(p, event_type)) {
                return false;
            }
        }
        if let Some(s) = &self.senders {
            if !s.contains(sender) {
                return false;
            }
        }
        true
    }

    /// [`Self::allows`] for a stored event, with the checks that need its content (`contains_url`).
    pub fn allows_event(&self, row: &events::EventRow) -> bool {
        if !self.allows(&row.event_type, &row.sender) {
            return false;
        }
        let Some(want_url) = self.contains_url else { return true };
        let has_url = serde_json::from_str::<Value>(&row.json)
            .ok()
            .is_some_and(|v| v.pointer("/content/url").is_some_and(Value::is_string));
        has_url == want_url
    }
}

/// Checks a filter against the spec's shape (`Filter`, `RoomFilter`, `EventFilter`, `RoomEventFilter`): objects where
/// sections go, booleans, integers, arrays of strings, `!` room ids and `@` user ids in the id lists. `null` counts as
/// absent. Unknown keys are allowed (extensions).
fn validate_filter(v: &Value) -> Result<()> {
    fn bad(path: &str, what: &str) -> Error {
        Error::bad_json(format!("filter `{path}` must be {what}"))
    }
    fn object<'a>(v: &'a Value, path: &str) -> Result<Option<&'a serde_json::Map<String, Value>>> {
        match v {
            Value::Null => Ok(None),
            Value::Object(o) => Ok(Some(o)),
            _ => Err(bad(path, "an object")),
        }
    }
    fn list(o: &serde_json::Map<String, Value>, path: &str, key: &str, sigil: Option<char>) -> Result<()> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Array(a))
                if a.iter().all(|x| x.as_str().is_some_and(|s| sigil.is_none_or(|c| s.starts_with(c)))) =>
            {
                Ok(())
            }
            Some(_) => Err(bad(
                &format!("{path}.{key}"),
                if sigil.is_some() { "an array of ids" } else { "an array of strings" },
            )),
        }
    }
    fn flags(o: &serde_json::Map<String, Value>, path: &str, keys: &[&str]) -> Result<()> {
        for k in keys {
            if o.get(*k).is_some_and(|f| !f.is_boolean() && !f.is_null()) {
                return Err(bad(&format!("{path}.{k}"), "a boolean"));
            }
        }
        Ok(())
    }
    // EventFilter, plus the RoomEventFilter fields when `room_event`.
    fn event_filter(v: Option<&Value>, path: &str, room_event: bool) -> Result<()> {
        let Some(o) = v.map(|v| object(v, path)).transpose()?.flatten() else { return Ok(()) };
        list(o, path, "types", None)?;
        list(o, path, "not_types", None)?;
        list(o, path, "senders", Some('@'))?;
        list(o, path, "not_senders", Some('@'))?;
        if o.get("limit").is_some_and(|l| !l.is_null() && !l.is_u64()) {
            return Err(bad(&format!("{path}.limit"), "a non-negative integer"));
        }
        if room_event {
            list(o, path, "rooms", Some('!'))?;
            list(o, path, "not_rooms", Some('!'))?;
            flags(
                o,
                path,
                &["lazy_load_members", "include_redundant_members", "unread_thread_notifications", "contains_url"],
            )?;
        }
        Ok(())
    }
    let Some(top) = object(v, "")? else { return Err(bad("", "an object")) };
    list(top, "", "event_fields", None)?;
    if top
        .get("event_format")
        .is_some_and(|f| !f.is_null() && f.as_str().is_none_or(|f| f != "client" && f != "federation"))
    {
        return Err(bad("event_format", "`client` or `federation`"));
    }
    event_filter(top.get("account_data"), "account_data", false)?;
    event_filter(top.get("presence"), "presence", false)?;
    if let Some(room) = top.get("room").map(|r| object(r, "room")).transpose()?.flatten() {
        list(room, "room", "rooms", Some('!'))?;
        list(room, "room", "not_rooms", Some('!'))?;
        flags(room, "room", &["include_leave"])?;
        for section in ["timeline", "state", "ephemeral", "account_data"] {
            event_filter(room.get(section), &format!("room.{section}"), true)?;
        }
    }
    Ok(())
}

impl Filter {
    pub fn parse(v: &Value) -> Result<Filter> {
        if !v.is_object() {
            return Err(Error::bad_json("filter must be an object"));
        }
        validate_filter(v)?;
        let room = v.get("room").filter(|r| !r.is_null());
        let section = |name: &str| room.and_then(|r| r.get(name));
        let timeline = EventFilter::parse(section("timeline"))?;
        let state_v = section("state");
        let state = EventFilter::parse(state_v)?;
        let flag = |sec: Option<&Value>, k: &str| sec.and_then(|s| s.get(k)).and_then(Value::as_bool).unwrap_or(false);
        let rooms = match room.and_then(|r| r.get("rooms")) {
            Some(Value::Array(a)) => Some(a.iter().filter_map(Value::as_str).map(str::to_owned).collect()),
            _ => None,
        };
        let not_rooms = match room.and_then(|r| r.get("not_rooms")) {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            _ => HashSet::new(),
        };
        Ok(Filter {
            timeline_limit: timeline.limit,
            lazy_load_members: flag(state_v, "lazy_load_members") || flag(section("timeline"), "lazy_load_members"),
            include_redundant_members: flag(state_v, "include_redundant_members"),
            include_leave: room.and_then(|r| r.get("include_leave")).and_then(Value::as_bool).unwrap_or(false),
            timeline,
            state,
            rooms,
            not_rooms,
            account_data: EventFilter::parse(v.get("account_data"))?,
            room_account_data: EventFilter::parse(section("account_data"))?,
            ephemeral: EventFilter::parse(section("ephemeral"))?,
            presence: EventFilter::parse(v.get("presence"))?,
            unread_thread_notifications: flag(section("timeline"), "unread_thread_notifications"),
        })
    }

    fn room_allowed(&self, room_id: &str) -> bool {
        !self.not_rooms.contains(room_id) && self.rooms.as_ref().is_none_or(|r| r.contains(room_id))
    }
}

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    filter: Option<String>,
    #[serde(default, deserialize_with = "qs::opt_bool")]
    full_state: Option<bool>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    timeout: Option<u64>,
    /// `online` (the default) or `unavailable` set the user's presence while the request runs; `offline` leaves it.
    set_presence: Option<String>,
    /// MSC4222 (`state_after`) is not implemented: validated, then ignored (clients fall back to `state`).
    #[serde(default, deserialize_with = "qs::opt_bool")]
    use_state_after: Option<bool>,
}

async fn load_filter(s: &AppState, user_id: &str, filter: Option<String>) -> Result<Filter> {
    let Some(f) = filter else { return Ok(Filter::default()) };
    if f.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(&f).map_err(|e| Error::bad_json(format!("invalid filter: {e}")))?;
        return Filter::parse(&v);
    }
    let id: i64 = f.parse().map_err(|_| Error::invalid_param("filter is neither an id nor JSON"))?;
    let uid = user_id.to_owned();
    let json = s
        .store
        .read(move |c| accounts::get_filter(c, &uid, id))
        .await?
        .ok_or_else(|| Error::not_found("no such filter"))?;
    Filter::parse(&serde_json::from_str(&json)?)
}

pub async fn sync(State(s): State<AppState>, auth: Auth, Query(q): Query<SyncQuery>) -> Result<impl IntoResponse> {
    if q.set_presence.as_deref().is_some_and(|p| !["online", "offline", "unavailable"].contains(&p)) {
        return Err(Error::invalid_param("set_presence must be online, offline or unavailable"));
    }
    let _ = q.use_state_after;
    let filter = load_filter(&s, auth.user_id.as_str(), q.filter).await?;
    // Before the position is read, so the user's own change is in this response.
    let set_presence = q.set_presence.as_deref().unwrap_or("online");
    let _syncing = s.presence.syncing(&s.store, auth.user_id.as_str(), set_presence).await?;
    let since = q.since.as_deref().map(parse_token).transpose()?;
    let full_state = q.full_state.unwrap_or(false);
    let timeout = Duration::from_millis(q.timeout.unwrap_or(0).min(300_000));
    let deadline = tokio::time::Instant::now() + timeout;

    if let Some(since) = since {
        // The client has seen everything up to `since`: its to-device messages up to there can go.
        drop_delivered_to_device(&s.store, &auth.user_id, &auth.device_id, StreamPos(since.stream)).await?;
    }

    let mut stream_rx = s.store.stream_watch();
    let mut typing_rx = s.typing.watch();
    loop {
        let pos = Token { stream: *stream_rx.borrow_and_update(), typing: s.typing.serial() };
        let _ = typing_rx.borrow_and_update();
        // The unread counts of the events up to `pos` come from the push evaluator: let it catch up first.
        crate::client::push::caught_up(&s, pos.stream).await;
        let (a, f) = (auth.clone(), filter.clone());
        let typing = s.typing.clone_view();
        let sent = s.clone();
        let (mut body, empty) = s.store.read(move |c| build(c, &a, &f, since, pos, full_state, &typing, &sent)).await?;
        if !empty || since.is_none() || full_state || tokio::time::Instant::now() >= deadline {
            refresh_presence(&s, &mut body);
            return Ok(axum::Json(body));
        }
        // Nothing new: wait for the stream or typing to move (or the timeout), then look again.
        tokio::select! {
            _ = stream_rx.changed() => {}
            _ = typing_rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5).min(deadline.saturating_duration_since(tokio::time::Instant::now()))) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            let pos = Token { stream: s.store.current_stream(), typing: s.typing.serial() };
            if pos.stream == since.map(|t| t.stream).unwrap_or(0) && Some(pos.typing) == since.map(|t| t.typing) {
                crate::client::push::caught_up(&s, pos.stream).await;
                let (a, f) = (auth.clone(), filter.clone());
                let typing = s.typing.clone_view();
                let sent = s.clone();
                let (mut body, _) =
                    s.store.read(move |c| build(c, &a, &f, since, pos, full_state, &typing, &sent)).await?;
                refresh_presence(&s, &mut body);
                return Ok(axum::Json(body));
            }
        }
    }
}

/// Deletes the to-device messages of `user_id`'s `device_id` up to `upto` (the client has them). Looked for on a
/// reader first: most syncs have none to delete, and a write waits behind whatever the writer is doing (a resync's
/// step), which made every incremental sync wait up to a step's length (bench/PROFILE.md, round 4).
pub(crate) async fn drop_delivered_to_device(
    store: &crate::store::Store,
    user_id: &ruma::UserId,
    device_id: &str,
    upto: StreamPos,
) -> Result<()> {
    let (u, d) = (user_id.to_owned(), device_id.to_owned());
    let (u2, d2) = (u.clone(), d.clone());
    if store.read(move |c| e2ee::has_to_device_upto(c, u2.as_str(), &d2, upto)).await? {
        store.write(move |w| e2ee::delete_to_device_upto(w.db(), u.as_str(), &d, upto)).await?;
    }
    Ok(())
}

/// Presence events with the activity not yet written laid over them.
fn refresh_presence(s: &AppState, body: &mut Value) {
    if let Some(events) = body.pointer_mut("/presence/events").and_then(Value::as_array_mut) {
        s.presence.refresh_events(events, crate::store::accounts::now_ms());
    }
}

/// The room's state at stream position `pos` (after its last timeline event up to there).
fn state_at(c: Db<'_>, room_nid: RoomNid, pos: i64) -> Result<Option<StateGroup>> {
    timeline::state_at(c, room_nid, StreamPos(pos))
}

/// The membership event of `user_id` in state group `sg`, if any.
fn member_event(c: Db<'_>, sg: StateGroup, user_id: &str) -> Result<Option<events::EventRow>> {
    let Some(skn) = state_groups::find_state_key_nid(c, "m.room.member", user_id)? else { return Ok(None) };
    let Some(nid) = state_groups::lookup_state(c, sg, skn)? else { return Ok(None) };
    events::event_by_nid(c, nid)
}

struct RoomSync {
    timeline: Vec<Value>,
    limited: bool,
    prev_batch: String,
    state: Vec<Value>,
}

/// The index (in `rows`, newest first) of the newest remote event with a `prev_events` entry missing from our
/// timeline: the history before it has a hole. Local events always follow what we have.
fn newest_gap(c: Db<'_>, auth: &Auth, rows: &[events::EventRow]) -> Result<Option<usize>> {
    let own_server = auth.user_id.server_name().as_str();
    for (i, row) in rows.iter().enumerate() {
        if row.sender.split_once(':').is_some_and(|x| x.1 == own_server) {
            continue;
        }
        if !events::prevs_missing_from_timeline(c, row.event_nid)?.is_empty() {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// The newest events of the window (`since`, `upto`] the user may see (at most `limit`, newest first) and whether
/// the timeline is limited. As Synapse's `_load_filtered_recents`: pages of `limit + 1` events are read backwards
/// and judged one by one (history visibility at each event) until enough are visible, the window is exhausted or
/// five pages were read. An incremental sync stops at the newest gap in the window (a remote event whose earlier
/// events we never got): it shows only what follows, as a limited timeline, so the client knows to paginate.
fn visible_recent(
    c: Db<'_>,
    auth: &Auth,
    room: &rooms::RoomRow,
    since: Option<i64>,
    upto: i64,
    limit: usize,
) -> Result<(Vec<events::EventRow>, bool)> {
    let mut judge = crate::room::visibility::ClientJudge::new(c, auth.user_id.as_str());
    let after = StreamPos(since.unwrap_or(i64::MIN));
    let mut top = upto;
    let mut visible = Vec::new();
    let mut limited = false;
    for _ in 0..5 {
        let page = timeline::newest_first(c, room.room_nid, after, StreamPos(top), (limit + 1) as i64)?;
        let full = page.len() > limit;
        top = page.last().and_then(|r| r.stream_ordering).map_or(top, |p| p.0 - 1);
        let mut page = page;
        let mut gap = false;
        if since.is_some() {
            if let Some(i) = newest_gap(c, auth, &page)? {
                page.truncate(i + 1);
                gap = true;
            }
        }
        visible.extend(judge.filter(page)?);
        if gap {
            limited = true;
            break;
        }
        if !full {
            break;
        }
        // More history before this page (an initial sync counts it as limited even when it is not shown).
        limited = true;
        if visible.len() > limit {
            break;
        }
    }
    if visible.len() > limit {
        limited = true;
        visible.truncate(limit);
    }
    Ok((visible, limited))
}

/// The newest timeline events of a room in the window (`since`, `upto`] that the user may see (history
/// visibility), oldest first, as `/sync` and sliding sync both show them.
pub(crate) struct TimelineWindow {
    pub rows: Vec<events::EventRow>,
    pub limited: bool,
    pub prev_batch: String,
    /// The stream position of the first event (`upto + 1` when there is none).
    pub first_stream: i64,
    pub first_sg_after: Option<StateGroup>,
}

/// The timeline half of [`room_window`]: at most `limit` events of the window.
pub(crate) fn timeline_window(
    c: Db<'_>,
    auth: &Auth,
    room: &rooms::RoomRow,
    limit: usize,
    since: Option<i64>,
    upto: i64,
) -> Result<TimelineWindow> {
    let (mut rows, limited) = visible_recent(c, auth, room, since, upto, limit)?;
    rows.reverse();
    let first_stream = rows.first().and_then(|r| r.stream_ordering).map_or(upto + 1, |p| p.0);
    let first_sg_after = rows.first().and_then(|r| r.sg_after);
    // A fresh (initial) sync whose timeline is not limited holds all the history the user may see: its prev_batch
    // is then the sync's own position, as Synapse gives it (`/members?at=` that token answers the members as of
    // the sync, which Complement's `TestGetRoomMembersAtPoint` checks; paging back from it repeats the timeline,
    // which clients drop as already seen). Otherwise it is the position just before the timeline's first event.
    let prev_stream = if since.is_none() && !limited { upto } else { first_stream - 1 };
    let prev_batch = Token { stream: prev_stream, typing: 0 }.render();
    Ok(TimelineWindow { rows, limited, prev_batch, first_stream, first_sg_after })
}

/// Timeline and state of one room for the window (`since`, `upto`].
#[allow(clippy::too_many_arguments)]
fn room_window(
    c: Db<'_>,
    auth: &Auth,
    room: &rooms::RoomRow,
    filter: &Filter,
    since: Option<i64>,
    upto: i64,
    full_state: bool,
    sent: &SentMembers,
) -> Result<RoomSync> {
    let limit = filter.timeline_limit.unwrap_or(10).clamp(0, 100);
    let TimelineWindow { rows, limited, prev_batch, first_stream, first_sg_after } =
        timeline_window(c, auth, room, limit, since, upto)?;

    let timeline: Vec<events::EventRow> = rows.into_iter().filter(|r| filter.timeline.allows_event(r)).collect();
    let timeline_ids: HashSet<&str> = timeline.iter().map(|r| r.event_id.as_str()).collect();

    // State: everything up to the timeline start for initial/full/newly-visible; otherwise the changes between
    // `since` and the timeline start (non-empty only for gappy syncs).
    // Nothing of the room precedes the timeline when it starts with our join of a room joined over federation
    // (the state before it is held as outliers): then the state at that first event, which the timeline carries.
    let start_sg = state_at(c, room.room_nid, first_stream - 1)?.or(first_sg_after);
    // With lazy loading the member half is never listed whole: only the non-member state is read here, and the
    // memberships of the timeline's senders (and our own on a fresh sync) are looked up one by one below.
    let lazy = filter.lazy_load_members;
    let exclude = if lazy { Some("m.room.member") } else { None };
    let mut state_nids: Vec<EventNid> = Vec::new();
    let fresh = since.is_none() || full_state;
    if fresh {
        if let Some(sg) = start_sg {
            state_nids.extend(state_groups::state_event_ids(c, sg, exclude)?.into_iter().map(|x| x.0));
        }
    } else if let (Some(since), true) = (since, limited) {
        let before: HashSet<EventNid> = match state_at(c, room.room_nid, since)? {
            Some(sg) => state_groups::state_event_ids(c, sg, exclude)?.into_iter().map(|x| x.0).collect(),
            None => HashSet::new(),
        };
        if let Some(sg) = start_sg {
            state_nids.extend(
                state_groups::state_event_ids(c, sg, exclude)?.into_iter().map(|x| x.0).filter(|n| !before.contains(n)),
            );
        }
    }
    let mut state = Vec::new();
    for nid in state_nids {
        let Some(row) = events::event_by_nid(c, nid)? else { continue };
        if timeline_ids.contains(row.event_id.as_str()) || !filter.state.allows(&row.event_type, &row.sender) {
            continue;
        }
        state.push(format::state_only(&row, &room.room_id, false));
    }
    if lazy {
        let members = lazy_members(c, auth, room, &timeline, start_sg.or(room.current_sg), fresh)?;
        state.extend(
            members
                .iter()
                .filter(|row| !timeline_ids.contains(row.event_id.as_str()))
                .map(|row| format::state_only(row, &room.room_id, false)),
        );
        let key = (auth.user_id.to_string(), auth.device_id.clone(), room.room_id.clone());
        sent.apply(key, fresh, !filter.include_redundant_members, &mut state);
    }
    let device = Some((auth.user_id.as_str(), auth.device_id.as_str()));
    let timeline =
        timeline.iter().map(|r| format::event(c, r, &room.room_id, device, false)).collect::<Result<Vec<_>>>()?;
    Ok(RoomSync { timeline, limited, prev_batch, state })
}

/// The membership events a lazy-loading sync sends with a room's timeline (at state group `sg`): our own on a
/// fresh sync, and the timeline senders' (sent even if seen before: clients tolerate redundant members). In a
/// partial-state room a sender's membership may be missing from the state: then it is taken from the auth events
/// of their event (as Synapse does), so clients can still render who spoke.
pub(crate) fn lazy_members(
    c: Db<'_>,
    auth: &Auth,
    room: &rooms::RoomRow,
    timeline: &[events::EventRow],
    sg: Option<StateGroup>,
    fresh: bool,
) -> Result<Vec<events::EventRow>> {
    let mut out = Vec::new();
    let mut have_members: HashSet<&str> = HashSet::new();
    let senders: BTreeSet<&str> = timeline.iter().map(|r| r.sender.as_str()).collect();
    if let Some(sg) = sg {
        let own = fresh.then_some(auth.user_id.as_str());
        for user in own.into_iter().chain(senders) {
            if have_members.contains(user) {
                continue;
            }
            if let Some(row) = member_event(c, sg, user)? {
                out.push(row);
                have_members.insert(user);
            }
        }
    }
    if !room.partial_state {
        return Ok(out);
    }
    for r in timeline {
        if have_members.contains(r.sender.as_str()) {
            continue;
        }
        let v: Value = serde_json::from_str(&r.json)?;
        let auth_ids = v.get("auth_events").and_then(Value::as_array).cloned().unwrap_or_default();
        for a in auth_ids {
            // v1/v2 rooms list `[id, hashes]` pairs.
            let Some(id) = a.as_str().or_else(|| a.get(0).and_then(Value::as_str)) else { continue };
            let Some(row) = events::event_by_id(c, id)? else { continue };
            if row.event_type != "m.room.member" || row.rejected.is_some() {
                continue;
            }
            if state_groups::state_key_of(c, row.state_key_nid.unwrap_or_default())?.1 == r.sender {
                out.push(row);
                have_members.insert(r.sender.as_str());
                break;
            }
        }
    }
    Ok(out)
}

fn room_summary(c: Db<'_>, room: &rooms::RoomRow, user_id: &str) -> Result<Value> {
    let (joined, invited) = members::member_counts(c, room.room_nid)?;
    let mut summary = json!({"m.joined_member_count": joined, "m.invited_member_count": invited});
    let named = match room.current_sg {
        Some(sg) => {
            crate::room::state_content(c, sg, "m.room.name", "")?
                .and_then(|v| v.get("name").cloned())
                .is_some_and(|n| n != json!(""))
                || crate::room::state_content(c, sg, "m.room.canonical_alias", "")?
                    .and_then(|v| v.get("alias").cloned())
                    .is_some()
        }
        None => false,
    };
    if !named {
        summary["m.heroes"] = json!(members::heroes(c, room.room_nid, user_id)?);
    }
    if room.partial_state {
        // MSC2775-style hint: the member list (and so these counts) is still being fetched.
        summary["org.matrix.msc2775.syncing"] = json!(true);
    }
    Ok(summary)
}

pub(crate) fn account_data_since(
    c: Db<'_>,
    user_id: &str,
    room_id: &str,
    since: i64,
    upto: i64,
    f: &EventFilter,
) -> Result<Vec<Value>> {
    Ok(account_data::changed_since(c, user_id, room_id, StreamPos(since), StreamPos(upto))?
        .into_iter()
        .filter(|(t, _)| f.allows(t, user_id))
        .map(|(t, content)| json!({"type": t, "content": content}))
        .collect())
}

/// Receipts that moved in the window; private receipts (`m.read.private`) only when they are `user_id`'s own.
pub(crate) fn receipts_since(
    c: Db<'_>,
    room_nid: RoomNid,
    since: i64,
    upto: i64,
    user_id: &str,
) -> Result<Option<Value>> {
    let mut content = serde_json::Map::new();
    for r in receipts::changed_since(c, room_nid, StreamPos(since), StreamPos(upto), user_id)? {
        let mut receipt = json!({"ts": r.ts});
        if !r.thread_id.is_empty() {
            receipt["thread_id"] = json!(r.thread_id);
        }
        let ev = content.entry(r.event_id).or_insert_with(|| json!({}));
        let by_type = ev.as_object_mut().expect("object").entry(r.receipt_type).or_insert_with(|| json!({}));
        // A user's unthreaded and threaded receipts on the same event: the unthreaded one wins (MSC4102).
        if by_type.get(&r.user_id).is_some_and(|old| old.get("thread_id").is_none()) && !r.thread_id.is_empty() {
            continue;
        }
        by_type[r.user_id] = receipt;
    }
    Ok((!content.is_empty()).then(|| json!({"type": "m.receipt", "content": content})))
}

/// One sync computation: the request, the position it syncs up to, and what every section needs.
struct SyncPass<'a> {
    c: Db<'a>,
    auth: &'a Auth,
    filter: &'a Filter,
    since: Option<Token>,
    pos: Token,
    full_state: bool,
    typing: &'a TypingView,
    sent: &'a SentMembers,
    /// Presence tracked (`presence.enabled`).
    presence: bool,
    /// `m.ignored_user_list`.
    ignored: HashSet<String>,
    /// Local membership changes in the window: room -> latest membership.
    changed: HashMap<RoomNid, String>,
}

impl SyncPass<'_> {
    fn since_stream(&self) -> Option<i64> {
        self.since.map(|t| t.stream)
    }

    /// The lower end of the window (exclusive): 0 for an initial sync.
    fn lo(&self) -> i64 {
        self.since_stream().unwrap_or(0)
    }

    fn is_ignored(&self, e: &Value) -> bool {
        e["sender"].as_str().is_some_and(|s| self.ignored.contains(s))
    }

    fn room(&self, room_nid: RoomNid) -> Result<rooms::RoomRow> {
        rooms::room_by_nid(self.c, room_nid)?.ok_or_else(|| Error::internal("room vanished"))
    }

    /// Rooms joined: timeline, state, ephemeral events, room account data, summary and counts; in an incremental
    /// sync only rooms with something new.
    fn joined(&self) -> Result<serde_json::Map<String, Value>> {
        let (c, auth, filter, since) = (self.c, self.auth, self.filter, self.since);
        let mut join = serde_json::Map::new();
        for (room_nid, room_id) in members::rooms_with_membership(c, auth.user_id.as_str(), "join")? {
            if !filter.room_allowed(&room_id) {
                continue;
            }
            let room = self.room(room_nid)?;
            if room.partial_state && !filter.lazy_load_members {
                // MSC3902: a client that wants every member sees the room once the member list is complete
                // (the resync then records a fresh join, so the room arrives as newly joined with full state).
                continue;
            }
            let newly = since.is_some() && self.changed.get(&room_nid).is_some_and(|m| m == "join");
            let window_since = if newly { None } else { self.since_stream() };
            let mut rs =
                room_window(c, auth, &room, filter, window_since, self.pos.stream, self.full_state, self.sent)?;
            rs.timeline.retain(|e| !self.is_ignored(e)); // m.ignored_user_list
            let ephemeral = self.ephemeral(room_nid, &room_id, newly)?;
            let account_data = account_data_since(
                c,
                auth.user_id.as_str(),
                &room_id,
                self.lo(),
                self.pos.stream,
                &filter.room_account_data,
            )?;
            let nothing =
                rs.timeline.is_empty() && rs.state.is_empty() && ephemeral.is_empty() && account_data.is_empty();
            if since.is_some() && !self.full_state && nothing && !newly {
                continue;
            }
            let (unread, unread_threads) = crate::client::notifications::unread_counts(
                c,
                &room,
                auth.user_id.as_str(),
                filter.unread_thread_notifications,
            )?;
            let mut body = json!({
                "timeline": {"events": rs.timeline, "limited": rs.limited, "prev_batch": rs.prev_batch},
                "state": {"events": rs.state},
                "ephemeral": {"events": ephemeral},
                "account_data": {"events": account_data},
                "summary": room_summary(c, &room, auth.user_id.as_str())?,
                "unread_notifications": unread,
            });
            if let Some(threads) = unread_threads {
                body["unread_thread_notifications"] = threads;
            }
            join.insert(room_id.clone(), body);
        }
        Ok(join)
    }

    /// Rooms peeked (MSC2753: `rooms.peek`, shaped as joined rooms): timeline and state (lazily loaded members as
    /// the filter asks), in full the first time after the peek began, then what is new. A room no longer readable
    /// (its history stopped being world-readable) is left out.
    fn peeked(&self) -> Result<serde_json::Map<String, Value>> {
        let (c, auth, filter, since) = (self.c, self.auth, self.filter, self.since);
        let mut peek = serde_json::Map::new();
        for (room_nid, room_id, began) in crate::store::peeks::rooms_peeked_by(c, auth.user_id.as_str())? {
            if !filter.room_allowed(&room_id) {
                continue;
            }
            let room = self.room(room_nid)?;
            if crate::room::visibility::visibility(c, &room, &auth.user_id)? != crate::room::visibility::Visibility::All
            {
                continue;
            }
            let newly = since.is_some_and(|t| t.stream < began);
            let window_since = if newly { None } else { self.since_stream() };
            let mut rs =
                room_window(c, auth, &room, filter, window_since, self.pos.stream, self.full_state, self.sent)?;
            rs.timeline.retain(|e| !self.is_ignored(e));
            if since.is_some() && !self.full_state && !newly && rs.timeline.is_empty() && rs.state.is_empty() {
                continue;
            }
            peek.insert(
                room_id.clone(),
                json!({
                    "timeline": {"events": rs.timeline, "limited": rs.limited, "prev_batch": rs.prev_batch},
                    "state": {"events": rs.state},
                    "summary": room_summary(c, &room, auth.user_id.as_str())?,
                }),
            );
        }
        Ok(peek)
    }

    /// Typing (when it changed since the token) and receipts of a joined room, as the filter allows. A room new to
    /// this sync (`newly`: joined in the window, or shown once its partial-state join completed) gets every receipt,
    /// not just those that moved in the window: the client has none of them yet.
    fn ephemeral(&self, room_nid: RoomNid, room_id: &str, newly: bool) -> Result<Vec<Value>> {
        let since = self.since;
        let typing = self
            .typing
            .changed
            .get(room_id)
            .filter(|s| since.is_none_or(|t| **s > t.typing))
            .map(|_| self.typing.rooms.get(room_id).cloned().unwrap_or_default());
        let mut ephemeral = Vec::new();
        if let Some(users) = typing {
            if since.is_some() || !users.is_empty() {
                ephemeral.push(json!({"type": "m.typing", "content": {"user_ids": users}}));
            }
        }
        let lo = if newly { 0 } else { self.lo() };
        if let Some(r) = receipts_since(self.c, room_nid, lo, self.pos.stream, self.auth.user_id.as_str())? {
            ephemeral.push(r);
        }
        ephemeral.retain(|e| self.filter.ephemeral.allows(e["type"].as_str().unwrap_or(""), ""));
        Ok(ephemeral)
    }

    /// Rooms invited to (in an incremental sync only invites new in the window), with their stripped state.
    fn invited(&self) -> Result<serde_json::Map<String, Value>> {
        let (c, user_id) = (self.c, self.auth.user_id.as_str());
        let mut invite = serde_json::Map::new();
        for (room_nid, room_id) in members::rooms_with_membership(c, user_id, "invite")? {
            if !self.filter.room_allowed(&room_id) || (self.since.is_some() && !self.changed.contains_key(&room_nid)) {
                continue;
            }
            let invite_state = stripped_state(c, &self.room(room_nid)?, user_id)?;
            let invite_event =
                invite_state.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == json!(user_id));
            if invite_event.is_some_and(|e| self.is_ignored(e)) {
                continue; // invites from ignored users are not shown
            }
            invite.insert(room_id.clone(), json!({"invite_state": {"events": invite_state}}));
        }
        Ok(invite)
    }

    /// Rooms left or banned from in the window (or all of them on an initial sync with `include_leave`), unless
    /// forgotten, with what the user may see up to their leave.
    /// Whether the user's leave of `room_nid` is a ban or a kick (a leave someone else sent).
    fn removed_by_someone_else(&self, room_nid: RoomNid) -> Result<bool> {
        let me = self.auth.user_id.as_str();
        let Some((membership, nid)) = members::membership_of(self.c, room_nid, me)? else { return Ok(false) };
        if membership == "ban" {
            return Ok(true);
        }
        Ok(events::event_by_nid(self.c, nid)?.is_some_and(|row| row.sender != me))
    }

    fn left(&self) -> Result<serde_json::Map<String, Value>> {
        let (c, auth) = (self.c, self.auth);
        let mut leave = serde_json::Map::new();
        for (room_nid, room_id) in members::rooms_with_membership(c, auth.user_id.as_str(), "leave")?
            .into_iter()
            .chain(members::rooms_with_membership(c, auth.user_id.as_str(), "ban")?)
        {
            let in_window = self.changed.get(&room_nid).is_some_and(|m| m == "leave" || m == "ban");
            // An initial sync always has the rooms the user was banned or kicked from (as Synapse: "always send
            // down rooms we were banned from or kicked from"); rooms they left themselves only with include_leave.
            let initial_shown =
                self.since.is_none() && (self.filter.include_leave || self.removed_by_someone_else(room_nid)?);
            if !self.filter.room_allowed(&room_id) || !(in_window || initial_shown) {
                continue;
            }
            // A forgotten room stays out of sync, except for the leave itself when it falls in the window: other
            // devices must still learn that the room was left (as in Synapse).
            if !in_window && members::is_forgotten(c, auth.user_id.as_str(), room_nid)? {
                continue;
            }
            let room = self.room(room_nid)?;
            let (_, leave_nid) = members::membership_of(c, room_nid, auth.user_id.as_str())?.unwrap_or_default();
            let leave_row = events::event_by_nid(c, leave_nid)?;
            let leave_pos = leave_row.as_ref().and_then(|r| r.stream_ordering).map_or(self.pos.stream, |p| p.0);
            // A rejected invite or a kick of someone never joined still appears, with what they may see.
            let upto = leave_pos.min(self.pos.stream);
            let mut rs =
                room_window(c, auth, &room, self.filter, self.since_stream(), upto, self.full_state, self.sent)?;
            // A user who was never joined (a rejected invite, a retracted or refused knock, a kick while invited)
            // sees the room only through their own membership events: none of its state (Synapse would show the
            // state at the leave; the spec's history visibility gives such a user nothing of the room).
            if !members::was_locally_joined(c, auth.user_id.as_str(), room_nid)? {
                rs.state.clear();
            }
            // Our own leave is always ours to see, even where history visibility hides the room (an invite
            // rejected in a `joined` room) or we hold no state for it: without it the client never learns the
            // room is gone.
            // A timeline limit of 0 keeps the timeline empty: the leave then goes with the state (as Synapse).
            if let Some(row) = &leave_row {
                let listed = |events: &[Value]| events.iter().any(|e| e["event_id"] == json!(row.event_id));
                if !listed(&rs.timeline) && !listed(&rs.state) {
                    if self.filter.timeline_limit == Some(0) {
                        if self.filter.state.allows("m.room.member", auth.user_id.as_str()) {
                            rs.state.push(format::state_only(row, &room.room_id, false));
                        }
                    } else if self.filter.timeline.allows("m.room.member", auth.user_id.as_str()) {
                        let device = Some((auth.user_id.as_str(), auth.device_id.as_str()));
                        rs.timeline.push(format::event(c, row, &room.room_id, device, false)?);
                    }
                }
            }
            leave.insert(
                room_id,
                json!({
                    "timeline": {"events": rs.timeline, "limited": rs.limited, "prev_batch": rs.prev_batch},
                    "state": {"events": rs.state},
                    "account_data": {"events": []},
                }),
            );
        }
        Ok(leave)
    }

    /// Rooms knocked on (in an incremental sync only knocks new in the window), with their stripped state.
    fn knocked(&self) -> Result<serde_json::Map<String, Value>> {
        let (c, user_id) = (self.c, self.auth.user_id.as_str());
        let mut knock = serde_json::Map::new();
        for (room_nid, room_id) in members::rooms_with_membership(c, user_id, "knock")? {
            if !self.filter.room_allowed(&room_id) || (self.since.is_some() && !self.changed.contains_key(&room_nid)) {
                continue;
            }
            let room = self.room(room_nid)?;
            knock.insert(room_id.clone(), json!({"knock_state": {"events": stripped_state(c, &room, user_id)?}}));
        }
        Ok(knock)
    }

    /// Global account data in the window; an initial sync also carries the default push rules when the user never
    /// changed them.
    fn account_data(&self) -> Result<Vec<Value>> {
        use crate::client::push_rules::{default_ruleset, PUSH_RULES};
        let user_id = self.auth.user_id.as_str();
        let mut account_data =
            account_data_since(self.c, user_id, "", self.lo(), self.pos.stream, &self.filter.account_data)?;
        if self.since.is_none()
            && self.filter.account_data.allows(PUSH_RULES, user_id)
            && !account_data.iter().any(|e| e["type"] == PUSH_RULES)
        {
            account_data.push(json!({"type": PUSH_RULES, "content": default_ruleset(user_id)}));
        }
        Ok(account_data)
    }

    /// To-device messages for this device (deleted once a later sync acknowledges them).
    fn to_device(&self) -> Result<Vec<Value>> {
        let (lo, upto) = (StreamPos(self.lo()), StreamPos(self.pos.stream));
        Ok(e2ee::to_device_messages(self.c, self.auth.user_id.as_str(), &self.auth.device_id, lo, upto)?
            .into_iter()
            .map(|m| json!({"sender": m.sender, "type": m.event_type, "content": m.content}))
            .collect())
    }

    /// Device list changes of users we share a room with, of members who joined or left our rooms, and of everyone
    /// in rooms we joined (also when a lazy join's member list completed) or left. The same as /keys/changes.
    fn device_lists(&self) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
        match self.since_stream() {
            Some(ss) => {
                let rejoins = !self.filter.lazy_load_members;
                e2ee::device_list_changes(self.c, self.auth.user_id.as_str(), ss, self.pos.stream, rejoins)
            }
            None => Ok(Default::default()),
        }
    }

    /// `m.presence` events: on an initial (or full-state) sync everyone visible who is not offline; on an incremental
    /// one the changes in the window, plus users new to us (who joined our rooms, or are in rooms we joined). One
    /// event per user, as the presence filter allows (as Synapse).
    fn presence(&self) -> Result<Vec<Value>> {
        use crate::store::presence as p;
        if !self.presence {
            return Ok(Vec::new());
        }
        let (c, user_id) = (self.c, self.auth.user_id.as_str());
        let rows = match self.since_stream() {
            Some(ss) if !self.full_state => {
                let (after, upto) = (StreamPos(ss), StreamPos(self.pos.stream));
                let mut rows = p::visible_changes(c, user_id, after, upto)?;
                rows.extend(p::of_new_members(c, user_id, after, upto)?);
                rows
            }
            _ => p::visible_not_offline(c, user_id)?,
        };
        let now = crate::store::accounts::now_ms();
        let mut seen = HashSet::new();
        let f = &self.filter.presence;
        let mut events: Vec<Value> = rows
            .into_iter()
            .filter(|r| f.allows("m.presence", &r.user_id) && !self.ignored.contains(&r.user_id))
            .filter(|r| seen.insert(r.user_id.clone()))
            .map(|r| crate::room::presence::sync_event(&r, now))
            .collect();
        if let Some(limit) = f.limit {
            events.truncate(limit);
        }
        Ok(events)
    }

    /// `device_one_time_keys_count` (always with `signed_curve25519`) and `device_unused_fallback_key_types`.
    fn key_counts(&self) -> Result<(serde_json::Map<String, Value>, Vec<String>)> {
        let (user_id, device_id) = (self.auth.user_id.as_str(), self.auth.device_id.as_str());
        let mut otk_counts = e2ee::one_time_key_counts(self.c, user_id, device_id)?;
        otk_counts.entry("signed_curve25519").or_insert(json!(0));
        Ok((otk_counts, e2ee::unused_fallback_key_types(self.c, user_id, device_id)?))
    }
}

/// The sync response up to `pos`, and whether it carries nothing new (a long poll then waits).
#[allow(clippy::too_many_arguments)]
fn build(
    c: Db<'_>,
    auth: &Auth,
    filter: &Filter,
    since: Option<Token>,
    pos: Token,
    full_state: bool,
    typing: &TypingView,
    services: &crate::http::Services,
) -> Result<(Value, bool)> {
    let (sent, presence) = (&services.sent_members, services.presence.enabled());
    let mut changed: HashMap<RoomNid, String> = HashMap::new();
    if let Some(ss) = since.map(|t| t.stream) {
        for (room, m) in members::changes_of(c, auth.user_id.as_str(), StreamPos(ss), StreamPos(pos.stream))? {
            changed.insert(room, m);
        }
    }
    let ignored = crate::client::notifications::ignored_users(c, auth.user_id.as_str())?;
    let pass = SyncPass { c, auth, filter, since, pos, full_state, typing, sent, presence, ignored, changed };

    let (join, invite, leave, knock) = (pass.joined()?, pass.invited()?, pass.left()?, pass.knocked()?);
    let peek = pass.peeked()?;
    let account_data = pass.account_data()?;
    let to_device = pass.to_device()?;
    let presence = pass.presence()?;
    let (dl_changed, dl_left) = pass.device_lists()?;
    let (otk_counts, fallback_types) = pass.key_counts()?;
    let empty = join.is_empty()
        && peek.is_empty()
        && invite.is_empty()
        && leave.is_empty()
        && knock.is_empty()
        && account_data.is_empty()
        && to_device.is_empty()
        && presence.is_empty()
        && dl_changed.is_empty()
        && dl_left.is_empty();
    let body = json!({
        "next_batch": pos.render(),
        "rooms": {"join": join, "invite": invite, "leave": leave, "knock": knock},
        "account_data": {"events": account_data},
        "presence": {"events": presence},
        "to_device": {"events": to_device},
        "device_lists": {"changed": dl_changed, "left": dl_left},
        "device_one_time_keys_count": otk_counts,
        "device_unused_fallback_key_types": fallback_types,
    });
    let mut body = body;
    if !peek.is_empty() {
        // Only when there are peeked rooms: MSC2753 is unstable, and clients without it see nothing new.
        body["rooms"]["peek"] = Value::Object(peek);
    }
    Ok((body, empty))
}
