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
use crate::room::remote::persist_outlier_batch;
use crate::room::{state, version, Pdu};
use crate::store::{events, rooms};

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
    let rules = version::rules(&room_version).map_err(|_| Error::incompatible_room_version(&room_version))?;

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
    // The answer goes to a file and is read back in batches: a full join's answer is the whole room (100 MB for a
    // 100k-member room, and a resident may ignore omit_members), which as one JSON value cost 1.6 GB of memory.
    let file = std::env::temp_dir().join(format!(
        "hearth-send-join-{}-{}.json",
        std::process::id(),
        crate::http::random_string(8)
    ));
    let answer = async {
        fed.client.request_to_file(reqwest::Method::PUT, &server, &path, Some(&body), &file).await?;
        store_join_answer(s, &server, room_id, &room_version, &file, body).await
    }
    .await;
    let _ = tokio::fs::remove_file(&file).await;
    let JoinAnswer { partial, join_pdu, state_ids, servers_in_room } = answer?;
    tracing::info!(%room_id, via = %server, partial, state = state_ids.len(), ms = started.elapsed().as_millis() as u64, "send_join answered and stored");

    let identity = s.identity.clone();
    let (rid, ver, srv) = (room_id.to_owned(), room_version.clone(), server.clone());
    let n_state_events = state_ids.len();
    let join_event_id = join_pdu.event_id.to_string();
    s.store
        .write(move |w| persist_join(w, &identity, &rid, &ver, partial, &join_pdu, &state_ids, &srv, &servers_in_room))
        .await?;
    tracing::info!(%room_id, event_id = %join_event_id, partial, ms = started.elapsed().as_millis() as u64, "joined remote room");
    if partial {
        s.jobs.wake();
    }
    Ok(JoinResult { room_id: room_id.to_owned(), partial, state_events: n_state_events })
}

/// What a stored `send_join` answer left to do: the join itself (as the resident may have countersigned it) on
/// top of the listed state, whose events are stored by then.
struct JoinAnswer {
    partial: bool,
    join_pdu: Pdu,
    state_ids: Vec<String>,
    servers_in_room: Vec<String>,
}

/// The small fields of a `send_join` answer; `state` and `auth_chain` are skipped here (not parsed into trees).
#[derive(serde::Deserialize)]
struct AnswerHead {
    #[serde(default)]
    members_omitted: bool,
    #[serde(default)]
    servers_in_room: Vec<String>,
    #[serde(default)]
    event: Option<Value>,
}

/// Events of a `send_join` answer verified and stored per batch.
const BATCH: usize = 200;

/// Reads a downloaded `send_join` answer: fetches every signing key it needs in one go, then verifies and stores
/// its auth chain and state as outliers in batches (bounded memory whatever the room's size). Events that fail
/// verification are dropped, as before; the state ids kept are those stored.
async fn store_join_answer(
    s: &AppState,
    server: &str,
    room_id: &str,
    room_version: &str,
    file: &std::path::Path,
    our_join: Value,
) -> Result<JoinAnswer> {
    let f = file.to_owned();
    let head: AnswerHead = tokio::task::spawn_blocking(move || -> std::result::Result<AnswerHead, String> {
        let reader = std::io::BufReader::new(std::fs::File::open(&f).map_err(|e| e.to_string())?);
        serde_json::from_reader(reader).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))?
    .map_err(|e| Error::bad_json(format!("{server}: unreadable send_join answer: {e}")))?;
    // Restricted joins: the resident countersigned our event and sends it back.
    let join_json = match head.event {
        Some(ev @ Value::Object(_)) => ev,
        _ => our_join,
    };
    let join_pdu = verify_batch(s, room_version, vec![join_json])
        .await?
        .pop()
        .ok_or_else(|| Error::internal("no join event"))?
        .map_err(|e| Error::internal(format!("our join event is invalid: {e}")))?;

    if let Some(fed) = s.federation.as_ref() {
        let f = file.to_owned();
        let need = tokio::task::spawn_blocking(move || {
            crate::federation::stream::keys_needed_by_file(&f, &["state", "auth_chain"])
        })
        .await;
        if let Ok(Ok(need)) = need {
            if let Err(e) = fed.keys.keys_for(&need).await {
                tracing::info!(error = %e, "send_join: key prefetch failed");
            }
        }
    }
    let (rid, ver) = (room_id.to_owned(), room_version.to_owned());
    s.store
        .write(move |w| {
            if rooms::room_by_id(w.conn, &rid)?.is_none() {
                rooms::insert_room(w.conn, &rid, &ver)?;
            }
            Ok(())
        })
        .await?;
    // The auth chain first, then the state (whose ids are the room's state at our join).
    let _ = store_array(s, server, room_id, room_version, file, "auth_chain").await?;
    let state_ids = store_array(s, server, room_id, room_version, file, "state").await?;
    Ok(JoinAnswer { partial: head.members_omitted, join_pdu, state_ids, servers_in_room: head.servers_in_room })
}

/// Verifies and stores (as outliers) the PDUs of one array of the answer in `file`; returns the ids of those
/// that are this room's and valid.
async fn store_array(
    s: &AppState,
    server: &str,
    room_id: &str,
    room_version: &str,
    file: &std::path::Path,
    key: &'static str,
) -> Result<Vec<String>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Box<serde_json::value::RawValue>>>(2);
    let f = file.to_owned();
    let producer = tokio::task::spawn_blocking(move || {
        let reader = std::io::BufReader::new(std::fs::File::open(&f).map_err(|e| e.to_string())?);
        crate::federation::stream::for_each_pdu_batch(reader, &[key], BATCH, &mut |batch| {
            tx.blocking_send(batch).is_ok()
        })
    });
    let mut ids = Vec::new();
    // Verify batch k+1 while the writer stores batch k.
    let mut pending: Option<tokio::task::JoinHandle<Result<()>>> = None;
    while let Some(batch) = rx.recv().await {
        let mut verified = Vec::with_capacity(batch.len());
        for r in crate::federation::inbound::verify_batch_raw(s, room_version, batch).await? {
            match r {
                Ok(p) if p.room_id.as_str() == room_id => verified.push(p),
                Ok(p) => {
                    tracing::warn!(%room_id, event_id = %p.event_id, "dropping event of another room from send_join answer")
                }
                Err(e) => tracing::warn!(%room_id, error = %e, "dropping invalid event from send_join answer"),
            }
        }
        ids.extend(verified.iter().map(|p| p.event_id.to_string()));
        if let Some(p) = pending.take() {
            p.await.map_err(|e| Error::internal(e.to_string()))??;
        }
        let (rid, store) = (room_id.to_owned(), s.store.clone());
        pending = Some(tokio::spawn(async move {
            store.write(move |w| persist_outlier_batch(w.conn, &rid, verified)).await.map(drop)
        }));
    }
    if let Some(p) = pending.take() {
        p.await.map_err(|e| Error::internal(e.to_string()))??;
    }
    producer
        .await
        .map_err(|e| Error::internal(e.to_string()))?
        .map_err(|e| Error::bad_json(format!("{server}: unreadable send_join answer: {e}")))?;
    Ok(ids)
}

#[allow(clippy::too_many_arguments)]
fn persist_join(
    w: &mut crate::store::Writer<'_>,
    identity: &crate::room::Identity,
    room_id: &str,
    room_version: &str,
    partial: bool,
    join: &Pdu,
    state_ids: &[String],
    via: &str,
    servers_in_room: &[String],
) -> Result<()> {
    let conn = w.conn;
    let rules = version::rules(room_version)?;
    let room = match rooms::room_by_id(conn, room_id)? {
        Some(r) => r,
        None => {
            let nid = rooms::insert_room(conn, room_id, room_version)?;
            rooms::room_by_nid(conn, nid)?.ok_or_else(|| Error::internal("room vanished"))?
        }
    };
    conn.execute("UPDATE rooms SET partial_state = ?2 WHERE room_nid = ?1", rusqlite::params![room.room_nid, partial])?;
    let room = rooms::room_by_nid(conn, room.room_nid)?.ok_or_else(|| Error::internal("room vanished"))?;
    // The state events were stored as outliers while the answer was read.
    let mut map = std::collections::HashMap::new();
    for id in state_ids {
        if let Some(row) = events::event_by_id(conn, id)? {
            if let (Some(skn), true) = (row.state_key_nid, row.room_nid == room.room_nid) {
                map.insert(skn, row.event_nid);
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
        crate::jobs::enqueue(w.conn, "resync", Some(room.room_nid.0), 10, &cursor)?;
    }
    Ok(())
}
