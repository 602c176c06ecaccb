//! Bulk import of a whole room whose events the caller vouches for (benchmark worlds, migrations): events go in
//! as timeline events in short chunks without per-event auth, then one full state group, the membership table
//! and the extremity are written at the end.

use std::collections::HashMap;

use ruma::{EventId, OwnedEventId, RoomId, ServerName};

use crate::error::{Error, Result};
use crate::room::Pdu;
use crate::store::events::{self, NewEvent};
use crate::store::ids::{RoomNid, StateGroup, StreamPos};
use crate::store::{members, notary, pushers, rooms, state_groups, Writer};

/// Creates the room row (or returns the existing one's nid).
pub fn ensure_room(w: &mut Writer<'_>, room_id: &RoomId, version: &str) -> Result<RoomNid> {
    match rooms::room_by_id(w.db(), room_id.as_str())? {
        Some(r) => Ok(r.room_nid),
        None => rooms::insert_room(w.db(), room_id.as_str(), version),
    }
}

/// Inserts a chunk of events in order (their prev/auth events earlier in the same or a previous chunk).
pub fn import_events(w: &mut Writer<'_>, room_nid: RoomNid, pdus: &[Pdu]) -> Result<usize> {
    for p in pdus {
        let stream = StreamPos(w.next_stream());
        let conn = w.db();
        let skn = match &p.state_key {
            Some(k) => Some(state_groups::state_key_nid(conn, &p.kind.to_string(), k)?),
            None => None,
        };
        let nid = events::insert_event(
            conn,
            &NewEvent {
                event_id: p.event_id.as_str(),
                room_nid,
                event_type: &p.kind.to_string(),
                state_key_nid: skn,
                sender: p.sender.as_str(),
                origin_server_ts: u64::from(p.origin_server_ts.get()) as i64,
                depth: p.depth,
                stream_ordering: Some(stream),
                outlier: false,
                rejected: None,
                soft_failed: false,
                txn: None,
                json: &p.canonical_string(),
            },
        )?;
        events::insert_edges(conn, nid, &p.prev_events.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        events::insert_auth_edges(conn, nid, &p.auth_events.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    }
    Ok(pdus.len())
}

/// Final step: the room's state (event ids of the current state) becomes one full group, used as the state
/// after every event from `timeline_from` on (the non-state tail after the last state event) and as current
/// state; `room_members` is filled and the last event becomes the forward extremity.
pub fn import_finish(
    w: &mut Writer<'_>,
    room_nid: RoomNid,
    state_event_ids: &[OwnedEventId],
    timeline_from: &EventId,
    last_event: &EventId,
) -> Result<StateGroup> {
    let conn = w.db();
    let mut map = HashMap::with_capacity(state_event_ids.len());
    let mut members = Vec::new();
    for id in state_event_ids {
        let (nid, skn, kind, json) = events::state_entry_by_id(conn, id.as_str())
            .ok()
            .flatten()
            .ok_or_else(|| Error::internal(format!("state event {id} not imported")))?;
        let skn = skn.ok_or_else(|| Error::internal(format!("{id} is not a state event")))?;
        map.insert(skn, nid);
        if kind == "m.room.member" {
            members.push((nid, json));
        }
    }
    let sg = crate::room::state::write_full(conn, room_nid, &map)?;
    let from = events::event_nid(conn, timeline_from.as_str())?
        .ok_or_else(|| Error::internal("timeline_from not imported"))?;
    events::set_sg_after_from(conn, room_nid, from, sg)?;
    rooms::set_current_sg(conn, room_nid, sg)?;
    let last =
        events::event_nid(conn, last_event.as_str())?.ok_or_else(|| Error::internal("last event not imported"))?;
    events::clear_extremities(conn, room_nid)?;
    events::replace_extremities(conn, room_nid, &[], last)?;
    // Imported history is no news: the push evaluator starts after it (else it would judge every imported event
    // for every local member; the history before `timeline_from` has no state group, which made each judgement
    // a scan of the room).
    if let Some(pos) = events::event_by_nid(conn, last)?.and_then(|r| r.stream_ordering) {
        if pushers::cursor(conn)? < pos {
            pushers::set_cursor(conn, pos)?;
        }
    }
    for (nid, json) in members {
        let v: serde_json::Value = serde_json::from_str(&json)?;
        let user = v.get("state_key").and_then(|x| x.as_str()).unwrap_or_default();
        let content = v.get("content").cloned().unwrap_or_default();
        members::upsert_member(
            conn,
            &members::MemberUpdate {
                room_nid,
                user_id: user,
                membership: content.get("membership").and_then(|x| x.as_str()).unwrap_or("leave"),
                event_nid: nid,
                displayname: content.get("displayname").and_then(|x| x.as_str()),
                avatar_url: content.get("avatar_url").and_then(|x| x.as_str()),
            },
        )?;
    }
    Ok(sg)
}

/// Stores another server's self-signed key response for serving as a notary.
pub fn store_notary_key(w: &mut Writer<'_>, server_name: &ServerName, response: &str) -> Result<()> {
    notary::store_notary_key(w.db(), server_name.as_str(), response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{memory_db, write};

    fn pdu(id: &str, kind: &str, state_key: Option<&str>, depth: i64, prev: &[&str]) -> Pdu {
        let mut v = serde_json::json!({
            "room_id": "!r:x", "sender": "@a:x", "type": kind, "content": {"membership": "join", "body": "hi"},
            "origin_server_ts": 1, "depth": depth, "prev_events": prev, "auth_events": [],
            "hashes": {"sha256": "x"}, "signatures": {},
        });
        if let Some(k) = state_key {
            v["state_key"] = k.into();
        }
        let obj = serde_json::from_value(v).expect("canonical");
        let rules = crate::room::version::rules("12").expect("v12");
        Pdu::from_canonical(obj, EventId::parse(id).expect("id"), &rules).expect("pdu")
    }

    #[test]
    fn imported_history_is_behind_the_push_cursor() {
        let mut mem = memory_db();
        let mut stream = 0i64;
        let room_id = RoomId::parse("!r:x").expect("room id");
        let pdus = [
            pdu("$c", "m.room.create", Some(""), 1, &[]),
            pdu("$m", "m.room.member", Some("@a:x"), 2, &["$c"]),
            pdu("$t", "m.room.message", None, 3, &["$m"]),
        ];
        write(&mut mem, &mut stream, |w| {
            let room = ensure_room(w, &room_id, "12")?;
            import_events(w, room, &pdus)?;
            let state = [EventId::parse("$c").expect("id"), EventId::parse("$m").expect("id")];
            import_finish(w, room, &state, &state[1], &pdus[2].event_id)?;
            Ok(())
        })
        .expect("import");
        let last = events::event_by_id(mem.db(), "$t").expect("read").and_then(|r| r.stream_ordering);
        assert!(last.is_some());
        assert_eq!(Some(pushers::cursor(mem.db()).expect("cursor")), last, "no imported event is pushed");
    }
}
