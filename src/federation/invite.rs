//! Invites across servers, and leaving rooms we only know through an invite.

use ruma::canonical_json::CanonicalJsonObject;
use ruma::{EventId, RoomId, UserId};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::inbound::verify_batch;
use crate::federation::FedContext;
use crate::room::append::commit_built;
use crate::room::{version, Pdu};
use crate::store::{invite_state, rooms};

/// Sends a built invite to the invitee's server for countersigning, then stores and distributes it.
pub async fn send_remote_invite(s: &FedContext, invite: Pdu) -> Result<String> {
    let fed =
        s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled: cannot invite remote users"))?;
    let target = invite.state_key.clone().unwrap_or_default();
    let server = target.split_once(':').map(|x| x.1.to_owned()).ok_or_else(|| Error::invalid_param("bad user id"))?;
    let rid = invite.room_id.to_string();
    let (version, stripped) = s
        .store
        .read(move |c| {
            let room = rooms::room_by_id(c, &rid)?.ok_or_else(|| Error::not_found("unknown room"))?;
            let stripped = crate::room::stripped::stripped_state_pdus(c, &room, "")?;
            Ok((room.version, stripped))
        })
        .await?;
    let body =
        json!({"event": serde_json::to_value(&invite.json)?, "room_version": version, "invite_room_state": stripped});
    let path =
        format!("/_matrix/federation/v2/invite/{}/{}", enc(invite.room_id.as_str()), enc(invite.event_id.as_str()));
    let answer = fed.client.request(reqwest::Method::PUT, &server, &path, Some(&body)).await?;
    let signed = answer.get("event").cloned().ok_or_else(|| Error::internal("invite answer without event"))?;
    let pdu = verify_batch(s, &version, vec![signed])
        .await?
        .pop()
        .ok_or_else(|| Error::internal("no event"))?
        .map_err(Error::internal)?;
    if pdu.event_id != invite.event_id {
        return Err(Error::internal("the invitee's server changed the invite"));
    }
    if ruma::signatures::required_server_signatures_to_verify_event(&pdu.json, &version::rules(&version)?.signatures)
        .is_err()
    {
        return Err(Error::internal("invite lacks signatures"));
    }
    let identity = s.identity.clone();
    let a = s.store.write(move |w| commit_built(w, &identity, &pdu, &[server])).await?;
    Ok(a.event_id)
}

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`: countersign an invite for one of our users.
pub async fn receive_invite(
    s: &FedContext,
    origin: &str,
    room_id: &RoomId,
    event_id: &EventId,
    body: Value,
) -> Result<Value> {
    let room_version = body.get("room_version").and_then(Value::as_str).unwrap_or("1").to_owned();
    let rules = version::rules(&room_version).map_err(|_| Error::incompatible_room_version(&room_version))?;
    let event = body.get("event").cloned().ok_or_else(|| Error::bad_json("missing event"))?;
    // A room we are in applies its server ACL to invites too.
    let (rid, o) = (room_id.to_owned(), origin.to_owned());
    let acl_ok = s
        .store
        .read(move |c| match rooms::room_by_id(c, rid.as_str())? {
            Some(room) => crate::federation::acl::room_allows(c, room.current_sg, &o),
            None => Ok(true),
        })
        .await?;
    if !acl_ok {
        return Err(Error::forbidden("server denied by the room's ACL"));
    }
    let pdu = verify_batch(s, &room_version, vec![event])
        .await?
        .pop()
        .ok_or_else(|| Error::bad_json("no event"))?
        .map_err(Error::forbidden)?;
    let target = pdu.state_key.clone().unwrap_or_default();
    if pdu.event_id.as_str() != event_id || pdu.room_id.as_str() != room_id {
        return Err(Error::bad_json("event id or room id does not match the path"));
    }
    if pdu.kind.to_string() != "m.room.member"
        || pdu.membership().as_deref() != Some("invite")
        || !s.identity.is_local_user(&target)
    {
        return Err(Error::bad_json("not an invite for a user of this server"));
    }
    if pdu.sender.server_name().as_str() != origin {
        return Err(Error::forbidden("invite sender is not from the requesting server"));
    }
    let t = target.clone();
    if !s.store.read(move |c| crate::store::accounts::user_exists(c, &t)).await? {
        return Err(Error::not_found("no such user"));
    }
    let mut obj: CanonicalJsonObject = pdu.json.clone();
    ruma::signatures::sign_event(s.identity.server_name.as_str(), &s.identity.keypair, &mut obj, &rules.redaction)
        .map_err(|e| Error::internal(e.to_string()))?;
    let signed = Pdu::from_canonical(obj, pdu.event_id.clone(), &rules).map_err(Error::internal)?;
    let received: Vec<Value> = body.get("invite_room_state").and_then(Value::as_array).cloned().unwrap_or_default();
    crate::room::stripped::check_received(&received, room_id, &rules)?;
    let mut stripped: Vec<Value> = received.iter().filter_map(crate::room::stripped::received_for_client).collect();
    stripped.retain(|e| {
        e.get("type").and_then(Value::as_str) != Some("m.room.member")
            || e.get("state_key").and_then(Value::as_str) != Some(&target)
    });
    stripped.push(json!({"type": "m.room.member", "state_key": target, "sender": signed.sender.as_str(), "content": signed.content_value(),
                         "event_id": signed.event_id.as_str(), "origin_server_ts": u64::from(signed.origin_server_ts.get())}));
    let identity = s.identity.clone();
    let (rid, ver, p) = (room_id.to_owned(), room_version.clone(), signed.clone());
    let stripped_json = Value::Array(stripped).to_string();
    s.store
        .write(move |w| {
            let room = match rooms::room_by_id(w.db(), rid.as_str())? {
                Some(r) => r,
                None => {
                    let nid = rooms::insert_room(w.db(), rid.as_str(), &ver)?;
                    rooms::room_by_nid(w.db(), nid)?.ok_or_else(|| Error::internal("room vanished"))?
                }
            };
            if room.current_sg.is_some() {
                // We are in the room already: the invite is an ordinary event that will also arrive via /send.
                return Ok(());
            }
            let nid = crate::room::remote::persist_outlier(w.db(), &room, &p)?;
            // Out of band, with a stream position: the push evaluator follows the stream and notifies the invitee.
            let stream = crate::store::ids::StreamPos(w.next_stream());
            crate::store::events::set_out_of_band_stream(w.db(), nid, stream)?;
            invite_state::set(w.db(), room.room_nid, &target, &stripped_json)?;
            crate::room::append::apply_membership(w, &identity, room.room_nid, &target, nid).map(drop)
        })
        .await?;
    Ok(json!({"event": serde_json::to_value(&signed.json)?}))
}

/// Leaves (or rejects an invite to) a room we hold no state for: make_leave/send_leave through `server`.
pub async fn remote_leave(s: &FedContext, user_id: &UserId, room_id: &RoomId, servers: &[String]) -> Result<()> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let mut last = Error::not_found("no server to leave through");
    for server in servers {
        let path = format!("/_matrix/federation/v1/make_leave/{}/{}", enc(room_id.as_str()), enc(user_id.as_str()));
        let made = match fed.client.get(server, &path).await {
            Ok(v) => v,
            Err(e) => {
                last = e.into();
                continue;
            }
        };
        let room_version = made.get("room_version").and_then(Value::as_str).unwrap_or("1").to_owned();
        let rules = version::rules(&room_version)?;
        let mut obj: CanonicalJsonObject = serde_json::from_value(made.get("event").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::internal(e.to_string()))?;
        for k in ["event_id", "signatures", "hashes", "unsigned"] {
            obj.remove(k);
        }
        obj.insert(
            "origin_server_ts".into(),
            ruma::canonical_json::CanonicalJsonValue::Integer(
                ruma::Int::try_from(crate::store::accounts::now_ms()).unwrap_or_default(),
            ),
        );
        if matches!(rules.event_id_format, ruma::room_version_rules::EventIdFormatVersion::V1) {
            obj.insert(
                "event_id".into(),
                ruma::canonical_json::CanonicalJsonValue::String(format!(
                    "${}:{}",
                    crate::util::random_string(18),
                    s.identity.server_name
                )),
            );
        }
        ruma::signatures::hash_and_sign_event(
            s.identity.server_name.as_str(),
            &s.identity.keypair,
            &mut obj,
            &rules.redaction,
        )
        .map_err(|e| Error::internal(e.to_string()))?;
        let event_id = version::event_id(&obj, &rules).map_err(Error::internal)?;
        let path = format!("/_matrix/federation/v2/send_leave/{}/{}", enc(room_id.as_str()), enc(event_id.as_str()));
        match fed.client.request(reqwest::Method::PUT, server, &path, Some(&serde_json::to_value(&obj)?)).await {
            Ok(_) => {
                let pdu = Pdu::from_canonical(obj, event_id, &rules).map_err(Error::internal)?;
                let identity = s.identity.clone();
                let (rid, uid) = (room_id.to_owned(), user_id.to_owned());
                s.store
                    .write(move |w| {
                        let room =
                            rooms::room_by_id(w.db(), rid.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
                        let nid = crate::room::remote::persist_outlier(w.db(), &room, &pdu)?;
                        if room.current_sg.is_none() {
                            // Out of band (no state here): the leave is what the user's `/sync` shows of the room.
                            let stream = crate::store::ids::StreamPos(w.next_stream());
                            crate::store::events::set_out_of_band_stream(w.db(), nid, stream)?;
                        }
                        invite_state::remove(w.db(), room.room_nid, uid.as_str())?;
                        crate::room::append::apply_membership(w, &identity, room.room_nid, uid.as_str(), nid)
                    })
                    .await?;
                return Ok(());
            }
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}
