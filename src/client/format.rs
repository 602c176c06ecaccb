//! Shaping stored events for clients.

use serde_json::{json, Value};

use crate::error::Result;
use crate::room::pdu::client_event;
use crate::store::accounts::now_ms;
use crate::store::events::{self, EventRow};
use crate::store::ids::EventNid;
use crate::store::timeline;
use crate::store::Db;
use crate::store::{relations, state_groups};

/// A stored event in the client format, with `unsigned` (age, transaction_id for the sending device,
/// redacted_because, prev_content for state events, and the bundled aggregations of its relations in
/// `m.relations`).
pub fn event(
    conn: Db<'_>,
    row: &EventRow,
    room_id: &str,
    viewer_device: Option<(&str, &str)>,
    with_room_id: bool,
) -> Result<Value> {
    event_bundled(conn, row, room_id, viewer_device, with_room_id, true)
}

/// [`event`], with the bundled aggregations only when `bundle` (the events inside a bundle carry no bundle of
/// their own beyond their edit, so a bundle never recurses).
fn event_bundled(
    conn: Db<'_>,
    row: &EventRow,
    room_id: &str,
    viewer_device: Option<(&str, &str)>,
    with_room_id: bool,
    bundle: bool,
) -> Result<Value> {
    let mut unsigned = serde_json::Map::new();
    if let Some(relations) = aggregations(conn, row, room_id, viewer_device, with_room_id, bundle)? {
        unsigned.insert("m.relations".into(), relations);
    }
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

/// The bundled aggregations of an event (spec: "Aggregations of child events"): `m.thread` (latest event, count,
/// whether the viewer took part), `m.replace` (the newest valid edit, whole) and `m.reference` (the ids of the
/// referencing events). With `threads` false only the edit is bundled. None when nothing relates to the event.
fn aggregations(
    conn: Db<'_>,
    row: &EventRow,
    room_id: &str,
    viewer_device: Option<(&str, &str)>,
    with_room_id: bool,
    threads: bool,
) -> Result<Option<Value>> {
    let counts = relations::counts(conn, &row.event_id)?;
    let mut out = serde_json::Map::new();
    // What is bundled is judged like any event the viewer is shown: a thread whose latest event, or an edit, they
    // may not see is left out (as Synapse filters the latest thread events for the client).
    let mut judge = viewer_device.map(|(user, _)| crate::room::visibility::ClientJudge::new(conn, user));
    let mut may_see = |e: &EventRow| -> Result<bool> {
        match judge.as_mut() {
            Some(j) => j.may_see(e),
            None => Ok(true),
        }
    };
    for (rel_type, count) in counts {
        match rel_type.as_str() {
            "m.thread" if threads => {
                let Some(latest) = relations::latest_in_thread(conn, &row.event_id)? else { continue };
                if !may_see(&latest)? {
                    continue;
                }
                let participated = match viewer_device {
                    Some((user, _)) => row.sender == user || relations::participated(conn, &row.event_id, user)?,
                    None => false,
                };
                let latest = event_bundled(conn, &latest, room_id, viewer_device, with_room_id, false)?;
                out.insert(
                    rel_type,
                    json!({"latest_event": latest, "count": count, "current_user_participated": participated}),
                );
            }
            "m.replace" if row.state_key_nid.is_none() => {
                let edit = relations::latest_edit(conn, &row.event_id, &row.sender, &row.event_type)?;
                let edit = match edit {
                    Some(e) if may_see(&e)? => Some(e),
                    _ => None,
                };
                if let Some(edit) = edit {
                    let age = now_ms().saturating_sub(edit.origin_server_ts).max(0);
                    let v = client_event(&edit.json, &edit.event_id, room_id, json!({"age": age}), with_room_id);
                    out.insert(rel_type, v);
                }
            }
            "m.reference" if threads => {
                let chunk: Vec<Value> =
                    relations::references(conn, &row.event_id)?.into_iter().map(|id| json!({"event_id": id})).collect();
                out.insert(rel_type, json!({"chunk": chunk}));
            }
            _ => {}
        }
    }
    Ok((!out.is_empty()).then_some(Value::Object(out)))
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
