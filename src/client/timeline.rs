//! `/messages` (paginating both ways) and `/context`.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::format;
use crate::client::sync::{parse_token, Filter, Token};
use crate::error::{Error, Result};
use crate::http::{qs, AppState, Auth, Query};
use crate::room::visibility::{self as vis, parse_readable_room_id, readable_room, ClientJudge};
use crate::store::ids::StreamPos;
use crate::store::{events, rooms, state_groups, timeline};

#[derive(Deserialize)]
pub struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    limit: Option<u64>,
    filter: Option<String>,
}

fn parse_filter(f: Option<&str>) -> Result<Filter> {
    match f {
        None => Ok(Filter::default()),
        Some(f) => {
            let v: Value = serde_json::from_str(f).map_err(|e| Error::bad_json(format!("invalid filter: {e}")))?;
            // A /messages filter is a RoomEventFilter: wrap it so `Filter` reads it as the timeline section.
            let mut wrapped = json!({"room": {"timeline": v.clone(), "state": {}}});
            if v.get("lazy_load_members").and_then(Value::as_bool) == Some(true) {
                wrapped["room"]["state"]["lazy_load_members"] = json!(true);
            }
            Filter::parse(&wrapped)
        }
    }
}

pub async fn messages(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<MessagesQuery>,
) -> Result<impl IntoResponse> {
    let backwards = match q.dir.as_deref() {
        Some("b") => true,
        Some("f") => false,
        None => false,
        _ => return Err(Error::invalid_param("dir must be b or f")),
    };
    let limit = q.limit.unwrap_or(10).clamp(1, 1000) as i64;
    let filter = parse_filter(q.filter.as_deref())?;
    let from = q.from.as_deref().map(parse_token).transpose()?;
    let to = q.to.as_deref().map(parse_token).transpose()?;
    let current = s.store.current_stream();
    let mut body = messages_page(&s, &auth, &room_id, backwards, limit, &filter, from, to, current).await?;
    if q.dir.is_none() {
        // `dir` is required (400), but only once the user may read the room: a room they may not (or forgot)
        // answers as it would with `dir` (Complement's TestRoomForget asks without it and expects 403).
        return Err(Error::missing_param("dir is required (b or f)"));
    }
    // Out of local history in a room that started elsewhere: backfill from a server in the room, then retry.
    let short = body["rows"].as_i64().unwrap_or(0) < limit;
    if backwards && short && to.is_none() {
        let backfilled = match ruma::RoomId::parse(&room_id) {
            Ok(rid) => crate::federation::backfill::backfill(&s.fed, &rid, limit as usize).await,
            Err(_) => Ok(0),
        };
        match backfilled {
            Ok(n) if n > 0 => {
                body = messages_page(&s, &auth, &room_id, backwards, limit, &filter, from, to, current).await?;
            }
            Ok(_) => {}
            Err(e) => tracing::info!(%room_id, error = %e, "backfill failed"),
        }
    }
    // `end` comes with every page that holds events, also the one reaching the room's creation; only a page
    // with nothing in it has none (Synapse does the same; clients then stop). The spec would omit it one page
    // earlier, at the edge, but clients and Complement expect Synapse's behaviour.
    if let Some(o) = body.as_object_mut() {
        o.remove("rows");
    }
    Ok(axum::Json(body))
}

#[allow(clippy::too_many_arguments)]
async fn messages_page(
    s: &AppState,
    auth: &Auth,
    room_id: &str,
    backwards: bool,
    limit: i64,
    filter: &Filter,
    from: Option<Token>,
    to: Option<Token>,
    current: i64,
) -> Result<Value> {
    let (auth, room_id, filter) = (auth.clone(), room_id.to_owned(), filter.clone());
    s.store
        .read(move |c| {
            let (room, visibility) = readable_room(c, &parse_readable_room_id(&room_id)?, &auth.user_id)?;
            let cap = vis::cap(visibility);
            let from = from.map(|t| t.stream).unwrap_or(if backwards { current } else { 0 });
            let (a, b) = if backwards {
                (from.min(cap), to.map(|t| t.stream).unwrap_or(i64::MIN))
            } else {
                (from, to.map(|t| t.stream).unwrap_or(i64::MAX).min(cap))
            };
            let rows = if backwards {
                timeline::newest_first(c, room.room_nid, StreamPos(b), StreamPos(a), limit)?
            } else {
                timeline::oldest_first(c, room.room_nid, StreamPos(a), StreamPos(b), limit)?
            };
            let end = rows.last().and_then(|r| r.stream_ordering).map(|p| if backwards { p.0 - 1 } else { p.0 });
            let raw = rows.len();
            // History visibility, per event (a page may come back shorter, or empty with an `end` to go on from).
            let rows = ClientJudge::new(c, auth.user_id.as_str()).filter(rows)?;
            let device = Some((auth.user_id.as_str(), auth.device_id.as_str()));
            let mut chunk = Vec::new();
            let mut shown = Vec::new();
            let ignored = crate::client::notifications::ignored_users(c, auth.user_id.as_str())?;
            for r in rows.iter().filter(|r| filter.timeline.allows_event(r) && !ignored.contains(&r.sender)) {
                shown.push(r);
                chunk.push(format::event(c, r, &room.room_id, device, true)?);
            }
            let state = if filter.lazy_load_members { senders_members(c, &room.room_id, &shown)? } else { Vec::new() };
            let mut body = json!({"chunk": chunk, "start": Token { stream: from, typing: 0 }.render(), "rows": raw});
            if let Some(end) = end {
                body["end"] = json!(Token { stream: end, typing: 0 }.render());
            }
            if !state.is_empty() {
                body["state"] = json!(state);
            }
            Ok(body)
        })
        .await
}

#[derive(Deserialize)]
pub struct ContextQuery {
    #[serde(default, deserialize_with = "qs::opt_u64")]
    limit: Option<u64>,
    filter: Option<String>,
}

pub async fn context(
    State(s): State<AppState>,
    auth: Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    Query(q): Query<ContextQuery>,
) -> Result<impl IntoResponse> {
    let limit = q.limit.unwrap_or(10).min(100) as i64;
    let filter = parse_filter(q.filter.as_deref())?;
    let body = s
        .store
        .read(move |c| {
            // The event and those around it are the judge's alone, as for `/event` (and Synapse's `/context`):
            // by the history visibility and the user's membership at each, whatever their membership now.
            let not_found = || Error::not_found("event not found");
            let room_id = parse_readable_room_id(&room_id).map_err(|_| not_found())?;
            let room = rooms::room_by_id(c, room_id.as_str())?.ok_or_else(not_found)?;
            let target = events::event_by_id(c, &event_id)?
                .filter(|r| r.room_nid == room.room_nid && r.stream_ordering.is_some())
                .ok_or_else(not_found)?;
            let pos = target.stream_ordering.map_or(0, |p| p.0);
            let mut judge = ClientJudge::new(c, auth.user_id.as_str());
            if !judge.may_see(&target)? {
                return Err(not_found());
            }
            let device = Some((auth.user_id.as_str(), auth.device_id.as_str()));
            let half = limit / 2;
            // Before: positions before `pos`, newest first; after: those after it, oldest first; each judged.
            let room_nid = room.room_nid;
            let before = timeline::newest_first(c, room_nid, StreamPos(i64::MIN), StreamPos(pos - 1), limit - half)?;
            let after = timeline::oldest_first(c, room_nid, StreamPos(pos), StreamPos(i64::MAX), half)?;
            let start = before.last().and_then(|r| r.stream_ordering).map_or(pos, |p| p.0) - 1;
            let end = after.last().and_then(|r| r.stream_ordering).map_or(pos, |p| p.0);
            let (before, after) = (judge.filter(before)?, judge.filter(after)?);
            let ignored = crate::client::notifications::ignored_users(c, auth.user_id.as_str())?;
            let fmt = |rows: &[events::EventRow]| -> Result<Vec<Value>> {
                rows.iter()
                    .filter(|r| filter.timeline.allows_event(r) && !ignored.contains(&r.sender))
                    .map(|r| format::event(c, r, &room.room_id, device, true))
                    .collect()
            };
            let mut state = Vec::new();
            if let Some(sg) = target.sg_after {
                let lazy = filter.lazy_load_members;
                let senders: std::collections::HashSet<&str> = before
                    .iter()
                    .chain(after.iter())
                    .chain(std::iter::once(&target))
                    .map(|r| r.sender.as_str())
                    .collect();
                for (skn, nid) in state_groups::load_state(c, sg)? {
                    if lazy {
                        let (t, k) = state_groups::state_key_of(c, skn)?;
                        if t == "m.room.member" && !senders.contains(k.as_str()) {
                            continue;
                        }
                    }
                    if let Some(ev) = format::state_event(c, nid, &room.room_id, true)? {
                        state.push(ev);
                    }
                }
            }
            Ok(json!({
                "event": format::event(c, &target, &room.room_id, device, true)?,
                "events_before": fmt(&before)?,
                "events_after": fmt(&after)?,
                "start": Token { stream: start, typing: 0 }.render(),
                "end": Token { stream: end, typing: 0 }.render(),
                "state": state,
            }))
        })
        .await?;
    Ok(axum::Json(body))
}

/// The membership of each sender of `rows` as of their events (a lazy-loading `/messages`): for each sender, the
/// membership in the state at their first event in the page's order, not the room's current state.
fn senders_members(c: crate::store::Db<'_>, room_id: &str, rows: &[&events::EventRow]) -> Result<Vec<Value>> {
    let mut at: std::collections::BTreeMap<&str, crate::store::ids::StateGroup> = std::collections::BTreeMap::new();
    for r in rows {
        if let Some(sg) = r.sg_after {
            at.entry(r.sender.as_str()).or_insert(sg);
        }
    }
    let mut state = Vec::new();
    for (sender, sg) in at {
        let Some(skn) = state_groups::find_state_key_nid(c, "m.room.member", sender)? else { continue };
        if let Some(nid) = state_groups::lookup_state(c, sg, skn)? {
            if let Some(ev) = format::state_event(c, nid, room_id, true)? {
                state.push(ev);
            }
        }
    }
    Ok(state)
}
