//! Backfill: when `/messages` runs out of local history in a room joined over federation, fetch older events
//! from a server in the room and place them before our timeline (negative stream positions).

use ruma::RoomId;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::inbound::verify_batch;
use crate::federation::FedContext;
use crate::room::remote::persist_outlier;
use crate::store::ids::{StateGroup, StreamPos};
use crate::store::{events, members, rooms};

/// Fetches up to `limit` events older than our oldest timeline event. Returns how many were stored.
pub async fn backfill(s: &FedContext, room_id: &RoomId, limit: usize) -> Result<usize> {
    let Some(fed) = s.federation.as_ref() else { return Ok(0) };
    let rid = room_id.to_owned();
    let me = s.identity.server_name.to_string();
    let found = s
        .store
        .read(move |c| {
            let Some(room) = rooms::room_by_id(c, rid.as_str())? else { return Ok(None) };
            let oldest = events::oldest_timeline_event(c, room.room_nid).ok().flatten();
            let Some((nid, oldest_id)) = oldest else { return Ok(None) };
            // Do we lack any of its prev events in the timeline?
            let gaps = events::prevs_missing_from_timeline(c, nid)?;
            if gaps.is_empty() {
                return Ok(None);
            }
            let mut servers = members::joined_servers(c, room.room_nid)?;
            // While partial, the member list is incomplete: the servers send_join told us about count too.
            servers.extend(rooms::partial_state_servers(c, room.room_nid)?);
            servers.sort();
            servers.dedup();
            servers.retain(|x| *x != me);
            Ok(Some((room.version, oldest_id, servers)))
        })
        .await?;
    let Some((version, oldest_id, servers)) = found else { return Ok(0) };
    for server in servers {
        let path = format!(
            "/_matrix/federation/v1/backfill/{}?v={}&limit={}",
            enc(room_id.as_str()),
            enc(&oldest_id),
            limit.clamp(1, 100)
        );
        let answer = match fed.client.get(&server, &path).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(%server, error = %e, "backfill failed");
                continue;
            }
        };
        let raw = answer.get("pdus").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut pdus: Vec<crate::room::Pdu> = verify_batch(s, &version, raw)
            .await?
            .into_iter()
            .filter_map(|r| r.ok())
            .filter(|p| p.room_id == room_id)
            .collect();
        // Newest first: each gets the next lower stream position.
        pdus.sort_by_key(|p| std::cmp::Reverse(p.depth));
        let rid = room_id.to_owned();
        let stored = s
            .store
            .write(move |w| {
                let room = rooms::room_by_id(w.db(), rid.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
                let mut next = events::lowest_stream_ordering(w.db())?.0;
                let mut n = 0;
                let rules = crate::room::version::rules(&room.version)?;
                for p in &pdus {
                    if let Some(row) = events::event_by_id(w.db(), p.event_id.as_str())? {
                        if row.stream_ordering.is_some() {
                            continue;
                        }
                    }
                    let nid = persist_outlier(w.db(), &room, p)?;
                    // In the timeline now: its prev edges (outliers have none) tell the next backfill where the
                    // history continues.
                    let prevs: Vec<String> = p.prev_events.iter().map(|e| e.to_string()).collect();
                    events::insert_edges(w.db(), nid, &prevs)?;
                    next -= 1;
                    // Auth of history is checked against the events' own auth events (we lack the state there).
                    let rejected = crate::room::remote::authorize_partial(
                        w.db(),
                        &rules,
                        p,
                        room.current_sg.unwrap_or(StateGroup(0)),
                    )
                    .err();
                    events::set_backfilled(w.db(), nid, StreamPos(next), rejected.as_deref())?;
                    n += 1;
                }
                let ids: Vec<String> = pdus.iter().map(|p| p.event_id.to_string()).collect();
                crate::room::append::apply_backfilled_redactions(w.db(), &room, &rules, &ids)?;
                Ok(n)
            })
            .await?;
        tracing::info!(%room_id, %server, stored, "backfilled");
        return Ok(stored);
    }
    Ok(0)
}
