//! `/messages` (paginating both ways, in topological order, backfilling at gaps in our history) and `/context`.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::format;
use crate::client::sync::{parse_token, Filter, Token};
use crate::error::{Error, Result};
use crate::http::{qs, AppState, Auth, Query};
use crate::room::visibility::{self as vis, parse_readable_room_id, readable_room, ClientJudge};
use crate::store::timeline::{TopoPos, TopoRange};
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

/// A `/messages` or `/context` token: a place in the room's topological order, `t{depth}_{stream}` (just after the
/// event with that depth and stream position), or a `/sync` token `s{stream}_{typing}` (a stream position).
#[derive(Clone, Copy, Debug)]
enum PageToken {
    Topo(TopoPos),
    Stream(i64),
}

fn parse_page_token(t: &str) -> Result<PageToken> {
    let Some(body) = t.strip_prefix('t') else { return Ok(PageToken::Stream(parse_token(t)?.stream)) };
    let bad = || Error::invalid_param(format!("invalid token `{t}`"));
    let (depth, stream) = body.split_once('_').ok_or_else(bad)?;
    Ok(PageToken::Topo(TopoPos {
        depth: depth.parse().map_err(|_| bad())?,
        stream: stream.parse().map_err(|_| bad())?,
    }))
}

fn render(p: TopoPos) -> String {
    format!("t{}_{}", p.depth, p.stream)
}

/// The place just before an event (paging backwards from it shows what precedes the event).
fn before_event(r: &events::EventRow) -> TopoPos {
    TopoPos { depth: r.depth, stream: r.stream_ordering.map_or(0, |p| p.0) - 1 }
}

/// The place just after an event.
fn at_event(r: &events::EventRow) -> TopoPos {
    TopoPos { depth: r.depth, stream: r.stream_ordering.map_or(0, |p| p.0) }
}

/// The events a page may hold: `from` and `to` bound it (`from` from above paging backwards, from below
/// forwards), a topological token by place, a `/sync` token by stream position (as Synapse); `cap` (how far the
/// user may read) by stream position.
fn page_range(backwards: bool, from: PageToken, to: Option<PageToken>, cap: i64) -> TopoRange {
    let mut range = TopoRange { stream_upto: cap, ..TopoRange::ALL };
    let (low, high) = if backwards { (to, Some(from)) } else { (Some(from), to) };
    match high {
        Some(PageToken::Topo(p)) => range.upto = p,
        Some(PageToken::Stream(x)) => range.stream_upto = range.stream_upto.min(x),
        None => {}
    }
    match low {
        Some(PageToken::Topo(p)) => range.after = p,
        Some(PageToken::Stream(x)) => range.stream_after = x,
        None => {}
    }
    range
}

/// Events one backfill asks for (Synapse's number).
const BACKFILL_LIMIT: usize = 100;

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
    let from = match q.from.as_deref() {
        Some(t) => (parse_page_token(t)?, t.to_owned()),
        // Backwards from now is backwards from the current stream position (as a `/sync` token would be).
        None if backwards => {
            let now = Token { stream: s.store.current_stream(), typing: 0 };
            (PageToken::Stream(now.stream), now.render())
        }
        None => (PageToken::Topo(TopoPos::MIN), render(TopoPos::MIN)),
    };
    let to = q.to.as_deref().map(parse_page_token).transpose()?;
    let page = Page { backwards, limit, filter, from: from.0, start: from.1, to };
    let mut body = messages_page(&s, &auth, &room_id, &page).await?;
    if q.dir.is_none() {
        // `dir` is required (400), but only once the user may read the room: a room they may not (or forgot)
        // answers as it would with `dir` (Complement's TestRoomForget asks without it and expects 403).
        return Err(Error::missing_param("dir is required (b or f)"));
    }
    // Paging back reached a gap in our history (our join into a room that began elsewhere, a backfill frontier, an
    // event with unknown prev events): backfill there from a server in the room, then read the page again (once).
    let gaps = std::mem::take(&mut body.gaps);
    if backwards && to.is_none() && !gaps.is_empty() {
        let backfilled = match ruma::RoomId::parse(&room_id) {
            Ok(rid) => crate::federation::backfill::backfill_from(&s.fed, &rid, &gaps, BACKFILL_LIMIT, None).await,
            Err(_) => Ok(0),
        };
        match backfilled {
            Ok(n) if n > 0 => body = messages_page(&s, &auth, &room_id, &page).await?,
            Ok(_) => {}
            Err(e) => tracing::info!(%room_id, error = %e, "backfill failed"),
        }
    }
    // `end` comes with every page that holds events, also the one reaching the room's creation; only a page
    // with nothing in it has none (Synapse does the same; clients then stop). The spec would omit it one page
    // earlier, at the edge, but clients and Complement expect Synapse's behaviour.
    Ok(axum::Json(body.body))
}

/// One `/messages` request's page: direction, size, filter and bounds.
struct Page {
    backwards: bool,
    limit: i64,
    filter: Filter,
    from: PageToken,
    /// `from` as the client gave it (the answer's `start`).
    start: String,
    to: Option<PageToken>,
}

struct PageRead {
    body: Value,
    /// Paging backwards: ids of the page's events (or of the event just after an empty page) whose prev events are
    /// missing from our timeline.
    gaps: Vec<String>,
}

async fn messages_page(s: &AppState, auth: &Auth, room_id: &str, page: &Page) -> Result<PageRead> {
    let (auth, room_id, filter) = (auth.clone(), room_id.to_owned(), page.filter.clone());
    let (backwards, limit, from, to, start) = (page.backwards, page.limit, page.from, page.to, page.start.clone());
    s.store
        .read(move |c| {
            let (room, visibility) = readable_room(c, &parse_readable_room_id(&room_id)?, &auth.user_id)?;
            let range = page_range(backwards, from, to, vis::cap(visibility));
            let rows = if backwards {
                timeline::topo_newest_first(c, room.room_nid, range, limit)?
            } else {
                timeline::topo_oldest_first(c, room.room_nid, range, limit)?
            };
            let mut gaps = Vec::new();
            if backwards {
                let mut nids: Vec<_> = rows.iter().map(|r| r.event_nid).collect();
                if rows.is_empty() {
                    // Nothing before `from`: the event just after it may be where our history starts.
                    let above = page_range(false, from, None, vis::cap(visibility));
                    let next = timeline::topo_oldest_first(c, room.room_nid, above, 1)?;
                    nids.extend(next.iter().map(|r| r.event_nid));
                }
                for (nid, _) in timeline::gaps_before(c, &nids)? {
                    if let Some(r) = events::event_by_nid(c, nid)? {
                        gaps.push(r.event_id);
                    }
                }
            }
            let end = rows.last().map(|r| if backwards { before_event(r) } else { at_event(r) });
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
            let mut body = json!({"chunk": chunk, "start": start});
            if let Some(end) = end {
                body["end"] = json!(render(end));
            }
            if !state.is_empty() {
                body["state"] = json!(state);
            }
            Ok(PageRead { body, gaps })
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
            let mut judge = ClientJudge::new(c, auth.user_id.as_str());
            if !judge.may_see(&target)? {
                return Err(not_found());
            }
            let device = Some((auth.user_id.as_str(), auth.device_id.as_str()));
            let half = limit / 2;
            // Before: the events topologically before it, newest first; after: those after it, oldest first; each
            // judged. The tokens are places in the same order, for `/messages` to go on from.
            let (room_nid, here) = (room.room_nid, at_event(&target));
            let before_range = TopoRange { upto: before_event(&target), ..TopoRange::ALL };
            let before = timeline::topo_newest_first(c, room_nid, before_range, limit - half)?;
            let after = timeline::topo_oldest_first(c, room_nid, TopoRange { after: here, ..TopoRange::ALL }, half)?;
            let start = before.last().map_or(before_event(&target), before_event);
            let end = after.last().map_or(here, at_event);
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
                "start": render(start),
                "end": render(end),
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
