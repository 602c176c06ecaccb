//! Joining a room that lives on other servers: `make_join`, then `send_join` v2 — with `omit_members=true` by
//! default (MSC3706), so the user is in the room after one round trip and the member list follows in the
//! background (the resync: `crate::federation::resync`, steps in `crate::room::partial`).

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::{RoomId, UserId};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::federation::batches::{Pipeline, Remote};
use crate::federation::client::enc;
use crate::federation::inbound::verify_batch;
use crate::federation::FedContext;
use crate::room::partial::{self, JoinedState};
use crate::room::{version, Pdu};
use crate::store::rooms;

pub struct JoinResult {
    pub room_id: String,
    pub partial: bool,
    pub state_events: usize,
}

/// Joins `room_id` for local `user_id` through the first of `via` that answers.
pub async fn remote_join(
    s: &FedContext,
    user_id: &UserId,
    room_id: &RoomId,
    via: &[String],
    reason: Option<&str>,
) -> Result<JoinResult> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let (server, made) = make_join(s, user_id, room_id, via).await?;
    let room_version = made.get("room_version").and_then(Value::as_str).unwrap_or("1").to_owned();
    let rules = version::rules(&room_version).map_err(|_| Error::incompatible_room_version(&room_version))?;
    let obj = join_from_template(s, user_id, &made, &rules, reason).await?;
    let event_id = version::event_id(&obj, &rules).map_err(Error::internal)?;

    let lazy = s.config.federation.lazy_joins;
    let path = format!(
        "/_matrix/federation/v2/send_join/{}/{}?omit_members={lazy}",
        enc(room_id.as_str()),
        enc(event_id.as_str())
    );
    let body = serde_json::to_value(&obj)?;
    let started = std::time::Instant::now();
    // The answer goes to a file and is read back in batches: a full join's answer is the whole room (100 MB for a
    // 100k-member room, and a resident may ignore omit_members), which as one JSON value cost 1.6 GB of memory.
    let file = std::env::temp_dir().join(format!(
        "hearth-send-join-{}-{}.json",
        std::process::id(),
        crate::util::random_string(8)
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
        .write(move |w| {
            let joined = JoinedState {
                room_id: rid.as_str(),
                room_version: &ver,
                partial,
                join: &join_pdu,
                state_ids: &state_ids,
                via: &srv,
                servers_in_room: &servers_in_room,
            };
            partial::begin(w, &identity, &joined)
        })
        .await?;
    tracing::info!(%room_id, event_id = %join_event_id, partial, ms = started.elapsed().as_millis() as u64, "joined remote room");
    if partial {
        s.jobs.wake();
    }
    Ok(JoinResult { room_id: room_id.to_string(), partial, state_events: n_state_events })
}

/// `make_join` for `user_id` through the first of `via` (not us) that answers: that server and its answer.
async fn make_join(s: &FedContext, user_id: &UserId, room_id: &RoomId, via: &[String]) -> Result<(String, Value)> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let versions: String = version::SUPPORTED.iter().map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&");
    let mut last_err = Error::not_found("no server could be reached to join this room");
    for server in via.iter().filter(|v| v.as_str() != s.identity.server_name.as_str()) {
        let path =
            format!("/_matrix/federation/v1/make_join/{}/{}?{versions}", enc(room_id.as_str()), enc(user_id.as_str()));
        match fed.client.get(server, &path).await {
            Ok(v) => return Ok((server.clone(), v)),
            Err(e) => {
                tracing::info!(%server, error = %e, "make_join failed");
                last_err = e.into();
            }
        }
    }
    Err(last_err)
}

/// Our join event from a resident's `make_join` template: our origin, time, reason and profile, hashed and signed.
async fn join_from_template(
    s: &FedContext,
    user_id: &UserId,
    made: &Value,
    rules: &ruma::room_version_rules::RoomVersionRules,
    reason: Option<&str>,
) -> Result<CanonicalJsonObject> {
    let mut obj = crate::federation::template::event_of(made, "make_join")?;
    if obj.get("sender").and_then(|v| if let CanonicalJsonValue::String(s) = v { Some(s.as_str()) } else { None })
        != Some(user_id.as_str())
    {
        return Err(Error::internal("make_join template is for another user"));
    }
    let uid = user_id.to_owned();
    if let Some(u) = s.store.read(move |c| crate::store::accounts::get_user(c, uid.as_str())).await? {
        if let Some(CanonicalJsonValue::Object(content)) = obj.get_mut("content") {
            if let Some(d) = u.displayname {
                content.insert("displayname".into(), CanonicalJsonValue::String(d));
            }
            if let Some(a) = u.avatar_url {
                content.insert("avatar_url".into(), CanonicalJsonValue::String(a));
            }
        }
    }
    crate::federation::template::stamp_and_sign(&s.identity, &mut obj, rules, reason, "join")?;
    Ok(obj)
}

/// Joins a room we are already in (and hold the state of) through another resident, for a join none of our
/// users may authorise (a restricted room where no local member can invite; Synapse's "remote join"): the
/// resident's countersigned join is then handled as any event of the room.
pub async fn remote_join_resident(
    s: &FedContext,
    user_id: &UserId,
    room_id: &RoomId,
    via: &[String],
    reason: Option<&str>,
) -> Result<()> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let (server, made) = make_join(s, user_id, room_id, via).await?;
    let room_version = made.get("room_version").and_then(Value::as_str).unwrap_or("1").to_owned();
    let rules = version::rules(&room_version).map_err(|_| Error::incompatible_room_version(&room_version))?;
    let obj = join_from_template(s, user_id, &made, &rules, reason).await?;
    let event_id = version::event_id(&obj, &rules).map_err(Error::internal)?;
    let path = format!(
        "/_matrix/federation/v2/send_join/{}/{}?omit_members=true",
        enc(room_id.as_str()),
        enc(event_id.as_str())
    );
    let ours = serde_json::to_value(&obj)?;
    let answer = fed.client.request(reqwest::Method::PUT, &server, &path, Some(&ours)).await?;
    let join_json = match answer.get("event") {
        Some(ev @ Value::Object(_)) => ev.clone(),
        _ => ours,
    };
    let pdu = verify_batch(s, &room_version, vec![join_json])
        .await?
        .pop()
        .ok_or_else(|| Error::internal("no join event"))?
        .map_err(|e| Error::internal(format!("our join event is invalid: {e}")))?;
    let outcome = crate::federation::inbound::ingest(
        s,
        &server,
        room_id,
        pdu,
        crate::federation::inbound::OnUnknownState::UseCurrentState,
    )
    .await?;
    let (rid, uid) = (room_id.to_owned(), user_id.to_owned());
    let joined = s
        .store
        .read(move |c| match rooms::room_by_id(c, rid.as_str())? {
            Some(r) => {
                Ok(crate::store::members::membership_of(c, r.room_nid, uid.as_str())?.is_some_and(|m| m.0 == "join"))
            }
            None => Ok(false),
        })
        .await?;
    if !joined {
        return Err(Error::forbidden(format!("the join through {server} was not accepted here: {outcome}")));
    }
    tracing::info!(%room_id, via = %server, "joined through another resident");
    Ok(())
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

/// The top-level fields `T` of a downloaded answer (`send_join`, a peek), read from the file on a blocking thread;
/// serde skips the big arrays without keeping them.
pub(crate) async fn read_answer_head<T: serde::de::DeserializeOwned + Send + 'static>(
    server: &str,
    file: &std::path::Path,
    what: &str,
) -> Result<T> {
    let f = file.to_owned();
    tokio::task::spawn_blocking(move || -> std::result::Result<T, String> {
        let reader = std::io::BufReader::new(std::fs::File::open(&f).map_err(|e| e.to_string())?);
        serde_json::from_reader(reader).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))?
    .map_err(|e| Error::bad_json(format!("{server}: unreadable {what} answer: {e}")))
}

/// Reads a downloaded `send_join` answer: fetches every signing key it needs in one go, then verifies and stores
/// its auth chain and state as outliers in batches (bounded memory whatever the room's size). Events that fail
/// verification are dropped, as before; the state ids kept are those stored.
async fn store_join_answer(
    s: &FedContext,
    server: &str,
    room_id: &RoomId,
    room_version: &str,
    file: &std::path::Path,
    our_join: Value,
) -> Result<JoinAnswer> {
    let head: AnswerHead = read_answer_head(server, file, "send_join").await?;
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

    let state_ids = store_state_file(s, server, room_id, room_version, file, "send_join").await?;
    Ok(JoinAnswer { partial: head.members_omitted, join_pdu, state_ids, servers_in_room: head.servers_in_room })
}

/// Verifies and stores (as outliers, in batches: bounded memory whatever the room's size) the `auth_chain` and
/// `state` of a downloaded answer (`what`: `send_join`, a peek), creating the room's row if needed; every signing
/// key it needs is fetched in one go first. Events that fail verification are dropped; returns the state ids
/// stored.
pub(crate) async fn store_state_file(
    s: &FedContext,
    server: &str,
    room_id: &RoomId,
    room_version: &str,
    file: &std::path::Path,
    what: &str,
) -> Result<Vec<String>> {
    let (rid, ver) = (room_id.to_owned(), room_version.to_owned());
    s.store
        .write(move |w| {
            if rooms::room_by_id(w.db(), rid.as_str())?.is_none() {
                rooms::insert_room(w.db(), rid.as_str(), &ver)?;
            }
            Ok(())
        })
        .await?;
    let pipeline = Pipeline { remote: Remote::of(s)?, room_id, room_version, background: false, keep_ids: true };
    pipeline.prefetch_keys(file, &["state", "auth_chain"]).await;
    // The auth chain first, then the state (whose ids are the room's state).
    let unreadable = |e: String| Error::bad_json(format!("{server}: unreadable {what} answer: {e}"));
    let chain = pipeline.from_file(file, &["auth_chain"]).await?;
    if let Some(e) = chain.source_error {
        return Err(unreadable(e));
    }
    let state = pipeline.from_file(file, &["state"]).await?;
    if let Some(e) = state.source_error {
        return Err(unreadable(e));
    }
    Ok(state.ids)
}
