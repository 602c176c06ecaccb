//! Tools clients call beside the timeline: jump to date (`GET /v1/rooms/{roomId}/timestamp_to_event`) and OpenID
//! tokens for widgets and integration managers (`POST /user/{userId}/openid/request_token`).

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde_json::json;

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Query};
use crate::room::timestamp;
use crate::room::visibility::{cap, parse_readable_room_id, readable_room, ClientJudge};
use crate::store::{events, rooms};

/// `GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event?ts=&dir=`: the closest event the user may see; when
/// our answer borders history we do not hold (or there is none), the other servers in the room are asked and a
/// closer answer of theirs wins. 403 for a room the user may not read; 404 when nothing is found.
pub async fn timestamp_to_event(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse> {
    let (ts, forward) = timestamp::parse_query(&q)?;
    let rid = parse_readable_room_id(&room_id)?;
    let user = auth.user_id.clone();
    let ours = s.identity.server_name.to_string();
    let rid2 = rid.clone();
    let (local, servers) = s
        .store
        .read(move |c| {
            let (room, vis) = readable_room(c, &rid2, &user)?;
            let mut judge = ClientJudge::new(c, user.as_str());
            let limit = cap(vis);
            let found = timestamp::closest_local(c, &room, ts, forward, |row| {
                Ok(row.stream_ordering.map_or(i64::MAX, |p| p.0) <= limit && judge.may_see(row)?)
            })?;
            let ask = found.as_ref().is_none_or(|f| f.next_to_gap);
            let servers = if ask { timestamp::servers_to_ask(c, &room, &ours)? } else { Vec::new() };
            Ok((found.map(|f| (f.row.event_id, f.row.origin_server_ts)), servers))
        })
        .await?;
    let mut answer = local;
    if !servers.is_empty() {
        let remote = crate::federation::query::remote_timestamp_to_event(&s.fed, &rid, ts, forward, &servers).await;
        if let Some((id, at, server)) = remote {
            let local_ts = answer.as_ref().map(|a| a.1);
            if timestamp::remote_is_closer(ts, forward, at, local_ts) {
                // Shown only once in our timeline and judged for the user like any event, at the time it carries
                // (not the time the other server claimed).
                if let Some(at) = remote_answer_shown(&s, &auth, &rid, &id, &server).await? {
                    if timestamp::remote_is_closer(ts, forward, at, local_ts) {
                        answer = Some((id, at));
                    }
                }
            }
        }
    }
    let (event_id, origin_server_ts) = answer.ok_or_else(|| {
        let dir = if forward { "forward" } else { "backward" };
        Error::not_found(format!("Unable to find event from {ts} in {dir} direction"))
    })?;
    Ok(axum::Json(json!({"event_id": event_id, "origin_server_ts": origin_server_ts})))
}

/// The event another server answered with, if the user may see it: it is brought into our timeline first
/// (backfilled from that server, as the spec asks, so `/context` and `/messages` can go on from it), then judged like
/// any event the user reads (history visibility at the event, the user's membership, how far they may read the
/// room). Its `origin_server_ts` as stored, or None when it is not to be shown (or could not be fetched).
async fn remote_answer_shown(
    s: &AppState,
    auth: &Auth,
    rid: &ruma::RoomId,
    event_id: &str,
    server: &str,
) -> Result<Option<i64>> {
    let (room, id) = (rid.to_owned(), event_id.to_owned());
    let held = s
        .store
        .read(move |c| {
            let Some(room) = rooms::room_by_id(c, room.as_str())? else { return Ok(false) };
            Ok(events::event_by_id(c, &id)?.is_some_and(|r| r.room_nid == room.room_nid && r.stream_ordering.is_some()))
        })
        .await?;
    if !held {
        let from = [event_id.to_owned()];
        if let Err(e) = crate::federation::backfill::backfill_from(&s.fed, rid, &from, 1, Some(server)).await {
            tracing::info!(%server, event = event_id, error = %e, "timestamp_to_event: backfilling the answer failed");
        }
    }
    let (room, id, user) = (rid.to_owned(), event_id.to_owned(), auth.user_id.clone());
    s.store
        .read(move |c| {
            let (room, vis) = readable_room(c, &room, &user)?;
            let Some(row) = events::event_by_id(c, &id)?.filter(|r| r.room_nid == room.room_nid) else {
                return Ok(None);
            };
            let in_reach = row.stream_ordering.is_some_and(|p| p.0 <= cap(vis)) && !row.outlier;
            let shown = in_reach && row.rejected.is_none() && ClientJudge::new(c, user.as_str()).may_see(&row)?;
            Ok(shown.then_some(row.origin_server_ts))
        })
        .await
}

/// How long an OpenID token is valid (Synapse's default: one hour).
const OPENID_TOKEN_LIFETIME_MS: i64 = 3_600_000;

/// `POST /user/{userId}/openid/request_token` (body: an empty object): a token another server (a widget's or
/// integration manager's) exchanges for the user id at our `/_matrix/federation/v1/openid/userinfo`. Only for
/// oneself (403 otherwise).
pub async fn openid_request_token(
    State(s): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
    crate::http::Json(_body): crate::http::Json<serde_json::Map<String, serde_json::Value>>,
) -> Result<impl IntoResponse> {
    if user_id != auth.user_id.as_str() {
        return Err(Error::forbidden("cannot request an OpenID token for another user"));
    }
    let token = crate::util::random_string(32);
    let (t, uid) = (token.clone(), user_id);
    s.store
        .write(move |w| {
            let now = crate::store::accounts::now_ms();
            crate::store::reports::add_openid_token(w.db(), &t, &uid, now + OPENID_TOKEN_LIFETIME_MS, now)
        })
        .await?;
    Ok(axum::Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "matrix_server_name": s.identity.server_name.as_str(),
        "expires_in": OPENID_TOKEN_LIFETIME_MS / 1000,
    })))
}
