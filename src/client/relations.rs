//! `GET /rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]` and `GET /rooms/{roomId}/threads`
//! (client API v1). What a user sees is what `/messages` would show them: the room must be readable, and only
//! events inside their visible window (history visibility, up to their leave) are listed.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::format;
use crate::client::sync::{parse_token, Token};
use crate::error::{Error, Result};
use crate::http::{qs, AppState, Auth, Query};
use crate::room::visibility::{self as vis, parse_readable_room_id, readable_room, ClientJudge};
use crate::store::ids::StreamPos;
use crate::store::relations::{self, RelationsQuery};
use crate::store::rooms::RoomRow;
use crate::store::{events, Db};

/// How deep `recurse=true` follows relations of relations (the spec asks for at least 3).
const RECURSION_DEPTH: i64 = 3;

#[derive(Deserialize)]
pub struct RelationsParams {
    from: Option<String>,
    to: Option<String>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    limit: Option<u64>,
    dir: Option<String>,
    #[serde(default, deserialize_with = "qs::opt_bool")]
    recurse: Option<bool>,
}

/// The readable room and the last stream position the user may see in it (their leave, for a former member).
fn visible_window(c: Db<'_>, room_id: &str, auth: &Auth) -> Result<(RoomRow, i64)> {
    let (room, visibility) = readable_room(c, &parse_readable_room_id(room_id)?, &auth.user_id)?;
    Ok((room, vis::cap(visibility)))
}

pub async fn relations(
    State(s): State<AppState>,
    auth: Auth,
    Path(path): Path<HashMap<String, String>>,
    Query(q): Query<RelationsParams>,
) -> Result<impl IntoResponse> {
    let backwards = match q.dir.as_deref() {
        None | Some("b") => true,
        Some("f") => false,
        _ => return Err(Error::invalid_param("dir must be b or f")),
    };
    let limit = q.limit.unwrap_or(5).clamp(1, 100) as i64;
    let from = q.from.as_deref().map(parse_token).transpose()?;
    let to = q.to.as_deref().map(parse_token).transpose()?;
    let current = s.store.current_stream();
    let get = |k: &str| path.get(k).cloned();
    let (room_id, parent) = (get("room_id").unwrap_or_default(), get("event_id").unwrap_or_default());
    let (rel_type, event_type) = (get("rel_type"), get("event_type"));
    let body = s
        .store
        .read(move |c| {
            let (room, cap) = visible_window(c, &room_id, &auth)?;
            let mut judge = ClientJudge::new(c, auth.user_id.as_str());
            let parent_row = events::event_by_id(c, &parent)?
                .filter(|p| p.room_nid == room.room_nid && p.rejected.is_none())
                .filter(|p| p.stream_ordering.is_some_and(|p| p.0 <= cap));
            let visible = match &parent_row {
                Some(p) => judge.may_see(p)?,
                None => false,
            };
            if !visible {
                return Err(Error::not_found("event not found"));
            }
            let (lo, hi) = if backwards {
                (to.map_or(i64::MIN, |t| t.stream), from.map_or(current, |t| t.stream))
            } else {
                (from.map_or(i64::MIN, |t| t.stream), to.map_or(i64::MAX, |t| t.stream))
            };
            let query = RelationsQuery {
                room_nid: room.room_nid,
                parent: &parent,
                rel_type: rel_type.as_deref(),
                event_type: event_type.as_deref(),
                depth: if q.recurse == Some(true) { RECURSION_DEPTH } else { 1 },
                lo: StreamPos(lo),
                hi: StreamPos(hi.min(cap)),
                backwards,
                limit: limit + 1,
            };
            let mut rows = relations::children(c, &query)?;
            let more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            let last_pos = rows.last().and_then(|r| r.stream_ordering);
            let rows = judge.filter(rows)?;
            let ignored = crate::client::notifications::ignored_users(c, auth.user_id.as_str())?;
            let device = Some((auth.user_id.as_str(), auth.device_id.as_str()));
            let chunk = rows
                .iter()
                .filter(|r| !ignored.contains(&r.sender))
                .map(|r| format::event(c, r, &room.room_id, device, true))
                .collect::<Result<Vec<_>>>()?;
            let mut body = json!({"chunk": chunk});
            if let (true, Some(last)) = (more, last_pos) {
                let next = if backwards { last.0 - 1 } else { last.0 };
                body["next_batch"] = json!(Token { stream: next, typing: 0 }.render());
            }
            if let Some(from) = &q.from {
                body["prev_batch"] = json!(from);
            }
            if let Some(recurse) = q.recurse {
                body["recursion_depth"] = json!(if recurse { RECURSION_DEPTH } else { 1 });
            }
            Ok(body)
        })
        .await?;
    Ok(axum::Json(body))
}

#[derive(Deserialize)]
pub struct ThreadsParams {
    include: Option<String>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    limit: Option<u64>,
    from: Option<String>,
}

/// `GET /rooms/{roomId}/threads`: thread roots, the most recently active thread first, each with its bundled
/// aggregations (`unsigned.m.relations.m.thread`).
pub async fn threads(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<ThreadsParams>,
) -> Result<impl IntoResponse> {
    let participated = match q.include.as_deref() {
        None | Some("all") => false,
        Some("participated") => true,
        _ => return Err(Error::invalid_param("include must be all or participated")),
    };
    let limit = q.limit.unwrap_or(5).clamp(1, 100) as i64;
    let before = q.from.as_deref().map(parse_token).transpose()?.map_or(i64::MAX, |t| t.stream);
    let body = s
        .store
        .read(move |c| {
            let (room, cap) = visible_window(c, &room_id, &auth)?;
            let user = auth.user_id.as_str();
            let participant = participated.then_some(user);
            let mut rows =
                relations::threads(c, room.room_nid, participant, StreamPos(i64::MIN), StreamPos(before), limit + 1)?;
            let more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            let ignored = crate::client::notifications::ignored_users(c, user)?;
            let device = Some((user, auth.device_id.as_str()));
            let mut judge = ClientJudge::new(c, user);
            let mut chunk = Vec::new();
            for t in &rows {
                let pos = t.root.stream_ordering.map_or(i64::MAX, |p| p.0);
                if pos <= cap && !ignored.contains(&t.root.sender) && judge.may_see(&t.root)? {
                    chunk.push(format::event(c, &t.root, &room.room_id, device, true)?);
                }
            }
            let mut body = json!({"chunk": chunk});
            if let (true, Some(last)) = (more, rows.last()) {
                body["next_batch"] = Value::from(Token { stream: last.latest.0, typing: 0 }.render());
            }
            Ok(body)
        })
        .await?;
    Ok(axum::Json(body))
}
