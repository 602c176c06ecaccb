//! Spaces and room previews: `GET /_matrix/client/v1/rooms/{roomId}/hierarchy` and
//! `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}` (MSC3266, also under its unstable `im.nheko.summary`
//! paths). The walk and the remote look-ups are `federation::hierarchy`'s, the summaries `room::hierarchy`'s.

use axum::extract::{Path, RawQuery, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::hierarchy::{self as fh, Request};
use crate::http::{qs, AppState, Auth, MaybeAuth, Query};
use crate::room::hierarchy::{self as h, Viewer};
use crate::store::{members, rooms};

#[derive(Deserialize)]
pub struct HierarchyQuery {
    #[serde(default, deserialize_with = "qs::opt_bool")]
    suggested_only: Option<bool>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    limit: Option<u64>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    max_depth: Option<u64>,
    from: Option<String>,
}

pub async fn hierarchy(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<HierarchyQuery>,
) -> Result<impl IntoResponse> {
    if q.limit == Some(0) {
        return Err(Error::invalid_param("limit must be greater than zero"));
    }
    if ruma::RoomId::parse(&room_id).is_err() {
        return Err(Error::forbidden("you may not see this room (not a valid room id)"));
    }
    let req = Request {
        user_id: auth.user_id.to_string(),
        room_id,
        suggested_only: q.suggested_only.unwrap_or(false),
        max_depth: q.max_depth,
        limit: q.limit,
        from: q.from.filter(|t| !t.is_empty()),
    };
    Ok(axum::Json(fh::client_hierarchy(&s.fed, &s.hierarchy_sessions, req).await?))
}

/// The `via` query parameters (repeatable).
fn via_params(q: Option<&str>) -> Vec<String> {
    q.unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("via="))
        .map(crate::util::percent_decode)
        .filter(|v| !v.is_empty())
        .collect()
}

/// A room id, or the room an alias names (ours, or asked of the alias's server, whose servers are added to `via`).
async fn resolve(s: &AppState, id_or_alias: &str, via: &mut Vec<String>) -> Result<String> {
    let not_found = || Error::not_found("room not found");
    if id_or_alias.starts_with('!') {
        ruma::RoomId::parse(id_or_alias).map_err(|_| not_found())?;
        return Ok(id_or_alias.to_owned());
    }
    let alias = ruma::RoomAliasId::parse(id_or_alias).map_err(|_| not_found())?;
    if alias.server_name() != s.identity.server_name {
        let (room_id, servers) = crate::federation::query::remote_alias(&s.fed, id_or_alias).await?;
        via.extend(servers);
        return Ok(room_id);
    }
    let a = id_or_alias.to_owned();
    s.store.read(move |c| rooms::alias_target(c, &a)).await?.ok_or_else(not_found)
}

pub async fn room_summary(
    State(s): State<AppState>,
    MaybeAuth(auth): MaybeAuth,
    Path(id_or_alias): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse> {
    let mut via = via_params(q.as_deref());
    let room_id = resolve(&s, &id_or_alias, &mut via).await?;
    let user = auth.map(|a| a.user_id.to_string());
    let (rid, u, me) = (room_id.clone(), user.clone(), s.identity.server_name.to_string());
    let local = s
        .store
        .read(move |c| {
            let Some(room) = h::resident_room(c, &rid, &me)? else { return Ok(None) };
            let viewer = u.as_deref().map_or(Viewer::Anyone, Viewer::User);
            let entry = h::local_entry(c, &room, viewer, false, false)?;
            Ok(Some(entry.map(|e| e.room).ok_or_else(|| Error::not_found("room not found, or you may not see it"))))
        })
        .await?;
    let mut summary = match local {
        Some(found) => found?,
        None => {
            if via.is_empty() {
                via = fh::server_of_room(&room_id);
            }
            fh::remote_summary(&s.fed, user.as_deref(), &room_id, &via).await?
        }
    };
    if let Some(user) = user {
        let rid = room_id.clone();
        let membership = s
            .store
            .read(move |c| match rooms::room_by_id(c, &rid)? {
                Some(r) => Ok(members::membership_of(c, r.room_nid, &user)?.map(|m| m.0)),
                None => Ok(None),
            })
            .await?;
        summary["membership"] = json!(membership.unwrap_or_else(|| "leave".into()));
    }
    Ok(axum::Json::<Value>(summary))
}
