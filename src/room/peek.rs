//! Peeks of our rooms by other servers (MSC2444, resident side), as the room core sees them: who may peek, and
//! what an event changes for the peeking servers. The endpoints are `crate::federation_api::peek`; the table is
//! `crate::store::peeks`.

use crate::error::Result;
use crate::room::visibility::{history_visibility_in, HistoryVisibility};
use crate::room::Pdu;
use crate::store::accounts::now_ms;
use crate::store::ids::RoomNid;
use crate::store::rooms::{self, RoomRow};
use crate::store::{outbox, peeks, Db};

/// A room may be peeked while its current history visibility is `world_readable` (and we hold its full state).
pub fn peekable(conn: Db<'_>, room: &RoomRow) -> Result<bool> {
    match room.current_sg {
        Some(sg) if !room.partial_state => Ok(history_visibility_in(conn, sg)? == HistoryVisibility::WorldReadable),
        _ => Ok(false),
    }
}

/// After an event of another server was stored: the peeking servers get it too (the MSC's "relay all events"),
/// except its origin and the servers in the room, which have it from its sender; then [`end_if_hidden`].
pub fn relay_remote_event(conn: Db<'_>, room_nid: RoomNid, pdu: &Pdu, origin: &str, ours: &str) -> Result<()> {
    let mut dests = peeks::peeking_servers(conn, room_nid, now_ms())?;
    if !dests.is_empty() {
        let joined = crate::store::members::joined_servers(conn, room_nid)?;
        dests.retain(|d| d != origin && d != ours && d != pdu.sender.server_name().as_str() && !joined.contains(d));
        outbox::enqueue_pdu_to(conn, pdu.event_id.as_str(), &dests)?;
    }
    end_if_hidden(conn, room_nid)
}

/// Every peek of the room ends once its history is no longer world-readable (the event that changed it was
/// queued for the peekers first, so they learn why).
pub fn end_if_hidden(conn: Db<'_>, room_nid: RoomNid) -> Result<()> {
    if peeks::peeking_servers(conn, room_nid, 0)?.is_empty() {
        return Ok(()); // the common case: nobody peeks, nothing to read
    }
    let Some(room) = rooms::room_by_nid(conn, room_nid)? else { return Ok(()) };
    let Some(sg) = room.current_sg else { return Ok(()) };
    if history_visibility_in(conn, sg)? != HistoryVisibility::WorldReadable {
        let n = peeks::end_all_in(conn, room_nid)?;
        if n > 0 {
            tracing::info!(room_id = %room.room_id, peeks = n, "history no longer world-readable: peeks ended");
        }
    }
    Ok(())
}
