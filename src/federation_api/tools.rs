//! `GET /_matrix/federation/v1/timestamp_to_event/{roomId}` (jump to date for another server's users) and
//! `GET /_matrix/federation/v1/openid/userinfo` (who an OpenID token we issued belongs to).

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde_json::json;

use crate::error::{Error, Result};
use crate::http::{AppState, Query, Signed};
use crate::room::timestamp;
use crate::room::visibility::{server_may_read_room, ServerJudge};
use crate::store::rooms;

/// The closest event in our own history (no further servers asked), among those the caller may see: 403 unless
/// one of its users is in the room (or the ACL refuses it), 404 when nothing is found.
pub async fn timestamp_to_event(
    State(s): State<AppState>,
    Path(room_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let (ts, forward) = timestamp::parse_query(&q)?;
    let found = s
        .store
        .read(move |c| {
            let room = rooms::room_by_id(c, &room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
            if !crate::federation::acl::room_allows(c, room.current_sg, &signed.origin)? {
                return Err(Error::forbidden("server denied by the room's ACL"));
            }
            if !server_may_read_room(c, &room, &signed.origin)? {
                return Err(Error::forbidden("server not in room"));
            }
            let mut judge = ServerJudge::new(c, room.room_nid, &signed.origin)?;
            let found = timestamp::closest_local(c, &room, ts, forward, |row| judge.may_see(row))?;
            Ok(found.map(|f| (f.row.event_id, f.row.origin_server_ts)))
        })
        .await?;
    let (event_id, origin_server_ts) = found.ok_or_else(|| Error::not_found("no event found"))?;
    Ok(axum::Json(json!({"event_id": event_id, "origin_server_ts": origin_server_ts})))
}

/// `GET /_matrix/federation/v1/openid/userinfo?access_token=` (not signed: the caller is whoever the user gave the
/// token to): `{"sub": user}`, or 401 `M_UNKNOWN_TOKEN` for a token unknown or expired.
pub async fn openid_userinfo(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse> {
    let token = q.get("access_token").cloned().ok_or_else(|| Error::missing_param("access_token is required"))?;
    let user = s
        .store
        .read(move |c| crate::store::reports::openid_user(c, &token, crate::store::accounts::now_ms()))
        .await?
        .ok_or_else(|| Error::new(crate::error::Kind::UnknownToken, "OpenID token unknown or expired"))?;
    Ok(axum::Json(json!({"sub": user})))
}
