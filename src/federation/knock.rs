//! Knocking on a room that lives on other servers: `make_knock`, then `send_knock`; the knock and the stripped
//! state the resident answers with are kept like a federated invite's (the room stays without state here).

use ruma::canonical_json::CanonicalJsonValue;
use ruma::{RoomId, UserId};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::FedContext;
use crate::room::{version, Pdu};
use crate::store::{invite_state, rooms};

/// Knocks on `room_id` for local `user_id` through the first of `via` that answers `make_knock`.
pub async fn remote_knock(
    s: &FedContext,
    user_id: &UserId,
    room_id: &RoomId,
    via: &[String],
    reason: Option<&str>,
) -> Result<()> {
    // Typed at the boundary; below, ids go into URLs, JSON and store calls as text.
    let (user_id, room_id) = (user_id.as_str(), room_id.as_str());
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let versions: String = version::SUPPORTED.iter().map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&");
    let mut last_err = Error::not_found("no server could be reached to knock on this room");
    for server in via.iter().filter(|v| v.as_str() != s.identity.server_name.as_str()) {
        let path = format!("/_matrix/federation/v1/make_knock/{}/{}?{versions}", enc(room_id), enc(user_id));
        let made = match fed.client.get(server, &path).await {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(%server, error = %e, "make_knock failed");
                last_err = e.into();
                continue;
            }
        };
        let (pdu, room_version) = sign_knock(s, user_id, &made, reason)?;
        let path = format!("/_matrix/federation/v1/send_knock/{}/{}", enc(room_id), enc(pdu.event_id.as_str()));
        let answer = match fed
            .client
            .request(reqwest::Method::PUT, server, &path, Some(&serde_json::to_value(&pdu.json)?))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(%server, error = %e, "send_knock failed");
                last_err = e.into();
                continue;
            }
        };
        let mut answer = answer;
        let entries = answer.get("knock_room_state").and_then(Value::as_array).cloned().unwrap_or_default();
        if let Err(e) = crate::room::stripped::check_received(&entries, &pdu.room_id, &version::rules(&room_version)?) {
            // The knock stands (the resident accepted it); a preview that fails the checks is not shown.
            tracing::warn!(%server, error = %e, "knock_room_state refused");
            answer["knock_room_state"] = Value::Array(Vec::new());
        }
        let stripped = knock_state(&answer, &pdu, user_id);
        let (identity, rid, uid) = (s.identity.clone(), room_id.to_owned(), user_id.to_owned());
        s.store
            .write(move |w| {
                let room = match rooms::room_by_id(w.db(), &rid)? {
                    Some(r) => r,
                    None => {
                        let nid = rooms::insert_room(w.db(), &rid, &room_version)?;
                        rooms::room_by_nid(w.db(), nid)?.ok_or_else(|| Error::internal("room vanished"))?
                    }
                };
                let nid = crate::room::remote::persist_outlier(w.db(), &room, &pdu)?;
                if room.current_sg.is_none() {
                    invite_state::set(w.db(), room.room_nid, &uid, &stripped.to_string())?;
                }
                crate::room::append::apply_membership(w, &identity, room.room_nid, &uid, nid)
            })
            .await?;
        return Ok(());
    }
    Err(last_err)
}

/// Our knock event from a `make_knock` answer's template, signed; with the room's version.
fn sign_knock(s: &FedContext, user_id: &str, made: &Value, reason: Option<&str>) -> Result<(Pdu, String)> {
    let room_version = made.get("room_version").and_then(Value::as_str).unwrap_or("1").to_owned();
    let rules = version::rules(&room_version).map_err(|_| Error::incompatible_room_version(&room_version))?;
    let mut obj = crate::federation::template::event_of(made, "make_knock")?;
    let is_ours = |k: &str| matches!(obj.get(k), Some(CanonicalJsonValue::String(v)) if v == user_id);
    let is_knock = matches!(obj.get("content"), Some(CanonicalJsonValue::Object(c))
        if matches!(c.get("membership"), Some(CanonicalJsonValue::String(m)) if m == "knock"));
    if !is_ours("sender") || !is_ours("state_key") || !is_knock {
        return Err(Error::internal("make_knock template is not a knock of this user"));
    }
    crate::federation::template::stamp_and_sign(&s.identity, &mut obj, &rules, reason, "knock")?;
    let event_id = version::event_id(&obj, &rules).map_err(Error::internal)?;
    let pdu = Pdu::from_canonical(obj, event_id, &rules).map_err(Error::internal)?;
    Ok((pdu, room_version))
}

/// The stripped state the resident answered with, our own membership replaced by the knock itself (what the
/// knocking user's `/sync` shows under `knock`).
fn knock_state(answer: &Value, knock: &Pdu, user_id: &str) -> Value {
    let mut stripped: Vec<Value> = answer
        .get("knock_room_state")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(crate::room::stripped::received_for_client)
        .collect();
    stripped.retain(|e| {
        e.get("type").and_then(Value::as_str) != Some("m.room.member")
            || e.get("state_key").and_then(Value::as_str) != Some(user_id)
    });
    stripped.push(json!({"type": "m.room.member", "state_key": user_id, "sender": user_id,
        "content": knock.content_value(), "event_id": knock.event_id.as_str(),
        "origin_server_ts": u64::from(knock.origin_server_ts.get())}));
    Value::Array(stripped)
}
