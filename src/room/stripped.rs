//! Stripped state: what a user invited to (or knocking on) a room sees of it.

use serde_json::{json, Value};

use crate::error::Result;
use crate::room::state_event;
use crate::store::{invite_state, rooms, Db};

/// Stripped state shown with an invite: the room's identity and the invite itself.
pub fn stripped_state(c: Db<'_>, room: &rooms::RoomRow, user_id: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let Some(sg) = room.current_sg else {
        // A room we were invited to over federation: the stripped state that came with the invite.
        let stored = invite_state::get(c, room.room_nid, user_id)?;
        return Ok(stored.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default());
    };
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
            let mut ev = json!({"type": t, "state_key": k, "content": p.content_value(), "sender": p.sender.as_str()});
            if t == "m.room.member" {
                ev["event_id"] = json!(p.event_id.as_str());
                ev["origin_server_ts"] = json!(u64::from(p.origin_server_ts.get()));
            }
            out.push(ev);
        }
    }
    // The inviter's membership, so clients can show who invited.
    if let Some(inviter) =
        out.iter().find(|e| e["type"] == "m.room.member").and_then(|e| e["sender"].as_str()).map(str::to_owned)
    {
        if inviter != user_id {
            if let Some(p) = state_event(c, sg, "m.room.member", &inviter)? {
                out.push(json!({"type": "m.room.member", "state_key": inviter, "content": p.content_value(), "sender": p.sender.as_str()}));
            }
        }
    }
    Ok(out)
}
