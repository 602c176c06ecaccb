//! Joining a room that lives on other servers: `make_join`, then `send_join` v2 — with `omit_members=true` by
//! default (MSC3706), so the user is in the room after one round trip and the member list follows in the
//! background (the resync job in `crate::jobs`).

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::Int;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::inbound::verify_batch;
use crate::http::AppState;
use crate::room::append::{persist, Outcome};
use crate::room::remote::persist_outlier;
use crate::room::{state, version, Pdu};
use crate::store::events;

pub struct JoinResult {
    pub room_id: String,
    pub partial: bool,
    pub state_events: usize,
}

/// Joins `room_id` for local `user_id` through the first of `via` that answers.
pub async fn remote_join(
    s: &AppState,
    user_id: &str,
    room_id: &str,
    via: &[String],
    reason: Option<&str>,
) -> Result<JoinResult> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let versions: String = version::SUPPORTED.iter().map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&");
    let mut last_err = Error::not_found("no server could be reached to join this room");
    let mut chosen = None;
    for server in via.iter().filter(|v| v.as_str() != s.identity.server_name.as_str()) {
        let path = format!("/_matrix/federation/v1/make_join/{}/{}?{versions}", enc(room_id), enc(user_id));
        match fed.client.get(server, &path).await {
            Ok(v) => {
                chosen = Some((server.clone(), v));
                break;
            }
            Err(e) => {
                tracing::info!(%server, error = %e, "make_join failed");
                last_err = e.into();
            }
        }
    }
    let (server, made) = chosen.ok_or(last_err)?;
    let room_version = made.get("room_version").and_then(Value::as_str).unwrap_or("1").to_owned();
    let rules = version::rules(&room_version).map_err(|_| {
        Error::matrix(
            axum::http::StatusCode::BAD_REQUEST,
            "M_INCOMPATIBLE_ROOM_VERSION",
            format!("room version {room_version} is not supported"),
        )
    })?;

    // Our join event, from the resident's template.
    let template = made.get("event").cloned().ok_or_else(|| Error::internal("make_join answer without an event"))?;
    let mut obj: CanonicalJsonObject =
        serde_json::from_value(template).map_err(|e| Error::internal(format!("bad make_join template: {e}")))?;
    for k in ["event_id", "signatures", "hashes", "unsigned"] {
        obj.remove(k);
    }
    if obj.get("sender").and_then(|v| if let CanonicalJsonValue::String(s) = v { Some(s.as_str()) } else { None })
        != Some(user_id)
    {
        return Err(Error::internal("make_join template is for another user"));
    }
    obj.insert("origin".into(), CanonicalJsonValue::String(s.identity.server_name.to_string()));
    obj.insert(
        "origin_server_ts".into(),
        CanonicalJsonValue::Integer(Int::try_from(crate::store::accounts::now_ms()).unwrap_or_default()),
    );
    if let (Some(r), Some(CanonicalJsonValue::Object(content))) = (reason, obj.get_mut("content")) {
        content.insert("reason".into(), CanonicalJsonValue::String(r.to_owned()));
    }
    let uid = user_id.to_owned();
    if let Some(u) = s.store.read(move |c| crate::store::accounts::get_user(c, &uid)).await? {
        if let Some(CanonicalJsonValue::Object(content)) = obj.get_mut("content") {
            if let Some(d) = u.displayname {
                content.insert("displayname".into(), CanonicalJsonValue::String(d));
            }
            if let Some(a) = u.avatar_url {
                content.insert("avatar_url".into(), CanonicalJsonValue::String(a));
            }
        }
    }
    if matches!(rules.event_id_format, ruma::room_version_rules::EventIdFormatVersion::V1) {
        obj.insert(
            "event_id".into(),
            CanonicalJsonValue::String(format!("${}:{}", crate::http::random_string(18), s.identity.server_name)),
        );
    }
    ruma::signatures::hash_and_sign_event(
        s.identity.server_name.as_str(),
        &s.identity.keypair,
        &mut obj,
        &rules.redaction,
    )
    .map_err(|e| Error::internal(format!("signing the join failed: {e}")))?;
    let event_id = version::event_id(&obj, &rules).map_err(Error::internal)?;

    let lazy = s.config.federation.lazy_joins;
    let path =
        format!("/_matrix/federation/v2/send_join/{}/{}?omit_members={lazy}", enc(room_id), enc(event_id.as_str()));
    let body = serde_json::to_value(&obj)?;
    let started = std::time::Instant::now();
    // A full join's answer is the whole room (100 MB for a 100k-member room; a resident may ignore
    // omit_members): allow up to the file cap.
    let cap = fed.client.file_cap();
    let answer = fed
        .client
        .request_capped(reqwest::Method::PUT, &server, &path, Some(&body), std::time::Duration::from_secs(600), cap)
        .await?;
    let partial = answer.get("members_omitted").and_then(Value::as_bool).unwrap_or(false);
    let servers_in_room: Vec<String> = answer
        .get("servers_in_room")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    // Restricted joins: the resident countersigned our event and sends it back.
    let join_json = match answer.get("event") {
        Some(ev @ Value::Object(_)) => ev.clone(),
        _ => body,
    };
    let state_raw = answer.get("state").and_then(Value::as_array).cloned().unwrap_or_default();
    let auth_raw = answer.get("auth_chain").and_then(Value::as_array).cloned().unwrap_or_default();
    let n_state = state_raw.len();
    let n_auth = auth_raw.len();

    let mut all = Vec::with_capacity(n_state + n_auth + 1);
    all.push(join_json);
    all.extend(state_raw);
    all.extend(auth_raw);
    let verified = verify_batch(s, &room_version, all).await?;
    let mut it = verified.into_iter();
    let join_pdu = it
        .next()
        .ok_or_else(|| Error::internal("no join event"))?
        .map_err(|e| Error::internal(format!("our join event is invalid: {e}")))?;
    let mut state_pdus = Vec::new();
    let mut auth_pdus = Vec::new();
    for (i, r) in it.enumerate() {
        match r {
            Ok(p) if i < n_state => state_pdus.push(p),
            Ok(p) => auth_pdus.push(p),
            Err(e) => tracing::warn!(%room_id, error = %e, "dropping invalid event from send_join answer"),
        }
    }
    tracing::info!(%room_id, via = %server, partial, state = state_pdus.len(), auth_chain = auth_pdus.len(), ms = started.elapsed().as_millis() as u64, "send_join answered");

    let identity = s.identity.clone();
    let (rid, ver, srv) = (room_id.to_owned(), room_version.clone(), server.clone());
    let n_state_events = state_pdus.len();
    let join_event_id = join_pdu.event_id.to_string();
    s.store
        .write(move |w| {
            persist_join(w, &identity, &rid, &ver, partial, &join_pdu, &state_pdus, &auth_pdus, &srv, &servers_in_room)
        })
        .await?;
    tracing::info!(%room_id, event_id = %join_event_id, partial, ms = started.elapsed().as_millis() as u64, "joined remote room");
    if partial {
        s.jobs.wake();
    }
    Ok(JoinResult { room_id: room_id.to_owned(), partial, state_events: n_state_events })
}

#[allow(clippy::too_many_arguments)]
fn persist_join(
    w: &mut crate::store::Writer<'_>,
    identity: &crate::room::Identity,
    room_id: &str,
    room_version: &str,
    partial: bool,
    join: &Pdu,
    state_pdus: &[Pdu],
    auth_pdus: &[Pdu],
    via: &str,
    servers_in_room: &[String],
) -> Result<()> {
    let conn = w.conn;
    let rules = version::rules(room_version)?;
    let room = match events::room_by_id(conn, room_id)? {
        Some(r) => r,
        None => {
            let nid = events::insert_room(conn, room_id, room_version)?;
            events::room_by_nid(conn, nid)?.ok_or_else(|| Error::internal("room vanished"))?
        }
    };
    conn.execute("UPDATE rooms SET partial_state = ?2 WHERE room_nid = ?1", rusqlite::params![room.room_nid, partial])?;
    let room = events::room_by_nid(conn, room.room_nid)?.ok_or_else(|| Error::internal("room vanished"))?;
    let mut sorted: Vec<&Pdu> = auth_pdus.iter().chain(state_pdus.iter()).collect();
    sorted.sort_by_key(|p| p.depth);
    for p in &sorted {
        if p.room_id.as_str() != room_id {
            continue;
        }
        persist_outlier(conn, &room, p)?;
    }
    let mut map = std::collections::HashMap::new();
    for p in state_pdus {
        if let (Some(k), true) = (&p.state_key, p.room_id.as_str() == room_id) {
            let skn = events::state_key_nid(conn, &p.kind.to_string(), k)?;
            if let Some(nid) = events::event_nid(conn, p.event_id.as_str())? {
                map.insert(skn, nid);
            }
        }
    }
    let sg = state::write_full(conn, room.room_nid, &map)?;
    if partial {
        conn.execute("UPDATE state_groups SET partial = 1 WHERE sg = ?1", [sg])?;
    }
    let ok = if partial {
        crate::room::remote::authorize_partial(conn, &rules, join, sg)
    } else {
        crate::room::append::authorize(conn, &rules, join, Some(sg))
    };
    ok.map_err(|e| Error::forbidden(format!("our join does not pass auth against the room state: {e}")))?;
    // Forget any previous extremities (we were not following the room).
    conn.execute("DELETE FROM forward_extremities WHERE room_nid = ?1", [room.room_nid])?;
    persist(w, identity, &room, &rules, join, Some(sg), Outcome::Accepted, None)?;
    if partial {
        let mut stmt = w
            .conn
            .prepare_cached("INSERT OR IGNORE INTO partial_state_servers (room_nid, server_name) VALUES (?1, ?2)")?;
        for srv in servers_in_room.iter().chain(std::iter::once(&via.to_owned())) {
            stmt.execute(rusqlite::params![room.room_nid, srv])?;
        }
        let cursor = json!({"join_event": join.event_id.as_str(), "via": via, "servers": servers_in_room, "sg": sg});
        crate::jobs::enqueue(w.conn, "resync", Some(room.room_nid), 10, &cursor)?;
    }
    Ok(())
}
