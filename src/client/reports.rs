//! Reporting content to the server's operators: `POST /rooms/{roomId}/report/{eventId}`, `/rooms/{roomId}/report`
//! and `/users/{userId}/report`. Reports are stored for `hearth report list`. A report about something the reporter
//! may not see (an event hidden from them, a room or user the server does not know) is 404, as the spec says and
//! Synapse does.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::room::visibility::{parse_readable_room_id, readable_room, ClientJudge};
use crate::store::accounts::now_ms;
use crate::store::reports::{self, Target};
use crate::store::{accounts, events, rooms};

/// Longest reason stored (Synapse keeps reasons as given; a bound keeps one report from filling the disk).
const MAX_REASON: usize = 4096;

/// The `reason` of a report body (a JSON object, else 400): absent or null is none, a string is kept (truncated), anything else is 400.
fn reason_of(body: &Map<String, Value>, required: bool) -> Result<Option<String>> {
    match body.get("reason") {
        None | Some(Value::Null) if required => Err(Error::missing_param("reason is required")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let mut end = s.len().min(MAX_REASON);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            Ok(Some(s[..end].to_owned()))
        }
        Some(_) => Err(Error::invalid_param("reason must be a string")),
    }
}

/// The optional `score` of an event report (removed from the spec in v1.13, still sent by older clients): an
/// integer from -100 (most offensive) to 0, as Synapse checks.
fn score_of(body: &Map<String, Value>) -> Result<Option<i64>> {
    match body.get("score") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if (-100..=0).contains(&n) => Ok(Some(n)),
            _ => Err(Error::invalid_param("score must be an integer from -100 to 0")),
        },
    }
}

/// `POST /rooms/{roomId}/report/{eventId}`: 404 unless the reporter may see the event.
pub async fn report_event(
    State(s): State<AppState>,
    auth: Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> Result<impl IntoResponse> {
    let (reason, score) = (reason_of(&body, false)?, score_of(&body)?);
    let user = auth.user_id.clone();
    let (rid, eid) = (room_id.clone(), event_id.clone());
    s.store
        .read(move |c| {
            let not_found = || Error::not_found("event not found");
            let (room, vis) = parse_readable_room_id(&rid)
                .and_then(|id| readable_room(c, &id, &user))
                .map_err(|e| if e.kind() == crate::error::Kind::Forbidden { not_found() } else { e })?;
            let row = events::event_by_id(c, &eid)?
                .filter(|r| r.room_nid == room.room_nid && r.rejected.is_none())
                .ok_or_else(not_found)?;
            let beyond_leave = row.stream_ordering.map_or(i64::MAX, |p| p.0) > crate::room::visibility::cap(vis);
            if beyond_leave || !ClientJudge::new(c, user.as_str()).may_see(&row)? {
                return Err(not_found());
            }
            Ok(())
        })
        .await?;
    let target = Target::Event { room_id, event_id };
    store_report(&s, &auth, target, reason, score).await
}

/// `POST /rooms/{roomId}/report`: any room the server knows (the reporter need not be in it); 404 otherwise.
pub async fn report_room(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<Map<String, Value>>,
) -> Result<impl IntoResponse> {
    let reason = reason_of(&body, true)?;
    let rid = room_id.clone();
    let known = s.store.read(move |c| Ok(rooms::room_by_id(c, &rid)?.is_some())).await?;
    if !known {
        return Err(Error::not_found("room not found"));
    }
    store_report(&s, &auth, Target::Room { room_id }, reason, None).await
}

/// `POST /users/{userId}/report`: a local user who exists, or a user of another server the server has seen in a
/// room; 404 otherwise.
pub async fn report_user(
    State(s): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
    Json(body): Json<Map<String, Value>>,
) -> Result<impl IntoResponse> {
    let reason = reason_of(&body, true)?;
    let target = crate::util::parse_user_id(&user_id).map_err(|_| Error::not_found("user not found"))?;
    let local = target.server_name().as_str() == s.identity.server_name.as_str();
    let uid = target.to_string();
    let known = s
        .store
        .read(move |c| if local { accounts::user_exists(c, &uid) } else { crate::store::members::user_known(c, &uid) })
        .await?;
    if !known {
        return Err(Error::not_found("user not found"));
    }
    store_report(&s, &auth, Target::User { user_id: target.to_string() }, reason, None).await
}

async fn store_report(
    s: &AppState,
    auth: &Auth,
    target: Target,
    reason: Option<String>,
    score: Option<i64>,
) -> Result<axum::Json<Value>> {
    let reporter = auth.user_id.to_string();
    let id =
        s.store.write(move |w| reports::add(w.db(), &reporter, &target, reason.as_deref(), score, now_ms())).await?;
    tracing::info!(report = id, reporter = %auth.user_id, "content reported");
    Ok(axum::Json(json!({})))
}
