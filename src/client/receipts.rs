//! Typing notifications, read receipts and the fully-read marker.
//!
//! Receipts live in the `receipts` table (public `m.read`, private `m.read.private`); the fully-read marker is the
//! room account data `m.fully_read`, as the spec defines it. Every change takes a stream position so /sync sees it.
//! With federation on, typing and public receipts also go to the other servers in the room as EDUs.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::receipts::{self, NewReceipt};
use crate::store::{account_data, accounts, events, members, outbox, rooms, Db};

fn is_joined(c: Db<'_>, room_nid: RoomNid, user_id: &str) -> Result<bool> {
    Ok(members::membership_of(c, room_nid, user_id)?.is_some_and(|(m, _)| m == "join"))
}

/// Queues `edu` for every other server with a joined member in the room.
fn send_to_room_servers(conn: Db<'_>, room_nid: RoomNid, our_server: &str, edu: &Value) -> Result<()> {
    let edu = edu.to_string();
    for server in members::joined_servers(conn, room_nid)?.into_iter().filter(|x| x != our_server) {
        outbox::enqueue_edu(conn, &server, &edu)?;
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct TypingBody {
    typing: bool,
    timeout: Option<u64>,
}

pub async fn typing(
    State(s): State<AppState>,
    auth: Auth,
    Path((room_id, user_id)): Path<(String, String)>,
    Json(body): Json<TypingBody>,
) -> Result<impl IntoResponse> {
    if user_id != auth.user_id {
        return Err(Error::forbidden("cannot set the typing state of another user"));
    }
    let (r, u, our_server) = (room_id.clone(), user_id.clone(), s.identity.server_name.to_string());
    // The room, if the user is joined, and whether other servers are in it.
    let joined = s
        .store
        .read(move |c| {
            let Some(room) = rooms::room_by_id(c, &r)? else { return Ok(None) };
            if !is_joined(c, room.room_nid, &u)? {
                return Ok(None);
            }
            let remote = members::joined_servers(c, room.room_nid)?.iter().any(|x| *x != our_server);
            Ok(Some((room.room_nid, remote)))
        })
        .await?;
    let Some((room_nid, remote)) = joined else { return Err(Error::forbidden("you are not joined to this room")) };
    // Typing::set caps the timeout; 30 s is what clients expect when they send none.
    s.typing.set(
        &crate::room::parse_room_id(&room_id)?,
        &auth.user_id,
        body.typing,
        Duration::from_millis(body.timeout.unwrap_or(30_000)),
    );
    if remote && s.federation.is_some() {
        let edu =
            json!({"edu_type": "m.typing", "content": {"room_id": room_id, "user_id": user_id, "typing": body.typing}});
        let our_server = s.identity.server_name.to_string();
        s.store.write(move |w| send_to_room_servers(w.db(), room_nid, &our_server, &edu)).await?;
    }
    Ok(axum::Json(json!({})))
}

/// One marker to move: a receipt of `receipt_type` (with its thread), or the fully-read marker.
struct Marker {
    receipt_type: String,
    event_id: String,
    thread_id: String,
}

/// The room the user is joined to, and the stream position of `event_id` in it (403 / 404 otherwise).
fn check_event(c: Db<'_>, room_id: &str, user_id: &str, event_id: &str) -> Result<(RoomNid, Option<StreamPos>)> {
    let room = rooms::room_by_id(c, room_id)?.ok_or_else(|| Error::forbidden("you are not joined to this room"))?;
    if !is_joined(c, room.room_nid, user_id)? {
        return Err(Error::forbidden("you are not joined to this room"));
    }
    let ev = events::event_by_id(c, event_id)?.filter(|e| e.room_nid == room.room_nid);
    let ev = ev.ok_or_else(|| Error::not_found(format!("event {event_id} not found in this room")))?;
    Ok((room.room_nid, ev.stream_ordering))
}

/// Moves all markers in one transaction (a bad event id leaves every marker where it was).
async fn set_markers(s: &AppState, auth: &Auth, room_id: &str, markers: Vec<Marker>) -> Result<()> {
    if markers.is_empty() {
        return Ok(());
    }
    let (room_id, user_id) = (room_id.to_owned(), auth.user_id.clone());
    let (federating, our_server) = (s.federation.is_some(), s.identity.server_name.to_string());
    s.store
        .write(move |w| {
            for m in &markers {
                let (room_nid, event_pos) = check_event(w.db(), &room_id, user_id.as_str(), &m.event_id)?;
                if m.receipt_type == "m.fully_read" {
                    // Like receipts, the marker never moves back to an older event.
                    let old = account_data::get(w.db(), user_id.as_str(), &room_id, "m.fully_read")?;
                    let old_pos = match old.as_ref().and_then(|o| o["event_id"].as_str()) {
                        Some(id) => events::event_by_id(w.db(), id)?.and_then(|e| e.stream_ordering),
                        None => None,
                    };
                    if old_pos.zip(event_pos).is_some_and(|(o, n)| n <= o) {
                        continue;
                    }
                    account_data::set(w, user_id.as_str(), &room_id, "m.fully_read", &json!({"event_id": m.event_id}))?;
                } else {
                    let ts = accounts::now_ms();
                    let r = NewReceipt {
                        room_nid: room_nid.0,
                        receipt_type: &m.receipt_type,
                        user_id: user_id.as_str(),
                        thread_id: &m.thread_id,
                        event_id: &m.event_id,
                        ts,
                    };
                    // Private receipts stay on this server.
                    if receipts::upsert(w, &r)? && federating && m.receipt_type == "m.read" {
                        let mut data = json!({"ts": ts});
                        if !m.thread_id.is_empty() {
                            data["thread_id"] = json!(m.thread_id);
                        }
                        let receipt = json!({"event_ids": [m.event_id], "data": data});
                        let edu =
                            json!({"edu_type": "m.receipt", "content": {&room_id: {"m.read": {&user_id: receipt}}}});
                        send_to_room_servers(w.db(), room_nid, &our_server, &edu)?;
                    }
                }
            }
            Ok(())
        })
        .await
}

fn check_event_id(event_id: &str) -> Result<()> {
    ruma::EventId::parse(event_id).map(|_| ()).map_err(|e| Error::invalid_param(format!("invalid event id: {e}")))
}

pub async fn receipt(
    State(s): State<AppState>,
    auth: Auth,
    Path((room_id, receipt_type, event_id)): Path<(String, String, String)>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    if !matches!(receipt_type.as_str(), "m.read" | "m.read.private" | "m.fully_read") {
        return Err(Error::invalid_param(format!("unknown receipt type `{receipt_type}`")));
    }
    check_event_id(&event_id)?;
    let thread_id = match body.get("thread_id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(t)) if !t.is_empty() && receipt_type != "m.fully_read" => t.clone(),
        Some(Value::String(_)) if receipt_type == "m.fully_read" => {
            return Err(Error::invalid_param("m.fully_read markers cannot have a thread_id"))
        }
        Some(_) => return Err(Error::invalid_param("thread_id must be a non-empty string")),
    };
    set_markers(&s, &auth, &room_id, vec![Marker { receipt_type, event_id, thread_id }]).await?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct ReadMarkers {
    #[serde(rename = "m.fully_read")]
    fully_read: Option<String>,
    #[serde(rename = "m.read")]
    read: Option<String>,
    #[serde(rename = "m.read.private")]
    read_private: Option<String>,
}

pub async fn read_markers(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<ReadMarkers>,
) -> Result<impl IntoResponse> {
    let mut markers = Vec::new();
    for (t, id) in [("m.fully_read", body.fully_read), ("m.read", body.read), ("m.read.private", body.read_private)] {
        if let Some(event_id) = id {
            check_event_id(&event_id)?;
            markers.push(Marker { receipt_type: t.to_owned(), event_id, thread_id: String::new() });
        }
    }
    set_markers(&s, &auth, &room_id, markers).await?;
    Ok(axum::Json(json!({})))
}
