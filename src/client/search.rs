//! `POST /search` (`room_events` only): full-text search over message bodies, room names and topics (SQLite FTS5,
//! `store::search`) in the rooms the user is joined to, from the first event their history visibility lets them
//! see; redacted events are no longer in the index. `order_by` `rank` pages by offset (`next_batch` `o{n}`),
//! `recent` by stream position (`b{pos}`: results older than it).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::format;
use crate::client::sync::{EventFilter, Filter, Token};
use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json, Query};
use crate::room::visibility::ClientJudge;
use crate::store::events::EventRow;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::search::{self, SearchQuery};
use crate::store::{members, rooms, state_groups, timeline, Db};

#[derive(Deserialize)]
pub struct SearchParams {
    next_batch: Option<String>,
}

/// Where the next page starts.
#[derive(Clone, Copy)]
enum Batch {
    Offset(i64),
    Before(i64),
}

fn parse_batch(t: &str) -> Result<Batch> {
    let bad = || Error::invalid_param("invalid next_batch");
    match t.split_at_checked(1) {
        Some(("o", n)) => Ok(Batch::Offset(n.parse::<u32>().map_err(|_| bad())?.into())),
        Some(("b", n)) => Ok(Batch::Before(n.parse().map_err(|_| bad())?)),
        _ => Err(bad()),
    }
}

/// The parsed `room_events` criteria.
struct Criteria {
    term: String,
    keys: Vec<String>,
    filter: Filter,
    recent: bool,
    context: Option<(i64, i64)>,
    include_state: bool,
    group_by: Vec<String>,
}

fn bad(msg: &str) -> Error {
    Error::bad_json(msg.to_owned())
}

fn parse_criteria(v: &Value) -> Result<Criteria> {
    let term = v.get("search_term").and_then(Value::as_str).ok_or_else(|| bad("search_term must be a string"))?;
    let keys = match v.get("keys") {
        None | Some(Value::Null) => vec!["content.body".into(), "content.name".into(), "content.topic".into()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|k| match k.as_str() {
                Some(k @ ("content.body" | "content.name" | "content.topic")) => Ok(k.to_owned()),
                _ => Err(bad("keys must be content.body, content.name or content.topic")),
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad("keys must be an array")),
    };
    let recent = match v.get("order_by") {
        None | Some(Value::Null) => false,
        Some(o) if o == "rank" => false,
        Some(o) if o == "recent" => true,
        Some(_) => return Err(bad("order_by must be rank or recent")),
    };
    // The filter is a RoomEventFilter: read it as the timeline section of a sync filter (which validates it).
    let filter = match v.get("filter") {
        None | Some(Value::Null) => Filter::default(),
        Some(f) if f.is_object() => {
            let mut room = json!({"timeline": f});
            for k in ["rooms", "not_rooms"] {
                if let Some(x) = f.get(k) {
                    room[k] = x.clone();
                }
            }
            Filter::parse(&json!({ "room": room }))?
        }
        Some(_) => return Err(bad("filter must be an object")),
    };
    let int = |c: &Value, k: &str| -> Result<i64> {
        match c.get(k) {
            None | Some(Value::Null) => Ok(5),
            Some(n) => n.as_u64().map(|n| n.min(100) as i64).ok_or_else(|| bad("context limits must be integers")),
        }
    };
    let context = match v.get("event_context") {
        None | Some(Value::Null) => None,
        Some(c) if c.is_object() => Some((int(c, "before_limit")?, int(c, "after_limit")?)),
        Some(_) => return Err(bad("event_context must be an object")),
    };
    let include_state = match v.get("include_state") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("include_state must be a boolean")),
    };
    let mut group_by = Vec::new();
    if let Some(g) = v.get("groupings").filter(|g| !g.is_null()) {
        let list = g.get("group_by").filter(|l| !l.is_null());
        if let Some(items) = list.map(|l| l.as_array().ok_or_else(|| bad("group_by must be an array"))).transpose()? {
            for x in items {
                match x.get("key").and_then(Value::as_str) {
                    Some(k @ ("room_id" | "sender")) => group_by.push(k.to_owned()),
                    _ => return Err(bad("a grouping key must be room_id or sender")),
                }
            }
        }
    }
    Ok(Criteria { term: term.to_owned(), keys, filter, recent, context, include_state, group_by })
}

pub async fn search(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<SearchParams>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    let cats = body.get("search_categories").ok_or_else(|| bad("search_categories is required"))?;
    if !cats.is_object() {
        return Err(bad("search_categories must be an object"));
    }
    let Some(room_events) = cats.get("room_events").filter(|r| !r.is_null()) else {
        return Ok(axum::Json(json!({"search_categories": {}})));
    };
    if !room_events.is_object() {
        return Err(bad("room_events must be an object"));
    }
    let criteria = parse_criteria(room_events)?;
    let batch = q.next_batch.as_deref().map(parse_batch).transpose()?;
    let result = s.store.read(move |c| room_events_search(c, &auth, &criteria, batch)).await?;
    Ok(axum::Json(json!({"search_categories": {"room_events": result}})))
}

/// The rooms to search (joined, allowed by the filter), each from its start (every result is then judged by the
/// history visibility at it).
fn searchable_rooms(c: Db<'_>, auth: &Auth, filter: &Filter) -> Result<Vec<(RoomNid, i64)>> {
    let mut out = Vec::new();
    for (room_nid, room_id) in members::rooms_with_membership(c, auth.user_id.as_str(), "join")? {
        if !filter.not_rooms.contains(&room_id) && filter.rooms.as_ref().is_none_or(|r| r.contains(&room_id)) {
            out.push((room_nid, i64::MIN));
        }
    }
    Ok(out)
}

fn room_events_search(c: Db<'_>, auth: &Auth, cr: &Criteria, batch: Option<Batch>) -> Result<Value> {
    let highlights: Vec<String> =
        cr.term.split(|ch: char| !ch.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_owned).collect();
    let limit = cr.filter.timeline.limit.unwrap_or(10).clamp(1, 100) as i64;
    let rooms = searchable_rooms(c, auth, &cr.filter)?;
    let Some(fts) = search::fts_query(&cr.term).filter(|_| !rooms.is_empty()) else {
        return Ok(json!({"count": 0, "results": [], "highlights": highlights}));
    };
    let ignored = crate::client::notifications::ignored_users(c, auth.user_id.as_str())?;
    let tl: &EventFilter = &cr.filter.timeline;
    let senders: Option<Vec<String>> = tl.senders.as_ref().map(|s| s.iter().cloned().collect());
    let not_senders: Vec<String> = tl.not_senders.iter().chain(ignored.iter()).cloned().collect();
    let query = SearchQuery {
        fts: &fts,
        rooms: &rooms,
        keys: &cr.keys,
        senders: senders.as_deref(),
        not_senders: &not_senders,
        recent: cr.recent,
        before: match batch {
            Some(Batch::Before(p)) => Some(StreamPos(p)),
            _ => None,
        },
        offset: match batch {
            Some(Batch::Offset(n)) => n,
            _ => 0,
        },
        limit,
    };
    let (raw, count) = search::search(c, &query)?;
    let page_full = raw.len() as i64 == limit;
    let last_pos = raw.last().and_then(|(r, _)| r.stream_ordering);
    let mut judge = ClientJudge::new(c, auth.user_id.as_str());
    let count = visible_count(c, &mut judge, &query, count)?;
    let mut rows = Vec::with_capacity(raw.len());
    for (row, rank) in raw {
        if judge.may_see(&row)? {
            rows.push((row, rank));
        }
    }
    let mut results = Vec::new();
    let mut room_ids: BTreeMap<RoomNid, String> = BTreeMap::new();
    for (row, rank) in &rows {
        let room_id = match room_ids.get(&row.room_nid) {
            Some(id) => id.clone(),
            None => {
                let id = rooms::room_by_nid(c, row.room_nid)?.map(|r| r.room_id).unwrap_or_default();
                room_ids.insert(row.room_nid, id.clone());
                id
            }
        };
        let device = Some((auth.user_id.as_str(), auth.device_id.as_str()));
        let mut item = json!({"rank": rank, "result": format::event(c, row, &room_id, device, true)?});
        if let Some((before, after)) = cr.context {
            item["context"] = context(c, &mut judge, row, &room_id, device, (before, after), &ignored)?;
        }
        results.push(item);
    }
    let mut body = json!({"results": results, "highlights": highlights});
    if let Some(count) = count {
        body["count"] = json!(count);
    }
    if page_full {
        body["next_batch"] = json!(match (cr.recent, last_pos) {
            (true, Some(p)) => format!("b{}", p.0),
            _ => format!("o{}", query.offset + limit),
        });
    }
    if !cr.group_by.is_empty() {
        body["groups"] = groups(&rows, &room_ids, &cr.group_by);
    }
    if cr.include_state {
        let mut state = serde_json::Map::new();
        for (nid, room_id) in &room_ids {
            let Some(sg) = rooms::room_by_nid(c, *nid)?.and_then(|r| r.current_sg) else { continue };
            let mut events = Vec::new();
            for (_, ev) in state_groups::load_state(c, sg)? {
                events.extend(format::state_event(c, ev, room_id, true)?);
            }
            state.insert(room_id.clone(), json!(events));
        }
        body["state"] = Value::Object(state);
    }
    Ok(body)
}

/// Most matches judged to count them; with more, `count` (an approximate count, the spec says) is left out.
const COUNT_JUDGED: i64 = 1000;

/// The number of matches the user may see, each judged like a result (so a hidden event never changes it): exact
/// up to [`COUNT_JUDGED`] matches, None (no `count`) past that.
fn visible_count(c: Db<'_>, judge: &mut ClientJudge<'_>, q: &SearchQuery<'_>, all: i64) -> Result<Option<i64>> {
    if all == 0 {
        return Ok(Some(0));
    }
    if all > COUNT_JUDGED {
        return Ok(None);
    }
    let every = SearchQuery { recent: true, before: None, offset: 0, limit: COUNT_JUDGED, ..*q };
    let mut visible = 0;
    for (row, _) in search::search(c, &every)?.0 {
        if judge.may_see(&row)? {
            visible += 1;
        }
    }
    Ok(Some(visible))
}

/// The events around a result (the user's visible window of its room), as `event_context` asks.
fn context(
    c: Db<'_>,
    judge: &mut ClientJudge<'_>,
    row: &EventRow,
    room_id: &str,
    device: Option<(&str, &str)>,
    (before, after): (i64, i64),
    ignored: &std::collections::HashSet<String>,
) -> Result<Value> {
    let pos = row.stream_ordering.map_or(0, |p| p.0);
    let older = if before > 0 {
        timeline::newest_first(c, row.room_nid, StreamPos(i64::MIN), StreamPos(pos - 1), before)?
    } else {
        Vec::new()
    };
    let newer = if after > 0 {
        timeline::oldest_first(c, row.room_nid, StreamPos(pos), StreamPos(i64::MAX), after)?
    } else {
        Vec::new()
    };
    let fmt = |rows: &[EventRow]| -> Result<Vec<Value>> {
        rows.iter()
            .filter(|r| !ignored.contains(&r.sender))
            .map(|r| format::event(c, r, room_id, device, true))
            .collect()
    };
    let start = older.last().and_then(|r| r.stream_ordering).map_or(pos, |p| p.0) - 1;
    let end = newer.last().and_then(|r| r.stream_ordering).map_or(pos, |p| p.0);
    let (older, newer) = (judge.filter(older)?, judge.filter(newer)?);
    Ok(json!({
        "events_before": fmt(&older)?,
        "events_after": fmt(&newer)?,
        "start": Token { stream: start, typing: 0 }.render(),
        "end": Token { stream: end, typing: 0 }.render(),
    }))
}

/// `groups`: the page's results by room and/or sender, each group listing its event ids in page order.
fn groups(rows: &[(EventRow, f64)], room_ids: &BTreeMap<RoomNid, String>, group_by: &[String]) -> Value {
    let mut out = serde_json::Map::new();
    for key in group_by {
        let mut g: serde_json::Map<String, Value> = serde_json::Map::new();
        for (row, _) in rows {
            let k = if key == "room_id" {
                room_ids.get(&row.room_nid).cloned().unwrap_or_default()
            } else {
                row.sender.clone()
            };
            let order = g.len();
            let entry = g.entry(k).or_insert_with(|| json!({"results": [], "order": order}));
            if let Some(list) = entry["results"].as_array_mut() {
                list.push(json!(row.event_id));
            }
        }
        out.insert(key.clone(), Value::Object(g));
    }
    Value::Object(out)
}
