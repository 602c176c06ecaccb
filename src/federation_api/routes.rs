//! The server-server API we serve. Handlers verify the caller (`Signed`), check the room's ACL and the caller's
//! right to see the data, and call into the room core.

use std::collections::{HashMap, HashSet, VecDeque};

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::Router;
use ruma::RoomId;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::state_answers::{StateAnswer, StateAnswers};
use crate::federation::{inbound, keys};
use crate::http::{AppState, Query, Signed};
use crate::room::append::reference;
use crate::room::directory::Directory;
use crate::room::remote::{handle_incoming, state_before, Incoming};
use crate::room::visibility::{server_may_read_room, ServerJudge};
use crate::room::{load_pdu, parse_room_id, state, version};
use crate::store::accounts::now_ms;
use crate::store::ids::{EventNid, StateGroup};
use crate::store::rooms::{self, RoomRow};
use crate::store::{e2ee, events, members, notary, state_groups, Db};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/key/v2/server", get(key_server))
        .route("/_matrix/key/v2/server/{key_id}", get(key_server))
        .route("/_matrix/key/v2/query", post(key_query))
        .route("/_matrix/key/v2/query/{server}", get(key_query_get))
        .route("/_matrix/federation/v1/version", get(fed_version))
        .route("/_matrix/federation/v1/send/{txn_id}", put(send_txn))
        .route("/_matrix/federation/v1/make_join/{room_id}/{user_id}", get(make_join))
        .route("/_matrix/federation/v1/send_join/{room_id}/{event_id}", put(send_join_v1))
        .route("/_matrix/federation/v2/send_join/{room_id}/{event_id}", put(send_join_v2))
        .route("/_matrix/federation/v1/make_leave/{room_id}/{user_id}", get(make_leave))
        .route("/_matrix/federation/v1/send_leave/{room_id}/{event_id}", put(send_leave_v1))
        .route("/_matrix/federation/v2/send_leave/{room_id}/{event_id}", put(send_leave))
        .route("/_matrix/federation/v2/invite/{room_id}/{event_id}", put(invite_v2))
        .route("/_matrix/federation/v1/make_knock/{room_id}/{user_id}", get(make_knock))
        .route("/_matrix/federation/v1/send_knock/{room_id}/{event_id}", put(send_knock))
        .route("/_matrix/federation/v1/state_ids/{room_id}", get(state_ids))
        .route("/_matrix/federation/v1/state/{room_id}", get(room_state))
        .route("/_matrix/federation/v1/event/{event_id}", get(get_event))
        .route("/_matrix/federation/v1/event_auth/{room_id}/{event_id}", get(event_auth))
        .route("/_matrix/federation/v1/get_missing_events/{room_id}", post(get_missing_events))
        .route("/_matrix/federation/v1/backfill/{room_id}", get(backfill))
        .route("/_matrix/federation/v1/query/profile", get(query_profile))
        .route("/_matrix/federation/v1/query/directory", get(query_directory))
        .route("/_matrix/federation/v1/user/devices/{user_id}", get(user_devices))
        .route("/_matrix/federation/v1/user/keys/query", post(user_keys_query))
        .route("/_matrix/federation/v1/user/keys/claim", post(user_keys_claim))
        .route("/_matrix/federation/v1/publicRooms", get(public_rooms).post(public_rooms_post))
        .route("/_matrix/federation/v1/hierarchy/{room_id}", get(super::hierarchy::hierarchy))
        .route("/_matrix/federation/v1/timestamp_to_event/{room_id}", get(super::tools::timestamp_to_event))
        .route("/_matrix/federation/v1/openid/userinfo", get(super::tools::openid_userinfo))
        .route(
            "/_matrix/federation/unstable/org.matrix.msc2444/peek/{room_id}/{peek_id}",
            put(super::peek::put_peek).delete(super::peek::delete_peek),
        )
}

async fn key_server(State(s): State<AppState>) -> Result<impl IntoResponse> {
    let name = s.identity.server_name.to_string();
    let old = s.store.read(move |c| keys::own_old_keys(c, &name)).await?;
    Ok(axum::Json(keys::own_key_response_with_old(&s.identity, &old)?))
}

/// Notary: our own keys, plus the key responses of other servers we hold (origin-signed, countersigned by us).
#[derive(serde::Deserialize)]
struct KeyQuery {
    /// server name -> key id -> criteria (we answer with every key we hold for the server).
    server_keys: std::collections::BTreeMap<String, std::collections::BTreeMap<String, KeyCriteria>>,
}

#[derive(serde::Deserialize)]
struct KeyCriteria {
    minimum_valid_until_ts: Option<u64>,
}

async fn key_query(
    State(s): State<AppState>,
    crate::http::Json(body): crate::http::Json<KeyQuery>,
) -> Result<impl IntoResponse> {
    // Canonical JSON integers stop at 2^53 - 1.
    if body
        .server_keys
        .values()
        .flat_map(|k| k.values())
        .any(|c| c.minimum_valid_until_ts.is_some_and(|t| t > (1 << 53) - 1))
    {
        return Err(Error::bad_json("minimum_valid_until_ts is out of range"));
    }
    let servers: Vec<String> = body.server_keys.into_keys().collect();
    Ok(axum::Json(json!({"server_keys": notary_answer(&s, servers).await?})))
}

async fn notary_answer(s: &AppState, servers: Vec<String>) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut others = Vec::new();
    for server in servers {
        if server == s.identity.server_name.as_str() {
            let name = s.identity.server_name.to_string();
            let old = s.store.read(move |c| keys::own_old_keys(c, &name)).await?;
            out.push(keys::own_key_response_with_old(&s.identity, &old)?);
        } else {
            others.push(server);
        }
    }
    let stored = s
        .store
        .read(move |c| {
            let mut found = Vec::new();
            for server in &others {
                if let Ok(Some(r)) = notary::notary_key(c, server) {
                    found.push(r);
                }
            }
            Ok(found)
        })
        .await?;
    for r in stored {
        out.push(keys::sign_value(&s.identity, serde_json::from_str(&r)?)?);
    }
    Ok(out)
}

async fn key_query_get(State(s): State<AppState>, Path(server): Path<String>) -> Result<impl IntoResponse> {
    Ok(axum::Json(json!({"server_keys": notary_answer(&s, vec![server]).await?})))
}

async fn fed_version() -> impl IntoResponse {
    axum::Json(json!({"server": {"name": "Hearth", "version": env!("CARGO_PKG_VERSION")}}))
}

async fn send_txn(State(s): State<AppState>, Path(_txn): Path<String>, signed: Signed) -> Result<impl IntoResponse> {
    let body = signed.body.ok_or_else(|| Error::bad_json("missing transaction body"))?;
    Ok(axum::Json(inbound::transaction(&s.fed, &signed.origin, &body).await?))
}

fn partial_refusal() -> Error {
    Error::unable_due_to_partial_state("this server has only partial state for the room")
}

/// A room we hold full state for, that `origin` may talk about (ACL).
fn resident_room(c: Db<'_>, room_id: &RoomId, origin: &str) -> Result<RoomRow> {
    let room = rooms::room_by_id(c, room_id.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
    if !crate::federation::acl::room_allows(c, room.current_sg, origin)? {
        return Err(Error::forbidden("server denied by the room's ACL"));
    }
    Ok(room)
}

/// An admin blocked the room here (`hearth room block`): no joins, knocks or invites through us.
fn refuse_blocked(c: Db<'_>, room_id: &str) -> Result<()> {
    if rooms::is_blocked(c, room_id)? {
        return Err(Error::forbidden("this room is blocked on this server"));
    }
    Ok(())
}

/// make_join/make_leave: an unsigned event template on our current state.
fn make_membership(c: Db<'_>, s: &AppState, room: &RoomRow, user_id: &str, membership: &str) -> Result<Value> {
    let rules = version::rules(&room.version)?;
    let sg = room.current_sg.ok_or_else(|| Error::not_found("unknown room"))?;
    let mut prev = Vec::new();
    let mut depth = 0;
    let mut ext = events::forward_extremities(c, room.room_nid)?;
    ext.sort_unstable();
    for nid in ext.iter().rev().take(10) {
        let (id, sha, d) = reference(c, *nid)?;
        depth = depth.max(d);
        prev.push((id, sha));
    }
    let mut content = json!({"membership": membership});
    if membership == "join" {
        // A restricted room: one of our members who may invite vouches for a member of an allowed room.
        let server = s.identity.server_name.as_str();
        if let Some(by) = crate::room::membership::restricted_join_authoriser(c, room, sg, user_id, server)? {
            content["join_authorised_via_users_server"] = json!(by);
        }
    }
    let sender = ruma::UserId::parse(user_id).map_err(|e| Error::invalid_param(e.to_string()))?;
    let raw = serde_json::value::to_raw_value(&content)?;
    let types = ruma::state_res::auth_types_for_event(
        &ruma::events::TimelineEventType::RoomMember,
        &sender,
        Some(user_id),
        &raw,
        &rules.authorization,
    )
    .map_err(Error::bad_json)?;
    let mut auth = Vec::new();
    for (t, k) in types {
        if let Some(skn) = state_groups::find_state_key_nid(c, &t.to_string(), &k)? {
            if let Some(nid) = state_groups::lookup_state(c, sg, skn)? {
                let (id, sha, _) = reference(c, nid)?;
                auth.push((id, sha));
            }
        }
    }
    let mut ev = json!({
        "type": "m.room.member", "state_key": user_id, "sender": user_id, "room_id": room.room_id,
        "content": content, "depth": depth + 1, "origin": s.identity.server_name.as_str(), "origin_server_ts": now_ms(),
        "prev_events": serde_json::to_value(version::event_refs(&prev, &rules))?,
        "auth_events": serde_json::to_value(version::event_refs(&auth, &rules))?,
    });
    // Would this membership be allowed? (check the rules now, before the remote server signs it)
    let mut probe = ev.clone();
    if matches!(rules.event_id_format, ruma::room_version_rules::EventIdFormatVersion::V1) {
        probe["event_id"] = json!(format!("$probe:{}", s.identity.server_name));
    }
    let obj: ruma::canonical_json::CanonicalJsonObject =
        serde_json::from_value(probe).map_err(|e| Error::internal(e.to_string()))?;
    let pdu = crate::room::Pdu::from_canonical(
        obj,
        ruma::OwnedEventId::try_from("$probe:probe").map_err(|e| Error::internal(e.to_string()))?,
        &rules,
    )
    .map_err(Error::internal)?;
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, &pdu, |t, k| {
        crate::room::state_event(c, sg, &t.to_string(), k).ok().flatten()
    })
    .map_err(|e| Error::forbidden(format!("you may not {membership} this room: {e}")))?;
    if !rules.authorization.use_room_create_sender {
        // nothing: v1-v10 templates carry `origin` already
    }
    ev.as_object_mut().map(|o| o.remove("origin"));
    Ok(json!({"room_version": room.version, "event": ev}))
}

/// What `make_join` and `make_knock` check first: the user is of the asking server; then the room versions it
/// supports (`ver=` query parameters, in order).
fn make_request_versions(user_id: &str, origin: &str, query: Option<String>) -> Result<Vec<String>> {
    if user_id.split_once(':').map(|x| x.1) != Some(origin) {
        return Err(Error::forbidden("user is not from the requesting server"));
    }
    Ok(query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("ver="))
        .map(crate::util::percent_decode)
        .collect())
}

async fn make_join(
    State(s): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let vers = make_request_versions(&user_id, &signed.origin, q)?;
    let s2 = s.clone();
    let answer = s
        .store
        .read(move |c| {
            refuse_blocked(c, &room_id)?;
            let room = resident_room(c, &parse_room_id(&room_id)?, &signed.origin)?;
            if room.partial_state {
                // MSC3902: never act as the resident for a room we only partly know.
                return Err(Error::not_found("this server cannot help with joining this room right now"));
            }
            let v = if vers.is_empty() { vec!["1".to_owned()] } else { vers };
            if !v.contains(&room.version) {
                return Err(Error::incompatible_room_version(&room.version));
            }
            make_membership(c, &s2, &room, &user_id, "join")
        })
        .await?;
    Ok(axum::Json(answer))
}

async fn make_knock(
    State(s): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let vers = make_request_versions(&user_id, &signed.origin, q)?;
    let s2 = s.clone();
    let answer = s
        .store
        .read(move |c| {
            refuse_blocked(c, &room_id)?;
            let room = resident_room(c, &parse_room_id(&room_id)?, &signed.origin)?;
            if room.partial_state {
                return Err(Error::not_found("this server cannot help with this room right now"));
            }
            if !vers.contains(&room.version) {
                return Err(Error::incompatible_room_version(&room.version));
            }
            make_membership(c, &s2, &room, &user_id, "knock")
        })
        .await?;
    Ok(axum::Json(answer))
}

async fn send_knock(
    State(s): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let (room, pdu) = accept_membership(&s, &signed.origin, &room_id, &event_id, signed.body, "knock").await?;
    let knocker = pdu.sender.to_string();
    let stripped = s
        .store
        .read(move |c| {
            let room = rooms::room_by_id(c, &room.room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
            crate::room::stripped::stripped_state_pdus(c, &room, &knocker)
        })
        .await?;
    Ok(axum::Json(json!({"knock_room_state": stripped})))
}

async fn make_leave(
    State(s): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    if user_id.split_once(':').map(|x| x.1) != Some(signed.origin.as_str()) {
        return Err(Error::forbidden("user is not from the requesting server"));
    }
    let s2 = s.clone();
    let answer = s
        .store
        .read(move |c| {
            let room = resident_room(c, &parse_room_id(&room_id)?, &signed.origin)?;
            if room.partial_state {
                return Err(Error::not_found("this server cannot help with this room right now"));
            }
            make_membership(c, &s2, &room, &user_id, "leave")
        })
        .await?;
    Ok(axum::Json(answer))
}

#[derive(Deserialize)]
struct OmitQuery {
    omit_members: Option<String>,
}

/// Accepts a remote server's signed membership event (join or leave) as the resident.
async fn accept_membership(
    s: &AppState,
    origin: &str,
    room_id: &str,
    event_id: &str,
    body: Option<Value>,
    membership: &str,
) -> Result<(RoomRow, crate::room::Pdu)> {
    let body = body.ok_or_else(|| Error::bad_json("missing event"))?;
    let (rid, o) = (room_id.to_owned(), origin.to_owned());
    let blocking = membership != "leave";
    let room = s
        .store
        .read(move |c| {
            if blocking {
                refuse_blocked(c, &rid)?;
            }
            resident_room(c, &parse_room_id(&rid)?, &o)
        })
        .await?;
    if room.partial_state {
        return Err(Error::not_found("this server cannot help with this room right now"));
    }
    let started = std::time::Instant::now();
    let body = if membership == "join" { countersign_restricted_join(s, &room, body)? } else { body };
    let pdu = inbound::verify_batch(&s.fed, &room.version, vec![body])
        .await?
        .pop()
        .ok_or_else(|| Error::bad_json("no event"))?
        .map_err(Error::bad_json)?;
    if pdu.event_id.as_str() != event_id {
        return Err(Error::bad_json("event id does not match the event"));
    }
    if pdu.kind.to_string() != "m.room.member"
        || pdu.state_key.as_deref() != Some(pdu.sender.as_str())
        || pdu.membership().as_deref() != Some(membership)
    {
        return Err(Error::bad_json(format!("not a {membership} event for its sender")));
    }
    if pdu.sender.server_name().as_str() != origin {
        return Err(Error::forbidden("event sender is not from the requesting server"));
    }
    if pdu.room_id.as_str() != room_id {
        return Err(Error::bad_json("event is for another room"));
    }
    let verified = started.elapsed();
    let identity = s.identity.clone();
    let (rid, p, o) = (pdu.room_id.clone(), pdu.clone(), origin.to_owned());
    let (stored, fanned_out) = s
        .store
        .write(move |w| {
            let t = std::time::Instant::now();
            match handle_incoming(w, &identity, &rid, &p, None)? {
                Incoming::Stored(_, crate::room::append::Outcome::Rejected(r)) => {
                    return Err(Error::forbidden(format!("event rejected: {r}")))
                }
                Incoming::MissingPrevs(_) => return Err(Error::bad_json("event does not build on events we know")),
                _ => {}
            }
            let stored = t.elapsed();
            // Tell the other servers in the room (not the one that asked; it already has it).
            let room = rooms::room_by_id(w.db(), rid.as_str())?.ok_or_else(|| Error::internal("room vanished"))?;
            let mut dests = members::joined_servers(w.db(), room.room_nid)?;
            // Servers peeking the room (MSC2444) see who joins and leaves too.
            dests.extend(crate::store::peeks::peeking_servers(w.db(), room.room_nid, now_ms())?);
            dests.sort();
            dests.dedup();
            dests.retain(|d| d != &o && d != identity.server_name.as_str());
            crate::store::outbox::enqueue_pdu_to(w.db(), p.event_id.as_str(), &dests)?;
            Ok((stored, t.elapsed() - stored))
        })
        .await?;
    tracing::info!(%room_id, %origin, membership, verify_ms = verified.as_millis() as u64, store_ms = stored.as_millis() as u64,
        fan_out_ms = fanned_out.as_millis() as u64, total_ms = started.elapsed().as_millis() as u64, "membership accepted");
    Ok((room, pdu))
}

/// A join naming one of our users in `join_authorised_via_users_server` (from our `make_join` for a restricted
/// room) is signed by us before it is checked, as the room's rules require that server's signature; a join naming
/// another server's user cannot be vouched for here (400, as Synapse answers).
fn countersign_restricted_join(s: &AppState, room: &RoomRow, body: Value) -> Result<Value> {
    let Some(by) = body.pointer("/content/join_authorised_via_users_server").and_then(Value::as_str) else {
        return Ok(body);
    };
    let rules = version::rules(&room.version)?;
    if !rules.authorization.restricted_join_rule {
        return Ok(body);
    }
    if !s.identity.is_local_user(by) {
        return Err(Error::bad_json("this server can only authorise joins through its own users"));
    }
    let mut obj: ruma::canonical_json::CanonicalJsonObject =
        serde_json::from_value(body).map_err(|e| Error::bad_json(e.to_string()))?;
    ruma::signatures::sign_event(s.identity.server_name.as_str(), &s.identity.keypair, &mut obj, &rules.redaction)
        .map_err(|e| Error::bad_json(format!("cannot sign the join: {e}")))?;
    Ok(serde_json::to_value(obj)?)
}

/// The servers in the room before `join` (the spec's `servers_in_room`): those with joined members, the joiner's
/// own only if another of its users is in, and always ours.
fn servers_before_join(c: Db<'_>, s: &AppState, room: &RoomRow, join: &crate::room::Pdu) -> Result<Vec<String>> {
    let mut servers = members::joined_servers(c, room.room_nid)?;
    let joiner_server = join.sender.server_name().as_str();
    let mut others_joined = false;
    for user in members::users_of_server(c, room.room_nid, joiner_server)? {
        if user != join.sender.as_str()
            && members::membership_of(c, room.room_nid, &user)?.is_some_and(|m| m.0 == "join")
        {
            others_joined = true;
            break;
        }
    }
    if !others_joined {
        servers.retain(|x| x != joiner_server);
    }
    if !servers.iter().any(|x| x == s.identity.server_name.as_str()) {
        servers.push(s.identity.server_name.to_string());
    }
    Ok(servers)
}

/// The send_join answer; with `omit_members` only the non-member state, the joiner's previous membership and
/// heroes (MSC3706/MSC3943), read from the materialised tables — never the whole member list.
fn send_join_answer(c: Db<'_>, s: &AppState, room: &RoomRow, join: &crate::room::Pdu, omit: bool) -> Result<Value> {
    let sg = match state_before(c, room, join)? {
        Ok(sg) => sg,
        Err(_) => room.current_sg.ok_or_else(|| Error::internal("no state"))?,
    };
    let join_nid = events::event_nid(c, join.event_id.as_str())?;
    let wanted = if omit { members_to_send(c, room, sg, Some(join.sender.as_str()), Vec::new())? } else { Vec::new() };
    let (state_json, auth_json) = state_and_chain(c, sg, omit.then_some(wanted.as_slice()), join_nid)?;
    let servers = servers_before_join(c, s, room, join)?;
    let mut out = json!({
        "origin": s.identity.server_name.as_str(),
        "state": state_json,
        "auth_chain": auth_json,
        "members_omitted": omit,
    });
    if omit {
        out["servers_in_room"] = json!(servers);
    }
    if join.content_value().get("join_authorised_via_users_server").is_some() {
        // We countersigned it: the joining server needs our signature.
        out["event"] = serde_json::to_value(&join.json)?;
    }
    Ok(out)
}

/// The members a lazy answer (an `omit_members` join, a peek) carries: `first` (the joiner), the heroes when the
/// room has no name or alias (clients name it after them), and `also` (a peek: the senders of recent events).
pub(super) fn members_to_send(
    c: Db<'_>,
    room: &RoomRow,
    sg: StateGroup,
    first: Option<&str>,
    also: Vec<String>,
) -> Result<Vec<String>> {
    let mut wanted: Vec<String> = first.map(str::to_owned).into_iter().collect();
    let named = crate::room::state_content(c, sg, "m.room.name", "")?.is_some()
        || crate::room::state_content(c, sg, "m.room.canonical_alias", "")?.is_some();
    if !named {
        wanted.extend(members::some_members_except(c, room.room_nid, first.unwrap_or(""), 5)?);
    }
    wanted.extend(also);
    let mut seen = HashSet::new();
    wanted.retain(|u| seen.insert(u.clone()));
    Ok(wanted)
}

/// The state at `sg` and its auth chain as JSON. With `omit = Some(members)` the member half is left out but for
/// `members`' own memberships (one query for the rest, a lookup per member: never the whole member list). The
/// chain also covers `extra` (a join), which itself is left out of both.
pub(super) fn state_and_chain(
    c: Db<'_>,
    sg: StateGroup,
    omit: Option<&[String]>,
    extra: Option<EventNid>,
) -> Result<(Vec<Value>, Vec<Value>)> {
    let mut state: Vec<(EventNid, String)> =
        state_groups::state_event_ids(c, sg, if omit.is_some() { Some("m.room.member") } else { None })?;
    for user in omit.unwrap_or_default() {
        if let Some(skn) = state_groups::find_state_key_nid(c, "m.room.member", user)? {
            if let Some(nid) = state_groups::lookup_state(c, sg, skn)? {
                if let Some(r) = events::event_by_nid(c, nid)? {
                    state.push((nid, r.event_id));
                }
            }
        }
    }
    let state_nids: HashSet<EventNid> = state.iter().map(|x| x.0).collect();
    let mut starts: Vec<EventNid> = state_nids.iter().copied().collect();
    starts.extend(extra);
    let chain = events::auth_chain_nids(c, &starts)?;
    let mut state_json = Vec::with_capacity(state.len());
    for (nid, _) in &state {
        if let Some(j) = events::json_of(c, *nid)? {
            state_json.push(serde_json::from_str::<Value>(&j)?);
        }
    }
    let mut auth_json = Vec::new();
    for nid in chain {
        // The starts are in the chain too: leave out `extra` itself and what `state` already has.
        if Some(nid) == extra || state_nids.contains(&nid) {
            continue;
        }
        if let Some(j) = events::json_of(c, nid)? {
            auth_json.push(serde_json::from_str::<Value>(&j)?);
        }
    }
    Ok((state_json, auth_json))
}

async fn send_join_v2(
    State(s): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    Query(q): Query<OmitQuery>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let omit = match q.omit_members.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Error::invalid_param("omit_members must be true or false")),
    };
    let started = std::time::Instant::now();
    let (room, pdu) = accept_membership(&s, &signed.origin, &room_id, &event_id, signed.body, "join").await?;
    let s2 = s.clone();
    let answer = s.store.read(move |c| send_join_answer(c, &s2, &room, &pdu, omit)).await?;
    tracing::info!(%room_id, origin = %signed.origin, omit_members = omit, state = answer["state"].as_array().map(Vec::len).unwrap_or(0),
        auth_chain = answer["auth_chain"].as_array().map(Vec::len).unwrap_or(0), ms = started.elapsed().as_millis() as u64, "send_join served");
    Ok(axum::Json(answer))
}

async fn send_join_v1(
    State(s): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let (room, pdu) = accept_membership(&s, &signed.origin, &room_id, &event_id, signed.body, "join").await?;
    let s2 = s.clone();
    let mut answer = s.store.read(move |c| send_join_answer(c, &s2, &room, &pdu, false)).await?;
    answer.as_object_mut().map(|o| o.remove("members_omitted"));
    Ok(axum::Json(json!([200, answer])))
}

async fn send_leave(
    State(s): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    accept_membership(&s, &signed.origin, &room_id, &event_id, signed.body, "leave").await?;
    Ok(axum::Json(json!({})))
}

/// The deprecated v1 `send_leave`: the same as v2, answered as `[200, {}]`.
async fn send_leave_v1(
    State(s): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    accept_membership(&s, &signed.origin, &room_id, &event_id, signed.body, "leave").await?;
    Ok(axum::Json(json!([200, {}])))
}

async fn invite_v2(
    State(s): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let body = signed.body.ok_or_else(|| Error::bad_json("missing body"))?;
    let mismatch = || Error::bad_json("event id or room id does not match the path");
    let room_id = ruma::RoomId::parse(&room_id).map_err(|_| mismatch())?;
    let event_id = ruma::EventId::parse(&event_id).map_err(|_| mismatch())?;
    let rid = room_id.to_string();
    s.store.read(move |c| refuse_blocked(c, &rid)).await?;
    Ok(axum::Json(crate::federation::invite::receive_invite(&s.fed, &signed.origin, &room_id, &event_id, body).await?))
}

#[derive(Deserialize)]
struct EventIdQuery {
    event_id: Option<String>,
}

/// The state group before `event_id`.
fn state_group_before(c: Db<'_>, room: &RoomRow, event_id: &str) -> Result<StateGroup> {
    let row = events::event_by_id(c, event_id)?
        .filter(|r| r.room_nid == room.room_nid && !r.outlier)
        .ok_or_else(|| Error::not_found("event not found"))?;
    let pdu = crate::room::pdu_from_row(c, &row)?;
    Ok(match state_before(c, room, &pdu)? {
        Ok(sg) => sg,
        Err(_) => {
            // Our partial-join event's prevs are outliers to us: the state before it is its base group.
            let sg_after = row.sg_after.ok_or_else(|| Error::not_found("no state at event"))?;
            let delta = state_groups::delta_of(c, sg_after).ok().flatten();
            if row.state_key_nid.is_some() {
                delta.unwrap_or(sg_after)
            } else {
                sg_after
            }
        }
    })
}

/// State before `event_id` and its auth chain (minus the state itself) — from indexed rows only, or from the
/// cache when the previous request asked for the same state group.
fn state_at_event_nids(
    c: Db<'_>,
    cache: &StateAnswers,
    room: &RoomRow,
    event_id: &str,
) -> Result<std::sync::Arc<StateAnswer>> {
    let sg = state_group_before(c, room, event_id)?;
    if let Some(a) = cache.get(&room.room_id, sg) {
        return Ok(a);
    }
    let mut state = state_groups::state_event_ids(c, sg, None)?;
    // In event order: the JSON reads of `/state` then walk the events table forwards.
    state.sort_unstable_by_key(|x| x.0);
    let nids: Vec<EventNid> = state.iter().map(|x| x.0).collect();
    let chain = events::auth_chain_beyond(c, &nids)?;
    let a = std::sync::Arc::new(StateAnswer { state, chain });
    cache.put(&room.room_id, sg, a.clone());
    Ok(a)
}

/// A JSON answer streamed in chunks of about 64 KiB from a reader (the chunks are sent from the blocking thread
/// as `fill` writes them): an answer over a 100k-member room's state is never held whole.
fn stream_json<F>(s: &AppState, fill: F) -> Result<axum::response::Response>
where
    F: FnOnce(Db<'_>, &mut dyn FnMut(&mut String) -> bool) -> Result<()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<bytes::Bytes, std::io::Error>>(4);
    let store = s.store.clone();
    tokio::spawn(async move {
        let r = store
            .read(move |c| {
                let mut send = |buf: &mut String| -> bool {
                    tx.blocking_send(Ok(bytes::Bytes::from(std::mem::take(buf)))).is_ok()
                };
                fill(c, &mut send)
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "streamed answer failed");
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from_stream(stream))
        .map_err(|e| Error::internal(e.to_string()))
}

/// The room (resident, not partial, readable by `origin`) and the state answer before `event_id`.
fn state_answer_for(
    c: Db<'_>,
    cache: &StateAnswers,
    room_id: &str,
    origin: &str,
    event_id: &str,
) -> Result<std::sync::Arc<StateAnswer>> {
    let room = resident_room(c, &parse_room_id(room_id)?, origin)?;
    if room.partial_state {
        return Err(partial_refusal());
    }
    if !server_may_read_room(c, &room, origin)? {
        return Err(Error::forbidden("your server is not in this room"));
    }
    state_at_event_nids(c, cache, &room, event_id)
}

/// The state answer a `/state` or `/state_ids` request (`what`) asks for, logged with how long it took.
async fn served_state_answer(
    s: &AppState,
    room_id: String,
    q: EventIdQuery,
    signed: Signed,
    what: &'static str,
) -> Result<std::sync::Arc<StateAnswer>> {
    let event_id = q.event_id.ok_or_else(|| Error::missing_param("event_id is required"))?;
    let started = std::time::Instant::now();
    let s2 = s.clone();
    let answer =
        s.store.read(move |c| state_answer_for(c, &s2.state_answers, &room_id, &signed.origin, &event_id)).await?;
    let ms = started.elapsed().as_millis() as u64;
    tracing::info!(state = answer.state.len(), auth_chain = answer.chain.len(), ms, "{what} served");
    Ok(answer)
}

/// `/state_ids`: the ids of the state before the event and of its auth chain, streamed.
async fn state_ids(
    State(s): State<AppState>,
    Path(room_id): Path<String>,
    Query(q): Query<EventIdQuery>,
    signed: Signed,
) -> Result<axum::response::Response> {
    let answer = served_state_answer(&s, room_id, q, signed, "/state_ids").await?;
    // Ids need no database: chunks straight from the answer.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<bytes::Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut buf = String::with_capacity(1 << 16);
        for (key, list) in [("{\"pdu_ids\":[", &answer.state), ("],\"auth_chain_ids\":[", &answer.chain)] {
            buf.push_str(key);
            for (i, (_, id)) in list.iter().enumerate() {
                if i > 0 {
                    buf.push(',');
                }
                push_json_str(&mut buf, id);
                if buf.len() >= 1 << 16 && tx.send(Ok(bytes::Bytes::from(std::mem::take(&mut buf)))).await.is_err() {
                    return;
                }
            }
        }
        buf.push_str("]}");
        let _ = tx.send(Ok(bytes::Bytes::from(buf))).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from_stream(stream))
        .map_err(|e| Error::internal(e.to_string()))
}

/// `s` as a JSON string onto `buf`.
fn push_json_str(buf: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push('"');
        buf.push_str(s);
        buf.push('"');
    } else {
        buf.push_str(&Value::from(s).to_string());
    }
}

fn pdus_json(c: Db<'_>, ids: &[String]) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(r) = events::event_by_id(c, id)? {
            out.push(serde_json::from_str::<Value>(&r.json)?);
        }
    }
    Ok(out)
}

/// `/state`: potentially 100k events, so the answer is streamed from the database in chunks of raw stored JSON
/// (never parsed, never held whole). "/state served" logs the time to the state and its auth chain, "/state
/// streamed" the time to the answer's last byte.
async fn room_state(
    State(s): State<AppState>,
    Path(room_id): Path<String>,
    Query(q): Query<EventIdQuery>,
    signed: Signed,
) -> Result<axum::response::Response> {
    let started = std::time::Instant::now();
    let answer = served_state_answer(&s, room_id, q, signed, "/state").await?;
    stream_json(&s, move |c, send| {
        let mut buf = String::with_capacity(1 << 17);
        let state: Vec<EventNid> = answer.state.iter().map(|x| x.0).collect();
        let chain: Vec<EventNid> = answer.chain.iter().map(|x| x.0).collect();
        for (key, list) in [("{\"pdus\":[", &state), ("],\"auth_chain\":[", &chain)] {
            buf.push_str(key);
            let mut first = true;
            let mut stopped = false;
            events::each_json(c, list, |j| {
                if !first {
                    buf.push(',');
                }
                first = false;
                buf.push_str(j);
                if buf.len() >= 1 << 16 && !send(&mut buf) {
                    stopped = true;
                }
                !stopped
            })?;
            if stopped {
                return Ok(());
            }
        }
        buf.push_str("]}");
        send(&mut buf);
        tracing::info!(ms = started.elapsed().as_millis() as u64, "/state streamed");
        Ok(())
    })
}

async fn get_event(
    State(s): State<AppState>,
    Path(event_id): Path<String>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let me = s.identity.server_name.to_string();
    let body = s
        .store
        .read(move |c| {
            let row = events::event_by_id(c, &event_id)?.ok_or_else(|| Error::not_found("event not found"))?;
            let room = rooms::room_by_nid(c, row.room_nid)?.ok_or_else(|| Error::not_found("event not found"))?;
            if !crate::federation::acl::room_allows(c, room.current_sg, &signed.origin)?
                || !server_may_read_room(c, &room, &signed.origin)?
            {
                return Err(Error::forbidden("your server may not see this event"));
            }
            let pdus = pdus_for_server(c, &room, std::slice::from_ref(&row), &signed.origin)?;
            Ok(json!({"origin": me, "origin_server_ts": now_ms(), "pdus": pdus}))
        })
        .await?;
    Ok(axum::Json(body))
}

async fn event_auth(
    State(s): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let body = s
        .store
        .read(move |c| {
            let room = resident_room(c, &parse_room_id(&room_id)?, &signed.origin)?;
            if room.partial_state {
                return Err(partial_refusal());
            }
            if !server_may_read_room(c, &room, &signed.origin)? {
                return Err(Error::forbidden("your server is not in this room"));
            }
            let pdu = load_pdu_by_str(c, &event_id)?
                .filter(|p| p.room_id.as_str() == room.room_id)
                .ok_or_else(|| Error::not_found("event not found"))?;
            let mut chain = state::auth_chain(c, [pdu.event_id.clone()])?;
            // From room version 12 the create event is cited by no event (the room id names it), yet it is part
            // of every auth chain (as Synapse answers).
            let create = room.current_sg.map(|sg| crate::room::state_event(c, sg, "m.room.create", ""));
            if let Some(create) = create.transpose()?.flatten().filter(|cr| cr.event_id != pdu.event_id) {
                chain.insert(create.event_id);
            }
            let chain: Vec<String> = chain.into_iter().map(|e| e.to_string()).collect();
            Ok(json!({"auth_chain": pdus_json(c, &chain)?}))
        })
        .await?;
    Ok(axum::Json(body))
}

/// An event by an id from a request: one that does not parse is one we do not have.
fn load_pdu_by_str(c: Db<'_>, event_id: &str) -> Result<Option<crate::room::Pdu>> {
    match ruma::EventId::parse(event_id) {
        Ok(id) => load_pdu(c, &id),
        Err(_) => Ok(None),
    }
}

/// Walks prev_events backwards from `from` (breadth first), skipping `stop`, up to `limit` events.
fn walk_back(
    c: Db<'_>,
    room: &RoomRow,
    from: &[String],
    stop: &HashSet<String>,
    limit: usize,
    include_start: bool,
) -> Result<Vec<events::EventRow>> {
    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut queue: VecDeque<String> = VecDeque::new();
    for f in from {
        if include_start {
            queue.push_back(f.clone());
        } else if let Some(pdu) = load_pdu_by_str(c, f)? {
            queue.extend(pdu.prev_events.iter().map(|p| p.to_string()));
        }
    }
    while let Some(id) = queue.pop_front() {
        if out.len() >= limit || !seen.insert(id.clone()) || stop.contains(&id) {
            continue;
        }
        let Some(row) = events::event_by_id(c, &id)? else { continue };
        if row.room_nid != room.room_nid || row.outlier {
            continue;
        }
        if let Some(pdu) = load_pdu_by_str(c, &id)? {
            queue.extend(pdu.prev_events.iter().map(|p| p.to_string()));
        }
        out.push(row);
    }
    Ok(out)
}

/// The events as `server` may see them: in full, or redacted where the history visibility at the event hides it
/// from that server (the hashes and signatures stay, so the copy still verifies as a redaction).
fn pdus_for_server(c: Db<'_>, room: &RoomRow, rows: &[events::EventRow], server: &str) -> Result<Vec<Value>> {
    let rules = version::rules(&room.version)?;
    let mut judge = ServerJudge::new(c, room.room_nid, server)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if judge.may_see(r)? {
            out.push(serde_json::from_str(&r.json)?);
            continue;
        }
        let obj: ruma::canonical_json::CanonicalJsonObject = serde_json::from_str(&r.json)?;
        let redacted = ruma::canonical_json::redact(obj, &rules.redaction, None)
            .map_err(|e| Error::internal(format!("redacting {}: {e}", r.event_id)))?;
        out.push(serde_json::to_value(redacted)?);
    }
    Ok(out)
}

async fn get_missing_events(
    State(s): State<AppState>,
    Path(room_id): Path<String>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let body = signed.body.clone().unwrap_or(Value::Null);
    let strs = |k: &str| -> Vec<String> {
        body.get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let (earliest, latest) = (strs("earliest_events"), strs("latest_events"));
    let limit = body.get("limit").and_then(Value::as_u64).unwrap_or(10).min(100) as usize;
    let min_depth = body.get("min_depth").and_then(Value::as_i64).unwrap_or(0);
    let answer = s
        .store
        .read(move |c| {
            let room = resident_room(c, &parse_room_id(&room_id)?, &signed.origin)?;
            if !server_may_read_room(c, &room, &signed.origin)? {
                return Err(Error::forbidden("your server is not in this room"));
            }
            let stop: HashSet<String> = earliest.into_iter().collect();
            let mut rows = walk_back(c, &room, &latest, &stop, limit, false)?;
            rows.retain(|r| r.depth >= min_depth);
            rows.sort_by_key(|r| r.depth);
            Ok(json!({"events": pdus_for_server(c, &room, &rows, &signed.origin)?}))
        })
        .await?;
    Ok(axum::Json(answer))
}

async fn backfill(
    State(s): State<AppState>,
    Path(room_id): Path<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let q = q.unwrap_or_default();
    let mut from = Vec::new();
    let mut limit = 10usize;
    for kv in q.split('&') {
        if let Some(v) = kv.strip_prefix("v=") {
            from.push(crate::util::percent_decode(v));
        } else if let Some(l) = kv.strip_prefix("limit=") {
            limit = l.parse().unwrap_or(10);
        }
    }
    let limit = limit.clamp(1, 100);
    let me = s.identity.server_name.to_string();
    let answer = s
        .store
        .read(move |c| {
            let room = resident_room(c, &parse_room_id(&room_id)?, &signed.origin)?;
            if !server_may_read_room(c, &room, &signed.origin)? {
                return Err(Error::forbidden("your server is not in this room"));
            }
            let rows = walk_back(c, &room, &from, &HashSet::new(), limit, true)?;
            let pdus = pdus_for_server(c, &room, &rows, &signed.origin)?;
            Ok(json!({"origin": me, "origin_server_ts": now_ms(), "pdus": pdus}))
        })
        .await?;
    Ok(axum::Json(answer))
}

#[derive(Deserialize)]
struct ProfileQuery {
    user_id: Option<String>,
    field: Option<String>,
}

async fn query_profile(
    State(s): State<AppState>,
    Query(q): Query<ProfileQuery>,
    _signed: Signed,
) -> Result<impl IntoResponse> {
    let user_id = q.user_id.ok_or_else(|| Error::missing_param("user_id is required"))?;
    if !s.identity.is_local_user(&user_id) {
        return Err(Error::invalid_param("user is not on this server"));
    }
    let user = s
        .store
        .read(move |c| crate::store::accounts::get_user(c, &user_id))
        .await?
        .filter(|u| !u.deactivated)
        .ok_or_else(|| Error::not_found("profile not found"))?;
    let mut out = json!({});
    if q.field.as_deref().is_none_or(|f| f == "displayname") {
        if let Some(d) = user.displayname {
            out["displayname"] = json!(d);
        }
    }
    if q.field.as_deref().is_none_or(|f| f == "avatar_url") {
        if let Some(a) = user.avatar_url {
            out["avatar_url"] = json!(a);
        }
    }
    Ok(axum::Json(out))
}

#[derive(Deserialize)]
struct DirectoryQuery {
    room_alias: Option<String>,
}

async fn query_directory(
    State(s): State<AppState>,
    Query(q): Query<DirectoryQuery>,
    _signed: Signed,
) -> Result<impl IntoResponse> {
    let alias = q.room_alias.ok_or_else(|| Error::missing_param("room_alias is required"))?;
    let a = alias.clone();
    let room_id = s
        .store
        .read(move |c| crate::store::rooms::alias_target(c, &a))
        .await?
        .ok_or_else(|| Error::not_found("room alias not found"))?;
    let rid = room_id.clone();
    let mut servers = s
        .store
        .read(move |c| match rooms::room_by_id(c, &rid)? {
            Some(r) => members::servers_in_room(c, r.room_nid),
            None => Ok(vec![]),
        })
        .await?;
    servers.retain(|x| x != s.identity.server_name.as_str());
    servers.insert(0, s.identity.server_name.to_string());
    Ok(axum::Json(json!({"room_id": room_id, "servers": servers})))
}

async fn user_devices(
    State(s): State<AppState>,
    Path(user_id): Path<String>,
    _signed: Signed,
) -> Result<impl IntoResponse> {
    if !s.identity.is_local_user(&user_id) {
        return Err(Error::invalid_param("user is not on this server"));
    }
    let uid = user_id.clone();
    let (devices, stream) = s
        .store
        .read(move |c| {
            let mut out = Vec::new();
            let mut keys: HashMap<String, Value> =
                e2ee::device_keys(c, &uid, &[])?.into_iter().map(|k| (k.device_id, k.keys)).collect();
            for d in crate::store::accounts::list_devices(c, &uid)? {
                let mut dev = json!({"device_id": d.device_id, "device_display_name": d.display_name});
                if let Some(k) = keys.remove(&d.device_id) {
                    dev["keys"] = k;
                }
                out.push(dev);
            }
            let stream = e2ee::latest_device_list_pos(c, &uid)?;
            Ok((out, stream))
        })
        .await?;
    let uid = user_id.clone();
    let cross = s.store.read(move |c| crate::e2ee::query_local(c, "", &[(uid, vec![])])).await?;
    let mut body = json!({"user_id": user_id, "stream_id": stream, "devices": devices});
    if let Some(k) = cross["master_keys"].get(&user_id) {
        body["master_key"] = k.clone();
    }
    if let Some(k) = cross["self_signing_keys"].get(&user_id) {
        body["self_signing_key"] = k.clone();
    }
    Ok(axum::Json(body))
}

/// Device keys and cross-signing keys (master, self-signing; never user-signing) of our users.
async fn user_keys_query(State(s): State<AppState>, signed: Signed) -> Result<impl IntoResponse> {
    let body = signed.body.unwrap_or(Value::Null);
    let identity = s.identity.clone();
    let wanted: Vec<(String, Vec<String>)> = body
        .get("device_keys")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(u, d)| {
                    (
                        u.clone(),
                        d.as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let wanted: Vec<(String, Vec<String>)> = wanted.into_iter().filter(|(u, _)| identity.is_local_user(u)).collect();
    let mut out = s.store.read(move |c| crate::e2ee::query_local(c, "", &wanted)).await?;
    if let Some(o) = out.as_object_mut() {
        o.remove("user_signing_keys");
        // Device display names stay on this server (as Synapse does by default).
        for devices in o.get_mut("device_keys").and_then(Value::as_object_mut).into_iter().flat_map(|m| m.values_mut())
        {
            for keys in devices.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
                if let Some(k) = keys.as_object_mut() {
                    k.remove("unsigned");
                }
            }
        }
    }
    Ok(axum::Json(out))
}

/// One-time (or fallback) keys of our users' devices, claimed for a remote user.
async fn user_keys_claim(State(s): State<AppState>, signed: Signed) -> Result<impl IntoResponse> {
    let body = signed.body.unwrap_or(Value::Null);
    let mut wanted: Vec<(String, String, String)> = Vec::new();
    for (user, devices) in body.get("one_time_keys").and_then(Value::as_object).into_iter().flatten() {
        if !s.identity.is_local_user(user) {
            continue;
        }
        for (device, algorithm) in devices.as_object().into_iter().flatten() {
            if let Some(a) = algorithm.as_str() {
                wanted.push((user.clone(), device.clone(), a.to_owned()));
            }
        }
    }
    let claimed = s.store.write(move |w| crate::e2ee::claim_local(w.db(), &wanted)).await?;
    Ok(axum::Json(json!({"one_time_keys": claimed})))
}

#[derive(Deserialize)]
struct PublicRoomsQuery {
    limit: Option<String>,
    since: Option<String>,
    include_all_networks: Option<String>,
    third_party_instance_id: Option<String>,
}

/// `GET /publicRooms`: our room directory, or an application service network's (`third_party_instance_id`), or
/// all of them (`include_all_networks`), for another server's users.
async fn public_rooms(
    State(s): State<AppState>,
    Query(q): Query<PublicRoomsQuery>,
    _signed: Signed,
) -> Result<impl IntoResponse> {
    let limit = match q.limit.as_deref() {
        Some(l) => Some(l.parse::<u64>().map_err(|_| Error::invalid_param("limit must be a number"))?),
        None => None,
    };
    let all = match q.include_all_networks.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Error::invalid_param("include_all_networks must be true or false")),
    };
    let dir = Directory::of(q.third_party_instance_id.as_deref(), all)?;
    let entries = s.store.read(move |c| crate::room::directory::entries(c, &dir, None)).await?;
    Ok(axum::Json(crate::room::directory::page(entries, limit, q.since.as_deref())))
}

/// `POST /publicRooms`: the same with a body, and a search term (`filter.generic_search_term`).
async fn public_rooms_post(State(s): State<AppState>, signed: Signed) -> Result<impl IntoResponse> {
    let body = signed.body.unwrap_or(Value::Null);
    let limit = match body.get("limit") {
        None | Some(Value::Null) => None,
        Some(l) => Some(l.as_u64().ok_or_else(|| Error::bad_json("limit must be a number"))?),
    };
    let since = body.get("since").and_then(Value::as_str).map(str::to_owned);
    let term =
        body.get("filter").and_then(|f| f.get("generic_search_term")).and_then(Value::as_str).map(str::to_lowercase);
    let all = body.get("include_all_networks").and_then(Value::as_bool).unwrap_or(false);
    let dir = Directory::of(body.get("third_party_instance_id").and_then(Value::as_str), all)?;
    let entries = s.store.read(move |c| crate::room::directory::entries(c, &dir, term.as_deref())).await?;
    Ok(axum::Json(crate::room::directory::page(entries, limit, since.as_deref())))
}
