//! Jump to date (`/timestamp_to_event`): the event closest to a timestamp in one direction, among the events a
//! viewer may see, and whether our answer sits at an edge of the history we hold (a gap before it, or a room whose
//! state we hold only partially), where the servers in the room may know a closer event (Synapse's
//! `TimestampLookupHandler`).

use crate::error::{Error, Result};
use crate::store::events::{self, EventRow};
use crate::store::rooms::RoomRow;
use crate::store::{members, rooms, timeline, Db};

/// Candidates read per page while skipping events the viewer may not see.
const PAGE: i64 = 50;
/// Pages read at most (events hidden from the viewer beyond that many end the search: not found).
const MAX_PAGES: i64 = 20;

/// A local answer and whether it borders history we do not hold.
pub struct Found {
    pub row: EventRow,
    pub next_to_gap: bool,
}

/// `ts` and `dir` of a `/timestamp_to_event` request (client or federation): both required.
pub fn parse_query(q: &std::collections::HashMap<String, String>) -> Result<(i64, bool)> {
    let ts = q.get("ts").ok_or_else(|| Error::missing_param("ts is required"))?;
    let ts: i64 = ts.parse().map_err(|_| Error::invalid_param("ts must be an integer (milliseconds)"))?;
    let forward = match q.get("dir").map(String::as_str) {
        Some("f") => true,
        Some("b") => false,
        Some(_) => return Err(Error::invalid_param("dir must be f or b")),
        None => return Err(Error::missing_param("dir is required")),
    };
    Ok((ts, forward))
}

/// The closest event at or after (`forward`) or at or before `ts` that `visible` accepts (events at the same time
/// ordered topologically), and whether other servers should be asked for a closer one.
pub fn closest_local(
    conn: Db<'_>,
    room: &RoomRow,
    ts: i64,
    forward: bool,
    mut visible: impl FnMut(&EventRow) -> Result<bool>,
) -> Result<Option<Found>> {
    for page in 0..MAX_PAGES {
        let rows = timeline::by_timestamp(conn, room.room_nid, ts, forward, page * PAGE, PAGE)?;
        let last_page = (rows.len() as i64) < PAGE;
        for row in rows {
            if visible(&row)? {
                let next_to_gap = room.partial_state || next_to_gap(conn, &row)?;
                return Ok(Some(Found { row, next_to_gap }));
            }
        }
        if last_page {
            break;
        }
    }
    Ok(None)
}

/// Whether history we do not hold borders `row`: some of its `prev_events` are missing from our timeline (our
/// join's, a backfill frontier's, a gap's; Synapse's `is_event_next_to_backward_gap`). Looking forwards from before
/// our history began, the first event found is such an event too (our join), so one check serves both directions.
fn next_to_gap(conn: Db<'_>, row: &EventRow) -> Result<bool> {
    Ok(!events::prevs_missing_from_timeline(conn, row.event_nid)?.is_empty())
}

/// The servers to ask about a room's history, ours excluded: those with joined members (or, while our join is
/// partial, those the resident listed), in a stable order.
pub fn servers_to_ask(conn: Db<'_>, room: &RoomRow, ours: &str) -> Result<Vec<String>> {
    let mut servers = members::joined_servers(conn, room.room_nid)?;
    if room.partial_state {
        servers.extend(rooms::partial_state_servers(conn, room.room_nid)?);
    }
    servers.sort();
    servers.dedup();
    servers.retain(|s| s != ours);
    Ok(servers)
}

/// Whether a remote answer at `remote_ts` is closer to `ts` than our own (`local_ts`) in the direction searched, and
/// on the right side of `ts` at all.
pub fn remote_is_closer(ts: i64, forward: bool, remote_ts: i64, local_ts: Option<i64>) -> bool {
    if forward {
        remote_ts >= ts && local_ts.is_none_or(|l| remote_ts < l)
    } else {
        remote_ts <= ts && local_ts.is_none_or(|l| remote_ts > l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closer_remote_answers_win_only_on_the_right_side() {
        assert!(remote_is_closer(100, true, 150, None));
        assert!(remote_is_closer(100, true, 150, Some(200)));
        assert!(!remote_is_closer(100, true, 250, Some(200)));
        assert!(!remote_is_closer(100, true, 99, None), "before ts, looking forwards");
        assert!(remote_is_closer(100, false, 90, Some(50)));
        assert!(!remote_is_closer(100, false, 40, Some(50)));
        assert!(!remote_is_closer(100, false, 101, None), "after ts, looking backwards");
    }
}
