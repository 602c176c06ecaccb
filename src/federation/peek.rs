//! Peeking into remote rooms over federation, peeking side (MSC2444, unstable prefix `org.matrix.msc2444`).
//!
//! A peek `PUT`s to a resident, stores its answer as a partial-state room with no member of ours
//! ([`crate::room::partial::begin_peek`]), then receives the room's new events in ordinary transactions. While a
//! local user peeks ([`crate::store::peeks`] `local_peeks`) the peek is renewed at half the resident's
//! `renewal_interval` ([`run`]); once nobody here peeks, it is deleted at the resident and the room's data purged
//! (unless a local user joined meanwhile: then the room stays, as any joined room).

use std::sync::Arc;
use std::time::Duration;

use ruma::RoomId;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::inbound::verify_batch;
use crate::federation::FedContext;
use crate::room::partial::{self, PeekedState};
use crate::room::version;
use crate::store::accounts::now_ms;
use crate::store::ids::RoomNid;
use crate::store::{peeks, purge, rooms};

const PREFIX: &str = "/_matrix/federation/unstable/org.matrix.msc2444/peek";

/// Rows per purge transaction (as `hearth room purge`): other writes never wait long behind it.
const PURGE_BATCH: i64 = 1000;

/// What a remote peek came to.
pub enum RemotePeek {
    /// We follow the room now (or already did).
    Following,
    /// None of the servers asked knows the peek API (404/400 `M_UNRECOGNIZED`, or a plain 404/405): the caller
    /// may fall back to a summary.
    Unsupported,
}

/// The small fields of a peek answer (`state` and `auth_chain` are read from the file in batches).
#[derive(serde::Deserialize)]
struct AnswerHead {
    room_version: Option<String>,
    latest_event_id: Option<String>,
    renewal_interval: Option<u64>,
}

fn path_of(room_id: &str, peek_id: &str) -> String {
    format!("{PREFIX}/{}/{}", enc(room_id), enc(peek_id))
}

fn ver_query() -> String {
    version::SUPPORTED.iter().map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&")
}

/// Whether an error answer means "this server has no peek API".
fn unsupported(e: &crate::federation::client::FedError) -> bool {
    matches!(e.status(), Some(404) | Some(405) | Some(400))
        && (e.errcode().is_none() || e.errcode() == Some("M_UNRECOGNIZED"))
}

/// When to renew a peek the resident gave `interval` ms: halfway (never sooner than in a second).
fn renew_at(interval: u64) -> i64 {
    now_ms() + (interval / 2).max(1000) as i64
}

/// Starts following `room_id` through the first of `via` (not us) that accepts a peek.
pub async fn peek(s: &FedContext, room_id: &RoomId, via: &[String]) -> Result<RemotePeek> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let rid = room_id.to_owned();
    let following = s
        .store
        .read(move |c| match rooms::room_by_id(c, rid.as_str())? {
            Some(r) => Ok(peeks::out_of(c, r.room_nid)?.is_some()),
            None => Ok(false),
        })
        .await?;
    if following {
        return Ok(RemotePeek::Following);
    }
    let mut last_err = Error::not_found("no server could be reached to peek into this room");
    let mut all_unsupported = true;
    for server in via.iter().filter(|v| v.as_str() != s.identity.server_name.as_str()) {
        let peek_id = crate::util::random_string(8);
        let path = format!("{}?{}", path_of(room_id.as_str(), &peek_id), ver_query());
        let file = std::env::temp_dir().join(format!(
            "hearth-peek-{}-{}.json",
            std::process::id(),
            crate::util::random_string(8)
        ));
        let started = std::time::Instant::now();
        let sent = fed.client.request_to_file(reqwest::Method::PUT, server, &path, Some(&json!({})), &file).await;
        let answer = match sent {
            Ok(_) => store_answer(s, server, room_id, &peek_id, &file).await,
            Err(e) => {
                tracing::info!(%server, %room_id, error = %e, "peek refused");
                if !unsupported(&e) {
                    all_unsupported = false;
                }
                if e.status() == Some(403) {
                    let _ = tokio::fs::remove_file(&file).await;
                    return Err(Error::forbidden(format!("{server} does not allow peeking into this room")));
                }
                if e.status() == Some(429) {
                    // The resident's limit on peeks (per server or per room): the client may try later.
                    let _ = tokio::fs::remove_file(&file).await;
                    return Err(Error::limit_exceeded(60_000));
                }
                Err(e.into())
            }
        };
        let _ = tokio::fs::remove_file(&file).await;
        match answer {
            Ok(()) => {
                tracing::info!(%room_id, via = %server, ms = started.elapsed().as_millis() as u64, "peeking remote room");
                return Ok(RemotePeek::Following);
            }
            Err(e) => last_err = e,
        }
    }
    if all_unsupported && via.iter().any(|v| v.as_str() != s.identity.server_name.as_str()) {
        return Ok(RemotePeek::Unsupported);
    }
    Err(last_err)
}

/// Verifies and stores a downloaded peek answer, fetches the resident's latest event, and makes a peeked room.
async fn store_answer(
    s: &FedContext,
    server: &str,
    room_id: &RoomId,
    peek_id: &str,
    file: &std::path::Path,
) -> Result<()> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let head: AnswerHead = crate::federation::join::read_answer_head(server, file, "peek").await?;
    let room_version = head.room_version.unwrap_or_else(|| "1".into());
    version::rules(&room_version).map_err(|_| Error::incompatible_room_version(&room_version))?;
    let state_ids = crate::federation::join::store_state_file(s, server, room_id, &room_version, file, "peek").await?;
    let latest = match &head.latest_event_id {
        Some(id) => {
            let got = fed.client.get(server, &format!("/_matrix/federation/v1/event/{}", enc(id))).await?;
            let pdu = got.get("pdus").and_then(Value::as_array).and_then(|a| a.first()).cloned();
            let pdu = pdu.ok_or_else(|| Error::bad_json(format!("{server}: no event {id}")))?;
            let pdu = verify_batch(s, &room_version, vec![pdu])
                .await?
                .pop()
                .ok_or_else(|| Error::bad_json("no event"))?
                .map_err(Error::bad_json)?;
            if pdu.event_id.as_str() != id || pdu.room_id.as_str() != room_id.as_str() {
                return Err(Error::bad_json(format!("{server}: latest event {id} is not that event of this room")));
            }
            Some(pdu)
        }
        None => None,
    };
    let interval = head.renewal_interval.unwrap_or(3_600_000);
    let identity = s.identity.clone();
    let (rid, server, peek_id) = (room_id.to_owned(), server.to_owned(), peek_id.to_owned());
    s.store
        .write(move |w| {
            let peeked = PeekedState {
                room_id: rid.as_str(),
                room_version: &room_version,
                latest: latest.as_ref(),
                state_ids: &state_ids,
            };
            partial::begin_peek(w, &identity, &peeked)?;
            let room = rooms::room_by_id(w.db(), rid.as_str())?.ok_or_else(|| Error::internal("room vanished"))?;
            peeks::set_out(w.db(), room.room_nid, &server, &peek_id, renew_at(interval))
        })
        .await
}

/// Ends our peek of a remote room when no local user peeks it any more: the resident is told (DELETE, best
/// effort: it expires anyway), and the room's data is purged unless a local user is in it now.
pub async fn stop_if_unwatched(s: &FedContext, room_nid: RoomNid) -> Result<()> {
    let ours = s.identity.server_name.to_string();
    let ended = s
        .store
        .write(move |w| {
            let Some(out) = peeks::out_of(w.db(), room_nid)? else { return Ok(None) };
            if peeks::local_peekers(w.db(), room_nid)? > 0 {
                return Ok(None);
            }
            peeks::delete_out(w.db(), room_nid)?;
            let stays = !purge::local_members(w.db(), room_nid, &ours)?.is_empty();
            if !stays {
                purge::forget_room_state(w.db(), room_nid, &out.room_id)?;
            }
            Ok(Some((out, stays)))
        })
        .await?;
    let Some((out, stays)) = ended else { return Ok(()) };
    if !stays {
        // The rest of the purge in short transactions, as `hearth room purge` does.
        while s.store.write_background(move |w| purge::delete_state_groups(w.db(), room_nid, PURGE_BATCH)).await? > 0 {}
        while s.store.write_background(move |w| purge::delete_events(w.db(), room_nid, PURGE_BATCH)).await? > 0 {}
        tracing::info!(room_id = %out.room_id, "peek ended: room purged");
    }
    if let Some(fed) = s.federation.as_ref() {
        let path = path_of(&out.room_id, &out.peek_id);
        if let Err(e) = fed.client.request(reqwest::Method::DELETE, &out.server_name, &path, Some(&json!({}))).await {
            tracing::info!(server = %out.server_name, room_id = %out.room_id, error = %e, "peek DELETE failed (it expires anyway)");
        }
    }
    Ok(())
}

/// Renews due peeks while someone here peeks; ends those nobody looks at, and those the resident no longer
/// accepts (the room stopped being world-readable, or it forgot the peek and refuses a new one).
pub async fn run(s: Arc<FedContext>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        match s.store.read_background(|c| peeks::out_due(c, now_ms())).await {
            Ok(due) => {
                for out in due {
                    if let Err(e) = renew(&s, &out).await {
                        tracing::info!(room_id = %out.room_id, error = %e, "peek renewal failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "peeks unreadable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn renew(s: &FedContext, out: &peeks::PeekOut) -> Result<()> {
    let room_nid = out.room_nid;
    let watched = s.store.read(move |c| peeks::local_peekers(c, room_nid)).await? > 0;
    let Some(fed) = s.federation.as_ref().filter(|_| watched) else {
        return stop_if_unwatched(s, room_nid).await;
    };
    let path = format!("{}?{}", path_of(&out.room_id, &out.peek_id), ver_query());
    match fed.client.request(reqwest::Method::PUT, &out.server_name, &path, Some(&json!({}))).await {
        Ok(v) => {
            let interval = v.get("renewal_interval").and_then(Value::as_u64).unwrap_or(3_600_000);
            let (server, peek_id) = (out.server_name.clone(), out.peek_id.clone());
            s.store.write(move |w| peeks::set_out(w.db(), room_nid, &server, &peek_id, renew_at(interval))).await?;
            tracing::debug!(room_id = %out.room_id, "peek renewed");
            Ok(())
        }
        Err(e) if matches!(e.status(), Some(403) | Some(404)) => {
            // The resident ends the peek (history no longer world-readable, or the room is gone there): so do we.
            tracing::info!(room_id = %out.room_id, error = %e, "peek ended by the resident");
            s.store
                .write(move |w| {
                    let users: Vec<String> = peeks::local_peek_users(w.db(), room_nid)?;
                    for u in users {
                        peeks::delete_local(w.db(), &u, room_nid)?;
                    }
                    Ok(())
                })
                .await?;
            stop_if_unwatched(s, room_nid).await
        }
        Err(e) => {
            // Unreachable for now: try again in a while (the resident keeps the peek until it expires).
            let (server, peek_id) = (out.server_name.clone(), out.peek_id.clone());
            s.store.write(move |w| peeks::set_out(w.db(), room_nid, &server, &peek_id, now_ms() + 5000)).await?;
            Err(e.into())
        }
    }
}
