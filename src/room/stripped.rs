//! Stripped state: what a user invited to (or knocking on) a room sees of it.

use ruma::canonical_json::CanonicalJsonObject;
use ruma::room_version_rules::RoomVersionRules;
use ruma::RoomId;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::room::{state_event, version, Pdu};
use crate::store::ids::StateGroup;
use crate::store::{invite_state, rooms, Db};

/// The state events that preview a room to someone invited or knocking (spec "Stripped state"): the room's
/// identity, `user_id`'s own membership and the membership of whoever sent it.
fn preview_events(c: Db<'_>, sg: StateGroup, user_id: &str) -> Result<Vec<Pdu>> {
    let mut out = Vec::new();
    for (t, k) in [
        ("m.room.create", ""),
        ("m.room.join_rules", ""),
        ("m.room.name", ""),
        ("m.room.avatar", ""),
        ("m.room.topic", ""),
        ("m.room.canonical_alias", ""),
        ("m.room.encryption", ""),
        ("m.room.member", user_id),
    ] {
        if let Some(p) = state_event(c, sg, t, k)? {
            out.push(p);
        }
    }
    // The inviter's membership, so clients can show who invited.
    let inviter = out.iter().find(|p| p.kind.to_string() == "m.room.member").map(|p| p.sender.to_string());
    if let Some(inviter) = inviter.filter(|i| i != user_id) {
        if let Some(p) = state_event(c, sg, "m.room.member", &inviter)? {
            out.push(p);
        }
    }
    Ok(out)
}

/// Stripped state for the client API (`/sync` `invite_state`/`knock_state`). For a room we were invited to over
/// federation, the state that came with the invite.
pub fn stripped_state(c: Db<'_>, room: &rooms::RoomRow, user_id: &str) -> Result<Vec<Value>> {
    let Some(sg) = room.current_sg else {
        let stored = invite_state::get(c, room.room_nid, user_id)?;
        return Ok(stored.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default());
    };
    Ok(preview_events(c, sg, user_id)?
        .iter()
        .map(|p| {
            let kind = p.kind.to_string();
            let own_membership = kind == "m.room.member" && p.state_key.as_deref() == Some(user_id);
            let mut ev = json!({"type": kind, "state_key": p.state_key.as_deref().unwrap_or(""),
                                "content": p.content_value(), "sender": p.sender.as_str()});
            if own_membership {
                ev["event_id"] = json!(p.event_id.as_str());
            }
            if own_membership || kind == "m.room.create" {
                ev["origin_server_ts"] = json!(u64::from(p.origin_server_ts.get()));
            }
            ev
        })
        .collect())
}

/// The same state for another server (`invite_room_state`, `knock_room_state`): since spec v1.16 (MSC4311) whole
/// PDUs in the room version's format, the create event always among them.
pub fn stripped_state_pdus(c: Db<'_>, room: &rooms::RoomRow, user_id: &str) -> Result<Vec<Value>> {
    let Some(sg) = room.current_sg else { return Ok(Vec::new()) };
    preview_events(c, sg, user_id)?.iter().map(|p| Ok(serde_json::to_value(&p.json)?)).collect()
}

/// A state entry received from another server (a whole PDU, or a stripped event from an older server) as the
/// client API shows it: `type`, `state_key`, `content` and `sender`, plus the create event's timestamp.
pub fn received_for_client(entry: &Value) -> Option<Value> {
    let obj = entry.as_object()?;
    let mut out = serde_json::Map::new();
    for key in ["type", "state_key", "content", "sender"] {
        out.insert(key.into(), obj.get(key)?.clone());
    }
    if obj.get("type").and_then(Value::as_str) == Some("m.room.create") {
        if let Some(ts) = obj.get("origin_server_ts") {
            out.insert("origin_server_ts".into(), ts.clone());
        }
    }
    Some(Value::Object(out))
}

/// Checks the state another server sent with an invite or knock answer for room `room_id`: entries naming a
/// different room are refused, and where the room id is the create event's hash (room v12) a whole create event
/// must hash to it (MSC4311). Stripped entries from older servers carry nothing to check and pass.
pub fn check_received(entries: &[Value], room_id: &RoomId, rules: &RoomVersionRules) -> Result<()> {
    for e in entries {
        let Some(obj) = e.as_object() else { return Err(Error::invalid_param("state entry is not an object")) };
        if obj.get("room_id").and_then(Value::as_str).is_some_and(|r| r != room_id.as_str()) {
            return Err(Error::invalid_param("stripped state names another room"));
        }
        let is_pdu = obj.contains_key("hashes") && obj.contains_key("signatures");
        if is_pdu
            && rules.authorization.room_create_event_id_as_room_id
            && obj.get("type") == Some(&json!("m.room.create"))
        {
            let canonical: CanonicalJsonObject = serde_json::from_value(e.clone())
                .map_err(|err| Error::invalid_param(format!("create event is not canonical JSON: {err}")))?;
            let id = version::event_id(&canonical, rules).map_err(Error::invalid_param)?;
            if id.as_str().get(1..) != room_id.as_str().get(1..) {
                return Err(Error::invalid_param("the create event in the stripped state is not this room's"));
            }
        }
    }
    Ok(())
}
