//! Peeking (MSC2753, unstable prefix `org.matrix.msc2753`): `POST /peek/{roomIdOrAlias}` starts looking at a
//! world-readable room without joining it, `POST /rooms/{roomId}/unpeek` stops; `/sync` shows peeked rooms under
//! `rooms.peek` (`sync.rs`). A room of another server is followed over federation (MSC2444,
//! `federation::peek`); against a server without the peek API the answer is the room's summary (from federation
//! `/hierarchy`), marked `summary_only`.

use axum::extract::{Path, RawQuery, State};
use axum::response::IntoResponse;
use serde_json::json;

use crate::error::{Error, Result};
use crate::federation::peek::RemotePeek;
use crate::http::{AppState, Auth};
use crate::room::visibility::{visibility, Visibility};
use crate::store::ids::RoomNid;
use crate::store::{members, peeks, rooms};

/// Where a room stands for a peek here.
enum Known {
    /// We follow it (a member of ours is in it, it is ours, or we already peek it): a local peek.
    Followed,
    /// Not followed: ask another server.
    Remote,
}

pub async fn peek(
    State(s): State<AppState>,
    auth: Auth,
    Path(id_or_alias): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse> {
    let (room_id, servers) = crate::client::rooms::resolve_room(&s, &id_or_alias).await?;
    let rid = crate::room::parse_room_id(&room_id)?;
    let r = room_id.clone();
    if s.store.read(move |c| rooms::is_blocked(c, &r)).await? {
        return Err(Error::forbidden("this room is blocked on this server"));
    }
    let mut via = crate::client::rooms::via_servers(q.as_deref(), &id_or_alias, servers);
    let me = s.identity.server_name.to_string();
    let r = room_id.clone();
    let known = s
        .store
        .read(move |c| {
            let Some(room) = rooms::room_by_id(c, &r)? else { return Ok(Known::Remote) };
            if room.current_sg.is_none() {
                return Ok(Known::Remote);
            }
            let servers = members::joined_servers(c, room.room_nid)?;
            let ours_alone = servers.iter().all(|x| *x == me);
            if servers.contains(&me) || ours_alone || peeks::out_of(c, room.room_nid)?.is_some() {
                Ok(Known::Followed)
            } else {
                Ok(Known::Remote)
            }
        })
        .await?;
    if let Known::Remote = known {
        via.retain(|v| *v != s.identity.server_name.as_str());
        let mut seen = std::collections::HashSet::new();
        via.retain(|v| seen.insert(v.clone()));
        if via.is_empty() {
            return Err(Error::not_found("no known servers to peek into this room through"));
        }
        match crate::federation::peek::peek(&s.fed, &rid, &via).await? {
            RemotePeek::Following => {}
            RemotePeek::Unsupported => {
                // Fallback: what federation /hierarchy tells of the room, clearly not a peek.
                let summary =
                    crate::federation::hierarchy::remote_summary(&s.fed, Some(auth.user_id.as_str()), &room_id, &via)
                        .await?;
                return Ok(axum::Json(json!({"room_id": room_id, "summary_only": true, "summary": summary})));
            }
        }
    }
    let (r, uid) = (room_id.clone(), auth.user_id.clone());
    let started = s
        .store
        .write(move |w| {
            let room = rooms::room_by_id(w.db(), &r)?.ok_or_else(|| Error::not_found("unknown room"))?;
            if visibility(w.db(), &room, &uid)? != Visibility::All {
                return Err(Error::forbidden("only rooms with world_readable history may be peeked"));
            }
            let stream = w.next_stream();
            peeks::add_local(w.db(), uid.as_str(), room.room_nid, stream)?;
            Ok(room.room_nid)
        })
        .await;
    if let Err(e) = started {
        // A remote peek nobody here uses any more is ended at once.
        let r = room_id.clone();
        if let Some(nid) = s.store.read(move |c| Ok(rooms::room_by_id(c, &r)?.map(|x| x.room_nid))).await? {
            let _ = crate::federation::peek::stop_if_unwatched(&s.fed, nid).await;
        }
        return Err(e);
    }
    Ok(axum::Json(json!({"room_id": room_id})))
}

pub async fn unpeek(State(s): State<AppState>, auth: Auth, Path(room_id): Path<String>) -> Result<impl IntoResponse> {
    let uid = auth.user_id.clone();
    let nid: Option<RoomNid> = s
        .store
        .write(move |w| {
            let Some(room) = rooms::room_by_id(w.db(), &room_id)? else { return Ok(None) };
            let was = peeks::delete_local(w.db(), uid.as_str(), room.room_nid)?;
            if was {
                w.next_stream(); // wakes the user's /sync, which no longer lists the room
            }
            Ok(was.then_some(room.room_nid))
        })
        .await?;
    let nid = nid.ok_or_else(|| Error::not_found("you are not peeking into this room"))?;
    crate::federation::peek::stop_if_unwatched(&s.fed, nid).await?;
    Ok(axum::Json(json!({})))
}

/// A local user joined a room they peeked: the peek has served its purpose (and the remote one, if nobody else
/// here peeks).
pub async fn joined(s: &AppState, user_id: &ruma::UserId, room_id: &str) -> Result<()> {
    let (uid, r) = (user_id.to_owned(), room_id.to_owned());
    let nid = s
        .store
        .write(move |w| {
            let Some(room) = rooms::room_by_id(w.db(), &r)? else { return Ok(None) };
            Ok(peeks::delete_local(w.db(), uid.as_str(), room.room_nid)?.then_some(room.room_nid))
        })
        .await?;
    if let Some(nid) = nid {
        crate::federation::peek::stop_if_unwatched(&s.fed, nid).await?;
    }
    Ok(())
}
