//! Peeking over federation, resident side (MSC2444, unstable prefix `org.matrix.msc2444`):
//! `PUT /_matrix/federation/unstable/org.matrix.msc2444/peek/{roomId}/{peekId}` starts (or renews) a peek of a
//! world-readable room; `DELETE` of the same path ends it. While it lasts the peeking server gets the room's new
//! events in ordinary transactions (`store::outbox::enqueue_pdu`, `room::peek::relay_remote_event`).
//!
//! The answer to a new peek is the room's current state with the members omitted as in an `omit_members`
//! `send_join` (the shared [`super::routes::state_and_chain`]): the heroes when the room has no name, plus the
//! senders of recent events, so a 100k-member room answers in the size of its non-member state.

use axum::extract::{Path, RawQuery, State};
use axum::response::IntoResponse;
use serde_json::json;

use crate::error::{Error, Result};
use crate::http::{AppState, Signed};
use crate::room::parse_room_id;
use crate::store::accounts::now_ms;
use crate::store::ids::StreamPos;
use crate::store::{events, peeks, rooms, timeline};

/// Senders of this many recent events have their memberships in the answer (clients show who spoke).
const RECENT_SENDERS_FROM: i64 = 20;

/// A peek id: ASCII, short (the MSC says 8 bytes or less; we accept up to 64 in case a server uses a room id).
fn valid_peek_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The room versions a `?ver=` query names (as for `make_join`); empty when none is named.
fn versions(q: Option<&str>) -> Vec<String> {
    q.unwrap_or_default().split('&').filter_map(|kv| kv.strip_prefix("ver=")).map(crate::util::percent_decode).collect()
}

pub async fn put_peek(
    State(s): State<AppState>,
    Path((room_id, peek_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> Result<impl IntoResponse> {
    if !valid_peek_id(&peek_id) {
        return Err(Error::invalid_param("peek id must be 1 to 64 ASCII characters"));
    }
    let rid = parse_room_id(&room_id)?;
    let vers = versions(q.as_deref());
    let origin = signed.origin.clone();
    let cfg = s.config.federation.clone();
    let renewal = cfg.peek_renewal_ms;
    let started = std::time::Instant::now();
    let started_room = s
        .store
        .write(move |w| {
            let c = w.db();
            let room = rooms::room_by_id(c, rid.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
            if !crate::federation::acl::room_allows(c, room.current_sg, &origin)? {
                return Err(Error::forbidden("server denied by the room's ACL"));
            }
            if rooms::is_blocked(c, rid.as_str())? {
                return Err(Error::forbidden("this room is blocked on this server"));
            }
            if room.current_sg.is_none() || room.partial_state {
                return Err(Error::not_found("this server cannot serve a peek of this room"));
            }
            if !crate::room::peek::peekable(c, &room)? {
                return Err(Error::forbidden("only rooms with world_readable history may be peeked"));
            }
            if !vers.is_empty() && !vers.contains(&room.version) {
                return Err(Error::incompatible_room_version(&room.version));
            }
            let now = now_ms();
            let renewing = peeks::is_peeking_with(c, room.room_nid, &origin, &peek_id, now)?;
            if !renewing {
                let (by_server, by_room) = peeks::counts(c, room.room_nid, &origin, now)?;
                if by_server >= cfg.peek_max_per_server as i64 || by_room >= cfg.peek_max_per_room as i64 {
                    return Err(Error::limit_exceeded(60_000));
                }
            }
            // Recorded before the state is read (the read below starts after this commit): every event after
            // the answer's state goes to the peeker, some maybe twice, none lost.
            peeks::upsert_in(c, room.room_nid, &origin, &peek_id, now + renewal as i64, now)?;
            Ok((!renewing).then_some(room))
        })
        .await?;
    let answer = match started_room {
        // The MSC answers a renewal with `{}`; the interval is added so a peeker learns of a changed one.
        None => json!({"renewal_interval": renewal}),
        Some(room) => {
            let s2 = s.clone();
            s.store.read(move |c| peek_answer(c, &s2, &room, renewal)).await?
        }
    };
    tracing::info!(%room_id, origin = %signed.origin, state = answer["state"].as_array().map(Vec::len).unwrap_or(0),
        ms = started.elapsed().as_millis() as u64, renewing = answer.get("state").is_none(), "peek served");
    Ok(axum::Json(answer))
}

/// The answer to a new peek: the current state with members omitted, its auth chain, the latest event.
fn peek_answer(
    c: crate::store::Db<'_>,
    s: &AppState,
    room: &rooms::RoomRow,
    renewal: u64,
) -> Result<serde_json::Value> {
    // The room as this read sees it: state and extremities of the same moment.
    let room = &rooms::room_by_nid(c, room.room_nid)?.ok_or_else(|| Error::not_found("unknown room"))?;
    let sg = room.current_sg.ok_or_else(|| Error::internal("no state"))?;
    let mut latest: Option<(i64, String)> = None;
    for nid in events::forward_extremities(c, room.room_nid)? {
        if let Some(r) = events::event_by_nid(c, nid)? {
            let pos = r.stream_ordering.map_or(i64::MIN, |p| p.0);
            if latest.as_ref().is_none_or(|(p, _)| pos > *p) {
                latest = Some((pos, r.event_id));
            }
        }
    }
    let recent = timeline::newest_first(c, room.room_nid, StreamPos(0), StreamPos(i64::MAX), RECENT_SENDERS_FROM)?;
    let senders: Vec<String> = recent.into_iter().map(|r| r.sender).collect();
    let wanted = super::routes::members_to_send(c, room, sg, None, senders)?;
    let (state, auth_chain) = super::routes::state_and_chain(c, sg, Some(&wanted), None)?;
    Ok(json!({
        "origin": s.identity.server_name.as_str(),
        "room_version": room.version,
        "state": state,
        "auth_chain": auth_chain,
        "members_omitted": true,
        "renewal_interval": renewal,
        "latest_event_id": latest.map(|l| l.1),
    }))
}

pub async fn delete_peek(
    State(s): State<AppState>,
    Path((room_id, peek_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let origin = signed.origin;
    let ended = s
        .store
        .write(move |w| {
            let Some(room) = rooms::room_by_id(w.db(), &room_id)? else { return Ok(false) };
            peeks::delete_in(w.db(), room.room_nid, &origin, &peek_id)
        })
        .await?;
    if !ended {
        return Err(Error::not_found("no such peek"));
    }
    Ok(axum::Json(json!({})))
}
