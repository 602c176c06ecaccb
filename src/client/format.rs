//! Shaping stored events for clients.

use serde_json::{json, Value};

use crate::error::Result;
use crate::room::pdu::client_event;
use crate::store::accounts::now_ms;
use crate::store::events::{self, EventRow};
use crate::store::ids::EventNid;
use crate::store::state_groups;
use crate::store::timeline;
use crate::store::Db;

/// A stored event in the client format, with `unsigned` (age, transaction_id for the sending device,
/// redacted_because, prev_content for state events).
pub fn event(
    conn: Db<'_>,
    row: &EventRow,
    room_id: &str,
    viewer_device: Option<(&str, &str)>,
    with_room_id: bool,
) -> Result<Value> {
    let mut unsigned = serde_json::Map::new();
    unsigned.insert("age".into(), json!(now_ms().saturating_sub(row.origin_server_ts).max(0)));
    if let (Some((user, device)), Some(txn_dev), Some(txn)) = (viewer_device, &row.txn_device, &row.txn_id) {
        if row.sender == user && txn_dev == device {
            unsigned.insert("transaction_id".into(), json!(txn));
        }
    }
    if let Some((user, _)) = viewer_device {
        unsigned.insert("membership".into(), json!(membership_at(conn, row, user)?));
    }
    if let Some(by) = &row.redacted_by {
        if let Some(r) = events::event_by_id(conn, by)? {
            unsigned.insert(
                "redacted_because".into(),
                client_event(&r.json, &r.event_id, room_id, json!({}), with_room_id),
            );
        }
    }
    if let Some(skn) = row.state_key_nid {
        // prev_content: the state this event replaced (clients render "changed their name" from it).
        if let Some(sg) = timeline::state_before(conn, row.event_nid)? {
            if let Some(prev_nid) = state_groups::lookup_state(conn, sg, skn)? {
                if let Some(prev) = events::event_by_nid(conn, prev_nid)? {
                    let v: Value = serde_json::from_str(&prev.json)?;
                    if let Some(c) = v.get("content") {
                        unsigned.insert("prev_content".into(), c.clone());
                        unsigned.insert("replaces_state".into(), json!(prev.event_id));
                        unsigned.insert("prev_sender".into(), json!(prev.sender));
                    }
                }
            }
        }
    }
    Ok(client_event(&row.json, &row.event_id, room_id, Value::Object(unsigned), with_room_id))
}

/// The viewer's membership in the room as of an event (the state after it, so one's own join reads `join`):
/// `unsigned.membership` (spec v1.11, MSC4115); `leave` when they had none.
fn membership_at(conn: Db<'_>, row: &EventRow, user_id: &str) -> Result<String> {
    let nid = match (row.sg_after, state_groups::find_state_key_nid(conn, "m.room.member", user_id)?) {
        (Some(sg), Some(skn)) => state_groups::lookup_state(conn, sg, skn)?,
        _ => None,
    };
    let Some(member) = nid.map(|n| events::event_by_nid(conn, n)).transpose()?.flatten() else {
        return Ok("leave".into());
    };
    let v: Value = serde_json::from_str(&member.json)?;
    Ok(v.pointer("/content/membership").and_then(Value::as_str).unwrap_or("leave").to_owned())
}

/// A state event in a state list: no `prev_content` lookup (that costs a state walk per event, and state lists
/// can hold 100k members), redaction shown as stored.
pub fn state_only(row: &EventRow, room_id: &str, with_room_id: bool) -> Value {
    let mut unsigned = serde_json::Map::new();
    unsigned.insert("age".into(), json!(now_ms().saturating_sub(row.origin_server_ts).max(0)));
    if let Some(by) = &row.redacted_by {
        unsigned.insert("redacted_because".into(), json!({"event_id": by}));
    }
    client_event(&row.json, &row.event_id, room_id, Value::Object(unsigned), with_room_id)
}

/// State events without timeline extras (for state lists).
pub fn state_event(conn: Db<'_>, nid: EventNid, room_id: &str, with_room_id: bool) -> Result<Option<Value>> {
    Ok(events::event_by_nid(conn, nid)?.map(|row| state_only(&row, room_id, with_room_id)))
}
